"""Hygon DCU native adapters (hwlayer/backends/cuda/hygon.py) over the emulated DCU libraries.

One test per adapter, each asserting the adapter served (traced counts: a silent fallback to the
Triton tier or generic op fails) and agreeing with the generic op; plus the emulators against vectors
worked out by hand from the references they cite (conformance/emulators/{flash_mla,lightop,deep_gemm}.py).
"""

from __future__ import annotations

import math

import pytest
import torch

import hwlayer
from conformance import emulators
from conformance.emulators import deep_gemm as dg
from conformance.emulators import flash_mla as fm
from conformance.emulators import lightop
from hwlayer import ops
from hwlayer.backends.cuda import hygon
from tests.test_backends_emulated import indexer_case, mla_case, paged, recall, served_natively


@pytest.fixture
def plan():
    emulators.activate("hygon")
    yield hwlayer.plan("hygon", trace=True)
    emulators.deactivate()


# ---- adapters


@pytest.mark.parametrize("H", [64, 16])
def test_dcu_flash_mla_serves_sparse_mla_with_a_natural_lse(plan, H):
    q, kv, idx, table, cu, lens = mla_case(H)
    out, lse = plan.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    want_out, want_lse = ops.sparse_mla_attention(q, kv, idx, table, cu, lens, 0.05, 512, return_lse=True)
    torch.testing.assert_close(lse, want_lse, atol=2e-3, rtol=2e-3)  # natural log; -inf for the empty row
    torch.testing.assert_close(out.float(), want_out.float(), atol=2e-2, rtol=2e-2)
    assert served_natively(plan, "sparse_mla_attention"), plan.call_counts()


def test_dcu_flash_mla_declines_more_than_128_heads(plan):
    q, *rest = mla_case(130)
    assert "64 or 128" in hygon.dcu_flash_mla_sparse_supports(q, *rest, 0.05, 512)


def test_lightop_moe_fused_gate_serves_glm5_routing(plan):
    gen = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(7, 64, generator=gen), torch.randn(64, generator=gen) * 0.1
    for args in ((bias, 6, 8, 3, True, 2.5), (bias, 4, 1, 1, True, 2.5)):  # grouped; GLM-5's one group
        gw, gi = plan.moe_route(logits, *args)
        ww, wi = ops.moe_route(logits, *args)
        assert torch.equal(gi.sort(-1).values, wi.sort(-1).values)
        torch.testing.assert_close(gw.gather(1, gi.argsort(-1)), ww.gather(1, wi.argsort(-1)), atol=1e-5, rtol=1e-5)
    assert served_natively(plan, "moe_route"), plan.call_counts()
    # the gate's contract is fixed (sigmoid + renormalize, with a bias): anything else declines
    assert "renormalizes" in hygon.lightop_moe_route_supports(logits, bias, 4, 1, 1, False, 1.0)
    assert "correction bias" in hygon.lightop_moe_route_supports(logits, None, 4, 1, 1, True, 1.0)


def test_dcu_deep_gemm_indexer_is_opt_in_and_serves_decode_and_prefill(plan, monkeypatch):
    args = indexer_case(torch.bfloat16)
    assert plan.backend.layout().canonical  # no FP8 cache unless opted in
    assert "HWLAYER_FP8_INDEXER" in hygon.dcu_indexer_supports(*args)
    monkeypatch.setenv("HWLAYER_FP8_INDEXER", "1")
    layout = plan.backend.layout()
    assert layout.name == "dcu-deepgemm-fp8-indexer" and not layout.canonical
    gen = torch.Generator().manual_seed(4)
    dense, table, cu, lens = paged(gen, [6, 1, 2], [6, 50, 90], 64, 128, torch.bfloat16)
    q, w = args[0], args[1]
    kc = layout.indexer_cache(*dense.shape, torch.bfloat16, dense.device)
    kc.write(torch.arange(dense.shape[0] * 64), dense.view(-1, 128))
    # a prefill batch (fp8_fp4_mqa_logits over gathered FP8 keys): FP8 scoring is near, not exact
    got = plan.lightning_indexer(q, w, kc, table, cu, lens, 16, 128**-0.5)
    assert recall(got, ops.lightning_indexer(q, w, dense, table, cu, lens, 16, 128**-0.5)) >= 0.95
    # a decode batch (fp8_fp4_paged_mqa_logits over the FP8 cache in place)
    dq, dw, dcu = q[[5, 6, 8]], w[[5, 6, 8]], torch.tensor([0, 1, 2, 3], dtype=torch.int32)
    got = plan.lightning_indexer(dq, dw, kc, table, dcu, lens, 16, 128**-0.5)
    assert recall(got, ops.lightning_indexer(dq, dw, dense, table, dcu, lens, 16, 128**-0.5)) >= 0.9  # 38 picks
    assert served_natively(plan, "lightning_indexer"), plan.call_counts()
    small = layout.indexer_cache(dense.shape[0] * 4, 16, 128, torch.bfloat16, dense.device)
    assert "blocks of 64" in hygon.dcu_indexer_supports(q, w, small, *args[3:])


def test_hygon_backend_states_fp8_and_what_it_was_written_against():
    backend = {b.name: b for b in hwlayer.backends.cuda.BACKENDS}["hygon"]
    assert "vllm-plugin-das@" in backend.verified and "not run on Hygon hardware" in backend.verified
    assert backend.attention_layout is hygon.HYGON_LAYOUT


# ---- emulators against their references


def test_dcu_flash_mla_follows_ref_sparse_attn_fwd_with_a_natural_lse():
    """The DCU build takes FlashMLA's current API (topk_length) and returns ref.py's natural-log lse:
    head 0 of row 0 sees scores 1 and 2 (index 4 is past s_kv): lse = log(e + e^2)."""
    from tests.test_emulators_vendor_refs import sparse_case

    q, kv, idx = sparse_case()
    out, _, lse = fm._dcu_flash_mla_sparse_fwd(q, kv, idx, 1.0)
    assert lse[0, 0].item() == pytest.approx(math.log(math.e + math.e**2), rel=1e-3)
    assert out[0, 0, 1].item() == pytest.approx((10 * math.e + 20 * math.e**2) / (math.e + math.e**2), rel=1e-2)
    with pytest.raises(RuntimeError, match="topk"):  # a partial top-k block is refused (assumed SM90 rule)
        fm._dcu_flash_mla_sparse_fwd(q, kv, idx[..., :64], 1.0)


def test_lightop_moe_fused_gate_is_renormalized_and_unscaled():
    """vllm_hcu's lightop gate: sigmoid + biased choice + renormalize; the routed scaling factor is not applied."""
    logits = torch.full((1, 32), -4.0)
    logits[0, 3], logits[0, 7], logits[0, 9] = 2.0, 1.0, 0.0
    bias = torch.zeros(32)
    bias[9] = 1.5  # sigmoid(0) + 1.5 = 2.0 > sigmoid(2) = 0.88: expert 9 is chosen first
    w, ids = lightop.moe_fused_gate(logits, bias, 1, 1, 2, 0, 2.5)
    assert ids.tolist() == [[9, 3]]
    s9, s3 = 0.5, 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(w, torch.tensor([[s9, s3]]) / (s9 + s3))


def test_dcu_deep_gemm_fp8_fp4_entries_follow_ref_fp8_mqa_logits():
    """sum_h relu(q_h . k) * w_h inside [ks, ke): q rows (1, 0) and (-1, 0) per head, keys e0 and 2 e0."""
    q = torch.zeros(1, 32, 32)
    q[0, 0, 0], q[0, 1, 0] = 1.0, -1.0
    k = torch.zeros(2, 32)
    k[0, 0], k[1, 0] = 1.0, 2.0
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 3.0, 5.0
    ks, ke = torch.tensor([0], dtype=torch.int32), torch.tensor([2], dtype=torch.int32)
    got = dg.fp8_fp4_mqa_logits(q.to(torch.float8_e4m3fn), (k.to(torch.float8_e4m3fn), torch.ones(2)), w, ks, ke)
    torch.testing.assert_close(got, torch.tensor([[3.0, 6.0]]))
    with pytest.raises(RuntimeError, match="FP4"):
        dg.fp8_fp4_mqa_logits((q, q), (k, torch.ones(2)), w, ks, ke)
