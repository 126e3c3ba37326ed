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


# ---- int8 experts: lightop's contiguous w8a8 grouped GEMM over the Marlin2 weight layout


def _int8_experts(E: int, D: int, inter: int, seed: int = 5):
    from hwlayer.ops.quant import quantize_weight

    gen = torch.Generator().manual_seed(seed)
    w13 = quantize_weight(torch.randn(E, 2 * inter, D, generator=gen) * 0.05, "int8")
    w2 = quantize_weight(torch.randn(E, D, inter, generator=gen) * 0.05, "int8")
    return gen, w13, w2


def _routing(gen: torch.Generator, T: int, k: int, E: int):
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    ids[1, 0], ids[-1, -1] = -1, E  # dropped: not an expert of this rank
    return torch.rand(T, k, generator=gen), ids


def _reference_experts(x, w13, w2, weights, ids):
    return ops.quant_fused_experts_factory(hwlayer.plan("cpu"))(x, w13, w2, weights, ids)


def test_lightop_int8_experts_serve_with_the_weights_packed_once(plan):
    gen, w13, w2 = _int8_experts(4, 256, 128)
    ready13 = plan.prepare_weight("model.layers.1.mlp.experts.w13", w13)
    ready2 = plan.prepare_weight("model.layers.1.mlp.experts.w2", w2)
    # one copy resident, in the kernel's layout; the contract's view of it is unchanged
    assert isinstance(ready13.data, hygon.Marlin2Int8) and tuple(ready13.data.packed.shape) == (4, 256 // 16, 256 * 16)
    assert ready13.data.packed.is_contiguous() and not ready13.data.is_contiguous()
    assert torch.equal(ready13.dequantize(), w13.dequantize()) and torch.equal(ready2.data, w2.data)
    assert ready13.nbytes == w13.nbytes
    x = torch.randn(9, 256, generator=gen).bfloat16()
    weights, ids = _routing(gen, 9, 3, 4)
    got = plan.quant_fused_experts(x, ready13, ready2, weights, ids)
    want = _reference_experts(x, w13, w2, weights, ids)
    # the SwiGLU output is quantised from fp32 (fuse_silu_mul_quant), not from bf16: within bf16 rounding
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=2e-2)
    assert served_natively(plan, "quant_fused_experts") and served_natively(plan, "prepare_weight")
    assert plan.call_counts()[("prepare_weight", "native")] == 2
    assert plan.quant_fused_experts(x[:0], ready13, ready2, weights[:0], ids[:0]).shape == (0, 256)


def test_lightop_int8_experts_decline_what_the_kernel_does_not_take(plan):
    gen, w13, w2 = _int8_experts(4, 256, 128)
    x = torch.randn(5, 256, generator=gen).bfloat16()
    weights, ids = _routing(gen, 5, 2, 4)
    assert "Marlin2 layout" in hygon.lightop_int8_experts_supports(x, w13, w2, weights, ids)  # not prepared
    ready13, ready2 = plan.prepare_weight("w13", w13), plan.prepare_weight("w2", w2)
    assert "bf16 / fp16" in hygon.lightop_int8_experts_supports(x.float(), ready13, ready2, weights, ids)
    _, odd, _ = _int8_experts(2, 144, 128)  # K = 144: not a multiple of 128
    assert "K % 128" in hygon.lightop_prepare_weight_supports("w13", odd)
    assert plan.prepare_weight("w13", odd).data.is_contiguous()  # declined: left [E, N, K] for the Triton tier
    # a packed stack the native path declines still computes right elsewhere (the generic op unpacks it)
    sizes = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(plan.quant_grouped_gemm(x, ready13, sizes).float(),
                               ops.quant_grouped_gemm(x, w13, sizes).float(), atol=1e-2, rtol=1e-2)


def test_contiguous_rows_pad_each_expert_to_256_rows():
    ids = torch.tensor([[2, 0], [2, 7], [-1, 2]], dtype=torch.int32)  # 7 and -1: dropped (E = 4)
    dest, m_indices, M = hygon.contiguous_rows(ids, 4)
    assert M == 1280  # round_up(6 + min(6, 4) * 255, 256): the padding bound without reading the counts
    assert dest.tolist() == [256, 0, 257, M, M, 258]  # expert 0's slice first, then expert 2's
    assert (m_indices[:1] == 0).all() and (m_indices[1:256] == -1).all()
    assert (m_indices[256:259] == 2).all() and (m_indices[259:512] == -1).all()
    # the empty tiles past the last slice: expert 0 on the first row (dummy work), -1 on the rest
    tails = m_indices[512:].view(-1, 256)
    assert (tails[:, 0] == 0).all() and (tails[:, 1:] == -1).all()


@pytest.mark.slow
def test_lightop_int8_experts_at_glm5_widths(plan):
    """GLM-5's expert GEMMs: gate/up N 4096 x K 6144, down N 6144 x K 2048 (two experts of 256)."""
    gen, w13, w2 = _int8_experts(2, 6144, 2048)
    ready13, ready2 = plan.prepare_weight("w13", w13), plan.prepare_weight("w2", w2)
    x = torch.randn(4, 6144, generator=gen).bfloat16()
    weights, ids = _routing(gen, 4, 2, 2)
    got = plan.quant_fused_experts(x, ready13, ready2, weights, ids).double()
    want = _reference_experts(x, w13, w2, weights, ids).double()
    # K = 6144 / 2048: two bf16 roundings of values up to ~70 (the reference also rounds SwiGLU to bf16)
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.9999
    assert served_natively(plan, "quant_fused_experts")


def test_marlin2_layout_is_vllm_hcus():
    """vllm_hcu's weight8bit_nt_kpack2_marlin2: [E, N/16, 16, K/64, 4, 16] -> (0, 3, 1, 4, 2, 5) ->
    (E, N/16, K*16), so w[e, n, k] sits at flat offset (((k // 64) * N/16 + n // 16) * 4 + k % 64 // 16) * 256
    + (n % 16) * 16 + k % 16 of expert e; for one 16 x 64 block that is vllm_hcu's own reference
    ``w.reshape(1, 16, 1, 4, 16).permute(2, 0, 3, 1, 4)`` (its test_weight8bit_marlin2_layout_2d_3d)."""
    E, N, K = 2, 48, 128
    w = torch.arange(E * N * K, dtype=torch.int64).remainder(251).sub(125).to(torch.int8).view(E, N, K)
    packed = hygon.marlin2_pack(w)
    assert tuple(packed.shape) == (E, N // 16, K * 16)
    flat = packed.view(E, -1)
    for e, n, k in [(0, 0, 0), (0, 17, 3), (1, 35, 70), (1, 47, 127), (0, 5, 100)]:
        at = (((k // 64) * (N // 16) + n // 16) * 4 + k % 64 // 16) * 256 + (n % 16) * 16 + k % 16
        assert flat[e, at] == w[e, n, k]
    block = w[0, :16, :64]
    assert torch.equal(hygon.marlin2_pack(block[None]).flatten(),
                       block.reshape(1, 16, 1, 4, 16).permute(2, 0, 3, 1, 4).flatten())
    assert torch.equal(lightop.marlin2_unpack(packed), w) and torch.equal(hygon.marlin2_unpack(packed), w)


def _legacy_n16_flat(w: torch.Tensor) -> torch.Tensor:
    """The older DCU DeepGEMM packing (weight8bit_nt_kpack2_marlin: 16x16 tiles, no 64-wide K group)."""
    E, N, K = w.shape
    return w.reshape(E, N // 16, 16, K // 16, 16).permute(0, 1, 3, 2, 4).reshape(E, N // 16, K * 16)


def test_lightop_contig_gemm_follows_the_dcu_deepgemm_reference_and_needs_the_layout():
    """The DCU DeepGEMM contiguous test's torch_gemm: out[m, n] = sa[m] sb[e, n] (a[m] . w[e, n]) for
    m_indices[m] = e, rows of -1 skipped; the weight must be in the Marlin2 layout (the legacy 16x16
    packing computes wrong), no 256-row tile may hold two experts or start with -1."""
    gen = torch.Generator().manual_seed(8)
    w = torch.randint(-127, 128, (2, 256, 128), generator=gen, dtype=torch.int8)
    a = torch.randint(-127, 128, (512, 128), generator=gen, dtype=torch.int8)
    sa, sb = torch.rand(512, generator=gen), torch.rand(2, 256, generator=gen)
    m_indices = torch.full((512,), -1, dtype=torch.int32)
    m_indices[:3], m_indices[256:300] = 1, 0
    out = torch.full((512, 256), 7.0).bfloat16()
    lightop.m_grouped_w8a8_gemm_nt_contig_asm((a, sa), (hygon.marlin2_pack(w), sb), out, m_indices)
    for rows, e in ((slice(0, 3), 1), (slice(256, 300), 0)):
        want = (a[rows].double() @ w[e].double().t()).float() * sa[rows, None] * sb[e]
        torch.testing.assert_close(out[rows].float(), want.bfloat16().float())
    assert (out[3:256] == 7).all()  # padding rows untouched
    for other in (w.reshape(2, 16, 128 * 16), _legacy_n16_flat(w)):  # not the layout: wrong results
        wrong = out.clone()
        lightop.m_grouped_w8a8_gemm_nt_contig_asm((a, sa), (other, sb), wrong, m_indices)
        assert not torch.allclose(wrong[:3].float(), out[:3].float())
    m_indices[3] = 0  # expert 0 inside expert 1's tile
    with pytest.raises(RuntimeError, match="two experts"):
        lightop.m_grouped_w8a8_gemm_nt_contig_asm((a, sa), (hygon.marlin2_pack(w), sb), out, m_indices)
    m_indices[3], m_indices[:256] = -1, -1  # an empty tile with -1 on its first row
    with pytest.raises(RuntimeError, match="first row"):
        lightop.m_grouped_w8a8_gemm_nt_contig_asm((a, sa), (hygon.marlin2_pack(w), sb), out, m_indices)
    with pytest.raises(RuntimeError, match="multiple of 256"):
        lightop.m_grouped_w8a8_gemm_nt_contig_asm((a[:300], sa[:300]), (hygon.marlin2_pack(w), sb), out[:300],
                                                  m_indices[:300])


def test_lightop_fuse_silu_mul_quant_and_per_token_quant():
    """silu(gate) * up in fp32, then one int8 scale per row (absmax / 127, round half to even); rows whose
    expert id is -1 are padding and stay unwritten."""
    h = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 0.0, 1.0, 1.0], [4.0, 4.0, 4.0, 4.0]]).bfloat16()
    out = torch.full((3, 2), 9, dtype=torch.int8)
    q, s = lightop.fuse_silu_mul_quant(h, output=out, expert_ids=torch.tensor([0, 3, -1], dtype=torch.int32))
    v = torch.nn.functional.silu(torch.tensor([1.0, -2.0])) * torch.tensor([3.0, 0.5])
    assert q is out and s.shape == (3, 1)
    torch.testing.assert_close(s[0, 0], v.abs().max() / 127)
    assert q[0].tolist() == torch.round(v / (v.abs().max() / 127)).to(torch.int8).tolist()
    assert q[1].tolist() == [0, 0] and q[2].tolist() == [9, 9]  # all-zero row: zeros; padding row untouched
    xq, xs = lightop.per_token_quant_int8(torch.tensor([[0.5, -1.0, 127.0]]))
    assert xq.tolist() == [[0, -1, 127]] and xs.tolist() == [[1.0]]  # 0.5 rounds to even


@pytest.mark.slow
def test_int8_model_at_glm5_attention_widths_runs_its_experts_through_lightop(tmp_path):
    """A W8A8 checkpoint with GLM-5's attention geometry (conformance/real_width.py; experts widened to
    intermediate 128 so the GEMMs meet the kernel's N % 256 / K % 128) on hygon: the logits of every step
    agree with the cpu backend's, every expert call reached lightop (no other tier), the stacks were packed
    once at load, and a decode step's forward reads nothing on the host (FakeTensorMode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conformance.real_width import REAL_WIDTH_CONFIG
    from model import Batch, load_model
    from model.tiny import make_tiny_checkpoint

    ck = make_tiny_checkpoint(tmp_path / "w8a8", {**REAL_WIDTH_CONFIG, "moe_intermediate_size": 128},
                              dtype=torch.bfloat16, std=0.05, weight_format="int8")
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0))

    def run(model):
        cache = model.new_cache(4, 64)
        logits = [model.forward_batch(Batch(prompt, i32(0, 40), i32(40), table), cache)[0]]
        for step, token in enumerate((7, 9)):
            batch = Batch(torch.tensor([token]), i32(0, 1), i32(41 + step), table)
            logits.append(model.forward_batch(batch, cache)[0])
        return logits, cache

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HWLAYER_CHECK", "0")
        want, _ = run(load_model(ck, backend="cpu", dtype="bf16"))
        with emulators.emulation("hygon"):
            mp.setenv("HWLAYER_TRACE", "1")
            model = load_model(ck, backend="hygon", dtype="bf16")
            got, cache = run(model)
            counts = model.plan.call_counts()
            ctx = model.context(Batch(torch.tensor([5]), i32(0, 1), i32(43), table), cache)
            with FakeTensorMode(allow_non_fake_inputs=True):
                model.forward_context(ctx, cache)
            assert model.plan.call_counts()[("quant_fused_experts", "native")] == 4  # the fake step ran lightop too
    for g, w in zip(got, want, strict=True):
        assert torch.nn.functional.cosine_similarity(g.double(), w.double(), dim=0) > 0.995
    other = {tier: n for (op, tier), n in counts.items() if op == "quant_fused_experts" and tier != "native"}
    assert counts.get(("quant_fused_experts", "native"), 0) == 3 and not other, counts  # one MoE layer, 3 steps
    assert counts[("prepare_weight", "native")] == 2  # the layer's w13 and w2 stacks
