"""Native paths that are right, copy-free and sync-free (issue 20): one test per defect, each failing
on the code before the fix. Vendor facts are cited at the line the adapter or emulator follows.
"""

from __future__ import annotations

import importlib
import math
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

import hwlayer
from conformance import emulators
from conformance.emulators import flash_mla as fm
from conformance.emulators._common import VendorCheckError
from hwlayer import ops
from hwlayer.ops.layout import attention_metadata

HOST_READS = (DataDependentOutputException, DynamicOutputShapeException)


@pytest.fixture
def emulate():
    def start(backend: str, **overrides):
        emulators.activate(backend, overrides or None)
        return hwlayer.plan(backend, trace=True)

    yield start
    emulators.deactivate()


def layout_keys(plan, dense: torch.Tensor):
    """The backend layout's indexer cache holding ``dense`` (``[blocks, bs, Di]``) as its rows: the cache a
    model allocates (the cuda layout's FP8 paged cache when ``HWLAYER_FP8_INDEXER=1``)."""
    cache = plan.backend.layout().indexer_cache(*dense.shape, dense.dtype, dense.device)
    cache.write(torch.arange(dense.shape[0] * dense.shape[1]), dense.reshape(-1, dense.shape[-1]))
    return cache


def counts_of(plan, op: str) -> tuple[int, int]:
    c = plan.call_counts()
    return c.get((op, "native"), 0), sum(n for (o, t), n in c.items() if o == op and t != "native")


def decode_batch(H: int = 64, K: int = 2048, seed: int = 0):
    """Two decode rows at GLM-5 widths over a paged latent cache (blocks of 64), with the step's meta."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor([70, 130], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32)
    table = torch.tensor([[3, 0, 6], [1, 4, 2]], dtype=torch.int32)
    kv = (torch.randn(8, 64, 576, generator=gen) * 0.5).bfloat16()
    q = (torch.randn(2, H, 576, generator=gen) * 0.5).bfloat16()
    idx = torch.full((2, K), -1, dtype=torch.int32)
    idx[0, :70] = torch.randperm(70, generator=gen).to(torch.int32)
    idx[1, :130] = torch.randperm(130, generator=gen).to(torch.int32)
    positions = (lens - 1).long()
    meta = attention_metadata(cu, lens, table, positions, block_size=64, max_seqlen_k=192, has_padding=False)
    return q, kv, idx, table, cu, lens, meta


# ---- host reads (decode-graph capture) ----------------------------------------------------------


@pytest.mark.parametrize("backend", ["cuda", "metax", "musa"])
def test_dsa_adapters_read_nothing_on_the_host_in_decode(emulate, backend, monkeypatch):
    """``token_positions`` without ``num_tokens``, ``int(lens.sum())`` / ``repeat_interleave(lens)`` and
    ``bool(empty.any())`` in the old adapters each read the device: under FakeTensorMode they raise."""
    monkeypatch.setenv("HWLAYER_CHECK", "0")
    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    monkeypatch.setenv("HWLAYER_MUSA_FP8_INDEXER", "1")
    plan = emulate(backend)
    q, kv, idx, table, cu, lens, meta = decode_batch()
    gen = torch.Generator().manual_seed(1)
    qi = torch.randn(2, 32, 128, generator=gen).bfloat16()
    w = torch.randn(2, 32, generator=gen)
    kc = layout_keys(plan, torch.randn(8, 64, 128, generator=gen).bfloat16())
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, lse = plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, meta=meta, return_lse=True)
        picked = plan.lightning_indexer(qi, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta)
    assert out.shape == (2, 64, 512) and lse.shape == (2, 64) and picked.shape == (2, 2048)
    assert counts_of(plan, "sparse_mla_attention") == (1, 0) and counts_of(plan, "lightning_indexer") == (1, 0)
    # the same calls with real data, without meta: right answers (the meta path is not the only one)
    got, got_lse = plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    want, want_lse = ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    torch.testing.assert_close(got_lse, want_lse, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    picked = plan.lightning_indexer(qi, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192)
    ref = ops.lightning_indexer(qi, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192)
    assert [sorted(r) for r in picked.tolist()] == [sorted(r) for r in ref.tolist()]  # top-2048 >= context: all


# ---- MetaX mcFlashMLA: natural-log lse --------------------------------------------------------------


def test_maca_flash_mla_lse_is_natural_log_as_its_kernel_writes_it(emulate):
    """MetaX-MACA/mcFlashMLA c2dbf6e ``csrc/flash_kernel/feature/softmax.h:450``: ``lse = row_max *
    softmax_scale + __logf(sum)`` with sum = sum_j exp2((s_j - row_max) * softmax_scale * log2(e)), i.e.
    ``log(sum_j exp(s_j * scale))``: natural log, whatever the docstring's "2-based" says. A hand case:
    two keys with scores 1 and 2 (scale 1) give lse = log(e + e^2)."""
    q = torch.zeros(1, 64, 576, dtype=torch.bfloat16)
    q[0, :, 0] = 1.0
    kv = torch.zeros(4, 1, 576, dtype=torch.bfloat16)
    kv[1, 0, 0], kv[2, 0, 0] = 1.0, 2.0
    kv[1, 0, 1], kv[2, 0, 1] = 10.0, 20.0  # values (column 1 is inside d_v)
    idx = torch.tensor([[[1, 2, -1]]], dtype=torch.int32)  # a partial block: mcFlashMLA handles it
    out, _, lse = fm._maca_flash_mla_sparse_fwd(q, kv, idx, 1.0)
    expect = math.log(math.e + math.e**2)
    torch.testing.assert_close(lse, torch.full((1, 64), expect), atol=1e-5, rtol=1e-5)
    p2 = math.e**2 / (math.e + math.e**2)
    torch.testing.assert_close(out[0, 0, 1].float(), torch.tensor(10 * (1 - p2) + 20 * p2), atol=0.1, rtol=0.01)
    # and the metax adapter passes it through unscaled (it used to multiply by ln 2)
    plan = emulate("metax")
    q2, kv2, idx2, table, cu, lens, meta = decode_batch()
    _, got = plan.sparse_mla_attention(q2, kv2, idx2, table, cu, lens, 0.05, 512, meta=meta, return_lse=True)
    _, want = ops.sparse_mla_attention(q2, kv2, idx2, table, cu, lens, 0.05, 512, return_lse=True)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    assert counts_of(plan, "sparse_mla_attention") == (1, 0)


# ---- FlashMLA sparse: architecture, empty top-k, whole top-k blocks ------------------------------


@pytest.mark.parametrize(("capability", "ok"), [((9, 0), True), ((10, 0), True), ((10, 3), True), ((8, 9), False),
                                                ((12, 0), False)])
def test_flash_mla_sparse_checks_the_architecture_before_calling(emulate, capability, ok):
    """FlashMLA 9241ae3 ``csrc/api/sparse_fwd.h``: ``TORCH_CHECK(is_sm90a || is_sm100f, ...)``."""
    plan = emulate("cuda")
    sys.modules["hwlayer_emulation"].CUDA_CAPABILITY = capability
    q, kv, idx, table, cu, lens, meta = decode_batch()
    why = hwlayer.backends.cuda.native.flash_mla_sparse_supports(q, kv, idx, table, cu, lens, 0.05, 512)
    assert (why is True) if ok else ("sm90a or sm100f" in why)
    if not ok:
        with pytest.raises(VendorCheckError, match="SM90a and SM100f"):
            fm.flash_mla_sparse_fwd(q, kv.view(-1, 1, 576), idx.unsqueeze(1), 0.05)
        plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512)  # declined: generic serves
        assert counts_of(plan, "sparse_mla_attention") == (0, 1)


@pytest.mark.parametrize("backend", ["cuda", "metax", "musa"])
def test_an_empty_index_tensor_is_answered_without_the_kernel(emulate, backend):
    """FlashMLA asserts ``topk > 0``; a [T, 0] index tensor means nothing to attend: out 0, lse -inf."""
    plan = emulate(backend)
    q, kv, _, table, cu, lens, _ = decode_batch()
    idx = torch.zeros(2, 0, dtype=torch.int32)
    with pytest.raises(VendorCheckError, match="topk > 0"):
        fm.flash_mla_sparse_fwd(q, kv.view(-1, 1, 576), idx.unsqueeze(1), 0.05)
    out, lse = plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    assert not out.any() and torch.isneginf(lse).all()
    assert counts_of(plan, "sparse_mla_attention") == (1, 0)


def test_flash_mla_emulator_requires_whole_top_k_blocks_as_sm90_does():
    """FlashMLA 9241ae3 ``csrc/sm90/prefill/sparse/phase1.cuh``: ``KU_ASSERT(params.topk % (2*B_TOPK) == 0)``
    (B_TOPK 64). The emulator used to drop a partial last block silently; now it raises like the kernel."""
    q, kv, idx, *_ = decode_batch(K=200)
    flat = kv.view(-1, 1, 576)
    with pytest.raises(VendorCheckError, match="% 128"):
        fm.flash_mla_sparse_fwd(q, flat, idx.unsqueeze(1), 0.05)
    with pytest.raises(VendorCheckError, match="% 128"):
        fm.flash_mla_sparse_fwd(q, flat, idx[:, :64].unsqueeze(1).contiguous(), 0.05)
    out, _, lse = fm.flash_mla_sparse_fwd(q, flat, torch.nn.functional.pad(idx, (0, 56), value=-1).unsqueeze(1), 0.05)
    assert out.shape == (2, 64, 512) and torch.isfinite(lse).all()


def test_kunlunxin_selects_devices_with_xpu_visible_devices():
    """vLLM-Kunlun (baidu/vLLM-Kunlun 09869ee, docs and CI env) uses XPU_VISIBLE_DEVICES."""
    backend = hwlayer.registry().backends["kunlunxin"]
    assert backend.visible_devices_env == "XPU_VISIBLE_DEVICES"


# ---- Cambricon rope: no per-call table rebuild ----------------------------------------------------


def test_cambricon_rope_builds_no_table_per_call(emulate, monkeypatch):
    """``convert.rope_full_tables`` built fp32 ``[max_pos, D]`` cos/sin tables on every call; now the
    step's meta rows serve (nothing built), and without meta the tables are built once per cache."""
    from hwlayer_cambricon import convert

    plan = emulate("cambricon")
    calls = []
    full = convert.rope_full_tables
    monkeypatch.setattr(convert, "rope_full_tables", lambda *a: calls.append(1) or full(*a))
    gen = torch.Generator().manual_seed(5)
    D, T = 64, 5
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(4096).float(), inv)
    cache = torch.cat([freqs.cos(), freqs.sin()], -1)
    positions = torch.tensor([3, 9, 100, 4000, 7])
    cu, lens = torch.tensor([0, T], dtype=torch.int32), torch.tensor([4001], dtype=torch.int32)
    meta = attention_metadata(cu, lens, torch.arange(64, dtype=torch.int32).view(1, 64), positions, block_size=64,
                              max_seqlen_k=4096, cos_sin_cache=cache)
    for interleaved in (True, False):
        x = torch.randn(T, 4, D, generator=gen).bfloat16()
        want = ops.rope(x, positions, cache, interleaved)
        for _ in range(3):
            torch.testing.assert_close(plan.rope(x, positions, cache, interleaved, meta=meta), want)
        assert calls == []  # the meta rows served: no table at all
        for _ in range(3):
            torch.testing.assert_close(plan.rope(x, positions, cache, interleaved), want)
        assert len(calls) == 1  # built once for this cache and layout
        calls.clear()
    assert counts_of(plan, "rope") == (12, 0)


# ---- no per-call copy of a whole cache or weight stack --------------------------------------------


class LargestOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor an aten op allocates (views and in-place ops are skipped:
    they allocate nothing; so are the emulated vendor kernels, ``hwlayer_emu::*``: their outputs are the
    kernel's own business)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not str(func.name()).startswith("hwlayer_emu::") and not func.is_view and not func._schema.is_mutable:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.sizes.append((t.numel(), str(func)))
        return out


def assert_smaller_than(mode: LargestOutputs, *big: torch.Tensor) -> None:
    limit = min(t.numel() for t in big)
    offenders = [(n, op) for n, op in mode.sizes if n >= limit]
    assert not offenders, f"tensors of {limit}+ elements made per call: {offenders[:5]}"


@pytest.mark.parametrize("backend", ["cuda", "metax", "musa"])
def test_dsa_adapters_copy_no_whole_cache_per_call(emulate, backend, monkeypatch):
    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    monkeypatch.setenv("HWLAYER_MUSA_FP8_INDEXER", "1")
    plan = emulate(backend)
    q, kv, idx, table, cu, lens, meta = decode_batch()
    gen = torch.Generator().manual_seed(1)
    qi, w = torch.randn(2, 32, 128, generator=gen).bfloat16(), torch.randn(2, 32, generator=gen)
    dense = torch.randn(8, 64, 128, generator=gen).bfloat16()
    kc = layout_keys(plan, dense)
    with LargestOutputs() as mode:
        plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, meta=meta)
    assert_smaller_than(mode, kv)
    with LargestOutputs() as mode:
        plan.lightning_indexer(qi, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta)
    assert_smaller_than(mode, dense)
    assert counts_of(plan, "sparse_mla_attention") == (1, 0) and counts_of(plan, "lightning_indexer") == (1, 0)


# ---- the FP8 paged indexer cache (vLLM's design): quantized once when written, read in place -----------


def full_cache_decode(seed: int = 3):
    """Two decode rows whose sequences fill the whole indexer cache (6 blocks of 64, 128-wide keys), as a
    full captured decode batch does, with the step's meta (and the backend's tables)."""
    gen = torch.Generator().manual_seed(seed)
    lens, cu = torch.tensor([170, 192], dtype=torch.int32), torch.tensor([0, 1, 2], dtype=torch.int32)
    table = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)
    spread = torch.logspace(-1, 1, 32)[None, :, None]  # heads of different magnitude, as after training
    q = (torch.randn(2, 32, 128, generator=gen) * spread).bfloat16()
    w = torch.randn(2, 32, generator=gen) * 32**-0.5
    dense = torch.randn(6, 64, 128, generator=gen).bfloat16()
    return q, w, dense, table, cu, lens


@pytest.mark.parametrize("backend", ["cuda", "musa"])
def test_fp8_indexer_reads_the_fp8_paged_cache_without_a_per_call_key_buffer(emulate, backend, monkeypatch):
    """The old DeepGEMM and mate adapters gathered every sequence's keys ([B * max_seqlen_k, 128]: here
    the whole cache) and re-quantized them per call; the FP8 layout's cache is quantized when written and
    read in place by ``fp8_paged_mqa_logits``, with the kernel's tables built once per step."""
    from hwlayer.ops.cache import Fp8PagedKV
    from hwlayer.ops.layout import with_backend_tables

    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    monkeypatch.setenv("HWLAYER_MUSA_FP8_INDEXER", "1")
    plan = emulate(backend)
    layout = plan.backend.layout()
    q, w, dense, table, cu, lens = full_cache_decode()
    kc = layout.indexer_cache(6, 64, 128, torch.bfloat16, torch.device("cpu"))
    assert isinstance(kc, Fp8PagedKV) and not layout.canonical
    assert layout.bytes_per_token(512, 64, 128, torch.bfloat16) == 576 * 2 + 128 + 4  # bf16 latent + FP8 keys
    with LargestOutputs() as mode:  # the write quantizes the new rows only
        plan.kv_cache_write(kc, dense.view(-1, 128)[:2], torch.tensor([7, 300]))
    assert_smaller_than(mode, dense)
    kc.write(torch.arange(384), dense.view(-1, 128))
    meta = attention_metadata(cu, lens, table, (lens - 1).long(), block_size=64, max_seqlen_k=192, has_padding=False)
    meta = with_backend_tables(meta, layout, cu, lens, table)  # once per step: DeepGEMM's schedule included
    with LargestOutputs() as mode:
        got = plan.lightning_indexer(q, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta)
    assert_smaller_than(mode, dense)
    assert counts_of(plan, "lightning_indexer") == (1, 0)
    want = ops.lightning_indexer(q, w, dense, table, cu, lens, 2048, 128**-0.5, 1, 192)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]  # top-2048 >= context: all
    with FakeTensorMode(allow_non_fake_inputs=True):  # and nothing is read back, tables included
        meta = with_backend_tables(attention_metadata(cu, lens, table, (lens - 1).long(), block_size=64,
                                                      max_seqlen_k=192, has_padding=False), layout, cu, lens, table)
        assert plan.lightning_indexer(q, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta).shape == (2, 2048)


def count_calls(monkeypatch, module: str, *names: str) -> dict[str, int]:
    """Counts calls of ``names`` in the emulated vendor ``module`` (which kernel served)."""
    mod, calls = importlib.import_module(module), {}  # the emulated module (activated by ``emulate``)
    for name in names:
        fn = getattr(mod, name)
        calls[name] = 0

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(mod, name, counted)
    return calls


def test_metax_decode_scores_the_bf16_cache_in_place_without_a_per_call_key_buffer(emulate, monkeypatch):
    """The old MetaX adapter gathered every sequence's keys into one bf16 buffer ([B * max_seqlen_k, 128]:
    in a decode batch that fills the cache, the whole indexer cache) on every call. A decode step now
    scores the canonical bf16 cache in place with MACA ``bf16_paged_mqa_logits`` (vLLM-metax 6162d93
    ``customized/layers/sparse_attn_indexer/bf16.py``), with the schedule built once per step by the
    metax layout; nothing read back."""
    from hwlayer.ops.layout import with_backend_tables

    plan = emulate("metax")
    layout = plan.backend.layout()
    assert layout.canonical and layout.default_block_size == 64
    q, w, dense, table, cu, lens = full_cache_decode()
    kc = layout_keys(plan, dense)
    meta = attention_metadata(cu, lens, table, (lens - 1).long(), block_size=64, max_seqlen_k=192, has_padding=False)
    meta = with_backend_tables(meta, layout, cu, lens, table)  # once per step: the MACA schedule included
    assert meta.backend is not None and meta.backend.schedule is not None
    calls = count_calls(monkeypatch, "deep_gemm", "bf16_paged_mqa_logits", "bf16_mqa_logits",
                        "get_paged_mqa_logits_metadata")
    with LargestOutputs() as mode:
        got = plan.lightning_indexer(q, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta)
    assert_smaller_than(mode, dense)
    assert calls == {"bf16_paged_mqa_logits": 1, "bf16_mqa_logits": 0, "get_paged_mqa_logits_metadata": 0}
    assert counts_of(plan, "lightning_indexer") == (1, 0)
    want = ops.lightning_indexer(q, w, dense, table, cu, lens, 2048, 128**-0.5, 1, 192)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]  # top-2048 >= context: all
    with FakeTensorMode(allow_non_fake_inputs=True):  # and nothing is read back, tables included
        meta = with_backend_tables(attention_metadata(cu, lens, table, (lens - 1).long(), block_size=64,
                                                      max_seqlen_k=192, has_padding=False), layout, cu, lens, table)
        assert plan.lightning_indexer(q, w, kc, table, cu, lens, 2048, 128**-0.5, 1, 192, meta=meta).shape == (2, 2048)
    assert calls["bf16_paged_mqa_logits"] == 2 and calls["bf16_mqa_logits"] == 0


def test_metax_paged_decode_agrees_with_the_float64_reference_and_prefill_still_gathers(emulate, monkeypatch):
    """Decode rows through ``bf16_paged_mqa_logits`` choose the float64 golden top-k (bf16 inputs are exact
    in fp32 products; only fp32 summation order differs), and equal the generic op's choice; a prefill step
    (more query tokens than sequences) keeps vLLM-metax's gathered ``bf16_mqa_logits``."""
    from conformance import golden

    plan = emulate("metax")
    calls = count_calls(monkeypatch, "deep_gemm", "bf16_paged_mqa_logits", "bf16_mqa_logits")
    gen = torch.Generator().manual_seed(7)
    seq_lens, topk = [150, 100, 37], 32
    table = torch.tensor([[5, 1, 3], [2, 4, 0], [0, 0, 0]], dtype=torch.int32)
    cu, lens = torch.tensor([0, 1, 2, 3], dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)
    q = (torch.randn(3, 64, 128, generator=gen) * torch.logspace(-1, 1, 64)[None, :, None]).bfloat16()
    w = torch.randn(3, 64, generator=gen) * 64**-0.5
    dense = torch.randn(6, 64, 128, generator=gen).bfloat16()
    kc = layout_keys(plan, dense)
    got = plan.lightning_indexer(q, w, kc, table, cu, lens, topk, 128**-0.5, 1, 150)
    assert calls == {"bf16_paged_mqa_logits": 1, "bf16_mqa_logits": 0}
    scores = golden.indexer_scores(q, w, dense, table, cu.tolist(), seq_lens, 128**-0.5)  # float64, per token
    for row, s in zip(got.tolist(), scores, strict=True):
        n = min(topk, s.numel())
        chosen = sorted(i for i in row if i >= 0)
        assert chosen == sorted(torch.sort(s, descending=True).indices[:n].tolist()), row
    want = ops.lightning_indexer(q, w, dense, table, cu, lens, topk, 128**-0.5, 1, 150)
    assert [sorted(r) for r in got.tolist()] == [sorted(r) for r in want.tolist()]
    cu_p = torch.tensor([0, 40, 41, 42], dtype=torch.int32)  # a 40-token prefill chunk joins the step
    qp = (torch.randn(42, 64, 128, generator=gen)).bfloat16()
    wp = torch.randn(42, 64, generator=gen) * 64**-0.5
    lens_p = torch.tensor([40, 150, 100], dtype=torch.int32)
    got = plan.lightning_indexer(qp, wp, kc, table, cu_p, lens_p, topk, 128**-0.5, 40, 150)
    assert calls == {"bf16_paged_mqa_logits": 1, "bf16_mqa_logits": 1}
    want = ops.lightning_indexer(qp, wp, dense, table, cu_p, lens_p, topk, 128**-0.5, 40, 150)
    for g, r in zip(got.tolist(), want.tolist(), strict=True):  # fp32 vs the generic op's order: near-ties may swap
        assert len(set(g) & set(r)) >= len(set(r)) - 1, (g, r)


def fp8_score_error_bound(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """An upper bound (float64, per token) on |score_fp8 - score| over a token's keys, from e4m3 rounding of
    q (per token and head row) and of the keys (per row): round-to-nearest moves a normal value by at most
    2^-4 of itself and a subnormal by 2^-10 of the row's scale (amax / 448); relu is 1-Lipschitz, so
    ``|e| <= scale * sum_h |w_h| sum_d (dq (|k| + dk) + |q| dk)``."""
    def delta(x):
        amax = x.abs().amax(-1, keepdim=True).clamp(min=1e-4)
        return 2.0**-4 * x.abs() + amax / 448 * 2.0**-10

    q, keys = q.double(), keys.double()
    dq, dk = delta(q), delta(keys)  # [T, H, D], [N, D]
    per_key = torch.einsum("thd,nd->thn", dq, keys.abs() + dk) + torch.einsum("thd,nd->thn", q.abs(), dk)
    return (scale * (w.double().abs().unsqueeze(-1) * per_key).sum(1)).amax(-1)  # [T]


def test_fp8_paged_indexer_agrees_with_the_float64_reference_within_fp8_tolerance(emulate, monkeypatch):
    """Prefill and decode rows over the FP8 paged cache, checked as the conformance suite checks a top-k
    (conformance/checks.py ``topk``): every chosen key's float64 score within the FP8 error bound of the
    golden top-k's (twice the bound: one key's error up, the other's down), and recall >= 0.95."""
    from conformance import golden

    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    plan = emulate("cuda")
    gen = torch.Generator().manual_seed(5)
    seq_lens, topk = [40, 150, 100], 32  # query rows 40 (a prefill), 1 and 3
    table = torch.tensor([[0, 0, 0], [5, 1, 3], [2, 4, 0]], dtype=torch.int32)
    cu = torch.tensor([0, 40, 41, 44], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    spread = torch.logspace(-1, 1, 64)[None, :, None]
    q = (torch.randn(44, 64, 128, generator=gen) * spread).bfloat16()
    w = torch.randn(44, 64, generator=gen) * 64**-0.5
    dense = torch.randn(6, 64, 128, generator=gen).bfloat16()
    kc = layout_keys(plan, dense)
    got = plan.lightning_indexer(q, w, kc, table, cu, lens, topk, 128**-0.5, 40, 150)
    assert counts_of(plan, "lightning_indexer") == (1, 0)
    scores = golden.indexer_scores(q, w, dense, table, cu.tolist(), seq_lens, 128**-0.5)  # float64, per token
    seq_idx, _ = ops.token_positions(cu, lens)
    recalls = []
    for t, (row, s) in enumerate(zip(got.tolist(), scores, strict=True)):
        n = min(topk, s.numel())
        chosen = [i for i in row if i >= 0]
        assert len(chosen) == n == len(set(chosen)) and max(chosen) < s.numel(), row
        b = int(seq_idx[t])
        slots = ops.positions_to_slots(table, torch.tensor([b]), torch.arange(s.numel())[None], 64)[0]
        keys = dense.view(-1, 128)[slots]
        bound = 2 * float(fp8_score_error_bound(q[t:t + 1], w[t:t + 1], keys, 128**-0.5)[0])
        best = torch.sort(s, descending=True)
        err = (torch.sort(s[chosen], descending=True).values - best.values[:n]).abs().max()
        assert err <= bound, f"token {t}: chosen scores off the golden top-{n} by {err:.3g} > FP8 bound {bound:.3g}"
        recalls.append(len(set(chosen) & set(best.indices[:n].tolist())) / n)
    assert sum(recalls) / len(recalls) >= 0.95, recalls


@pytest.mark.parametrize("backend", ["cambricon", "musa"])
def test_moe_and_rope_adapters_copy_no_weight_or_table_per_call(emulate, backend):
    plan = emulate(backend)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 256, generator=gen).bfloat16(), torch.randn(32, 512, 256, generator=gen).bfloat16()
    sizes = torch.zeros(32, dtype=torch.int64)
    sizes[[1, 5, 9]] = torch.tensor([3, 4, 1])
    with LargestOutputs() as mode:
        plan.grouped_gemm(x, w, sizes)
    assert_smaller_than(mode, w)
    assert counts_of(plan, "grouped_gemm") == (1, 0)
    if backend == "cambricon":  # the old adapter rebuilt [max_pos, D] cos/sin tables per call
        inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
        freqs = torch.outer(torch.arange(4096).float(), inv)
        cache = torch.cat([freqs.cos(), freqs.sin()], -1)
        xr, positions = torch.randn(2, 65, 64, generator=gen).bfloat16(), torch.tensor([69, 129])
        plan.rope(xr, positions, cache, True)  # the first call without meta builds the tables once
        for meta in (None, attention_metadata(torch.tensor([0, 1, 2], dtype=torch.int32),
                                              torch.tensor([70, 130], dtype=torch.int32),
                                              torch.arange(6, dtype=torch.int32).view(2, 3), positions,
                                              block_size=64, max_seqlen_k=192, cos_sin_cache=cache)):
            with LargestOutputs() as mode:
                plan.rope(xr, positions, cache, True, meta=meta)
            assert_smaller_than(mode, cache)


@pytest.mark.parametrize(("backend", "opt_in"), [("cuda", "HWLAYER_FP8_INDEXER"), ("musa", "HWLAYER_MUSA_FP8_INDEXER")])
def test_kv_bytes_per_token_counts_the_fp8_indexer_cache(emulate, backend, opt_in, monkeypatch):
    """The serving layer sizes its cache with ``model.kv_bytes_per_token()``: with the FP8 indexer cache each
    indexer layer's token takes ``Di + 4`` bytes (FP8 codes + an fp32 scale) instead of ``2 Di`` (bf16), and
    that is what ``new_cache`` allocates. The tiny model's indexer (16-wide) is outside the kernels: the
    generic ops serve it through the cache's canonical rows (the mixing rule), and decode reads nothing back."""
    from model import Batch, load_model
    from model.tiny import ensure_default_model

    monkeypatch.setenv("HWLAYER_CHECK", "0")  # as serving: value checks read the device
    emulate(backend)
    canonical = load_model(ensure_default_model(), backend=backend, dtype="bf16").kv_bytes_per_token()
    monkeypatch.setenv(opt_in, "1")
    m = load_model(ensure_default_model(), backend=backend, dtype="bf16")
    cfg = m.config
    layers = sum(cfg.layer_has_indexer(i) for i in range(m.num_cache_layers))
    Di = cfg.index_head_dim
    assert m.kv_bytes_per_token() == canonical - layers * (2 * Di - (Di + 4))
    cache = m.new_cache(3, 64)
    allocated = sum(c.nbytes for c in cache.latent + cache.indexer if c is not None)
    assert m.kv_bytes_per_token(64) * 3 * 64 == allocated
    assert all(type(c).__name__ == "Fp8PagedKV" for c in cache.indexer if c is not None)
    table = torch.arange(3, dtype=torch.int32).view(1, 3)
    m.forward_batch(Batch(torch.arange(1, 10), torch.tensor([0, 9], dtype=torch.int32),
                          torch.tensor([9], dtype=torch.int32), table), cache)  # written quantized, read back
    ctx = m.context(Batch(torch.tensor([7]), torch.tensor([0, 1], dtype=torch.int32),
                          torch.tensor([10], dtype=torch.int32), table), cache)
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert m.forward_context(ctx, cache).shape == (1, cfg.vocab_size)
