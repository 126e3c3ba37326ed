"""CPU emulation of Iluvatar's ``ixformer.inference.functions``: the DSA indexer pair (ixformer 0.7.0),
MoE routing and the grouped expert GEMMs.

No ixformer test is public, and the DSA pair's source is not either. The DSA signatures are those
vllm_iluvatar 0.1.0 calls (``sparse_attn_indexer``, its fork of vLLM's
``model_executor/layers/sparse_attn_indexer.py``, read through the code index; prefill chunks and the
decode batch make the same two calls)::

    logits = dsa_indexer_mqa_logits_with_blocks(q, cu_seqlens_q, cu_seq_lens, kv_cache, block_table, weights,
                                                max_q_len=, max_kv_len=, max_context_len=)
    dsa_update_topk_indices(logits, cu_seqlen_ks, cu_seqlen_ke, topk_tokens, topk_indices_buffer)

plus the optional ``logits=`` output that FlagGems-vllm's Iluvatar benchmark passes (it checks the
wrapper returns that fp32 tensor). Semantics, from the references those callers hold the kernels to:

* ``dsa_indexer_mqa_logits_with_blocks``: FlagGems-vllm's benchmark reference for the native call
  (``reference``: per query row, key position ``p`` of its sequence at block ``table[p // bs]``, slot
  ``p % bs``; ``sum_h relu(q_h . k_p) * w_h``, fp32; only ``p`` below the sequence's length is compared,
  "padding values are not a common native contract"). The columns past a sequence's length are
  filled with ``+inf`` here, garbage a caller must not select. q ``[T, H, D]``, cache
  ``[blocks, bs, D]`` in q's dtype, weights ``[T, H]`` in q's dtype (vllm_iluvatar's V4 indexer:
  "matching the downstream dsa_indexer_mqa_logits_with_blocks dtype contract"), int32 ``cu_seqlens``
  and block table.
* ``dsa_update_topk_indices``: the torch path the plugin replaced (``sparse_attn_indexer_original``):
  top-k of each row's columns ``[ks, ke)``, written as ``column - ks``, ``-1`` where fewer candidates;
  in place into ``topk_indices`` (int32 ``[T, >= topk]``), nothing returned; fp32 or bf16 logits
  (vllm_iluvatar's V4 indexer: "dsa_update_topk_indices already accepts bf16 logits").

MoE routing and grouped expert GEMMs (the bf16 and W8A8 paths), with signatures and semantics from
the sources that show them (no ixformer test is public; the references below are the vendor's own
``ref_*`` functions where one exists):

* ``moe_grouped_topk(gating_output, topk, num_expert_group, topk_group, scoring_func="softmax",
  e_score_correction_bias=None, topk_weight=None, topk_ids=None, renormalize=True)`` -> ``(fp32
  [T, topk], int32 [T, topk])``: ixformer's Python layer and its reference ``ref_moe_grouped_topk``
  (a copy of the ixformer SDK's ``inference/functions/moe.py`` in dylanyunlon/project_6@87a19d2
  ``ixformer_sdk/inference/functions/moe.py``; the kernel's C declaration, ``moe_grouped_topk<IN_DTYPE,
  INDEX_DTYPE>`` with ``const IN_DTYPE *bias``, in ``ixformer_sdk/csrc/include/ixformer/kernels/kernels.h``
  there). Scores ``sigmoid`` (or ``softmax``) in fp32; the choice score adds the bias; groups are
  ranked by their **max** choice score (not DeepSeek's sum of the top two) and the others masked to
  ``0.0``; ids = top-k of the masked choice scores; weights = the unbiased scores of those ids, divided
  by their sum when ``renormalize`` (no epsilon, no routed scaling factor). Gating fp32 or bf16 (the
  wrapper's docstring); the bias in the gating's dtype (the kernel types both ``IN_DTYPE``; the
  docstring lists fp16/bf16 for the bias, so an fp32 bias beside fp32 gating is our reading).
* ``moe_w16a16_group_gemv(input, weight, output_dtype, tokens_per_experts_gpu, dst_to_src=None,
  format="TN", output=None)``: the graph-capturable grouped GEMM mojo_opset's Iluvatar backend takes
  under CUDA-graph capture, with the per-expert row counts on the device (XPU-Forces/mojo_opset@b97e98b
  ``mojo_opset/backends/ixformer/operators/moe.py``, ``IxformerExperts``; the host-sized
  ``moe_w16a16_group_gemm`` otherwise). Its arithmetic is ``MojoExperts``' torch reference
  (``mojo_opset/core/operators/moe.py``: rows of expert ``e`` times ``W_e^T``, fp32 accumulate), which
  ``mojo_opset/tests/accuracy/operators/test_moe.py`` holds the ixformer backend to on Iluvatar CI
  (``.github/workflows/iluvatar_accuracy_ci.yml``); the row/format rules are those of ixformer's
  ``ref_moe_w8a8_group_gemm`` (``"TN"``: weight ``[E, N, K]``, ``"NN"``: ``[E, K, N]``; input ``[M, K]``).
  Rows past ``sum(tokens)`` are left unspecified (NaN here).
* ``moe_w8a8_group_gemv(input, weight, i_scales, w_scales, output_dtype, tokens_per_experts,
  dst_to_src=None, format=0, output=None)``: its int8 twin, as ``IxformerQuantMoE`` calls it
  (``format=0``, the ``"NN"`` weight ``[E, K, N]`` its load hook makes, device row counts): per row
  ``(x_int8 . w_int8) * i_scale * w_scale[e, n]`` in fp32, cast to ``output_dtype``
  (``ref_moe_w8a8_group_gemm``); integer formats as vllm_iluvatar's ``{"NN": 0, "NT": 1, "TN": 2}``.

All are opaque custom ops with fake kernels (``_common.opaque``). tests/test_emulators_vendor_refs.py
and tests/test_iluvatar.py check them against vectors derived from those references.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque

SOURCE = ("vllm_iluvatar 0.1.0 sparse_attn_indexer (calls) + FlagGems-vllm Iluvatar paged-MQA benchmark "
          "reference (logits) + vllm_iluvatar sparse_attn_indexer_original (top-k) + ixformer SDK moe.py "
          "ref_moe_grouped_topk / ref_moe_w8a8_group_gemm (dylanyunlon/project_6@87a19d2) + mojo_opset@b97e98b "
          "ixformer MoE (group GEMV calls, MojoExperts reference)")


def _logits_impl(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, kv_cache: torch.Tensor,
                 block_table: torch.Tensor, weights: torch.Tensor, max_context_len: int) -> torch.Tensor:
    T = q.shape[0]
    bs = kv_cache.shape[1]
    out = torch.full((T, max_context_len), float("inf"), dtype=torch.float32)
    for b in range(cu_seqlens_q.shape[0] - 1):
        q0, q1 = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        n = int(cu_seqlens_kv[b + 1] - cu_seqlens_kv[b])
        if q1 == q0 or n == 0:
            continue
        check(n <= max_context_len,
              f"dsa_indexer_mqa_logits_with_blocks: kv length {n} > max_context_len {max_context_len}")
        pos = torch.arange(n)
        keys = kv_cache[block_table[b, pos // bs].long(), pos % bs].float()  # [n, D]
        dots = torch.einsum("thd,nd->thn", q[q0:q1].float(), keys).clamp_min(0)
        out[q0:q1, :n] = (dots * weights[q0:q1].float()[:, :, None]).sum(1)
    return out


def _logits_fake(q, cu_seqlens_q, cu_seqlens_kv, kv_cache, block_table, weights, max_context_len):
    return q.new_empty((q.shape[0], max_context_len), dtype=torch.float32)


_logits_op = opaque("ixf_dsa_indexer_mqa_logits_with_blocks", _logits_impl, _logits_fake)


def dsa_indexer_mqa_logits_with_blocks(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, kv_cache: torch.Tensor,
    block_table: torch.Tensor, weights: torch.Tensor, logits: torch.Tensor | None = None, *,
    max_q_len: int, max_kv_len: int, max_context_len: int,
) -> torch.Tensor:
    check(q.dim() == 3, f"dsa_indexer_mqa_logits_with_blocks: q is [T, H, D], got {tuple(q.shape)}")
    check(kv_cache.dim() == 3 and kv_cache.shape[-1] == q.shape[-1],
          f"dsa_indexer_mqa_logits_with_blocks: kv_cache is [blocks, block_size, {q.shape[-1]}], "
          f"got {tuple(kv_cache.shape)}")
    check(q.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype == q.dtype and weights.dtype == q.dtype,
          f"dsa_indexer_mqa_logits_with_blocks: bf16/fp16 q, kv_cache and weights of one dtype, got "
          f"{q.dtype}, {kv_cache.dtype}, {weights.dtype}")
    check(weights.shape == q.shape[:2],
          f"dsa_indexer_mqa_logits_with_blocks: weights [T, H], got {tuple(weights.shape)}")
    check(cu_seqlens_q.dtype == cu_seqlens_kv.dtype == block_table.dtype == torch.int32,
          "dsa_indexer_mqa_logits_with_blocks: int32 cu_seqlens_q, cu_seqlens_kv and block_table")
    B = cu_seqlens_q.shape[0] - 1
    check(cu_seqlens_kv.shape[0] == B + 1 and block_table.dim() == 2 and block_table.shape[0] == B,
          "dsa_indexer_mqa_logits_with_blocks: cu_seqlens_kv [B + 1] and block_table [B, blocks] for B sequences")
    check(q.is_contiguous() and weights.is_contiguous(), "dsa_indexer_mqa_logits_with_blocks: contiguous q and weights")
    check(max_q_len >= 0 and max_kv_len >= 0 and max_context_len >= max_kv_len,
          f"dsa_indexer_mqa_logits_with_blocks: max_context_len {max_context_len} >= max_kv_len {max_kv_len}")
    result = _logits_op(q, cu_seqlens_q, cu_seqlens_kv, kv_cache, block_table, weights, int(max_context_len))
    if logits is None:
        return result
    check(logits.dtype == torch.float32 and logits.shape == result.shape,
          "dsa_indexer_mqa_logits_with_blocks: logits= is fp32 [T, max_context_len]")
    return logits.copy_(result)


def _topk_impl(logits: torch.Tensor, cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, topk: int,
               topk_indices: torch.Tensor) -> None:
    T, width = logits.shape
    cols = torch.arange(width)
    outside = (cols[None, :] < cu_seqlen_ks.long()[:, None]) | (cols[None, :] >= cu_seqlen_ke.long()[:, None])
    scores = logits.float().masked_fill(outside, float("-inf"))
    k = min(topk, width)
    vals, idx = scores.topk(k, dim=-1)
    picked = torch.where(outside.gather(1, idx), -1, idx - cu_seqlen_ks.long()[:, None])
    topk_indices[:, :topk] = -1
    topk_indices[:, :k] = picked.to(torch.int32)


def _topk_fake(logits, cu_seqlen_ks, cu_seqlen_ke, topk, topk_indices) -> None:
    return None


_topk_op = opaque("ixf_dsa_update_topk_indices", _topk_impl, _topk_fake, mutates_args=("topk_indices",))


def dsa_update_topk_indices(logits: torch.Tensor, cu_seqlen_ks: torch.Tensor, cu_seqlen_ke: torch.Tensor, topk: int,
                            topk_indices: torch.Tensor) -> None:
    T = logits.shape[0]
    check(logits.dim() == 2 and logits.dtype in (torch.float32, torch.bfloat16),
          f"dsa_update_topk_indices: fp32/bf16 logits [T, N], got {logits.dtype} {tuple(logits.shape)}")
    check(cu_seqlen_ks.shape == cu_seqlen_ke.shape == (T,) and cu_seqlen_ks.dtype == cu_seqlen_ke.dtype == torch.int32,
          "dsa_update_topk_indices: int32 cu_seqlen_ks / cu_seqlen_ke of one entry per logits row")
    check(topk_indices.dtype == torch.int32 and topk_indices.dim() == 2 and topk_indices.shape[0] == T
          and topk_indices.shape[1] >= topk,
          f"dsa_update_topk_indices: int32 topk_indices [{T}, >= {topk}], got {topk_indices.dtype} "
          f"{tuple(topk_indices.shape)}")
    _topk_op(logits, cu_seqlen_ks, cu_seqlen_ke, int(topk), topk_indices)



# ---------------------------------------------------------------------------------------------
# MoE: moe_grouped_topk (ref_moe_grouped_topk), moe_w16a16_group_gemv / moe_w8a8_group_gemv


def _grouped_topk_impl(gating_output: torch.Tensor, bias: torch.Tensor | None, topk: int, num_expert_group: int,
                       topk_group: int, sigmoid: bool, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = gating_output.float()
    scores = g.sigmoid() if sigmoid else g.softmax(-1)
    choice = scores + bias.float().unsqueeze(0) if bias is not None else scores
    T, E = choice.shape
    group_scores = choice.view(T, num_expert_group, -1).max(dim=-1).values  # max, not DeepSeek's top-2 sum
    keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices
    mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)
    mask = mask.unsqueeze(-1).expand(T, num_expert_group, E // num_expert_group).reshape(T, E)
    ids = choice.masked_fill(~mask.bool(), 0.0).topk(topk, dim=-1, sorted=False).indices
    weights = scores.gather(1, ids)  # the unbiased scores (also without a bias: the same values)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _grouped_topk_fake(gating_output, bias, topk, num_expert_group, topk_group, sigmoid, renormalize):
    T = gating_output.shape[0]
    return (gating_output.new_empty((T, topk), dtype=torch.float32),
            gating_output.new_empty((T, topk), dtype=torch.int32))


_grouped_topk_op = opaque("ixf_moe_grouped_topk", _grouped_topk_impl, _grouped_topk_fake)


def moe_grouped_topk(
    gating_output: torch.Tensor, topk: int, num_expert_group: int, topk_group: int, scoring_func: str = "softmax",
    e_score_correction_bias: torch.Tensor | None = None, topk_weight: torch.Tensor | None = None,
    topk_ids: torch.Tensor | None = None, renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    check(gating_output.dim() == 2 and gating_output.dtype in (torch.float32, torch.bfloat16),
          f"moe_grouped_topk: gating_output is fp32/bf16 [num_tokens, num_experts], got {gating_output.dtype} "
          f"{tuple(gating_output.shape)}")
    T, E = gating_output.shape
    check(scoring_func in ("softmax", "sigmoid"), f"moe_grouped_topk: unsupported scoring function {scoring_func!r}")
    check(num_expert_group >= 1 and E % num_expert_group == 0 and 1 <= topk_group <= num_expert_group,
          f"moe_grouped_topk: {E} experts in {num_expert_group} groups, keeping {topk_group}")
    check(1 <= topk <= E, f"moe_grouped_topk: topk {topk} outside [1, {E}]")
    bias = e_score_correction_bias
    if bias is not None:
        check(bias.shape == (E,) and bias.dtype == gating_output.dtype,
              f"moe_grouped_topk: e_score_correction_bias [{E}] in the gating's dtype {gating_output.dtype} (the "
              f"kernel's IN_DTYPE), got {bias.dtype} {tuple(bias.shape)}")
    weights, ids = _grouped_topk_op(gating_output, bias, int(topk), int(num_expert_group), int(topk_group),
                                    scoring_func == "sigmoid", bool(renormalize))
    if topk_weight is not None:
        weights = topk_weight.copy_(weights)
    if topk_ids is not None:
        ids = topk_ids.copy_(ids)
    return weights, ids


FORMAT_CODES = {0: "NN", 1: "NT", 2: "TN"}  # vllm_iluvatar's W4A8 method: {"NN": 0, "NT": 1, "TN": 2}


def _expert_weight(weight: torch.Tensor, e: int, fmt: str) -> torch.Tensor:
    return weight[e] if fmt[0] == "T" else weight[e].t()  # [N, K]


def _group_rows(tokens: torch.Tensor, M: int) -> list[tuple[int, int, int]]:
    out, start = [], 0
    for e, n in enumerate(tokens.tolist()):
        out.append((e, start, start + n))
        start += n
    check(start <= M, f"group gemv: the row counts add up to {start}, more than the {M} input rows")
    return out


def _scatter_rows(out: torch.Tensor, dst_to_src: torch.Tensor | None) -> torch.Tensor:
    if dst_to_src is None:
        return out
    result = out.clone()
    result[dst_to_src.long()] = out[: dst_to_src.shape[0]]  # ref_moe_w8a8_group_gemm: tmp[dst_to_src] = output
    return result


def _w16a16_impl(input: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, dst_to_src: torch.Tensor | None,
                 fmt: str, output_dtype: torch.dtype) -> torch.Tensor:
    M = input.shape[0]
    N = weight.shape[1] if fmt[0] == "T" else weight.shape[2]
    out = torch.full((M, N), float("nan"), dtype=torch.float32)  # rows past sum(tokens): unspecified
    for e, a, b in _group_rows(tokens, M):
        if b > a:
            out[a:b] = input[a:b].float() @ _expert_weight(weight, e, fmt).float().t()
    return _scatter_rows(out, dst_to_src).to(output_dtype)


def _w16a16_fake(input, weight, tokens, dst_to_src, fmt, output_dtype):
    N = weight.shape[1] if fmt[0] == "T" else weight.shape[2]
    return input.new_empty((input.shape[0], N), dtype=output_dtype)


_w16a16_op = opaque("ixf_moe_w16a16_group_gemv", _w16a16_impl, _w16a16_fake)


def _group_gemv_checks(name: str, input: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, fmt: str,
                       output_dtype: torch.dtype) -> None:
    check(fmt in ("TN", "NN"), f"{name}: format {fmt!r} outside TN / NN (the [M, K] input formats emulated)")
    check(input.dim() == 2 and weight.dim() == 3, f"{name}: input [M, K] and weight [E, ., .], got "
          f"{tuple(input.shape)} and {tuple(weight.shape)}")
    K = weight.shape[2] if fmt[0] == "T" else weight.shape[1]
    check(K == input.shape[1], f"{name}: weight {tuple(weight.shape)} ({fmt}) does not take K = {input.shape[1]}")
    check(input.is_contiguous() and weight.is_contiguous(), f"{name}: contiguous input and weight")
    check(tokens.dim() == 1 and tokens.shape[0] == weight.shape[0] and tokens.dtype == torch.int32
          and tokens.device == input.device,
          f"{name}: int32 row counts [{weight.shape[0]}] on the input's device, got {tokens.dtype} "
          f"{tuple(tokens.shape)} on {tokens.device}")
    check(output_dtype in (torch.float16, torch.bfloat16), f"{name}: output_dtype fp16/bf16, got {output_dtype}")


def moe_w16a16_group_gemv(
    input: torch.Tensor, weight: torch.Tensor, output_dtype: torch.dtype, tokens_per_experts_gpu: torch.Tensor,
    dst_to_src: torch.Tensor | None = None, format: str = "TN", output: torch.Tensor | None = None,
) -> torch.Tensor:
    _group_gemv_checks("moe_w16a16_group_gemv", input, weight, tokens_per_experts_gpu, format, output_dtype)
    check(input.dtype in (torch.float16, torch.bfloat16) and weight.dtype == input.dtype,
          f"moe_w16a16_group_gemv: fp16/bf16 input and weight of one dtype, got {input.dtype} and {weight.dtype}")
    result = _w16a16_op(input, weight, tokens_per_experts_gpu, dst_to_src, format, output_dtype)
    return result if output is None else output.copy_(result)


def _w8a8_impl(input: torch.Tensor, weight: torch.Tensor, i_scales: torch.Tensor, w_scales: torch.Tensor,
               tokens: torch.Tensor, dst_to_src: torch.Tensor | None, fmt: str,
               output_dtype: torch.dtype) -> torch.Tensor:
    M, N = input.shape[0], w_scales.shape[1]
    out = torch.full((M, N), float("nan"), dtype=torch.float32)
    for e, a, b in _group_rows(tokens, M):
        if b > a:
            acc = input[a:b].float() @ _expert_weight(weight, e, fmt).float().t()
            out[a:b] = acc * i_scales[a:b].view(-1, 1) * w_scales[e].view(1, -1)
    return _scatter_rows(out, dst_to_src).to(output_dtype)


def _w8a8_fake(input, weight, i_scales, w_scales, tokens, dst_to_src, fmt, output_dtype):
    return input.new_empty((input.shape[0], w_scales.shape[1]), dtype=output_dtype)


_w8a8_op = opaque("ixf_moe_w8a8_group_gemv", _w8a8_impl, _w8a8_fake)


def moe_w8a8_group_gemv(
    input: torch.Tensor, weight: torch.Tensor, i_scales: torch.Tensor, w_scales: torch.Tensor,
    output_dtype: torch.dtype, tokens_per_experts: torch.Tensor, dst_to_src: torch.Tensor | None = None,
    format: int = 0, output: torch.Tensor | None = None,
) -> torch.Tensor:
    check(format in FORMAT_CODES, f"moe_w8a8_group_gemv: format code {format!r} outside {FORMAT_CODES}")
    fmt = FORMAT_CODES[format]
    _group_gemv_checks("moe_w8a8_group_gemv", input, weight, tokens_per_experts, fmt, output_dtype)
    check(input.dtype == weight.dtype == torch.int8, "moe_w8a8_group_gemv: int8 input and weight")
    N = weight.shape[1] if fmt[0] == "T" else weight.shape[2]
    check(i_scales.shape == (input.shape[0],) and i_scales.dtype == torch.float32,
          f"moe_w8a8_group_gemv: fp32 i_scales [{input.shape[0]}], got {i_scales.dtype} {tuple(i_scales.shape)}")
    check(w_scales.shape == (weight.shape[0], N) and w_scales.dtype == torch.float32,
          f"moe_w8a8_group_gemv: fp32 w_scales [{weight.shape[0]}, {N}], got {w_scales.dtype} {tuple(w_scales.shape)}")
    result = _w8a8_op(input, weight, i_scales, w_scales, tokens_per_experts, dst_to_src, fmt, output_dtype)
    return result if output is None else output.copy_(result)


def install_package(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.7.0")


def install_functions(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.7.0", dsa_indexer_mqa_logits_with_blocks, dsa_update_topk_indices, moe_grouped_topk,
         moe_w16a16_group_gemv, moe_w8a8_group_gemv)
