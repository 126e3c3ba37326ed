"""CPU emulation of the Kunlunxin ``kunlun_ops`` functions the Kunlunxin adapters call.

Written against baidu/vLLM-Kunlun 09869ee, which wraps each ``kunlun_ops`` function in a
``torch.ops._C`` custom op (``vllm_kunlun/ops/_custom_ops.py``) and calls them from its model code;
``kunlun_ops`` itself is a closed Kunlunxin library with no public tests, so the signatures are the
keyword calls vLLM-Kunlun makes and the semantics the references it names:

* ``sparse_prefill_fwd_opt(q, kv, indices, out, max_logits, lse, sm_scale, qlod_cpu, qlod_xpu,
  kvlod_cpu, kvlod_xpu, d_v=-1, is_causal=True, use_xfa_boost=False)`` (``_custom_ops.py:2148-2182``;
  called from ``ops/attention/flashmla.py::flash_mla_sparse_prefill``, "adapted from FlashMLA's
  flash_mla_interface.py"): q ``[s_q, h_q, d_qk]`` bf16, kv ``[s_kv, d_qk]`` (the flattened cache,
  ``flashmla_sparse.py:636``), indices int32 ``[s_q, 1, topk]`` of kv rows, -1 or ``>= s_kv`` invalid;
  outputs written in place. **lse is base 2** ("lse: [s_q, h_q], float, 2-based log-sum-exp", its
  docstring; vLLM-Kunlun's ``flashmla_sparse.py:57-60`` ``_lse2_to_lse`` converts it with ``* ln 2``).
  Semantics FlashMLA's ``tests/ref.py::ref_sparse_attn_fwd`` (:mod:`.flash_mla`, the API it was
  adapted from). The lods' role in the sparse kernel is undocumented: checked for shape only.
* ``fwd_kvcache_mla(q_c, kv_cache, indices, kv_lod_cpu, out, max_logits, p_sums, softmax_scale,
  max_seq_kv, q_r=None, pe_cache=None, use_xfa_boost=False, kv_lod_xpu=None)`` (``_custom_ops.py:
  2245-2277``; ``flashmla.py::kunlun_flash_mla_with_kvcache``): q ``[B, s_q <= 2, H, D]`` (its assert),
  kv_cache ``[s_kv, D]``, indices ``[B, s_q, topk]``, per-sequence lengths ``[B]``; out ``[B, s_q, H,
  d_v]`` with ``d_v = out.shape[-1]``; ``max_logits`` and ``p_sums`` ``[B, s_q, H]`` fp32, emulated as
  the scaled-score max and ``sum exp(P - max)`` (their base is undocumented: the adapter never uses them).
* ``I8_mqa_logits(q, fused_kv_cache, weights, context_q_lens, context_k_lens, logits, clean_logits,
  max_seq_q=0, max_seq_k=0, is_causal=False, use_xfa_boost=False)`` (``_custom_ops.py:1994-2022``;
  ``ops/deep_gemm.py::int8_mqa_logits``): q int8 ``[M, H, D]``, ``fused_kv_cache = (k int8 [N, D],
  k_scale fp32 [N] or [N, 1])``, weights fp32 ``[M, H]`` (the caller folds the q scales in:
  ``models/deepseek_v2.py:765-770``), lods ``(cpu, xpu)`` ``[0, M]`` / ``[0, N]`` (``v1/attention/
  backends/mla/indexer.py:106-111``); ``logits[m, n] = sum_h w[m, h] * relu(q[m, h] . k[n] * s[n])``,
  DeepGEMM's ``ref_fp8_mqa_logits`` that its masking comment cites (vllm ``tests/kernels/attention/
  test_deepgemm_attention.py``); the ``[ks, ke)`` mask is a separate op there (the adapter masks).
* ``I8_paged_mqa_logits(q, fused_kv_cache, weights, context_lens, block_table, max_context_len,
  clean_logits, out, use_xfa_boost=False)`` (``_custom_ops.py:2076-2100``; ``ops/deep_gemm.py::
  int8_paged_mqa_logits``): q int8 ``[B, next_n, H, D]``, ``fused_kv_cache = [k int8 [blocks, bs, 1, D],
  k_scale fp32 [B, max_context_len]]`` (the scales gathered by the block table), weights ``[B, next_n,
  H]``, ``context_lens = (cpu, xpu)`` ``[B]``, ``out`` fp32 ``[B, next_n, max_context_len]``,
  ``max_context_len`` a whole number of blocks (deepseek_v2.py:723); semantics DeepGEMM's
  ``ref_fp8_paged_mqa_logits`` (token ``i`` of sequence ``b`` at position ``context_len - next_n + i``;
  ``clean_logits``: later positions ``-inf``).
* ``moe_sigmoid_group_topk_norm(x, norm_score, topk_index, block_static, bias, n_group, topk_group,
  scale)`` (``_custom_ops.py:1351-1372``; ``ops/_kunlun_ops.py:419-429``, the sigmoid branch of
  ``fused_moe``, which ignores ``renormalize``: the weights are always normalized): DeepSeek-V3
  ``noaux_tc`` as vLLM's ``grouped_topk`` with ``e_score_correction_bias`` (the path it replaces):
  sigmoid scores, biased for the choice, groups ranked by their top-2 biased sum, weights from the
  unbiased scores normalized to sum 1, times ``scale``; ``block_static`` ``[12, E]`` int32 per-block
  expert counts (``num_blocks = 12`` there).
* ``moe_fc(x, weight, sorted_tokens_num_lod, sorted_tokens_idx, moe_topk, y, act=None, ...)``
  (``_custom_ops.py:1204-1245``; ``_kunlun_ops.py:595-645``): rows of ``x`` sorted by expert, expert
  ``e`` owning rows ``lod[e]:lod[e+1]``; ``y`` (``[M, topk, N]``, the same rows in the same order) gets
  ``x_row @ weight[e]^T`` (``weight [E, N, K]``, bf16; the second ``moe_fc`` there reads the first's
  output in place, so input and output rows share one order).
* ``rmsnorm(x, weight, output, eps)`` and ``add_rmsnorm(x, y, residual_output=, weight=, eps=, output=)``
  (``_custom_ops.py:255-340``, positional / keyword exactly as the ``torch.ops._C`` wrappers call them;
  ``ops/layernorm.py:85-104``, vLLM-Kunlun's RMSNorm): ``output = x * rsqrt(mean(x^2) + eps) * weight``
  in fp32, rounded once; the fused op first forms ``x + y`` in x's dtype (written to
  ``residual_output``), vLLM's ``fused_add_rms_norm`` semantics (``RMSNorm.forward_native``). No kernel
  source is public: the single rounding is this emulation's assumption.
* ``rotary_embedding(positions, query, key, head_size, cos_sin_cache, is_neox)`` (``_custom_ops.py:
  993-1010``): vLLM's ``rotary_embedding`` in place on ``query`` and ``key`` (``[T, H * hs]`` or
  ``[T, H, hs]``; the first ``rot_dim = cos_sin_cache.shape[1]`` dims of each head, NeoX halves or
  GPT-J pairs), semantics ``RotaryEmbedding.forward_native``; cache, query and key of one dtype.
* ``concat_and_cache_mla(kv_c, k_pe, slot_mapping, kv_cache)`` (``_custom_ops.py:1588-1601``,
  keywords; ``flashmla_sparse.py:800``): row ``t`` = ``[kv_c[t], k_pe[t]]`` into flat slot
  ``slot_mapping[t]`` of ``[blocks, bs, Dc + Dr]``, a negative slot skipped (vLLM's cache kernel).

Every kernel is an opaque custom op (:func:`._common.opaque`) that writes its outputs in place.
"""

from __future__ import annotations

import math
import types

import torch

from . import flash_mla as _fm
from ._common import check, fill, opaque

SOURCE = "baidu/vLLM-Kunlun 09869ee vllm_kunlun/ops/_custom_ops.py (kunlun_ops as it calls it)"
LOG2E = math.log2(math.e)


# ---- sparse_prefill_fwd_opt


def _prefill_impl(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                  max_logits: torch.Tensor, lse: torch.Tensor, sm_scale: float, d_v: int) -> None:
    o, m, s = _fm._prefill_impl(q, kv.unsqueeze(1), indices, sm_scale, d_v, None, True)  # base-2 lse
    out.copy_(o.to(out.dtype))
    max_logits.copy_(m)
    lse.copy_(s)


_prefill = opaque("kunlun_sparse_prefill_fwd_opt", _prefill_impl, lambda *args: None,
                  mutates_args=("out", "max_logits", "lse"))


def sparse_prefill_fwd_opt(
    q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, max_logits: torch.Tensor,
    lse: torch.Tensor, sm_scale: float, qlod_cpu: torch.Tensor | None = None, qlod_xpu: torch.Tensor | None = None,
    kvlod_cpu: torch.Tensor | None = None, kvlod_xpu: torch.Tensor | None = None, d_v: int = -1,
    is_causal: bool = True, use_xfa_boost: bool = False,
) -> None:
    check(q.dim() == 3 and kv.dim() == 2 and indices.dim() == 3, "sparse_prefill_fwd_opt: q [s_q, h_q, d_qk], "
          "kv [s_kv, d_qk], indices [s_q, h_kv, topk]")
    s_q, h_q, d_qk = q.shape
    check(q.dtype == kv.dtype == torch.bfloat16 and indices.dtype == torch.int32,
          "sparse_prefill_fwd_opt: q, kv bfloat16, indices int32")
    check(kv.shape[1] == d_qk and indices.shape[:2] == (s_q, 1), "sparse_prefill_fwd_opt: shape mismatch")
    check(d_v == 512, f"sparse_prefill_fwd_opt: d_v can only be 512, got {d_v}")
    check(indices.shape[2] > 0, "sparse_prefill_fwd_opt: topk > 0")
    check(out.shape == (s_q, h_q, d_v) and out.dtype == q.dtype,
          "sparse_prefill_fwd_opt: out [s_q, h_q, d_v] of q's dtype")
    for name, t in (("max_logits", max_logits), ("lse", lse)):
        check(t.shape == (s_q, h_q) and t.dtype == torch.float32, f"sparse_prefill_fwd_opt: {name} fp32 [s_q, h_q]")
    lods = (("qlod_cpu", qlod_cpu), ("qlod_xpu", qlod_xpu), ("kvlod_cpu", kvlod_cpu), ("kvlod_xpu", kvlod_xpu))
    for name, lod in lods:
        check(lod is None or (lod.dim() == 1 and lod.dtype == torch.int32),
              f"sparse_prefill_fwd_opt: {name} int32 [B+1]")
    check(qlod_cpu is None or qlod_cpu.device.type == "cpu", "sparse_prefill_fwd_opt: qlod_cpu must be a host tensor")
    _prefill(q, kv, indices, out, max_logits, lse, float(sm_scale), int(d_v))


# ---- fwd_kvcache_mla


def _decode_impl(q_c: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, out: torch.Tensor,
                 max_logits: torch.Tensor, p_sums: torch.Tensor, softmax_scale: float) -> None:
    B, s, H, D = q_c.shape
    d_v = out.shape[-1]
    o, m, lse = _fm._prefill_impl(q_c.reshape(B * s, H, D), kv_cache.unsqueeze(1),
                                  indices.reshape(B * s, 1, -1), softmax_scale, d_v, None, False)
    empty = torch.isinf(lse) & (lse > 0)
    out.copy_(o.masked_fill(empty[..., None], 0).view(B, s, H, d_v).to(out.dtype))
    max_logits.copy_(m.view(B, s, H))
    p_sums.copy_(torch.exp(lse - m).masked_fill(empty, 0).view(B, s, H))


_decode = opaque("kunlun_fwd_kvcache_mla", _decode_impl, lambda *args: None,
                 mutates_args=("out", "max_logits", "p_sums"))


def fwd_kvcache_mla(
    q_c: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, kv_lod_cpu: torch.Tensor, out: torch.Tensor,
    max_logits: torch.Tensor, p_sums: torch.Tensor, softmax_scale: float, max_seq_kv: int,
    q_r: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None, use_xfa_boost: bool = False,
    kv_lod_xpu: torch.Tensor | None = None,
) -> None:
    check(q_c.dim() == 4 and kv_cache.dim() == 2 and indices.dim() == 3,
          "fwd_kvcache_mla: q [B, s_q, H, D], kv_cache [s_kv, D], indices [B, s_q, topk]")
    B, s, H, D = q_c.shape
    check(s <= 2, "kunlun_ops.fwd_kvcache_mla only support seq_len_q <= 2 for now.")
    check(q_c.dtype == kv_cache.dtype == torch.bfloat16, "By now, the kernel does not support uint8 kv cache.")
    check(kv_cache.shape[1] == D and indices.shape[:2] == (B, s) and indices.dtype == torch.int32,
          "fwd_kvcache_mla: shape mismatch")
    check(q_r is None and pe_cache is None, "emulator: separate rope query / cache are not emulated")
    check(kv_lod_cpu.device.type == "cpu" and kv_lod_cpu.shape == (B,) and kv_lod_cpu.dtype == torch.int32,
          "fwd_kvcache_mla: kv_lod_cpu host int32 [B] (cache_seqlens_cpu)")
    check(kv_lod_xpu is None or kv_lod_xpu.shape == (B,), "fwd_kvcache_mla: kv_lod_xpu [B]")
    check(out.shape[:3] == (B, s, H) and out.dtype == q_c.dtype, "fwd_kvcache_mla: out [B, s_q, H, d_v]")
    for name, t in (("max_logits", max_logits), ("p_sums", p_sums)):
        check(t.shape == (B, s, H) and t.dtype == torch.float32, f"fwd_kvcache_mla: {name} fp32 [B, s_q, H]")
    check(max_seq_kv >= 1, "fwd_kvcache_mla: max_seq_kv >= 1")
    _decode(q_c, kv_cache, indices, out, max_logits, p_sums, float(softmax_scale))


# ---- I8_mqa_logits


def _i8_logits_impl(q: torch.Tensor, k: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                    logits: torch.Tensor) -> None:
    kf = k.float() * k_scale.reshape(-1, 1).float()
    qf, w = q.float(), weights.float()
    step = max(1, (1 << 24) // max(1, q.shape[0] * q.shape[1]))
    for n0 in range(0, k.shape[0], step):
        n1 = min(k.shape[0], n0 + step)
        score = torch.einsum("mhd,nd->hmn", qf, kf[n0:n1])
        logits[:, n0:n1] = (score.relu() * w.transpose(0, 1).unsqueeze(-1)).sum(dim=0)


_i8_logits = opaque("kunlun_I8_mqa_logits", _i8_logits_impl, lambda *args: None, mutates_args=("logits",))


def I8_mqa_logits(  # the vendor's name
    q: torch.Tensor, fused_kv_cache: list[torch.Tensor], weights: torch.Tensor, context_q_lens: list[torch.Tensor],
    context_k_lens: list[torch.Tensor], logits: torch.Tensor, clean_logits: bool, max_seq_q: int = 0,
    max_seq_k: int = 0, is_causal: bool = False, use_xfa_boost: bool = False,
) -> None:
    k, k_scale = fused_kv_cache
    check(q.dtype == torch.int8 and q.dim() == 3, "I8_mqa_logits: q int8 [M, H, D]")
    M, H, D = q.shape
    check(k.dtype == torch.int8 and k.dim() == 2 and k.shape[1] == D, "I8_mqa_logits: k int8 [N, D]")
    N = k.shape[0]
    check(k_scale.dtype == torch.float32 and k_scale.numel() == N, "I8_mqa_logits: k scale fp32 [N] or [N, 1]")
    check(weights.dtype == torch.float32 and weights.shape == (M, H), "I8_mqa_logits: weights fp32 [M, H]")
    check(logits.shape == (M, N) and logits.dtype == torch.float32, "I8_mqa_logits: logits fp32 [M, N]")
    for name, (cpu, xpu), total in (("context_q_lens", context_q_lens, M), ("context_k_lens", context_k_lens, N)):
        check(cpu.device.type == "cpu" and cpu.dtype == xpu.dtype == torch.int32 and cpu.shape == xpu.shape,
              f"I8_mqa_logits: {name} = (host int32 lod, device int32 lod)")
        check(cpu.shape == (2,), f"I8_mqa_logits: {name} = [0, {total}] (one span, as indexer.py builds it)")
    check(not is_causal, "emulator: causal I8_mqa_logits is not emulated (vLLM-Kunlun masks with ks/ke after)")
    _i8_logits(q, k, k_scale, weights, logits)


# ---- I8_paged_mqa_logits


def _i8_paged_impl(q: torch.Tensor, k_val: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
                   context_lens: torch.Tensor, block_table: torch.Tensor, clean_logits: bool,
                   out: torch.Tensor) -> None:
    B, next_n, H, D = q.shape
    L = out.shape[-1]
    keys = k_val[:, :, 0].index_select(0, block_table.reshape(-1).long()).view(B, -1, D)[:, :L]  # [B, L, D]
    kf = keys.float() * k_scale.view(B, L, 1)
    score = torch.einsum("bnhd,bld->bnhl", q.float(), kf).relu()
    logits = (score * weights.float().view(B, next_n, H, 1)).sum(dim=2)  # [B, next_n, L]
    if clean_logits:  # DeepGEMM's ref_fp8_paged_mqa_logits: token i of b sits at context_len - next_n + i
        pos = torch.arange(L)[None, None, :]
        last = context_lens.long().view(B, 1, 1) - next_n + torch.arange(next_n).view(1, next_n, 1)
        logits = logits.masked_fill(pos > last, float("-inf"))
    out.copy_(logits)


_i8_paged = opaque("kunlun_I8_paged_mqa_logits", _i8_paged_impl, lambda *args: None, mutates_args=("out",))


def I8_paged_mqa_logits(  # the vendor's name
    q: torch.Tensor, fused_kv_cache: list[torch.Tensor], weights: torch.Tensor, context_lens: list[torch.Tensor],
    block_table: torch.Tensor, max_context_len: int, clean_logits: bool, out: torch.Tensor,
    use_xfa_boost: bool = False,
) -> None:
    k_val, k_scale = fused_kv_cache
    check(q.dtype == torch.int8 and q.dim() == 4, "I8_paged_mqa_logits: q int8 [B, next_n, H, D]")
    B, next_n, H, D = q.shape
    check(k_val.dtype == torch.int8 and k_val.dim() == 4 and k_val.shape[2:] == (1, D),
          "I8_paged_mqa_logits: k values int8 [num_blocks, block_size, 1, D]")
    check(block_table.dim() == 2 and block_table.shape[0] == B and block_table.dtype == torch.int32,
          "I8_paged_mqa_logits: block_table int32 [B, max_blocks]")
    check(max_context_len == block_table.shape[1] * k_val.shape[1],
          "I8_paged_mqa_logits: max_context_len must be a whole number of blocks (deepseek_v2.py:723)")
    check(k_scale.dtype == torch.float32 and k_scale.shape == (B, max_context_len),
          "I8_paged_mqa_logits: k scales fp32 [B, max_context_len], gathered by the block table")
    check(weights.dtype == torch.float32 and weights.shape == (B, next_n, H), "I8_paged_mqa_logits: weights [B, n, H]")
    cpu, xpu = context_lens
    check(cpu.device.type == "cpu" and cpu.shape == xpu.shape == (B,) and cpu.dtype == xpu.dtype == torch.int32,
          "I8_paged_mqa_logits: context_lens = (host int32 [B], device int32 [B])")
    check(out.dtype == torch.float32 and out.shape == (B, next_n, max_context_len),
          "I8_paged_mqa_logits: out fp32 [B, next_n, max_context_len]")
    _i8_paged(q, k_val, k_scale, weights, xpu, block_table, bool(clean_logits), out)


# ---- moe_sigmoid_group_topk_norm

NUM_STAT_BLOCKS = 12  # _kunlun_ops.py: num_blocks = 12


def _route_impl(x: torch.Tensor, norm_score: torch.Tensor, topk_index: torch.Tensor, block_static: torch.Tensor,
                bias: torch.Tensor, n_group: int, topk_group: int, scale: float) -> None:
    M, E = x.shape
    k = topk_index.shape[1]
    scores = x.float().sigmoid()
    choice = scores + bias.float()
    grouped = choice.view(M, n_group, E // n_group)
    group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)
    keep = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
    gmask = torch.zeros_like(group_scores).scatter_(1, keep, 1).bool()
    choice = grouped.masked_fill(~gmask[..., None], float("-inf")).view(M, E)
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :k]
    w = scores.gather(1, ids)
    norm_score.copy_(w / w.sum(-1, keepdim=True) * scale)
    topk_index.copy_(ids.to(topk_index.dtype))
    if block_static.numel():
        block = torch.arange(M) * block_static.shape[0] // max(M, 1)
        block_static.zero_()
        block_static.index_put_((block[:, None].expand(M, k).reshape(-1), ids.reshape(-1)),
                                torch.ones(M * k, dtype=block_static.dtype), accumulate=True)


_route = opaque("kunlun_moe_sigmoid_group_topk_norm", _route_impl, lambda *args: None,
                mutates_args=("norm_score", "topk_index", "block_static"))


def moe_sigmoid_group_topk_norm(
    x: torch.Tensor, norm_score: torch.Tensor, topk_index: torch.Tensor, block_static: torch.Tensor,
    bias: torch.Tensor, n_group: int, topk_group: int, scale: float,
) -> None:
    check(x.dim() == 2 and x.dtype == torch.float32, "moe_sigmoid_group_topk_norm: x fp32 [M, E]")
    M, E = x.shape
    check(topk_index.dim() == 2 and topk_index.shape[0] == M and topk_index.dtype == torch.int32,
          "moe_sigmoid_group_topk_norm: topk_index int32 [M, k]")
    check(norm_score.shape == topk_index.shape and norm_score.dtype == torch.float32,
          "moe_sigmoid_group_topk_norm: norm_score fp32 [M, k]")
    check(bias is not None and bias.shape == (E,), "moe_sigmoid_group_topk_norm: bias [E]")
    check(n_group >= 1 and E % n_group == 0 and 1 <= topk_group <= n_group,
          "moe_sigmoid_group_topk_norm: E divisible into n_group groups, 1 <= topk_group <= n_group")
    check(topk_index.shape[1] <= topk_group * (E // n_group), "moe_sigmoid_group_topk_norm: k within the kept groups")
    check(block_static.dtype == torch.int32 and (block_static.numel() == 0 or block_static.shape[1] == E),
          "moe_sigmoid_group_topk_norm: block_static int32 [blocks, E]")
    _route(x, norm_score, topk_index, block_static, bias, int(n_group), int(topk_group), float(scale))


# ---- moe_fc


def _fc_impl(x: torch.Tensor, weight: torch.Tensor, lod: torch.Tensor, y: torch.Tensor,
             x_max: torch.Tensor | None, w_max: torch.Tensor | None) -> None:
    rows = y.view(-1, y.shape[-1])
    if x_max is not None:  # int8: kunlun_ops takes the max as the scale (value = q * max / 127)
        x = x.float() * x_max.reshape(-1, 1).float() / 127.0
        weight = weight.float() * w_max.reshape(weight.shape[0], weight.shape[1], 1).float() / 127.0
    bounds = lod.tolist()  # a kernel reads its lod freely
    check(bounds[0] == 0 and bounds[-1] <= x.shape[0] and all(a <= b for a, b in zip(bounds, bounds[1:], strict=False)),
          "moe_fc: sorted_tokens_num_lod must rise from 0 to at most the row count")
    for e in range(weight.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            rows[a:b] = (x[a:b].float() @ weight[e].float().T).to(rows.dtype)


_fc = opaque("kunlun_moe_fc", _fc_impl, lambda *args: None, mutates_args=("y",))


def moe_fc(
    x: torch.Tensor, weight: torch.Tensor, sorted_tokens_num_lod: torch.Tensor, sorted_tokens_idx: torch.Tensor,
    moe_topk: int, y: torch.Tensor, act: str | None = None, x_perchannel_max: torch.Tensor | None = None,
    w_perchannel_max: torch.Tensor | None = None, topk_ids: torch.Tensor | None = None,
    topk_w: torch.Tensor | None = None, bias: torch.Tensor | None = None, tgemm_type: str | None = None,
    tweight_type: str | None = None, scale_n: int = 0, scale_k: int = 0, use_pack_int4: bool = False,
    sort_mode: bool = True,
) -> None:
    check(x.dim() == 2 and weight.dim() == 3 and weight.shape[2] == x.shape[1], "moe_fc: x [rows, K], weight [E, N, K]")
    check(act is None and bias is None and topk_w is None and not use_pack_int4,
          "emulator: fused activation, bias, routing weights and packed int4 are not emulated")
    E, N = weight.shape[:2]
    if x.dtype == torch.int8:  # W8A8 (compressed_tensors_moe.py:224-240): per-row x max, per-channel w max
        check(weight.dtype == torch.int8, "moe_fc: int8 x takes an int8 weight")
        check(x_perchannel_max is not None and x_perchannel_max.dtype == torch.float32
              and x_perchannel_max.numel() == x.shape[0], "moe_fc: int8 x needs x_perchannel_max fp32 [rows, 1]")
        check(w_perchannel_max is not None and w_perchannel_max.dtype == torch.float32
              and w_perchannel_max.numel() == E * N, "moe_fc: int8 weight needs w_perchannel_max fp32 [E, N, 1]")
        check(y.dtype in (torch.bfloat16, torch.float16), "moe_fc: int8 GEMM writes a bf16/fp16 y")
    else:
        check(x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16), "moe_fc: bf16/fp16 x and weight")
        check(x_perchannel_max is None and w_perchannel_max is None, "moe_fc: scales only with int8 x")
        check(y.dtype == x.dtype, "moe_fc: y of x's dtype")
    check(sorted_tokens_num_lod.shape == (E + 1,) and sorted_tokens_num_lod.dtype == torch.int32,
          "moe_fc: sorted_tokens_num_lod int32 [E + 1]")
    check(sorted_tokens_idx.numel() == x.shape[0] and sorted_tokens_idx.dtype == torch.int32,
          "moe_fc: sorted_tokens_idx int32 [rows]")
    check(y.dim() == 3 and y.shape[1] == moe_topk and y.shape[0] * moe_topk == x.shape[0]
          and y.shape[2] == N, "moe_fc: y [rows / topk, topk, N]")
    _fc(x, weight, sorted_tokens_num_lod, y, x_perchannel_max, w_perchannel_max)


# ---- rmsnorm / add_rmsnorm


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _rmsnorm_impl(x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, eps: float) -> None:
    output.copy_(_norm(x, weight, eps))


def _add_rmsnorm_impl(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, output: torch.Tensor,
                      residual_output: torch.Tensor, eps: float) -> None:
    s = (x.float() + y.float()).to(x.dtype)
    residual_output.copy_(s)
    output.copy_(_norm(s, weight, eps))


_rmsnorm = opaque("kunlun_rmsnorm", _rmsnorm_impl, lambda *args: None, mutates_args=("output",))
_add_rmsnorm = opaque("kunlun_add_rmsnorm", _add_rmsnorm_impl, lambda *args: None,
                      mutates_args=("output", "residual_output"))


def _check_norm(x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, name: str) -> None:
    check(x.is_contiguous(), f"{name}: Kunlun does not support non-contiguous input (layernorm.py:77)")
    check(weight.shape == (x.shape[-1],), f"{name}: weight [D]")
    check(output.shape == x.shape and output.dtype == x.dtype and output.is_contiguous(),
          f"{name}: output contiguous, x's shape and dtype")


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, output: torch.Tensor, eps: float = 1e-5) -> None:
    _check_norm(x, weight, output, "rmsnorm")
    _rmsnorm(x, weight, output, float(eps))


def add_rmsnorm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-5,
                output: torch.Tensor | None = None, residual_output: torch.Tensor | None = None) -> None:
    check(weight is not None and output is not None and residual_output is not None,
          "add_rmsnorm: weight, output and residual_output are required")
    _check_norm(x, weight, output, "add_rmsnorm")
    check(y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous(), "add_rmsnorm: y like x")
    check(residual_output.shape == x.shape and residual_output.dtype == x.dtype, "add_rmsnorm: residual_output like x")
    _add_rmsnorm(x, y, weight, output, residual_output, float(eps))


# ---- rotary_embedding


def _rotate(t: torch.Tensor, positions: torch.Tensor, head_size: int, cache: torch.Tensor, is_neox: bool) -> None:
    rot = cache.shape[1]
    view = t.view(t.shape[0], -1, head_size)
    cos, sin = cache.index_select(0, positions.long()).float().chunk(2, dim=-1)  # [T, rot / 2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    part = view[..., :rot].float()
    if is_neox:
        x1, x2 = part.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    view[..., :rot] = out.to(t.dtype)


def _rope_impl(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
               cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    _rotate(query, positions, head_size, cos_sin_cache, is_neox)
    _rotate(key, positions, head_size, cos_sin_cache, is_neox)


_rope = opaque("kunlun_rotary_embedding", _rope_impl, lambda *args: None, mutates_args=("query", "key"))


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, head_size: int,
                     cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    check(positions.dim() == 1 and positions.shape[0] == query.shape[0] == key.shape[0],
          "rotary_embedding: positions [T], query and key with T rows")
    check(query.is_contiguous() and key.is_contiguous(), "rotary_embedding: contiguous query and key")
    check(query.dtype == key.dtype == cos_sin_cache.dtype, "rotary_embedding: query, key and cache of one dtype")
    rot = cos_sin_cache.shape[1]
    check(rot % 2 == 0 and rot <= head_size, "rotary_embedding: rot_dim even and <= head_size")
    for name, t in (("query", query), ("key", key)):
        check(t[0].numel() % head_size == 0, f"rotary_embedding: {name} rows are whole heads of head_size")
    _rope(positions, query, key, int(head_size), cos_sin_cache, bool(is_neox))


# ---- concat_and_cache_mla


def _cache_impl(kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor, kv_cache: torch.Tensor) -> None:
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    keep = slot_mapping >= 0  # a kernel reads its slots freely
    rows = torch.cat((kv_c, k_pe), dim=-1)[keep].to(kv_cache.dtype)
    flat.index_copy_(0, slot_mapping[keep].long(), rows)


_cache = opaque("kunlun_concat_and_cache_mla", _cache_impl, lambda *args: None, mutates_args=("kv_cache",))


def concat_and_cache_mla(kv_c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
                         kv_cache: torch.Tensor) -> None:
    check(kv_c.dim() == 2 and k_pe.dim() == 2 and kv_c.shape[0] == k_pe.shape[0] == slot_mapping.shape[0],
          "concat_and_cache_mla: kv_c [T, Dc], k_pe [T, Dr], slot_mapping [T]")
    check(kv_cache.dim() == 3 and kv_cache.shape[2] == kv_c.shape[1] + k_pe.shape[1] and kv_cache.is_contiguous(),
          "concat_and_cache_mla: kv_cache contiguous [num_blocks, block_size, Dc + Dr]")
    check(kv_c.dtype == k_pe.dtype == kv_cache.dtype, "concat_and_cache_mla: one dtype (bf16 cache, no fp8 here)")
    check(slot_mapping.dtype in (torch.int32, torch.int64), "concat_and_cache_mla: int slot_mapping")
    _cache(kv_c, k_pe, slot_mapping, kv_cache)


def install(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.0.0+emulated", sparse_prefill_fwd_opt, fwd_kvcache_mla, I8_mqa_logits,
         I8_paged_mqa_logits, moe_sigmoid_group_topk_norm, moe_fc, rmsnorm, add_rmsnorm, rotary_embedding,
         concat_and_cache_mla)
