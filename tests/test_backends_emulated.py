"""Vendor adapters against CPU emulators of their libraries' documented APIs (conformance/emulators).

The conformance suite (``pytest conformance --backend X --emulated``, in ``make test``) runs every
op through the adapters at its own shapes; its DSA cases are too small for any vendor kernel, so the
DSA adapters are exercised here at documented shapes (576/512 latent, 64/128 heads, indexer 32 x 128,
blocks of 16). Each test compares the plan's answer with the generic op and asserts from the call
counts that the native adapter served it, so a missing argument, a wrong layout or a wrong lse base
fails here. Also: the emulators' signatures against stubs recorded from the real torch-npu wheel,
and the emulators' own documented checks.
"""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwlayer
from conformance import emulators
from conformance.emulators import flash_mla as fm_emulator
from conformance.emulators import torch_npu as npu_emulator
from conformance.emulators._common import VendorCheckError
from hwlayer import ops

STUBS = Path(emulators.__file__).parent / "stubs"


@pytest.fixture
def emulate():
    """``plan = emulate("ascend")``: the backend's traced plan over its emulated libraries."""

    def start(backend: str, **overrides):
        emulators.activate(backend, overrides or None)
        return hwlayer.plan(backend, trace=True)

    yield start
    emulators.deactivate()


def native_calls(plan, op: str) -> tuple[int, int]:
    counts = plan.call_counts()
    return counts.get((op, "native"), 0), sum(n for (o, t), n in counts.items() if o == op and t != "native")


def served_natively(plan, op: str) -> bool:
    native, other = native_calls(plan, op)
    return native > 0 and other == 0


def paged(gen: torch.Generator, q_lens: list[int], seq_lens: list[int], bs: int, width: int, dtype: torch.dtype):
    """A varlen batch over a shuffled paged cache: (cache, block_table int32, cu_seqlens int32, seq_lens int32)."""
    blocks = [-(-L // bs) for L in seq_lens]
    nb = sum(blocks) + 2
    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[at:at + n]
        at += n
    cache = torch.randn(nb, bs, width, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return cache, table, cu, torch.tensor(seq_lens, dtype=torch.int32)


def sparse_indices(gen: torch.Generator, q_lens: list[int], seq_lens: list[int], K: int) -> torch.Tensor:
    rows = []
    for n, L in zip(q_lens, seq_lens, strict=True):
        for i in range(n):
            pos = L - n + i
            take = min(K - 3, pos + 1)
            row = torch.randperm(pos + 1, generator=gen)[:take].tolist() + [-1] * (K - take)
            rows.append([row[j] for j in torch.randperm(K, generator=gen).tolist()])
    rows[0] = [-1] * K  # a token with no valid index: out 0, lse -inf
    return torch.tensor(rows, dtype=torch.int32)


def mla_case(H: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [3, 2], [40, 70]
    kv, table, cu, lens = paged(gen, q_lens, seq_lens, 16, 576, torch.bfloat16)
    q = (torch.randn(sum(q_lens), H, 576, generator=gen) * 0.5).to(torch.bfloat16)
    return q, kv, sparse_indices(gen, q_lens, seq_lens, 24), table, cu, lens


def check_mla(plan, H: int) -> None:
    q, kv, idx, table, cu, lens = mla_case(H)
    out, lse = plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    want_out, want_lse = ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=2e-3)  # natural log, -inf for the empty row
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    assert served_natively(plan, "sparse_mla_attention"), plan.call_counts()


def indexer_case(dtype: torch.dtype, heads: int = 32, scale_q: float = 1.0, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    q_lens, seq_lens = [6, 1, 2], [6, 50, 90]
    k, table, cu, lens = paged(gen, q_lens, seq_lens, 16, 128, dtype)
    spread = torch.logspace(-1, 1, heads)[None, :, None]  # heads of different magnitude, as after training
    q = (torch.randn(sum(q_lens), heads, 128, generator=gen) * spread * scale_q).to(dtype)
    w = torch.randn(sum(q_lens), heads, generator=gen) * heads**-0.5
    return q, w, k, table, cu, lens, 16, 128**-0.5


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    hits = total = 0
    for g, w in zip(got.tolist(), want.tolist(), strict=True):
        w_set = {p for p in w if p >= 0}
        hits += len(w_set & {p for p in g if p >= 0})
        total += len(w_set)
    return hits / max(total, 1)


# ---------------------------------------------------------------------------------------------
# The switch: test-only, complete, and gone afterwards


def test_emulation_switch_is_test_only_and_leaves_nothing_behind():
    with pytest.raises(hwlayer.BackendError, match="torch_npu is not installed"):
        hwlayer.select_backend("ascend")
    with emulators.emulation("ascend"):
        backend = hwlayer.select_backend("ascend")
        assert backend.device_type == "cpu" and backend.verified.startswith("emulated from docs, not hardware")
        assert backend.availability().reason.startswith("EMULATED")
        assert importlib.util.find_spec("torch_npu") is not None
    assert "torch_npu" not in sys.modules and "hwlayer_emulation" not in sys.modules
    assert hwlayer.registry().backends["ascend"].device_type == "npu"
    with pytest.raises(hwlayer.BackendError):
        hwlayer.select_backend("ascend")


def test_import_mcoplib_alone_registers_no_torch_ops_c(emulate):
    emulate("metax")
    importlib.import_module("mcoplib")
    assert not hasattr(torch.ops._C, "rms_norm")  # as mcoplib/__init__.py: only mcoplib._C registers
    importlib.import_module("mcoplib._C")
    assert hasattr(torch.ops._C, "rms_norm")


# ---------------------------------------------------------------------------------------------
# Signatures: emulators vs stubs recorded from the real torch-npu 2.14.0 wheel

# Where the wheel's own text is not a usable signature, with the reason.
STUB_EXCEPTIONS = {
    # The 2.14.0 docstring writes "int[]? tuning_config" with no default; op-plugin's current doc
    # (517f2e7d0f20, torch_npu-npu_grouped_matmul.md) has tuning_config=None.
    ("npu_grouped_matmul", "tuning_config"): "default",
}


@pytest.mark.parametrize("op", sorted(json.loads((STUBS / "torch_npu-2.14.0.json").read_text())["ops"]))
def test_torch_npu_emulator_signature_matches_the_recorded_wheel_stub(op):
    stub = json.loads((STUBS / "torch_npu-2.14.0.json").read_text())["ops"][op]
    params = list(inspect.signature(getattr(npu_emulator, op)).parameters.values())
    assert [p.name for p in params] == [s["name"] for s in stub["params"]]
    for p, s in zip(params, stub["params"], strict=True):
        if STUB_EXCEPTIONS.get((op, p.name)) != "default":
            want = inspect.Parameter.empty if s["default"] == "<required>" else s["default"]
            assert p.default == want, f"{op}({p.name}): default {p.default!r}, wheel {want!r}"
        if stub["kinds_recorded"]:  # the wheel text marks keyword-only parameters with '*'
            assert (p.kind is inspect.Parameter.KEYWORD_ONLY) == s["kwonly"], f"{op}({p.name}) keyword-only"


def _source_stub_cases() -> list[tuple[str, str, str]]:
    """(stub file, function, emulator attribute path) for the stubs recorded from vendor git sources."""
    return [
        ("flash_mla-9241ae3", "flash_mla_sparse_fwd", "flash_mla.flash_mla_sparse_fwd"),
        ("flash_mla-before-082094b", "flash_mla_sparse_fwd", "flash_mla._legacy_flash_mla_sparse_fwd"),
        ("mcFlashMLA-c2dbf6e", "flash_mla_sparse_fwd", "flash_mla._maca_flash_mla_sparse_fwd"),
        ("DeepGEMM-54e2261", "fp8_mqa_logits", "deep_gemm.fp8_mqa_logits"),
        ("DeepGEMM-54e2261", "fp8_paged_mqa_logits", "deep_gemm.fp8_paged_mqa_logits"),
        ("DeepGEMM-54e2261", "get_paged_mqa_logits_metadata", "deep_gemm.get_paged_mqa_logits_metadata"),
        ("vLLM-metax-3aadf08-deep_gemm", "bf16_mqa_logits", "deep_gemm.bf16_mqa_logits"),
        ("mate-3f58cc3-moe_fused_gate", "moe_fused_gate", "mate.moe_fused_gate"),
        ("mate-3f58cc3-flashmla", "flash_mla_sparse_fwd", "mate.flash_mla_sparse_fwd"),
        ("mate-3f58cc3-deep_gemm", "fp8_mqa_logits", "mate.fp8_mqa_logits"),
        ("mate-3f58cc3-deep_gemm", "fp8_paged_mqa_logits", "mate.fp8_paged_mqa_logits"),
        ("mate-3f58cc3-deep_gemm", "get_paged_mqa_logits_metadata", "mate.get_paged_mqa_logits_metadata"),
        ("mate-3f58cc3-deep_gemm", "m_grouped_bf16_gemm_nt_contiguous", "mate.m_grouped_bf16_gemm_nt_contiguous"),
        ("mate-3f58cc3-gemm", "ragged_m_moe_gemm_16bit", "mate.ragged_m_moe_gemm_16bit"),
        ("ixformer-sdk-87a19d2-moe", "moe_grouped_topk", "ixformer.moe_grouped_topk"),
    ]


@pytest.mark.parametrize(("stub_file", "function", "emulator"), _source_stub_cases())
def test_emulator_signature_matches_the_vendor_source(stub_file, function, emulator):
    stub = json.loads((STUBS / f"{stub_file}.json").read_text())["ops"][function]
    module, attr = emulator.rsplit(".", 1)
    fn = getattr(importlib.import_module(f"conformance.emulators.{module}"), attr)
    params = list(inspect.signature(fn).parameters.values())
    assert [(p.name, p.kind is inspect.Parameter.KEYWORD_ONLY) for p in params] == [
        (s["name"], s["kwonly"]) for s in stub["params"]]
    for p, s in zip(params, stub["params"], strict=True):
        want = inspect.Parameter.empty if s["default"] == "<required>" else s["default"]
        assert p.default == want, f"{function}({p.name}): default {p.default!r}, source {want!r}"


def test_required_arguments_are_required_as_in_the_vendor_sources():
    from conformance.emulators import mate, torch_mlu_ops

    x = torch.randn(4, 32)
    with pytest.raises(TypeError, match="renormalize"):  # mate/moe_fused_gate.py: no default
        mate.moe_fused_gate(x, torch.zeros(32), 1, 1, 2, num_fused_shared_experts=0, routed_scaling_factor=1.0,
                            apply_routed_scaling_factor_on_output=True)
    with pytest.raises(TypeError, match="max_in_group_list"):  # torch_mlu_ops _ops.py group_gemm
        torch_mlu_ops.group_gemm(x, torch.randn(2, 8, 32), torch.tensor([2, 2], dtype=torch.int32), None, None, None,
                                 None)
    with pytest.raises(TypeError):  # npu_sparse_flash_attention: options are keyword-only
        npu_emulator.npu_sparse_flash_attention(x, x, x, x, 1.0, None)


def test_emulators_raise_where_the_docs_say_the_op_fails():
    q, kv, idx, *_ = mla_case(32)
    with pytest.raises(VendorCheckError, match="Unsupported h_q: 32"):  # csrc/api/sparse_fwd.h
        fm_emulator.flash_mla_sparse_fwd(q, kv.view(-1, 1, 576), idx.unsqueeze(1), 0.1)
    x = torch.randn(4, 16).t()
    with pytest.raises(VendorCheckError, match="non-contiguous"):  # npu_swiglu doc
        npu_emulator.npu_swiglu(x)
    with pytest.raises(VendorCheckError, match="gamma dtype"):  # npu_add_rms_norm doc: gamma dtype = x1's
        npu_emulator.npu_add_rms_norm(torch.randn(2, 8).bfloat16(), torch.randn(2, 8).bfloat16(), torch.ones(8), 1e-6)


# ---------------------------------------------------------------------------------------------
# Ascend


def test_ascend_dsa_adapters_at_documented_shapes(emulate):
    plan = emulate("ascend")
    # The Ascend layout (hook specs 2.0): nope / rope caches apart, handed to the kernel as they are.
    q, kv, idx, table, cu, lens = mla_case(8)  # N1 in {1, 2, 4, ..., 128}
    paged = plan.backend.layout().latent_cache(kv.shape[0], 16, 512, 64, kv.dtype, kv.device)
    paged.write(torch.arange(kv.shape[0] * 16), kv.view(-1, 576))
    out = plan.sparse_mla_attention(q, paged, idx, table, cu, lens, 0.05, 512)
    want = ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512)
    torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)
    assert served_natively(plan, "sparse_mla_attention"), plan.call_counts()
    # An lse asked for: the kernel has none with a paged cache, so generic serves (no second pass).
    _, lse = plan.sparse_mla_attention(q, paged, idx, table, cu, lens, 0.05, 512, return_lse=True)
    torch.testing.assert_close(lse, ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512,
                                                             return_lse=True)[1], atol=2e-3, rtol=2e-3)
    assert native_calls(plan, "sparse_mla_attention") == (1, 1)
    q, *rest = mla_case(6)
    paged6 = plan.backend.layout().latent_cache(rest[0].shape[0], 16, 512, 64, kv.dtype, kv.device)
    plan.sparse_mla_attention(q, paged6, *rest[1:], 0.05, 512)
    assert native_calls(plan, "sparse_mla_attention")[1] == 2  # 6 heads: declined, generic served
    assert "1/2/4" in hwlayer.backends.ascend.adapters.sparse_mla_attention_supports(q, paged6, *rest[1:], 0.05, 512)

    args = indexer_case(torch.bfloat16)
    got = plan.lightning_indexer(*args)
    assert recall(got, ops.lightning_indexer(*args)) == 1.0
    assert served_natively(plan, "lightning_indexer")


def test_ascend_sfa_rejects_return_softmax_lse_with_a_paged_cache():
    q = torch.zeros(2, 8, 512, dtype=torch.bfloat16)
    cache = torch.zeros(3, 16, 1, 512, dtype=torch.bfloat16)
    with pytest.raises(VendorCheckError, match="return_softmax_lse"):
        npu_emulator.npu_sparse_flash_attention(
            q, cache, cache, torch.zeros(2, 1, 4, dtype=torch.int32), 0.1, layout_query="TND", layout_kv="PA_BSND",
            attention_mode=2, return_softmax_lse=True)


def test_ascend_moe_and_norm_adapters(emulate):
    plan = emulate("ascend")
    gen = torch.Generator().manual_seed(2)
    # moe_permute through npu_moe_init_routing_v2 (dropped ids included): the contract's T*k layout,
    # kept rows first, dropped rows last with order -1 (their x rows may hold anything)
    ids = torch.randint(0, 8, (10, 3), generator=gen, dtype=torch.int32)
    ids[2, 1], ids[5, 0] = -1, 9
    x = torch.randn(10, 16, generator=gen).bfloat16()
    (gx, gsizes, gorder), (wx, wsizes, worder) = plan.moe_permute(x, ids, 8), ops.moe_permute(x, ids, 8)
    assert torch.equal(gsizes, wsizes) and torch.equal(gorder, worder) and int((gorder == -1).sum()) == 2
    assert gx.shape == wx.shape and torch.equal(gx[:28], wx[:28])
    # unpermute through npu_moe_token_unpermute (bf16): every assignment kept, and with the two dropped
    # rows holding NaN, which must not reach the output
    w = torch.rand(10, 3, generator=gen)
    y = torch.randn(30, 16, generator=gen).bfloat16()
    y[28:] = float("nan")
    torch.testing.assert_close(plan.moe_unpermute(y, gorder, w, 10).float(),
                               ops.moe_unpermute(y, worder, w, 10).float(), atol=2e-2, rtol=2e-2)
    ids = torch.randint(0, 8, (10, 3), generator=gen, dtype=torch.int32)
    _, _, order = ops.moe_permute(x, ids, 8)
    y = torch.randn(30, 16, generator=gen).bfloat16()
    torch.testing.assert_close(plan.moe_unpermute(y, order, w, 10).float(), ops.moe_unpermute(y, order, w, 10).float(),
                               atol=2e-2, rtol=2e-2)
    assert served_natively(plan, "moe_permute") and served_natively(plan, "moe_unpermute")
    # rms_norm: an fp32 weight with bf16 input goes to the op as is (never rounded to bf16)
    xb, wf = torch.randn(4, 64, generator=gen).bfloat16(), torch.rand(64, generator=gen) + 0.5
    torch.testing.assert_close(plan.rms_norm(xb, wf, 1e-6), ops.rms_norm(xb, wf, 1e-6), atol=0, rtol=0)
    r = torch.randn(4, 64, generator=gen).bfloat16()
    for g, wnt in zip(plan.rms_norm(xb, wf, 1e-6, r), ops.rms_norm(xb, wf, 1e-6, r), strict=True):
        torch.testing.assert_close(g, wnt, atol=0, rtol=0)
    assert served_natively(plan, "rms_norm")


# ---------------------------------------------------------------------------------------------
# CUDA family: FlashMLA (current / legacy / MACA), DeepGEMM, mcoplib._C, lightop


@pytest.mark.parametrize("H", [16, 64, 128])
def test_flash_mla_current_api_natural_lse_and_heads(emulate, H):
    check_mla(emulate("cuda"), H)


def test_flash_mla_more_than_128_heads_declines(emulate):
    emulate("cuda")
    q, *rest = mla_case(130)
    why = hwlayer.backends.cuda.native.flash_mla_sparse_supports(q, *rest, 0.05, 512)
    assert "64 or 128" in why


def test_flash_mla_legacy_api_base2_lse_is_converted(emulate):
    check_mla(emulate("cuda", flash_mla=fm_emulator.install_legacy), 16)


def test_metax_maca_flash_mla_and_bf16_indexer(emulate):
    plan = emulate("metax")
    check_mla(plan, 64)
    args = indexer_case(torch.bfloat16)
    assert recall(plan.lightning_indexer(*args), ops.lightning_indexer(*args)) == 1.0  # lossless, no opt-in
    assert served_natively(plan, "lightning_indexer")
    fp32_args = indexer_case(torch.float32)
    assert "HWLAYER_FP8_INDEXER" in hwlayer.backends.cuda.native.deep_gemm_indexer_supports(*fp32_args)


def test_deep_gemm_fp8_indexer_opt_in(emulate, monkeypatch):
    plan = emulate("cuda")
    supports = hwlayer.backends.cuda.native.deep_gemm_indexer_supports
    args = indexer_case(torch.bfloat16)
    assert "HWLAYER_FP8_INDEXER" in supports(*args)
    assert plan.backend.layout().canonical  # no FP8 cache unless opted in
    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    # a bf16 cache is not scored in FP8 (every key would be gathered and re-quantized per call)
    assert "FP8 paged indexer cache" in supports(*args)
    layout = plan.backend.layout()
    assert layout.name == "deepgemm-fp8-indexer" and not layout.canonical
    gen = torch.Generator().manual_seed(4)
    dense, table, cu, lens = paged(gen, [6, 1, 2], [6, 50, 90], 64, 128, torch.bfloat16)
    q, w = args[0], args[1]
    kc = layout.indexer_cache(*dense.shape, torch.bfloat16, dense.device)
    kc.write(torch.arange(dense.shape[0] * 64), dense.view(-1, 128))
    # FP8 scoring: near, not exact; dropping q's per-row scale from the weights drops below
    got = plan.lightning_indexer(q, w, kc, table, cu, lens, 16, 128**-0.5)
    assert recall(got, ops.lightning_indexer(q, w, dense, table, cu, lens, 16, 128**-0.5)) >= 0.95
    assert served_natively(plan, "lightning_indexer")
    small = layout.indexer_cache(dense.shape[0] * 4, 16, 128, torch.bfloat16, dense.device)  # blocks of 16
    assert "blocks of (64,)" in supports(q, w, small, *args[3:])


def test_hygon_lightop_width_limit_and_both_paths(emulate):
    plan = emulate("hygon")
    w = torch.rand(64) + 0.5
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(plan.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6))
    for g, want in zip(plan.rms_norm(x, w, 1e-6, r), ops.rms_norm(x, w, 1e-6, r), strict=True):
        torch.testing.assert_close(g, want)
    assert served_natively(plan, "rms_norm")
    narrow = torch.randn(3, 32)
    assert "under 64" in hwlayer.backends.cuda.native.lightop_rms_norm_supports(narrow, torch.ones(32), 1e-6)


# ---------------------------------------------------------------------------------------------
# Cambricon and Moore Threads


def test_cambricon_routing_and_group_gemm(emulate):
    plan = emulate("cambricon")
    from hwlayer_cambricon import adapters

    gen = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(7, 64, generator=gen), torch.randn(64, generator=gen) * 0.1
    for args in ((bias, 6, 8, 3, True, 2.5), (bias, 6, 1, 1, False, 1.0)):
        gw, gi = plan.moe_route(logits, *args)
        ww, wi = ops.moe_route(logits, *args)
        assert torch.equal(gi.sort(-1).values, wi.sort(-1).values)
        torch.testing.assert_close(gw.gather(1, gi.argsort(-1)), ww.gather(1, wi.argsort(-1)), atol=1e-5, rtol=1e-5)
    assert served_natively(plan, "moe_route")
    assert "top-2" in adapters.supports_moe_route(logits, None, 6, 8, 3, True, 1.0)  # no bias: tmo ranks by max
    x, w = torch.randn(9, 16, generator=gen), torch.randn(3, 8, 16, generator=gen)
    sizes = torch.tensor([4, 0, 5])
    torch.testing.assert_close(plan.grouped_gemm(x, w, sizes), ops.grouped_gemm(x, w, sizes), atol=1e-5, rtol=1e-5)
    assert served_natively(plan, "grouped_gemm")


@pytest.mark.parametrize("renormalize", [True, False])
def test_musa_glm5_routing_goes_native(emulate, renormalize):
    plan = emulate("musa")
    gen = torch.Generator().manual_seed(4)
    logits, bias = torch.randn(5, 256, generator=gen), torch.randn(256, generator=gen) * 0.05
    got_w, got_i = plan.moe_route(logits, bias, 8, 1, 1, renormalize, 2.5)  # GLM-5: 256 experts, one group
    want_w, want_i = ops.moe_route(logits, bias, 8, 1, 1, renormalize, 2.5)
    assert torch.equal(got_i.sort(-1).values, want_i.sort(-1).values)
    torch.testing.assert_close(got_w.sum(-1), want_w.sum(-1), atol=1e-5, rtol=1e-5)
    assert served_natively(plan, "moe_route")


def fp8_layout_case(plan, dtype: torch.dtype, heads: int = 32, scale_q: float = 1.0):
    """``indexer_case`` over the backend layout's FP8 paged indexer cache (blocks of 64): ``(args with that
    cache, the same args with the dense cache)``."""
    q, w, *_ = indexer_case(dtype, heads=heads, scale_q=scale_q)
    dense, table, cu, lens = paged(torch.Generator().manual_seed(4), [6, 1, 2], [6, 50, 90], 64, 128, dtype)
    kc = plan.backend.layout().indexer_cache(*dense.shape, dtype, dense.device)
    kc.write(torch.arange(dense.shape[0] * 64), dense.view(-1, 128))
    rest = (table, cu, lens, 16, 128**-0.5)
    return (q, w, kc, *rest), (q, w, dense, *rest)


def test_musa_fp8_indexer_scales_queries_and_flashmla_pads_heads(emulate, monkeypatch):
    plan = emulate("musa")
    assert plan.backend.layout().canonical  # no FP8 cache unless opted in
    monkeypatch.setenv("HWLAYER_MUSA_FP8_INDEXER", "1")
    assert plan.backend.layout().name == "mate-fp8-indexer"
    args, dense_args = fp8_layout_case(plan, torch.float32, scale_q=2000.0)  # beyond e4m3's 448: a bare cast saturates
    assert recall(plan.lightning_indexer(*args), ops.lightning_indexer(*dense_args)) >= 0.95
    assert served_natively(plan, "lightning_indexer")
    check_mla(plan, 16)


def test_musa_mqa_logits_head_limits_are_checked_in_supports(emulate, monkeypatch):
    """mate's fp8_mqa_logits takes 32 or 64 heads of dim 32/64/128 (mate 3f58cc3 csrc/deepgemm_attention.mu):
    other shapes decline in supports() instead of raising inside the kernel."""
    from hwlayer_musa import adapters

    plan = emulate("musa")
    monkeypatch.setenv("HWLAYER_MUSA_FP8_INDEXER", "1")
    for heads in (8, 16, 128):
        assert "32, 64" in adapters.supports_lightning_indexer(*indexer_case(torch.float32, heads=heads))
    assert adapters.supports_lightning_indexer(*fp8_layout_case(plan, torch.float32, heads=64)[0]) is True
    # a dense cache is not scored in FP8 (every key would be gathered and re-quantized per call)
    assert "FP8 paged indexer cache" in adapters.supports_lightning_indexer(*indexer_case(torch.float32, heads=64))
    q, w, k, *rest = indexer_case(torch.float32, heads=32)
    assert "32, 64" in adapters.supports_lightning_indexer(q[..., :96].contiguous(), w, k[..., :96], *rest)
    from conformance.emulators import mate

    with pytest.raises(VendorCheckError, match="num_heads"):
        mate.fp8_mqa_logits(torch.zeros(2, 8, 128).to(torch.float8_e4m3fn),
                            (torch.zeros(3, 128).to(torch.float8_e4m3fn), torch.ones(3)), torch.ones(2, 8),
                            torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))


def test_emulated_conformance_fails_when_an_expected_adapter_never_serves():
    # hygon registers no rope adapter: declaring rope "expected native" must fail the session even
    # though every rope case passes (the generic op would have been compared with itself).
    args = ["-q", "-p", "no:cacheprovider", "conformance/test_rope.py", "conformance/test_norms.py",
            "--backend", "hygon", "--emulated", "--dtype", "fp32", "-k", "rope or model_widths"]
    code = ("import sys, pytest\n"
            "from conformance import emulators\n"
            "emulators.EXPECTED_NATIVE['hygon'] = ('rms_norm', 'rope')\n"
            f"sys.exit(pytest.main({args!r}))\n")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "never served a call: rope" in done.stdout
    assert " failed" not in done.stdout.splitlines()[-1]  # every case passed; the guard failed the run
