"""The emulators against vectors derived from the vendors' own test references (issue 20).

Each case is small enough to work out by hand from the reference the emulator cites (at a commit):
FlashMLA ``tests/ref.py::ref_sparse_attn_fwd``, DeepGEMM ``tests/test_attention.py::ref_fp8_mqa_logits``,
mate ``tests/test_fused_moe_gate.py::biased_grouped_topk_impl``, vLLM ``tests/kernels/core/
test_layernorm.py`` (``RMSNorm.forward_native``), MetaX mcFlashMLA's kernel (``softmax.h:450``) and the
"Math:" blocks of torch_mlu_ops ``_ops.py``. The expected values are written out here, not computed by
the emulator's code, so an emulator that drifted from its reference fails. Also: every emulated kernel
is opaque to FakeTensorMode (a fake kernel answers; the emulator's value reads stay out of sight).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conformance.emulators import deep_gemm as dg
from conformance.emulators import flash_mla as fm
from conformance.emulators import lightop, mate, torch_mlu_ops, vllm_c

E, E2 = math.e, math.e**2


def sparse_case(h_q: int = 64, topk: int = 128):
    """One query row per head group: q = e0 (per head h: scale h+1); kv rows with k[:, 0] = score base,
    k[:, 1] = value. Indices: rows 1 and 2, one index past s_kv (invalid per ref.py), -1 padding."""
    q = torch.zeros(2, h_q, 576, dtype=torch.bfloat16)
    q[:, :, 0] = 1.0
    kv = torch.zeros(4, 1, 576, dtype=torch.bfloat16)
    kv[1, 0, 0], kv[2, 0, 0], kv[3, 0, 0] = 1.0, 2.0, 50.0
    kv[1, 0, 1], kv[2, 0, 1], kv[3, 0, 1] = 10.0, 20.0, 1000.0
    idx = torch.full((2, 1, topk), -1, dtype=torch.int32)
    idx[0, 0, :3] = torch.tensor([1, 2, 4])  # 4 >= s_kv: invalid ("invalid_mask = (indices < 0) | (indices >= s_kv)")
    return q, kv, idx  # row 1: no valid index at all ("lonely_q")


def test_flash_mla_sparse_fwd_follows_ref_sparse_attn_fwd():
    q, kv, idx = sparse_case()
    out, max_logits, lse = fm.flash_mla_sparse_fwd(q, kv, idx, 1.0)
    # row 0: P = [1, 2] over the valid keys -> lse = log(e + e^2), max = 2, o = softmax . [10, 20]
    p2 = E2 / (E + E2)
    torch.testing.assert_close(lse[0], torch.full((64,), math.log(E + E2)))
    torch.testing.assert_close(max_logits[0], torch.full((64,), 2.0))
    torch.testing.assert_close(out[0, :, 1].float(), torch.full((64,), 10 * (1 - p2) + 20 * p2), atol=0.1, rtol=0)
    # row 1 (lonely): lse = +inf, out = 0 (ref.py: lonely_q_mask)
    assert torch.isposinf(lse[1]).all() and not out[1].float().any()
    # topk_length masks positions past it: with length 1 only key 1 counts (lse = 1, o = 10)
    _, _, lse1 = fm.flash_mla_sparse_fwd(q, kv, idx, 1.0, topk_length=torch.tensor([1, 0], dtype=torch.int32))
    torch.testing.assert_close(lse1[0], torch.ones(64))
    # the base-2 generation (before 082094b) reports the same lse in log2
    _, _, lse2 = fm._legacy_flash_mla_sparse_fwd(q, kv, idx, 1.0)
    torch.testing.assert_close(lse2[0], torch.full((64,), math.log(E + E2) / math.log(2)))


def test_maca_flash_mla_is_natural_log_and_takes_a_partial_block():
    """mcFlashMLA c2dbf6e softmax.h:450: ``row_max * softmax_scale + __logf(sum)``: natural log."""
    q, kv, idx = sparse_case(topk=3)
    _, _, lse = fm._maca_flash_mla_sparse_fwd(q, kv, idx, 1.0)
    torch.testing.assert_close(lse[0], torch.full((64,), math.log(E + E2)))
    assert torch.isposinf(lse[1]).all()


def test_mate_flash_mla_mirrors_flash_mla():
    q, kv, idx = sparse_case(topk=64)
    _, _, lse = mate.flash_mla_sparse_fwd(q, kv, idx, 1.0)
    torch.testing.assert_close(lse[0], torch.full((64,), math.log(E + E2)))


def mqa_case(heads: int = 32, dim: int = 32):
    """q[m, h] = a_h e0, k[n] = b_n e0: score = a_h b_n; values exact in e4m3."""
    a = torch.tensor([1.0, -1.0] * (heads // 2))
    b = torch.tensor([2.0, 0.5, -1.0])
    q = torch.zeros(2, heads, dim)
    q[:, :, 0] = a
    k = torch.zeros(3, dim)
    k[:, 0] = b
    w = torch.zeros(2, heads)
    w[:, 0], w[:, 1] = 3.0, 5.0  # head 0 (a = 1) and head 1 (a = -1) weigh in
    ks, ke = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3, 2], dtype=torch.int32)
    # ref: logits[m, n] = sum_h w[m, h] * relu(a_h b_n): n=0: 3*2 = 6; n=1: 3*0.5 = 1.5; n=2: 5*1 = 5
    want = torch.tensor([[6.0, 1.5, 5.0], [-math.inf, 1.5, -math.inf]])
    return q, k, w, ks, ke, want


def test_deep_gemm_mqa_logits_follow_ref_fp8_mqa_logits():
    q, k, w, ks, ke, want = mqa_case()
    got = dg.fp8_mqa_logits(q.to(torch.float8_e4m3fn), (k.to(torch.float8_e4m3fn), torch.ones(3)), w, ks, ke)
    torch.testing.assert_close(got, want)
    # the per-row key scale multiplies the key (kv_fp8 * kv_scale): scale 2 on key 1 doubles its logit
    got = dg.fp8_mqa_logits(q.to(torch.float8_e4m3fn), (k.to(torch.float8_e4m3fn), torch.tensor([1.0, 2.0, 1.0])),
                            w, ks, ke)
    assert got[0, 1] == 3.0
    got = dg.bf16_mqa_logits(q.bfloat16(), k.bfloat16(), w, ks, ke)
    torch.testing.assert_close(got, want)
    got = mate.fp8_mqa_logits(q.to(torch.float8_e4m3fn), (k.to(torch.float8_e4m3fn), torch.ones(3)), w, ks, ke,
                              clean_logits=True)
    torch.testing.assert_close(got, want)


def fused_fp8_cache(rows: dict[tuple[int, int], tuple[float, float]], num_blocks: int = 2, block_kv: int = 64,
                    dim: int = 32) -> torch.Tensor:
    """DeepGEMM's fused paged cache as ``test_paged_mqa_logits``'s ``kv_cache_cast_to_fp8`` lays it out
    (DeepGEMM 54e2261 tests/test_attention.py): per block ``block_kv * dim`` e4m3 codes, then ``block_kv``
    fp32 scales. ``rows[(block, offset)] = (code of dim 0, scale)``; every other code is 0."""
    codes = torch.zeros(num_blocks, block_kv, dim)
    scales = torch.ones(num_blocks, block_kv)
    for (b, o), (c, sf) in rows.items():
        codes[b, o, 0], scales[b, o] = c, sf
    fused = torch.empty(num_blocks, block_kv * (dim + 4), dtype=torch.uint8)
    fused[:, : block_kv * dim] = codes.to(torch.float8_e4m3fn).view(num_blocks, -1).view(torch.uint8)
    fused[:, block_kv * dim:] = scales.view(torch.uint8)
    return fused.view(num_blocks, block_kv, 1, dim + 4)


def test_deep_gemm_paged_mqa_logits_follow_ref_paged_mqa_logits():
    """``ref_paged_mqa_logits`` with 2-D context lens: row (b, j) at key position k < context_lens[b, j] is
    sum_h relu(q[b, j, h] . kv[k]) * weights[row, h], kv = codes * scale; columns past it are not
    written (clean_logits=False). Positions 0..63 in block 1, 64..127 in block 0 (block_table [1, 0])."""
    kv = fused_fp8_cache({(1, 0): (1.0, 2.0), (1, 1): (-1.0, 1.0), (1, 2): (3.0, 1.0), (0, 1): (4.0, 0.5)})
    q = torch.zeros(1, 2, 32, 32)
    q[0, :, 0, 0], q[0, :, 1, 0] = 1.0, -1.0  # head 1 sees -kv: relu drops it unless kv < 0
    w = torch.zeros(2, 32)
    w[:, 0], w[:, 1] = 2.0, 0.5
    ctx = torch.tensor([[3, 70]], dtype=torch.int32)
    table = torch.tensor([[1, 0]], dtype=torch.int32)
    sched = dg.get_paged_mqa_logits_metadata(ctx, 64, dg.get_num_sms())
    got = dg.fp8_paged_mqa_logits(q.to(torch.float8_e4m3fn), kv, w, ctx, table, sched, 128)
    assert got.shape == (2, 128) and got.dtype == torch.float32
    # row 0 (3 keys): kv = 2, -1, 3 -> 2*relu(kv) + 0.5*relu(-kv) = 4, 0.5, 6
    assert got[0, :3].tolist() == [4.0, 0.5, 6.0]
    # row 1 (70 keys): the same, position 65 (block 0, offset 1) kv = 4 * 0.5 = 2 -> 4; the rest 0
    want = torch.zeros(70)
    want[:3], want[65] = torch.tensor([4.0, 0.5, 6.0]), 4.0
    assert torch.equal(got[1, :70], want)
    assert (got[0, 3:] > 1e29).all() and (got[1, 70:] > 1e29).all()  # unwritten: the caller masks them
    with pytest.raises(RuntimeError, match="clean_logits"):
        dg.fp8_paged_mqa_logits(q.to(torch.float8_e4m3fn), kv, w, ctx, table, sched, 128, clean_logits=True)
    with pytest.raises(RuntimeError, match="block_kv must be 64"):
        dg.get_paged_mqa_logits_metadata(ctx, 32, dg.get_num_sms())


def test_maca_bf16_paged_mqa_logits_follow_ref_paged_mqa_logits():
    """DeepGEMM 54e2261 ``ref_paged_mqa_logits`` with bf16 keys (no scale), as vLLM-metax 6162d93 calls MACA's
    ``bf16_paged_mqa_logits``: the bf16 cache ``[blocks, 64, D]`` viewed ``[blocks, 64, 1, D]``, 1-D context
    lens (draft token j of request i sees keys ``0 .. context_lens[i] - next_n + j``), ``-inf`` past them
    (always cleaned). Positions 0..63 in block 1, 64..127 in block 0 (block_table [1, 0])."""
    cache = torch.zeros(2, 64, 32, dtype=torch.bfloat16)
    cache[1, 0, 0], cache[1, 1, 0], cache[1, 2, 0], cache[0, 1, 0] = 2.0, -1.0, 3.0, 4.0
    q = torch.zeros(1, 2, 32, 32, dtype=torch.bfloat16)
    q[0, :, 0, 0], q[0, :, 1, 0] = 1.0, -1.0  # head 1 sees -kv: relu drops it unless kv < 0
    w = torch.zeros(2, 32)
    w[:, 0], w[:, 1] = 2.0, 0.5
    ctx, table = torch.tensor([66], dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32)
    maca = types.ModuleType("deep_gemm")
    dg.install_maca(maca)
    sched = maca.get_paged_mqa_logits_metadata(ctx, 64, 8)
    got = maca.bf16_paged_mqa_logits(q, cache.unsqueeze(-2), w, ctx, table, sched, max_model_len=128)
    want = torch.full((2, 128), float("-inf"))
    want[:, :65] = 0.0
    want[:, :3] = torch.tensor([4.0, 0.5, 6.0])  # 2*relu(kv) + 0.5*relu(-kv) for kv = 2, -1, 3
    want[1, 65] = 8.0  # draft 1 sees position 65 (block 0, offset 1): kv = 4; draft 0 stops at 64
    assert sched.shape == (9, 2) and sched.dtype == torch.int32
    assert torch.equal(got, want)
    ctx2 = torch.tensor([[3, 66]], dtype=torch.int32)  # 2-D: row (0, j) sees keys k < ctx2[0, j]
    got2 = maca.bf16_paged_mqa_logits(q, cache.unsqueeze(-2), w, ctx2, table, sched, 128)
    assert torch.equal(got2[1], want[1]) and got2[0, :3].tolist() == [4.0, 0.5, 6.0] and got2[0, 3:].isinf().all()
    with pytest.raises(RuntimeError, match="kv_cache is bf16"):
        maca.bf16_paged_mqa_logits(q, cache, w, ctx, table, sched, 128)  # the cache without its unsqueeze(-2)
    with pytest.raises(RuntimeError, match="block_kv must be 64"):
        maca.get_paged_mqa_logits_metadata(ctx, 32, 8)
    with FakeTensorMode(allow_non_fake_inputs=True):  # opaque: shapes only
        sched = maca.get_paged_mqa_logits_metadata(ctx, 64, 8)
        assert maca.bf16_paged_mqa_logits(q, cache.unsqueeze(-2), w, ctx, table, sched, 128).shape == (2, 128)


def test_mate_paged_mqa_logits_follow_its_ref_fp8_paged_mqa_logits():
    """mate 3f58cc3 tests/test_deep_gemm.py ``ref_fp8_paged_mqa_logits``: 1-D context lens, draft token j
    of request i sees keys ``0 .. context_lens[i] - next_n + j``; ``clean_logits=True`` leaves ``-inf``
    past that (the test asserts the -inf mask; the docstring's "zero-fill" loses)."""
    kv = fused_fp8_cache({(1, 0): (1.0, 2.0), (1, 2): (3.0, 1.0), (0, 1): (4.0, 0.5)})
    q = torch.zeros(1, 2, 32, 32)
    q[0, :, 0, 0] = 1.0
    w = torch.zeros(2, 32)
    w[:, 0] = 1.0
    ctx, table = torch.tensor([66], dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32)
    sched = mate.get_paged_mqa_logits_metadata(ctx, 64)
    got = mate.fp8_paged_mqa_logits(q.to(torch.float8_e4m3fn), kv, w, ctx, table, sched, 128, True)
    want = torch.full((2, 128), float("-inf"))
    want[:, :65] = 0.0
    want[:, 0], want[:, 2] = 2.0, 3.0
    want[1, 65] = 2.0  # draft 1 sees position 65 (block 0, offset 1): 4 * 0.5; draft 0 stops at 64
    assert torch.equal(got, want)


def test_deep_gemm_paged_mqa_logits_schedule_follows_the_sm90_scheduler():
    """``sm90_paged_mqa_logits_metadata`` (non-varlen): rows of 300 and 10 keys are 2 + 1 segments of 256;
    on 4 SMs the first (4 - 3) get none and the rest one each, as (row, segment) starts; then the end."""
    ctx = torch.tensor([[300], [10]], dtype=torch.int32)
    assert dg.get_paged_mqa_logits_metadata(ctx, 64, 4).tolist() == [[0, 0], [0, 0], [0, 1], [1, 0], [2, 0]]


def test_mate_moe_fused_gate_follows_biased_grouped_topk_impl():
    """32 experts, one group, top-2: the bias changes the choice, the weights come from the unbiased sigmoid."""
    logits = torch.full((1, 32), -4.0)
    logits[0, 3], logits[0, 7], logits[0, 9] = 2.0, 1.0, 0.0
    bias = torch.zeros(32)
    bias[9] = 1.5  # sigmoid(0) + 1.5 = 2.0 > sigmoid(2) = 0.88: expert 9 is chosen first
    w, ids = mate.moe_fused_gate(logits, bias, 1, 1, 2, num_fused_shared_experts=0, routed_scaling_factor=2.5,
                                 renormalize=True, apply_routed_scaling_factor_on_output=True)
    assert ids.tolist() == [[9, 3]]
    s9, s3 = 0.5, 1 / (1 + math.exp(-2.0))
    torch.testing.assert_close(w, torch.tensor([[s9, s3]]) / (s9 + s3) * 2.5)


def test_mate_ragged_gemm_per_token_expert_ids():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).bfloat16()
    b = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]]).bfloat16()  # [E=2, N=1, K=2]
    out = torch.full((3, 1), 99.0, dtype=torch.bfloat16)
    mate.ragged_m_moe_gemm_16bit(a, b, torch.tensor([1, 0, -1], dtype=torch.int32), out)
    assert out.float().tolist() == [[3.0], [2.0], [99.0]]  # row 2: id -1, untouched


def test_rms_norms_follow_rmsnorm_forward_native():
    """vLLM RMSNorm.forward_native: x * rsqrt(mean(x^2) + eps) in fp32, cast, times the weight; x = [3, 4]
    has mean square 12.5. The fused op first adds the residual and returns the sum."""
    x = torch.tensor([[3.0, 4.0] * 32])
    w = torch.full((64,), 2.0)
    want = x / math.sqrt(12.5) * 2
    out = torch.empty_like(x)
    vllm_c.register()
    try:
        torch.ops._C.rms_norm(out, x, w, 0.0)
        torch.testing.assert_close(out, want)
        xi, r = torch.tensor([[1.0, 2.0] * 32]), torch.tensor([[2.0, 2.0] * 32])
        torch.ops._C.fused_add_rms_norm(xi, r, w, 0.0)
        torch.testing.assert_close(r, x)
        torch.testing.assert_close(xi, want)
    finally:
        vllm_c.unregister()
    torch.testing.assert_close(lightop.rmsnorm_forward_autograd(x, w, 0.0, False), want)
    xi, r = torch.tensor([[1.0, 2.0] * 32]), torch.tensor([[2.0, 2.0] * 32])
    lightop.fused_add_rms_norm(xi, r, w, 0.0)
    torch.testing.assert_close(xi, want)
    normed, summed = torch_mlu_ops.fused_rms_norm(torch.tensor([[1.0, 2.0] * 32]), torch.tensor([[2.0, 2.0] * 32]),
                                                   w, None, None, 0.0, True)
    torch.testing.assert_close(summed, x)
    torch.testing.assert_close(normed, want)


@pytest.mark.parametrize("interleaved", [True, False])
def test_tmo_apply_rotary_follows_its_math_block(interleaved):
    """A quarter turn: cos 0, sin 1 -> (x1, x2) becomes (-x2, x1) on each rotated pair (cross: 2i, 2i+1;
    fold: i, i + D/2)."""
    x = torch.arange(1.0, 5.0).view(1, 1, 4)
    cos, sin = torch.zeros(1, 4), torch.ones(1, 4)
    torch_mlu_ops.apply_rotary(x, sin, cos, torch.zeros(1, dtype=torch.int32), None, interleaved, True, False, 1)
    assert x.view(-1).tolist() == ([-2.0, 1.0, -4.0, 3.0] if interleaved else [-3.0, -4.0, 1.0, 2.0])


def test_tmo_moe_sigmoid_topk_and_group_gemm_follow_their_math_blocks():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    w, ids = torch_mlu_ops.moe_sigmoid_topk(logits, 2, normalize=True, route_scale=2.0)
    s = torch.sigmoid(torch.tensor([2.0, 1.0]))
    assert ids.tolist() == [[0, 2]]
    torch.testing.assert_close(w, (s / s.sum() * 2.0)[None])
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[[1.0, 2.0]], [[3.0, 4.0]]])
    out = torch_mlu_ops.group_gemm(a, b, torch.tensor([1, 2], dtype=torch.int32), None, None, None, None, 2)
    assert out.tolist() == [[1.0], [4.0], [7.0]]


def test_emulated_kernels_are_opaque_to_fake_tensors():
    """Under FakeTensorMode the emulators' own value reads (``.tolist()``, ``unique()``, ``int(t)``) would
    raise; as opaque custom ops with fake kernels they answer with shapes only."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        sizes = torch.tensor([1, 2, 2], dtype=torch.int32)
        out = torch_mlu_ops.group_gemm(torch.randn(5, 8), torch.randn(3, 4, 8), sizes, None, None, None, None, 5)
        assert out.shape == (5, 4)
        d = torch.empty(4, 4, dtype=torch.bfloat16)
        mate.ragged_m_moe_gemm_16bit(torch.randn(4, 8).bfloat16(), torch.randn(3, 4, 8).bfloat16(),
                                     torch.tensor([0, 1, -1, 2], dtype=torch.int32), d)
        x = torch.randn(3, 2, 64)
        assert torch_mlu_ops.apply_rotary(x, torch.randn(9, 64), torch.randn(9, 64),
                                          torch.zeros(3, dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32),
                                          True, True, False, 3).shape == x.shape
        q, kv, idx = sparse_case()
        assert fm.flash_mla_sparse_fwd(q, kv, idx, 1.0)[0].shape == (2, 64, 512)
        ctx = torch.tensor([[3, 70]], dtype=torch.int32)
        sched = dg.get_paged_mqa_logits_metadata(ctx, 64, dg.get_num_sms())
        logits = dg.fp8_paged_mqa_logits(torch.zeros(1, 2, 32, 32).to(torch.float8_e4m3fn), fused_fp8_cache({}),
                                         torch.ones(2, 32), ctx, torch.tensor([[1, 0]], dtype=torch.int32), sched, 128)
        assert logits.shape == (2, 128) and sched.shape == (dg.get_num_sms() + 1, 2)
        w, ids = mate.moe_fused_gate(torch.randn(3, 32), torch.zeros(32), 1, 1, 4, num_fused_shared_experts=0,
                                     routed_scaling_factor=1.0, renormalize=True,
                                     apply_routed_scaling_factor_on_output=True)
        assert ids.shape == (3, 4)
