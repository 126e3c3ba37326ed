"""Iluvatar CoreX natives through ixformer, as Iluvatar's vLLM plugin calls them.

Written against vllm_iluvatar 0.1.0 / ixformer 0.7.0, emulated in CI (``conformance/emulators/ixformer``),
not run on Iluvatar hardware. ``ixformer`` is imported lazily (inside ``supports`` and the adapters).

What vllm_iluvatar 0.1.0 calls for DeepSeek-V3.2 / GLM-5 (its fork of vLLM's
``model_executor/layers/sparse_attn_indexer.py``, ``sparse_attn_indexer``, registered as the custom op
``vllm::ilu_sparse_attn_indexer``; read through the code index, which does not name the repository or
commit) and what is wired here:

* **lightning_indexer** (wired): ``ops.indexer_k_cache(k, kv_cache, slot_mapping)`` writes bf16 keys
  into a ``[num_blocks, block_size, head_dim]`` indexer cache -- our canonical indexer cache -- then,
  for each prefill chunk and for the decode batch alike::

      logits = ixfops.dsa_indexer_mqa_logits_with_blocks(q, cu_seqlens_q, cu_seq_lens, kv_cache,
                   block_table, weights, max_q_len=..., max_kv_len=..., max_context_len=...)
      ixfops.dsa_update_topk_indices(logits, cu_seqlen_ks, cu_seqlen_ke, topk_tokens, topk_indices_buffer)

  The kernel reads the paged cache in place through the block table (no key is gathered); its
  per-step inputs (``cu_seq_lens``, ``cu_seqlen_ks`` / ``ke``, the host maxima) come from the
  plugin's indexer metadata builder, built once per step: here :class:`IxformerLayout` builds them
  (:class:`IxformerTables`). The logits are fp32 ``[T, max_context_len]``, column ``p`` the key at
  position ``p`` of the token's sequence (FlagGems-vllm's Iluvatar benchmark holds the native call to
  that reference: ``sum_h relu(q . k_p) * w_h`` for ``p`` below the sequence's length, other columns
  unspecified); ``dsa_update_topk_indices`` writes the top-k of columns ``[ks, ke)`` as ``column - ks``
  with ``-1`` past the candidates (the semantics of the torch path the plugin replaced,
  ``sparse_attn_indexer_original``: ``topk``, ``-= ks``, ``-1`` outside ``[0, ke - ks)``). Tokens'
  ranges here are ``[0, position + 1)``: causal, and the same under either reading of ``ks``.
  The kernel takes blocks of 16/32/64 and falls back to ixformer's ``ref_dsa_indexer_mqa_logits_with_blocks``
  for others (vllm_iluvatar's DeepSeek-V4 indexer notes); the layout asks for blocks of 64.
* **sparse MLA** (not wired): no public DeepSeek-V3.2 / GLM-5 sparse-MLA call was found. The public
  sparse MLA calls are DeepSeek-V4's, in vllm_iluvatar's ``IluDeepseekV4MLAAttention`` (the V4 W4A8 layer,
  bf16 caches): prefill ``ixfops.ds4_flash_mla_sparse_fwd(q=, kv=[N, 1, D], indices=[T, 1, K],
  sm_scale=, attn_sink=, topk_length=, output=)`` over a gathered workspace, decode
  ``ixfops.ds4_flash_mla_with_kvcache(q=[T, 1, H, D], k_cache=[blocks, bs, 1, D], indices=, topk_length=,
  sm_scale=, attn_sink=, extra_k_cache=, extra_indices=, extra_topk_length=, output=)``. Their output has
  q's shape (V4's value is the whole 512-wide row, with an attention sink); GLM-5's rows are 576 wide
  (latent 512 + rope 64) with a 512-wide value, and nothing public shows these kernels taking D = 576,
  returning an lse, or running without V4's sink, so they are not wired. The other public ixformer MLA
  call, ``vllm_paged_attention_mla_int8`` (vllm_iluvatar's ``TritonMLABackend``), is dense paged decode.
* **MoE** (not wired): the public ixformer MoE calls are ``moe_topk_softmax`` (softmax routing;
  GLM-5 routes with sigmoid scores, a correction bias and group top-k, which it does not take) and
  ``ixfops.moe_compute_token_index_ep(topk_ids=, num_experts=, start_expert_id=, end_expert_id=)``,
  which returns ``expert_sizes_cpu`` (a host copy: not sync-free); no public grouped-expert GEMM call
  with a documented signature was found, so grouped experts stay on the Triton tier.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops import token_positions
from hwlayer.ops.cache import AttentionLayout, PagedKV
from hwlayer.ops.layout import AttentionMetadata

from . import native

IXFORMER = "ixformer.inference.functions"
KERNEL_BLOCKS = (16, 32, 64)  # others take ixformer's reference fallback (slow, same result)
VERIFIED = ("written against vllm_iluvatar 0.1.0 / ixformer 0.7.0 (ixformer.inference.functions "
            "dsa_indexer_mqa_logits_with_blocks + dsa_update_topk_indices), emulated in CI, "
            "not run on Iluvatar hardware")


def _ixf() -> Any:
    """``ixformer.inference.functions`` when it imports and has the DSA indexer pair, else None."""
    if not native.importable(IXFORMER):
        return None
    ixf = sys.modules[IXFORMER]
    ok = all(hasattr(ixf, f) for f in ("dsa_indexer_mqa_logits_with_blocks", "dsa_update_topk_indices"))
    return ixf if ok else None


@dataclass(frozen=True)
class IxformerTables:
    """The indexer pair's per-step inputs besides q, the cache, the block table and the weights, as
    vllm_iluvatar's indexer metadata builder makes them: built once per step, device arithmetic only."""

    cu_seqlens_kv: torch.Tensor  # int32 [B + 1]: cumulative key counts (the sequences' lengths)
    ks: torch.Tensor  # int32 [T]: first candidate column of each token (0)
    ke: torch.Tensor  # int32 [T]: one past its last (position + 1: causal)
    max_context_len: int  # host: the logits' width (the step's max_seqlen_k)
    block_size: int  # host


def ixformer_tables(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, block_size: int,
                    max_context_len: int, meta: AttentionMetadata | None = None) -> IxformerTables:
    """:class:`IxformerTables` of a varlen batch; nothing read back (``meta``'s token -> sequence map when given)."""
    if meta is not None:
        seq_idx = meta.seq_idx
        pos = meta.first_query_pos.index_select(0, seq_idx) + torch.arange(num_tokens, device=seq_idx.device) \
            - cu_seqlens_q.index_select(0, seq_idx)
    else:
        seq_idx, pos = token_positions(cu_seqlens_q, seq_lens, num_tokens)
    cu_kv = torch.nn.functional.pad(seq_lens.cumsum(0), (1, 0)).to(torch.int32)
    ke = (pos + 1).to(torch.int32)
    return IxformerTables(cu_kv, torch.zeros_like(ke), ke, max_context_len, block_size)


class IxformerLayout(AttentionLayout):
    """The iluvatar backend's layout: the canonical caches (the bf16 ``[blocks, bs, D]`` indexer cache
    is what ``dsa_indexer_mqa_logits_with_blocks`` reads in place), blocks of 64 by default, and the
    indexer pair's per-step tables (:class:`IxformerTables`) when ixformer is present."""

    name = "ixformer"
    default_block_size = 64

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> IxformerTables | None:
        if meta is None or _ixf() is None:
            return None
        return ixformer_tables(cu_seqlens_q, seq_lens, meta.num_tokens, meta.block_size, meta.max_seqlen_k, meta)


ILUVATAR_LAYOUT = IxformerLayout()


def ixformer_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    keys = native.canonical_tensor(k_cache)
    if keys is None:
        return "ixformer's indexer reads the canonical [blocks, block_size, D] indexer cache"
    if not native._cuda_tensors(q, weights, keys, block_table, cu_seqlens_q, seq_lens):
        return "needs CUDA tensors"
    if q.dtype not in (torch.bfloat16, torch.float16) or keys.dtype != q.dtype:
        return f"ixformer's indexer takes bf16/fp16 q and keys of one dtype, got {q.dtype} and {keys.dtype}"
    if _ixf() is None:
        return f"{IXFORMER} with dsa_indexer_mqa_logits_with_blocks is not importable"
    return True


def ixformer_lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: PagedKV | torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    """The paged cache scored in place by ``dsa_indexer_mqa_logits_with_blocks``, the top-k written by
    ``dsa_update_topk_indices``; the tables come from the step (:class:`IxformerLayout`), else are built here."""
    ixf = _ixf()
    keys = native.canonical_tensor(k_cache)
    T, bs = q.shape[0], keys.shape[1]
    tables = meta.backend if meta is not None else None
    if not (isinstance(tables, IxformerTables) and tables.block_size == bs
            and max_seqlen_k in (None, tables.max_context_len)):
        if max_seqlen_k is None:  # the op's documented convenience outside a forward: reads the device
            max_seqlen_k = int(seq_lens.max()) if seq_lens.numel() else 0
        tables = ixformer_tables(cu_seqlens_q, seq_lens, T, bs, max_seqlen_k,
                                 meta if meta is not None and meta.block_size == bs else None)
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    if T == 0 or tables.max_context_len == 0:
        return out
    # weights in q's dtype (vllm_iluvatar's dtype contract); relu(s x) = s relu(x) for s > 0 folds the scale
    w = (weights.float() * scale).to(q.dtype).contiguous()
    logits = ixf.dsa_indexer_mqa_logits_with_blocks(
        q.contiguous(), cu_seqlens_q.to(torch.int32), tables.cu_seqlens_kv, keys, block_table.to(torch.int32), w,
        max_q_len=max_seqlen_q or T, max_kv_len=tables.max_context_len, max_context_len=tables.max_context_len)
    ixf.dsa_update_topk_indices(logits, tables.ks, tables.ke, topk, out)
    return out
