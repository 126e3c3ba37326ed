"""CPU emulation of Iluvatar's ``ixformer.inference.functions`` DSA indexer pair (ixformer 0.7.0).

No ixformer source or test is public. The signatures are those vllm_iluvatar 0.1.0 calls
(``sparse_attn_indexer``, its fork of vLLM's ``model_executor/layers/sparse_attn_indexer.py``, read
through the code index; prefill chunks and the decode batch make the same two calls)::

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

Both are opaque custom ops with fake kernels (``_common.opaque``). tests/test_emulators_vendor_refs.py
checks them against vectors derived from those references.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque

SOURCE = ("vllm_iluvatar 0.1.0 sparse_attn_indexer (calls) + FlagGems-vllm Iluvatar paged-MQA benchmark "
          "reference (logits) + vllm_iluvatar sparse_attn_indexer_original (top-k)")


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


def install_package(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.7.0")


def install_functions(module: types.ModuleType) -> None:
    fill(module, SOURCE, "0.7.0", dsa_indexer_mqa_logits_with_blocks, dsa_update_topk_indices)
