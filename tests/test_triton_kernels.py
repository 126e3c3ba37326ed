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
        out, lse = tp.sparse_mla_attention(*args)
    out_ref, lse_ref = ops.sparse_mla_attention(*args)
    close(out, out_ref, dtype)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and bool(torch.isinf(lse[2]).all())
    assert bool((out[2] == 0).all())
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse[finite], lse_ref[finite], rtol=1e-4, atol=1e-4)


def test_bad_input_reaches_the_generic_error(tp) -> None:
    x = torch.randn(2, 8)
    # supports() declines what the contract rejects, so the generic op names the bad argument.
    with served_by_triton(tp, "rms_norm", calls=1, tier="generic"), pytest.raises(
            ValueError, match="rms_norm: argument 'weight' expected shape \\[8\\]"):
        tp.rms_norm(x, torch.ones(7), 1e-6)
    with served_by_triton(tp, "grouped_gemm", calls=1, tier="generic"), pytest.raises(
            ValueError, match="grouped_gemm: argument 'group_sizes'"):
        tp.grouped_gemm(torch.randn(5, 4), torch.randn(2, 3, 4), torch.tensor([4, 2]))
    with served_by_triton(tp, "silu_and_mul", calls=1, tier="generic"), pytest.raises(
            ValueError, match="silu_and_mul: argument 'x' expected an even last dim"):
        tp.silu_and_mul(torch.randn(2, 7))


def test_triton_backend_facts(tp) -> None:
    b = tp.backend
    assert b.name == "triton" and tp.device.type == "cpu"  # no GPU here: the interpreter runs on CPU tensors
    assert "TRITON_INTERPRET=1" in b.verified and "not run on GPU" in b.verified
    assert b.priority < hwlayer.registry().backends["cpu"].priority
