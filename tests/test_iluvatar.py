"""Iluvatar's ixformer adapters (hwlayer/backends/cuda/iluvatar.py: the DSA indexer, moe_grouped_topk routing,
the bf16 / int8 group GEMVs) over the ixformer emulator (conformance/emulators/ixformer.py): the emulator
held to hand-derived vectors of the references it follows, and the adapters held to the generic ops with
call counts (they served); the indexer reads the paged cache in place with the step's tables built once."""

from __future__ import annotations

import pytest
import torch

import hwlayer
from conformance import emulators
from conformance.emulators import ixformer as ixf_emu
from conformance.emulators._common import VendorCheckError
from hwlayer import ops
from hwlayer.ops.layout import attention_metadata, with_backend_tables


def i32(*v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# The emulator against vectors derived from its references


def test_ixformer_logits_follow_the_paged_reference():
    """FlagGems-vllm's reference: column p = sum_h relu(q_h . k_p) w_h, k_p at table[p // bs], slot p % bs."""
    cache = torch.zeros(3, 2, 2, dtype=torch.bfloat16)  # 3 blocks of 2 slots, D = 2
    cache[2, 0] = torch.tensor([1.0, 0.0])  # position 0 (block 0 of the sequence is physical block 2)
    cache[2, 1] = torch.tensor([0.0, 1.0])  # position 1
    cache[0, 0] = torch.tensor([1.0, 1.0])  # position 2 (physical block 0)
    cache[1, 0] = torch.tensor([9.0, 9.0])  # not in the table: never read
    q = torch.tensor([[[2.0, -1.0], [-1.0, 3.0]]], dtype=torch.bfloat16)  # one token, 2 heads
    w = torch.tensor([[0.5, 2.0]], dtype=torch.bfloat16)
    logits = ixf_emu.dsa_indexer_mqa_logits_with_blocks(q, i32(0, 1), i32(0, 3), cache, i32(2, 0).view(1, 2), w,
                                                        max_q_len=1, max_kv_len=3, max_context_len=4)
    # p0: relu(2)*.5 + relu(-1)*2 = 1; p1: relu(-1)*.5 + relu(3)*2 = 6; p2: relu(1)*.5 + relu(2)*2 = 4.5
    assert logits.dtype == torch.float32 and logits.shape == (1, 4)
    assert logits[0, :3].tolist() == [1.0, 6.0, 4.5]
    assert logits[0, 3] == float("inf")  # past the sequence: garbage a caller must not select


def test_ixformer_topk_follows_the_replaced_torch_path():
    """sparse_attn_indexer_original: topk of [ks, ke), minus ks, -1 where fewer candidates; in place."""
    logits = torch.tensor([[5.0, 1.0, 3.0, float("inf")], [0.0, 2.0, 9.0, 7.0]])
    out = torch.full((2, 3), 7, dtype=torch.int32)
    assert ixf_emu.dsa_update_topk_indices(logits, i32(0, 1), i32(2, 4), 3, out) is None
    assert out.tolist() == [[0, 1, -1], [1, 2, 0]]  # row 1: columns 2, 3, 1 minus ks = 1


def test_ixformer_checks_fail_like_the_kernel():
    q = torch.zeros(1, 2, 4, dtype=torch.bfloat16)
    cache = torch.zeros(1, 16, 4, dtype=torch.bfloat16)
    args = (q, i32(0, 1), i32(0, 1), cache, i32(0).view(1, 1))
    with pytest.raises(VendorCheckError, match="one dtype"):  # fp32 weights with bf16 q
        ixf_emu.dsa_indexer_mqa_logits_with_blocks(*args, torch.zeros(1, 2), max_q_len=1, max_kv_len=1,
                                                   max_context_len=1)
    with pytest.raises(VendorCheckError, match="int32 topk_indices"):
        ixf_emu.dsa_update_topk_indices(torch.zeros(1, 4), i32(0), i32(1), 2, torch.zeros(1, 2, dtype=torch.int64))


def test_ixformer_kernels_are_opaque_to_fake_tensors():
    """The emulator reads values (``int(cu[b])``); as opaque custom ops they answer with shapes only."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.empty(3, 2, 4, dtype=torch.bfloat16)
        logits = ixf_emu.dsa_indexer_mqa_logits_with_blocks(
            q, i32(0, 3), i32(0, 5), torch.empty(2, 4, 4, dtype=torch.bfloat16), i32(1, 0).view(1, 2),
            torch.empty(3, 2, dtype=torch.bfloat16), max_q_len=3, max_kv_len=5, max_context_len=8)
        assert logits.shape == (3, 8) and logits.dtype == torch.float32
        ixf_emu.dsa_update_topk_indices(logits, i32(0, 0, 0), i32(3, 4, 5), 2, torch.empty(3, 2, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# The adapter


@pytest.fixture
def plan():
    emulators.activate("iluvatar")
    yield hwlayer.plan("iluvatar", trace=True)
    emulators.deactivate()


def indexer_case(dtype: torch.dtype = torch.bfloat16, bs: int = 64):
    """q_lens [6, 1, 2] over contexts [6, 50, 90] in a shuffled paged cache; 32 heads of 128, top-16."""
    gen = torch.Generator().manual_seed(1)
    seq_lens = [6, 50, 90]
    blocks = [-(-L // bs) for L in seq_lens]
    perm = torch.randperm(sum(blocks) + 2, generator=gen)
    table = torch.zeros(3, max(blocks), dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks):
        table[b, :n] = perm[at:at + n]
        at += n
    cache = torch.randn(sum(blocks) + 2, bs, 128, generator=gen).to(dtype)
    q = torch.randn(9, 32, 128, generator=gen).to(dtype)
    w = torch.randn(9, 32, generator=gen) * 32**-0.5
    return q, w, cache, table, i32(0, 6, 7, 9), i32(*seq_lens), 16, 128**-0.5


def same_sets(got: torch.Tensor, want: torch.Tensor) -> bool:
    return all({p for p in g if p >= 0} == {p for p in w if p >= 0} and g.count(-1) == w.count(-1)
               for g, w in zip(got.tolist(), want.tolist(), strict=True))


def served(plan, op: str) -> bool:
    counts = plan.call_counts()
    return counts.get((op, "native"), 0) > 0 and not any(n for (o, t), n in counts.items() if o == op and t != "native")


@pytest.mark.parametrize("bs", [64, 16])  # 16: a kernel block size; 64: the layout's default
def test_ixformer_indexer_serves_and_agrees_with_generic(plan, bs):
    args = indexer_case(bs=bs)
    got = plan.lightning_indexer(*args)
    assert same_sets(got, ops.lightning_indexer(*args))
    assert served(plan, "lightning_indexer"), plan.call_counts()


def test_ixformer_indexer_declines_what_the_kernel_does_not_take(plan):
    from hwlayer.backends.cuda import iluvatar

    args = indexer_case(torch.float32)
    assert "bf16/fp16" in iluvatar.ixformer_indexer_supports(*args)
    plan.lightning_indexer(*args)
    assert not served(plan, "lightning_indexer")  # generic served it, and the counts say so


def test_ixformer_indexer_reads_the_cache_in_place_with_tables_built_once(plan, monkeypatch):
    from hwlayer.backends.cuda import iluvatar

    q, w, cache, table, cu, lens, topk, scale = indexer_case()
    layout = plan.backend.layout()
    assert layout is iluvatar.ILUVATAR_LAYOUT and layout.canonical
    kc = layout.indexer_cache(cache.shape[0], 64, 128, torch.bfloat16, cache.device)
    kc.write(torch.arange(cache.shape[0] * 64), cache.view(-1, 128))
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 49, 88, 89])
    meta = attention_metadata(cu, lens, table, positions, block_size=64, max_seqlen_k=90)
    meta = with_backend_tables(meta, layout, cu, lens, table)  # once per step
    assert isinstance(meta.backend, iluvatar.IxformerTables)

    built, seen = [], []
    monkeypatch.setattr(iluvatar, "ixformer_tables", lambda *a, **k: built.append(1))
    ixf = iluvatar._ixf()
    real = ixf.dsa_indexer_mqa_logits_with_blocks

    def spy(q, cu_q, cu_kv, kv_cache, *rest, **kw):
        seen.append(kv_cache.data_ptr())
        return real(q, cu_q, cu_kv, kv_cache, *rest, **kw)

    monkeypatch.setattr(ixf, "dsa_indexer_mqa_logits_with_blocks", spy)
    want = ops.lightning_indexer(q, w, cache, table, cu, lens, topk, scale)
    for _layer in range(2):
        got = plan.lightning_indexer(q, w, kc, table, cu, lens, topk, scale, 6, 90, meta=meta)
        assert same_sets(got, want)
    assert not built  # the layers used the step's tables
    assert seen == [kc.canonical.data_ptr()] * 2  # the cache itself, not a gathered copy
    assert served(plan, "lightning_indexer"), plan.call_counts()


# ---------------------------------------------------------------------------------------------
# MoE: moe_grouped_topk and the group GEMVs, the emulator against its references' vectors


def test_ixformer_grouped_topk_follows_ref_moe_grouped_topk():
    """ref_moe_grouped_topk: sigmoid scores, bias for the choice only, groups ranked by their MAX choice
    score (others masked to 0), weights = unbiased scores of the ids, renormalized, unscaled."""
    logit = torch.tensor([0.0, 2.0, -2.0, 1.0, 0.5, 0.5, 0.5, 0.5])  # 2 groups of 4
    s = logit.sigmoid()
    bias = torch.tensor([0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    # choice = s + bias: group 0 max = s[2] + 0.9 = 1.019 (sum of top-2 would be 1.019 + 0.881 = 1.90);
    # group 1 max = 0.622 (top-2 sum 1.245): the max rule keeps group 0.
    w, ids = ixf_emu.moe_grouped_topk(logit.view(1, 8), 2, 2, 1, "sigmoid", bias, renormalize=True)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert sorted(ids[0].tolist()) == [1, 2]  # choice 0.881 and 1.019
    pair = {int(i): float(v) for i, v in zip(ids[0], w[0], strict=True)}
    assert pair[2] == pytest.approx(float(s[2] / (s[1] + s[2])))  # the unbiased score, renormalized
    w, ids = ixf_emu.moe_grouped_topk(logit.view(1, 8), 2, 1, 1, "sigmoid", None, renormalize=False)
    assert sorted(ids[0].tolist()) == [1, 3] and sorted(w[0].tolist()) == pytest.approx(sorted(s[[1, 3]].tolist()))


def test_ixformer_group_gemvs_follow_the_grouped_references():
    """MojoExperts / ref_moe_w8a8_group_gemm: rows of expert e times W_e^T (TN: [E, N, K]; NN: [E, K, N]),
    int8 rows scaled by their scale and the weight's per-channel scale; rows past the counts unspecified."""
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=torch.bfloat16)
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, -1.0]]],
                     dtype=torch.bfloat16)  # [E=2, N=3, K=2]
    out = ixf_emu.moe_w16a16_group_gemv(input=x, weight=w, output_dtype=torch.bfloat16,
                                        tokens_per_experts_gpu=i32(1, 2), format="TN")
    assert out[:3].tolist() == [[1.0, 2.0, 3.0], [6.0, 0.0, -4.0], [10.0, 0.0, -6.0]]
    assert out[3].isnan().all()  # past sum(tokens): garbage a caller must not use
    xq = torch.tensor([[1, 2], [3, -4]], dtype=torch.int8)
    wq = torch.tensor([[[1, 0], [0, 1]], [[2, 1], [1, 2]]], dtype=torch.int8)  # NN: [E=2, K=2, N=2]
    out = ixf_emu.moe_w8a8_group_gemv(input=xq, weight=wq, i_scales=torch.tensor([0.5, 2.0]),
                                      w_scales=torch.tensor([[1.0, 1.0], [0.25, 1.0]]), output_dtype=torch.bfloat16,
                                      tokens_per_experts=i32(1, 1), format=0)
    # row 0 (expert 0): [1, 2] * 0.5 * [1, 1]; row 1 (expert 1): [3*2-4*1, 3*1-4*2] = [2, -5] * 2 * [0.25, 1]
    assert out.tolist() == [[0.5, 1.0], [1.0, -10.0]]


def test_ixformer_moe_checks_fail_like_the_kernel():
    g = torch.zeros(2, 8)
    with pytest.raises(VendorCheckError, match="gating's dtype"):  # one IN_DTYPE for gating and bias
        ixf_emu.moe_grouped_topk(g, 2, 1, 1, "sigmoid", torch.zeros(8, dtype=torch.bfloat16))
    x, w = torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2, 5, 4, dtype=torch.bfloat16)
    with pytest.raises(VendorCheckError, match="int32 row counts"):
        ixf_emu.moe_w16a16_group_gemv(x, w, torch.bfloat16, torch.tensor([1, 2]))
    with pytest.raises(VendorCheckError, match="does not take K"):
        ixf_emu.moe_w16a16_group_gemv(x, w, torch.bfloat16, i32(1, 2), format="NN")


def test_ixformer_moe_kernels_are_opaque_to_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        w, ids = ixf_emu.moe_grouped_topk(torch.empty(3, 8), 2, 1, 1, "sigmoid", torch.empty(8))
        assert w.shape == ids.shape == (3, 2)
        out = ixf_emu.moe_w16a16_group_gemv(torch.empty(5, 4, dtype=torch.bfloat16),
                                            torch.empty(2, 6, 4, dtype=torch.bfloat16), torch.bfloat16, i32(2, 3))
        assert out.shape == (5, 6)
        out = ixf_emu.moe_w8a8_group_gemv(torch.empty(5, 4, dtype=torch.int8), torch.empty(2, 4, 6, dtype=torch.int8),
                                          torch.empty(5), torch.empty(2, 6), torch.bfloat16, i32(2, 3))
        assert out.shape == (5, 6)


# ---------------------------------------------------------------------------------------------
# MoE adapters: served (call counts), against the generic ops


def test_ixformer_route_serves_glm5_routing_and_scales(plan):
    """GLM-5: sigmoid, correction bias, one group, renormalized, x2.5 (the kernel does not scale)."""
    gen = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(12, 32, generator=gen), torch.randn(32, generator=gen) * 0.5
    got_w, got_ids = plan.moe_route(logits, bias, 4, 1, 1, True, 2.5)
    want_w, want_ids = ops.moe_route(logits, bias, 4, 1, 1, True, 2.5)
    order_g, order_w = got_ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(got_ids.gather(1, order_g), want_ids.gather(1, order_w))
    torch.testing.assert_close(got_w.gather(1, order_g), want_w.gather(1, order_w))
    assert served(plan, "moe_route"), plan.call_counts()


def test_ixformer_route_declines_a_dropped_group(plan):
    from hwlayer.backends.cuda import iluvatar

    logits = torch.randn(4, 32)
    reason = iluvatar.ixformer_moe_route_supports(logits, None, 4, 4, 2, True, 1.0)
    assert "max score" in reason  # ixformer's group rule is not noaux_tc's
    plan.moe_route(logits, None, 4, 4, 2, True, 1.0)
    assert not served(plan, "moe_route")


def test_ixformer_grouped_gemm_serves_with_padding_rows(plan):
    gen = torch.Generator().manual_seed(4)
    sizes = torch.tensor([3, 0, 5, 2])
    x = torch.randn(13, 64, generator=gen).bfloat16()  # 3 padding rows (moe_permute's dropped assignments)
    w = (torch.randn(4, 48, 64, generator=gen) * 0.125).bfloat16()
    got = plan.grouped_gemm(x, w, sizes)
    torch.testing.assert_close(got[:10].float(), ops.grouped_gemm(x, w, sizes)[:10].float(), atol=2e-2, rtol=2e-2)
    assert served(plan, "grouped_gemm"), plan.call_counts()


def test_ixformer_int8_experts_serve_on_the_prepared_layout(plan):
    from hwlayer.backends.cuda import iluvatar
    from hwlayer.ops.quant import quantize_weight

    gen = torch.Generator().manual_seed(5)
    qw = quantize_weight(torch.randn(3, 40, 64, generator=gen), "int8")
    x, sizes = torch.randn(9, 64, generator=gen).bfloat16(), torch.tensor([4, 0, 5])
    assert "prepare_weight makes" in iluvatar.ixformer_quant_grouped_gemm_supports(x, qw, sizes)
    prepared = plan.prepare_weight("model.layers.1.mlp.experts.w13", qw)
    assert prepared.data.transpose(1, 2).is_contiguous() and torch.equal(prepared.data, qw.data)  # same values
    got = plan.quant_grouped_gemm(x, prepared, sizes)
    torch.testing.assert_close(got.float(), ops.quant_grouped_gemm(x, qw, sizes).float(), atol=3e-2, rtol=2e-2)
    assert served(plan, "quant_grouped_gemm"), plan.call_counts()
