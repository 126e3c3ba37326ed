"""The Triton tier against the generic torch ops, run in Triton's CPU interpreter (TRITON_INTERPRET=1).

The interpreter executes the same ``@triton.jit`` kernels a GPU compiles, with numpy underneath; it
rounds fp32 -> bf16 toward zero (one bf16 ulp from torch), hence the bf16 tolerances. These tests say
nothing about GPU speed or GPU numerics: no GPU was available.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hwlayer
from hwlayer import ops

pytestmark = pytest.mark.slow  # Triton's interpreter; make test runs this file in its own process

# Not importorskip: importing triton here, before the fixture sets TRITON_INTERPRET, would define
# triton's own library functions as compiled ones and the interpreter could not run them.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)


def _compiled_triton_loaded() -> bool:
    tl = sys.modules.get("triton.language")
    return tl is not None and type(tl.sum).__name__ != "InterpretedFunction"


@functools.cache
def _run_in_fresh_process() -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GLM_", "HWLAYER_"))}
    env.update(TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def tp():
    if _compiled_triton_loaded():
        # Something earlier in this session imported triton without TRITON_INTERPRET, so this
        # process cannot interpret kernels: run this file in a fresh process and report its result.
        done = _run_in_fresh_process()
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        pytest.skip(f"ran in a fresh TRITON_INTERPRET=1 process: {done.stdout.strip().splitlines()[-1]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        mp.delenv("HWLAYER_TRITON", raising=False)
        p = hwlayer.plan("triton", trace=True)
        yield p


def tol(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    torch.testing.assert_close(a.float(), b.float(), **tol(dtype))


@contextlib.contextmanager
def served_by_triton(p, op: str, calls: int, tier: str = "native"):
    """Asserts that the block called ``op`` through the plan ``calls`` times, each served by ``tier``
    ("native": the Triton kernel). A ``supports()`` that declined shows as a "generic" call; without this
    check a test would then compare the generic op with itself."""
    before = p.call_counts()
    yield
    after = p.call_counts()
    delta = {key: n - before.get(key, 0) for key, n in after.items() if key[0] == op and n != before.get(key, 0)}
    assert delta == {(op, tier): calls}, f"{op}: expected {calls} {tier} call(s), the plan served {delta}"


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_and_fused_residual(tp, dtype: torch.dtype) -> None:
    x, r, w = torch.randn(3, 5, 72, dtype=dtype), torch.randn(3, 5, 72, dtype=dtype), torch.randn(72)
    with served_by_triton(tp, "rms_norm", calls=2):
        out = tp.rms_norm(x, w, 1e-6)
        y, s = tp.rms_norm(x, w, 1e-6, residual=r)
    close(out, ops.rms_norm(x, w, 1e-6), dtype)
    y_ref, s_ref = ops.rms_norm(x, w, 1e-6, residual=r)
    close(y, y_ref, dtype)
    torch.testing.assert_close(s, s_ref)  # the new residual is exactly x + residual in x.dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_with_and_without_bias(tp, dtype: torch.dtype) -> None:
    x, w, b = torch.randn(7, 128, dtype=dtype) * 2 + 1, torch.randn(128), torch.randn(128)
    with served_by_triton(tp, "layer_norm", calls=2):
        with_bias, without_bias = tp.layer_norm(x, w, b, 1e-6), tp.layer_norm(x, w, None, 1e-6)
    close(with_bias, ops.layer_norm(x, w, b, 1e-6), dtype)
    close(without_bias, ops.layer_norm(x, w, None, 1e-6), dtype)


def test_kv_cache_write_skips_padding(tp) -> None:
    cache = torch.zeros(3, 4, 40, dtype=torch.bfloat16)
    expected = cache.clone()
    rows = torch.randn(5, 40)
    slots = torch.tensor([7, -1, 0, 11, -1])
    with served_by_triton(tp, "kv_cache_write", calls=1):
        tp.kv_cache_write(cache, rows, slots)
    ops.kv_cache_write(expected, rows, slots)
    assert torch.equal(cache, expected)
    with pytest.raises(ValueError, match="kv_cache_write: argument 'slot_mapping' expected slots < 12"):
        tp.kv_cache_write(cache, rows, torch.tensor([0, 1, 2, 3, 12]))


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_both_layouts(tp, dtype: torch.dtype, interleaved: bool) -> None:
    D = 64
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(300).float()[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), -1)
    pos = torch.tensor([0, 1, 299, 17, 17])
    for x in (torch.randn(5, 4, D, dtype=dtype), torch.randn(5, D, dtype=dtype)):
        with served_by_triton(tp, "rope", calls=1):
            out = tp.rope(x, pos, cache, interleaved)
        close(out, ops.rope(x, pos, cache, interleaved), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(tp, dtype: torch.dtype) -> None:
    x = torch.randn(4, 3, 2 * 50, dtype=dtype) * 3
    with served_by_triton(tp, "silu_and_mul", calls=1):
        out = tp.silu_and_mul(x)
    close(out, ops.silu_and_mul(x), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_with_empty_and_ragged_groups(tp, dtype: torch.dtype) -> None:
    sizes = torch.tensor([0, 33, 1, 0, 70])
    x = torch.randn(int(sizes.sum()), 40, dtype=dtype)
    w = torch.randn(5, 90, 40, dtype=dtype)
    with served_by_triton(tp, "grouped_gemm", calls=1):
        out = tp.grouped_gemm(x, w, sizes)
    ref = ops.grouped_gemm(x.float(), w.float(), sizes)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=0.2)


@pytest.mark.parametrize(("n_group", "topk_group", "renorm"), [(1, 1, True), (8, 3, True), (4, 4, False)])
def test_moe_route_matches_selection_and_weights(tp, n_group: int, topk_group: int, renorm: bool) -> None:
    logits = torch.randn(11, 64)
    bias = torch.randn(64) * 0.2
    with served_by_triton(tp, "moe_route", calls=1):
        w, ids = tp.moe_route(logits, bias, 6, n_group, topk_group, renorm, 2.5)
    w_ref, ids_ref = ops.moe_route(logits, bias, 6, n_group, topk_group, renorm, 2.5)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    order, order_ref = ids.long().argsort(1), ids_ref.long().argsort(1)
    assert torch.equal(ids.gather(1, order), ids_ref.gather(1, order_ref))
    torch.testing.assert_close(w.gather(1, order), w_ref.gather(1, order_ref))


def _dsa_batch(dtype: torch.dtype, Di: int = 32, Dk: int = 48):
    torch.manual_seed(1)
    bs, nb = 4, 24
    block_table = torch.randperm(nb)[:18].view(3, 6).to(torch.int32)
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)  # prefill chunk, decode, prefill from scratch
    seq_lens = torch.tensor([10, 21, 5], dtype=torch.int32)
    return dict(
        k_cache=torch.randn(nb, bs, Di, dtype=dtype), kv_cache=torch.randn(nb, bs, Dk, dtype=dtype),
        block_table=block_table, cu=cu, seq_lens=seq_lens,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk", [4, 64])
def test_lightning_indexer_selects_the_same_positions(tp, dtype: torch.dtype, topk: int) -> None:
    b = _dsa_batch(dtype)
    q = torch.randn(9, 8, 32, dtype=dtype)
    weights = torch.randn(9, 8) * 8**-0.5
    args = (q, weights, b["k_cache"], b["block_table"], b["cu"], b["seq_lens"], topk, 32**-0.5)
    with served_by_triton(tp, "lightning_indexer", calls=1):
        got = tp.lightning_indexer(*args)
    ref = ops.lightning_indexer(*args)
    assert got.dtype == torch.int32 and got.shape == (9, topk)
    assert torch.equal(got.sort(1).values, ref.sort(1).values)  # same set, -1 padding included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_attention_out_and_lse(tp, dtype: torch.dtype) -> None:
    b = _dsa_batch(dtype)
    q = torch.randn(9, 5, 48, dtype=dtype)
    idx = ops.lightning_indexer(torch.randn(9, 2, 32), torch.rand(9, 2), b["k_cache"].float(), b["block_table"],
                                b["cu"], b["seq_lens"], 12, 0.2)
    idx[2] = -1  # a token with no valid index: out 0, lse -inf
    idx[5, ::2] = -1  # holes in the middle of a row
    args = (q, b["kv_cache"], idx, b["block_table"], b["cu"], b["seq_lens"], 0.15, 40)
    with served_by_triton(tp, "sparse_mla_attention", calls=1):
        out, lse = tp.sparse_mla_attention(*args, return_lse=True)
    out_ref, lse_ref = ops.sparse_mla_attention(*args, return_lse=True)
    close(out, out_ref, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and bool(torch.isinf(lse[2]).all())
    assert bool((out[2] == 0).all())
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=1e-4, atol=1e-4)


def test_bad_input_is_the_dispatchers_one_line_error(tp) -> None:
    """Hook specs 2.0: the dispatcher checks the contract before any tier runs, so the error names the
    bad argument and neither the Triton kernel nor its supports() sees the call."""
    before = tp.call_counts()
    with pytest.raises(ValueError, match="rms_norm: argument 'weight' expected shape \\[8\\]"):
        tp.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="grouped_gemm: argument 'group_sizes' expected shape \\[2\\]"):
        tp.grouped_gemm(torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([4, 2, 1]))
    with pytest.raises(ValueError, match="silu_and_mul: argument 'x' expected an even last dim"):
        tp.silu_and_mul(torch.randn(2, 7))
    assert tp.call_counts() == before
    # A bad VALUE (counts summing past the rows) is not the contract check's (it reads no values): the
    # generic op's HWLAYER_CHECK test names it.
    with served_by_triton(tp, "grouped_gemm", calls=1, tier="generic"), pytest.raises(
            ValueError, match="grouped_gemm: argument 'group_sizes'"):
        tp.grouped_gemm(torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([4, 2]))


def test_triton_backend_facts(tp) -> None:
    b = tp.backend
    assert b.name == "triton" and tp.device.type == "cpu"  # no GPU here: the interpreter runs on CPU tensors
    assert "TRITON_INTERPRET=1" in b.verified and "not run on GPU" in b.verified
    assert b.priority < hwlayer.registry().backends["cpu"].priority


# --------------------------------------------------------------------------------------------
# Launch paths: split-K decode vs one-pass prefill attention, the fused MoE


@contextlib.contextmanager
def launched(expected: dict[str, int]):
    """The block launched exactly these Triton kernel paths (the tier's host-side counter)."""
    from hwlayer.backends.triton.adapters import LAUNCHES

    before = dict(LAUNCHES)
    yield
    moved = {k: n - before.get(k, 0) for k, n in LAUNCHES.items() if n != before.get(k, 0)}
    assert moved == expected, f"expected launch paths {expected}, got {moved}"


def _mla_inputs(dtype: torch.dtype, cu: list[int], seq_lens: list[int], K: int, H: int, q_scale: float):
    torch.manual_seed(3)
    bs, V, R = 16, 64, 16
    need = [-(-L // bs) for L in seq_lens]
    nb = sum(need) + 2
    perm = torch.randperm(nb)
    table = torch.zeros(len(seq_lens), max(need), dtype=torch.int32)
    start = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[start : start + n].to(torch.int32)
        start += n
    rows = []
    for b, L in enumerate(seq_lens):
        n = cu[b + 1] - cu[b]
        for i in range(n):
            pos = L - n + i
            take = min(K, pos + 1)
            rows.append(torch.randperm(pos + 1)[:take].tolist() + [-1] * (K - take))  # -1 last, as the indexer
    idx = torch.tensor(rows, dtype=torch.int32)
    q = (torch.randn(cu[-1], H, V + R) * q_scale).to(dtype)
    kv = torch.randn(nb, bs, V + R, dtype=dtype)
    return q, kv, idx, table, torch.tensor(cu, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32), V


def _mla_close(got, ref, dtype: torch.dtype) -> None:
    out, lse = got
    out_ref, lse_ref = ref
    close(out, out_ref, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mla_split_k_decode(tp, dtype: torch.dtype) -> None:
    # Two decode tokens with 256 selected rows each: the keys are split across programs. The second
    # sequence has 20 positions, so its later splits hold only -1 (partials with lse -inf), and a
    # row of only -1 must still give out 0 and lse -inf after the merge.
    q, kv, idx, table, cu, lens, V = _mla_inputs(dtype, [0, 1, 2], [300, 20], 256, 16, 3.0)
    scale = (q.shape[-1]) ** -0.5
    with served_by_triton(tp, "sparse_mla_attention", calls=2), launched(
            {"sparse_mla_split": 2, "sparse_mla_merge": 2}):
        got = tp.sparse_mla_attention(q, kv, idx, table, cu, lens, scale, V, return_lse=True)
        empty = torch.full_like(idx, -1)
        out0, lse0 = tp.sparse_mla_attention(q, kv, empty, table, cu, lens, scale, V, return_lse=True)
    _mla_close(got, ops.sparse_mla_attention(q, kv, idx, table, cu, lens, scale, V, return_lse=True), dtype)
    assert bool((out0 == 0).all()) and bool(torch.isinf(lse0).all())


def test_sparse_mla_prefill_with_large_logits(tp) -> None:
    # 24 prefill tokens fill the interpreter's "device" without splitting; logits in the hundreds
    # overflow fp32 exp() (above ~88) unless the running max is subtracted.
    q, kv, idx, table, cu, lens, V = _mla_inputs(torch.float32, [0, 16, 24], [16, 90], 72, 5, 8.0)
    with served_by_triton(tp, "sparse_mla_attention", calls=1), launched({"sparse_mla_prefill": 1}):
        got = tp.sparse_mla_attention(q, kv, idx, table, cu, lens, 1.0, V, return_lse=True)
    assert float(got[1].max()) > 100  # the logits really are large
    # fp32 logits of a few hundred carry ~1e-4 absolute rounding (summation order differs from the
    # generic's), hence 1e-3; without the max subtraction the result would be inf/NaN.
    out_ref, lse_ref = ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 1.0, V, return_lse=True)
    assert bool(torch.isfinite(got[0]).all()) and bool(torch.isfinite(got[1]).all())
    torch.testing.assert_close(got[0], out_ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got[1], lse_ref, rtol=1e-5, atol=1e-3)


def test_mla_path_choice_from_host_sizes() -> None:
    from hwlayer.backends.triton.adapters import mla_head_block, mla_num_splits

    h200 = 132  # SMs
    # GLM-5-shaped decode, batch 1: 16 heads x 2048 selected rows must spread over the device.
    assert mla_head_block(16, 512) == 16
    assert mla_num_splits(1, 16, 2048, 512, h200) == 32
    assert mla_num_splits(8, 64, 2048, 512, h200) == 9  # 8 tokens x 2 head tiles: 16 programs x 9 splits
    assert mla_num_splits(1, 16, 100, 512, h200) == 1  # too few keys to split
    assert mla_num_splits(4096, 16, 2048, 512, h200) == 1  # a prefill fills the device as it is
    assert mla_num_splits(132, 16, 2048, 512, h200) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_experts_without_permute_round_trip(tp, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    T, E, k, D, inter = 9, 8, 3, 48, 40
    x = torch.randn(T, D, dtype=dtype)
    w13 = (torch.randn(E, 2 * inter, D) * D**-0.5).to(dtype)
    w2 = (torch.randn(E, D, inter) * inter**-0.5).to(dtype)
    ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).to(torch.int32)
    ids[0, 1], ids[4, 0], ids[6] = -1, E, -1  # dropped: another rank's expert, a past-the-end id, a whole token
    weights = torch.rand(T, k)
    before = tp.call_counts()
    with served_by_triton(tp, "fused_experts", calls=1), launched({"fused_moe": 1}):
        out = tp.fused_experts(x, w13, w2, weights, ids)
    parts = {key for key, n in tp.call_counts().items() if n != before.get(key, 0) and key[0] != "fused_experts"}
    assert not parts, f"the fused kernel must not go through the composite's parts: {parts}"
    ref = hwlayer.plan("cpu").fused_experts(x.float(), w13.float(), w2.float(), weights, ids)
    assert bool((out[6] == 0).all())
    torch.testing.assert_close(out.float(), ref, **(dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32
                                                    else dict(rtol=3e-2, atol=3e-2)))


@pytest.mark.parametrize("one_launch", [True, False])
def test_moe_align_block_size_layout(tp, one_launch: bool) -> None:
    from hwlayer.backends.triton.adapters import moe_align_block_size

    ids = torch.tensor([[3, 0], [3, -1], [0, 7], [3, 5]], dtype=torch.int32)  # 8 assignments; -1 and 7 dropped
    sorted_ids, block_expert = moe_align_block_size(ids, 6, 4, use_kernel=one_launch)
    numel, bm = ids.numel(), 4
    assert sorted_ids.numel() == 28  # the host-known bound: 8 + min(8, 6 experts) * 3, in whole blocks
    blocks = sorted_ids.view(-1, bm).tolist()
    experts = block_expert.tolist()
    real = [(e, [j for j in blk if j < numel]) for e, blk in zip(experts, blocks, strict=True) if e < 6]
    # each expert's assignments, in token order, padded to whole blocks; the dropped ones nowhere
    assert real == [(0, [1, 4]), (3, [0, 2, 6]), (5, [7])]
    assert all(e == 6 for e in experts[len(real):])  # blocks past the last expert: no work
    assert all(j == numel for blk in blocks[len(real):] for j in blk)


def test_moe_align_kernel_matches_the_torch_alignment(tp) -> None:
    """The one-launch Triton alignment (decode-sized batches) and the torch-op one (large batches)
    give identical rows and block experts, dropped ids and non-power-of-two expert counts included."""
    from hwlayer.backends.triton.adapters import moe_align_block_size

    torch.manual_seed(7)
    for T, k, E, block_m in [(1, 8, 64, 16), (33, 8, 64, 16), (9, 3, 6, 4), (40, 8, 256, 16), (5, 1, 1, 16)]:
        ids = torch.randint(-1, E + 1, (T, k), dtype=torch.int32)  # -1 and E: dropped
        got = moe_align_block_size(ids, E, block_m, use_kernel=True)
        want = moe_align_block_size(ids, E, block_m, use_kernel=False)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (T, k, E, block_m)


def test_adapters_are_sync_free(tp, monkeypatch) -> None:
    """Every adapter (predicate and launch code) runs under FakeTensorMode, where reading a device
    tensor on the host (``.item()``, ``int(t)``, ``.tolist()``, ``bool(t)``) raises: the host side
    of the Triton tier never waits for the device. Kernels are replaced by recorders (fake tensors
    have no data for them); the grids they record must come out of host-known sizes."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

    from hwlayer.backends.triton import adapters

    grids = []

    class Recorder:
        def __getattr__(self, name: str):
            class Launch:
                def __getitem__(self, grid):
                    return lambda *args, **kwargs: grids.append((name, grid))
            return Launch()

    monkeypatch.setattr(adapters, "_kernels", lambda: Recorder())
    monkeypatch.setenv("HWLAYER_CHECK", "0")  # serving's setting: no value checks
    mode = FakeTensorMode()
    real = _mla_inputs(torch.bfloat16, [0, 1, 2], [300, 20], 256, 16, 1.0)
    q, kv, idx, table, cu, lens, V = (mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in real)
    qi, wi, ki = (mode.from_tensor(t) for t in (torch.randn(2, 4, 32), torch.randn(2, 4), torch.randn(20, 16, 32)))
    x, res, w = (mode.from_tensor(t) for t in (torch.randn(2, 64), torch.randn(2, 64), torch.randn(64)))
    ids, tw = mode.from_tensor(torch.randint(-1, 8, (2, 3), dtype=torch.int32)), mode.from_tensor(torch.rand(2, 3))
    w13, w2 = mode.from_tensor(torch.randn(8, 64, 64)), mode.from_tensor(torch.randn(8, 64, 32))
    pos, cos_sin = mode.from_tensor(torch.tensor([5, 9])), mode.from_tensor(torch.randn(400, 32))
    sizes = mode.from_tensor(torch.tensor([1, 0, 1, 0, 0, 0, 0, 0]))
    calls = [
        ("rms_norm", (x, w, 1e-6, res)), ("layer_norm", (x, w, None, 1e-6)),
        ("rope", (x.view(2, 2, 32), pos, cos_sin, True)),
        ("kv_cache_write", (mode.from_tensor(torch.zeros(4, 16, 64)), x, pos)),
        ("lightning_indexer", (qi, wi, ki, table, cu, lens, 16, 0.2, 1, 300)),
        ("sparse_mla_attention", (q, kv, idx, table, cu, lens, 0.1, V)),  # split-K decode
        ("sparse_mla_attention", (q[:1].expand(24, -1, -1), kv, idx[:1].expand(24, -1), table[:1],
                                  mode.from_tensor(torch.tensor([0, 24], dtype=torch.int32)),
                                  mode.from_tensor(torch.tensor([300], dtype=torch.int32)), 0.1, V)),  # prefill
        ("moe_route", (x[:, :8].float(), None, 2, 1, 1, True, 1.0)),
        ("grouped_gemm", (x, w13, sizes)), ("silu_and_mul", (x,)),
        ("fused_experts", (x, w13, w2, tw, ids)),
    ]
    with mode:
        for op, args in calls:
            fn, supports = adapters.IMPLEMENTATIONS[op]
            assert supports(*args) is True, op
            fn(*args)
        with pytest.raises(DataDependentOutputException):  # the mode does catch a host read
            adapters.lightning_indexer(qi, wi, ki, table, cu, lens, 16, 0.2)  # no max_seqlen_k: reads it
    launched_kernels = [name for name, _ in grids]
    for name in ("sparse_mla_kernel", "sparse_mla_merge_kernel", "indexer_score_kernel", "moe_align_kernel",
                 "fused_moe_gate_up_kernel",
                 "fused_moe_down_kernel", "moe_sum_kernel", "grouped_gemm_kernel", "kv_cache_write_kernel"):
        assert name in launched_kernels, name


def test_model_decode_step_on_the_triton_tier_reads_nothing_on_the_host(tp, monkeypatch) -> None:
    """The tiny model's decode step and a mixed prefill + decode step on the Triton tier, under
    FakeTensorMode with the kernels replaced by recorders: the forward, the dispatch predicates and
    the adapters together never read the device on the host (tests/test_sync_free.py does the same
    for the generic ops)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hwlayer.backends.triton import adapters
    from model import Batch, load_model
    from model.tiny import ensure_default_model

    launched_kernels: list[str] = []

    class Recorder:
        def __getattr__(self, name: str):
            class Launch:
                def __getitem__(self, grid):
                    return lambda *args, **kwargs: launched_kernels.append(name)
            return Launch()

    model = load_model(ensure_default_model(), backend="triton", dtype="bf16")
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    cache = model.new_cache(8, 4)
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    model.forward_batch(Batch(torch.arange(1, 13), i32(0, 9, 12), i32(9, 3), table), cache)  # real prefill
    monkeypatch.setattr(adapters, "_kernels", lambda: Recorder())
    monkeypatch.setenv("HWLAYER_CHECK", "0")
    for batch in (Batch(torch.tensor([20, 21]), i32(0, 1, 2), i32(10, 4), table),  # decode
                  Batch(torch.tensor([20, 30, 31, 32, 33, 34]), i32(0, 1, 6), i32(10, 8), table)):  # mixed
        ctx = model.context(batch, cache)  # host metadata, built before the forward as the runner does
        launched_kernels.clear()
        with FakeTensorMode(allow_non_fake_inputs=True):
            logits = model.forward_context(ctx, cache)
        assert logits.shape == (2, model.config.vocab_size)
        for kernel in ("indexer_score_kernel", "sparse_mla_kernel", "fused_moe_gate_up_kernel", "moe_route_kernel",
                       "kv_cache_write_kernel", "rms_norm_kernel"):
            assert kernel in launched_kernels, (kernel, sorted(set(launched_kernels)))


def test_runner_replays_triton_decode_steps_on_static_buffers(tp) -> None:
    """model.runner on the Triton tier: decode steps of 3 sequences replay in the 4-row recorded
    graph (CPU stand-in for a CUDA graph) with the captured step's static sizes (max_seqlen_k = the
    runner's max_model_len); the padding row writes no cache row (the Triton kv_cache_write skips
    slot -1) and the real rows match an eager step."""
    from model import Batch, load_model
    from model.runner import ModelRunner, RecordedGraph
    from model.tiny import ensure_default_model

    model = load_model(ensure_default_model(), backend="triton")
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [3, 4, 5], [7] * 13]
    tables = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [0, 1, 2, 3, 4, 13, 14, 15],
                           [16, 17, 18, 19, 20, 21, 22, 23]], dtype=torch.int32)  # sequence 1 owns block 0

    def prefilled():
        cache = model.new_cache(24, 4)
        lens = [len(p) for p in prompts]
        cu = torch.tensor([0, 9, 12, 25], dtype=torch.int32)
        logits = model.forward_batch(Batch(torch.tensor(sum(prompts, [])), cu, torch.tensor(lens, dtype=torch.int32),
                                           tables), cache)
        return cache, logits.argmax(-1)

    cache, tokens = prefilled()
    eager_cache, _ = prefilled()
    runner = ModelRunner(model, max_num_seqs=4, max_model_len=32, graphs=RecordedGraph)
    untouched = [None if t is None else t.clone() for t in cache.kv + cache.index_k]
    runner.capture(cache)  # the ladder 1, 2, 4, each recorded once; the steps below are replays
    assert all(a is None or torch.equal(a, b) for a, b in zip(untouched, cache.kv + cache.index_k, strict=True))
    lens = [len(p) for p in prompts]
    main = model.config.num_hidden_layers
    for _ in range(2):
        lens = [n + 1 for n in lens]
        batch = Batch(tokens.clone(), torch.arange(4, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32), tables)
        before = [None if t is None else t.clone() for t in cache.kv + cache.index_k]
        layers = model.config.num_hidden_layers
        moe_layers = sum(model.config.layer_is_moe(i) for i in range(layers))
        with launched({"sparse_mla_prefill": layers, "fused_moe": moe_layers}):  # the Triton tier served the step
            logits = runner(batch, cache)
        eager = model.forward_batch(batch, eager_cache)
        torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
        written = sorted(int(tables[b, (n - 1) // 4]) * 4 + (n - 1) % 4 for b, n in enumerate(lens))
        for i, (old, new) in enumerate(zip(before, cache.kv + cache.index_k, strict=True)):
            if old is not None:
                changed = (old != new).reshape(-1, old.shape[-1]).any(-1).nonzero().flatten().tolist()
                assert changed == (written if i % len(cache.kv) < main else []), "a padding row wrote into the cache"
        tokens = eager.argmax(-1)
    assert runner.replays == 2 and runner.eager_steps == 0
