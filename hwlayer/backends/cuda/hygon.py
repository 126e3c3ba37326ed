"""Hygon DCU native adapters, written against Hygon's vLLM plugin vllm_hcu (HYGON-AI/vllm-plugin-das),
emulated in CI, not run on Hygon hardware.

Each adapter calls a DCU library the way vllm_hcu does, at the commit cited; libraries are imported
lazily (inside the functions) and every adapter sits behind a ``supports`` predicate:

* ``sparse_mla_attention``: the DCU FlashMLA build's ``flash_mla.flash_mla_interface.flash_mla_sparse_fwd``
  (``vllm_hcu/v1/attention/ops/flashmla.py``@0e048c7 imports it from there). Its lse is taken as the
  natural log: vllm_hcu passes ``topk_length`` (the FlashMLA API generation whose lse is natural,
  deepseek-ai/FlashMLA 082094b) and feeds the returned lse to vLLM's cross-rank merge, which takes a
  natural-log lse (``v1/attention/backends/mla/flashmla_sparse.py``@063db5d). The DCU kernel's source is
  not public, so the base is not checked in a kernel. Global slot ids, heads padded to 64 / 128, top-k
  padded to blocks of 128: as the NVIDIA adapter (:mod:`.native`).
* ``moe_route``: ``lightop.op.moe_fused_gate(logits, bias, n_group, topk_group, top_k, 0,
  routed_scaling_factor)`` (``fused_moe/router_runtime.py``@13272b6); a fixed "sigmoid scoring followed
  by renormalization" contract (``fused_moe/lightop_routing.py``@5a61c48), weights returned unscaled, so
  only renormalized routing with a correction bias is taken, and the scaling is applied here.
* ``lightning_indexer`` (opt-in, ``HWLAYER_FP8_INDEXER=1``: FP8 scoring can change the top-k): the DCU
  DeepGEMM's ``fp8_fp4_paged_mqa_logits`` for decode steps over the FP8 paged indexer cache that
  :class:`HygonLayout` allocates (keys quantised once when written, read in place, the schedule built
  once per step), and ``fp8_fp4_mqa_logits`` for prefill over the sequence's keys gathered from that
  cache, as vllm_hcu does (``model_executor/layers/sparse_attn_indexer.py``@058761f).

Not wired: the w8a8 grouped GEMM ``lightop.gemm_ops.m_grouped_w8a8_gemm_nt_contig_asm``. Its weight
is a packed ``(E, N // 16, K * 16)`` int8 layout for an assembly kernel ("MARLIN" in the kernel
name), and the packing (which row/column permutation) is not in any public source found, so a
``prepare_weight`` for it would be invented; int8 experts stay on the Triton tier.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from hwlayer.ops.cache import Fp8PagedKV, tables_for_call
from hwlayer.ops.layout import AttentionMetadata

from . import native
from .native import (
    MQA_LOGITS_HEAD_DIMS,
    MQA_LOGITS_HEADS,
    PagedIndexerTables,
    fp8_indexer_enabled,
    importable,
    indexer_key_layout,
    is_decode_step,
    paged_indexer_tables,
    topk_positions,
)

WRITTEN_AGAINST = "vllm_hcu (HYGON-AI/vllm-plugin-das@0e048c7/063db5d/13272b6/058761f)"


def _cuda_tensors(*tensors: Any) -> bool:
    return native._cuda_tensors(*tensors)


# --------------------------------------------------------------------------------------------
# sparse_mla_attention: DCU FlashMLA


# The DCU build differs from NVIDIA's FlashMLA only in its import path, its head rule and the missing
# architecture check: the same adapter, made by native.make_flash_mla_sparse.
dcu_flash_mla_sparse_attention, dcu_flash_mla_sparse_supports = native.make_flash_mla_sparse(dcu=True)


# --------------------------------------------------------------------------------------------
# moe_route: lightop.op.moe_fused_gate


def lightop_moe_route_supports(router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
                               renormalize: bool, routed_scaling_factor: float) -> bool | str:
    if not importable("lightop.op") or not hasattr(sys.modules["lightop.op"], "moe_fused_gate"):
        return "lightop.op.moe_fused_gate is not importable"
    if not _cuda_tensors(router_logits):
        return "needs DCU (cuda) tensors"
    if not renormalize:
        return "lightop's moe_fused_gate always renormalizes (vllm_hcu lightop_routing.py: sigmoid + renormalize)"
    if correction_bias is None:
        return "vllm_hcu calls lightop's fused gate only with a correction bias"
    E = router_logits.shape[1]
    if not (E > n_group and E % n_group == 0):
        return f"vllm_hcu takes lightop's fused gate only when {E} experts split into more than {n_group} groups"
    return True


def lightop_moe_route(
    router_logits: torch.Tensor, correction_bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    from lightop import op

    weights, ids = op.moe_fused_gate(router_logits.float().contiguous(), correction_bias.float().contiguous(),
                                     n_group, topk_group, top_k, 0, routed_scaling_factor)
    return weights.float() * routed_scaling_factor, ids.to(torch.int32)  # the gate returns them unscaled


# --------------------------------------------------------------------------------------------
# lightning_indexer: DCU DeepGEMM fp8_fp4_(paged_)mqa_logits over the FP8 paged indexer cache


def dcu_deep_gemm() -> Any:
    """The DCU ``deep_gemm`` module when it imports and has the entries vllm_hcu calls, else None."""
    if not importable("deep_gemm"):
        return None
    dg = sys.modules["deep_gemm"]
    need = ("fp8_fp4_mqa_logits", "fp8_fp4_paged_mqa_logits", "get_paged_mqa_logits_metadata", "get_num_sms")
    return dg if all(hasattr(dg, f) for f in need) else None


DCU_PAGED_BLOCK = 64  # the paged MQA-logits block vLLM's indexer uses (and DeepGEMM's SM90 asserts); DCU: assumed


class HygonLayout(native.DeepGemmLayout):
    """The hygon backend's layout: canonical caches, except that with ``HWLAYER_FP8_INDEXER=1`` and a DCU
    DeepGEMM the indexer key cache is FP8 with per-row scales (:class:`~hwlayer.ops.cache.Fp8PagedKV`,
    vLLM's layout, which vllm_hcu keeps: ``indexer_k_quant_and_cache`` at the write), with the paged
    kernel's tables built once per decode step. The latent cache stays canonical (DCU FlashMLA reads it)."""

    default_block_size = DCU_PAGED_BLOCK

    fp8_name = "dcu-deepgemm-fp8-indexer"

    @property
    def fp8_indexer(self) -> bool:
        return fp8_indexer_enabled() and dcu_deep_gemm() is not None

    def paged_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                     block_table: torch.Tensor) -> PagedIndexerTables | None:
        if meta.block_size != DCU_PAGED_BLOCK or not is_decode_step(meta.num_tokens, seq_lens.shape[0]):
            return None
        return paged_indexer_tables(cu_seqlens_q, seq_lens, block_table, meta.num_tokens, meta.block_size,
                                    meta.max_seqlen_k, meta)


HYGON_LAYOUT = HygonLayout()


def dcu_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    if not isinstance(k_cache, Fp8PagedKV):
        return ("the DCU DeepGEMM indexer scores FP8 keys from the FP8 paged indexer cache (the hygon layout "
                "allocates it under HWLAYER_FP8_INDEXER=1: FP8 scoring can change the top-k)")
    if dcu_deep_gemm() is None:
        return "deep_gemm with fp8_fp4_mqa_logits / fp8_fp4_paged_mqa_logits is not importable"
    if q.shape[1] not in MQA_LOGITS_HEADS or q.shape[2] not in MQA_LOGITS_HEAD_DIMS:
        return f"DeepGEMM mqa logits take {MQA_LOGITS_HEADS} heads of dim {MQA_LOGITS_HEAD_DIMS}"
    if not _cuda_tensors(q, weights, k_cache.data, block_table, cu_seqlens_q, seq_lens):
        return "needs DCU (cuda) tensors"
    if k_cache.block_size != DCU_PAGED_BLOCK:
        return f"DeepGEMM's paged MQA logits take blocks of {DCU_PAGED_BLOCK}, got {k_cache.block_size}"
    return True


def dcu_lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: Fp8PagedKV, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    dg = dcu_deep_gemm()
    T = q.shape[0]
    # q quantised per (token, head) row; its scale and ours folded into the head weights (relu(s x) = s relu(x)).
    q_fp8, q_scale = native._fp8_rows(q)
    w = (weights.float() * q_scale * scale).contiguous()
    if is_decode_step(T, seq_lens.shape[0]):  # decode: the paged kernel reads the FP8 cache in place
        bs = k_cache.block_size
        tables = tables_for_call(meta, bs, max_seqlen_k, seq_lens, lambda L, m: paged_indexer_tables(
            cu_seqlens_q, seq_lens, block_table, T, bs, L, m))
        if tables.max_context_len == 0:
            return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
        logits = dg.fp8_fp4_paged_mqa_logits(q_fp8.unsqueeze(1).contiguous(), k_cache.fused(), w,
                                             tables.context_lens, tables.block_table, tables.schedule,
                                             tables.max_context_len, clean_logits=False)
        ke = tables.context_lens.view(T)
        return topk_positions(logits, torch.zeros_like(ke), ke, topk)
    # prefill: this batch's keys gathered from the FP8 cache (codes and scales, no re-quantisation), as
    # vllm_hcu's cp_gather_indexer_k_quant_cache, then the non-paged kernel
    key_slots, ks, ke = indexer_key_layout(block_table, cu_seqlens_q, seq_lens, T, k_cache.block_size, max_seqlen_k,
                                           meta)
    if key_slots.shape[0] == 0 or T == 0:
        return torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    k_fp8 = k_cache.codes.reshape(-1, k_cache.width).index_select(0, key_slots).view(torch.float8_e4m3fn)
    k_scale = k_cache.scales.reshape(-1).index_select(0, key_slots)
    logits = dg.fp8_fp4_mqa_logits(q_fp8.contiguous(), (k_fp8, k_scale.contiguous()), w, ks, ke, clean_logits=False)
    return topk_positions(logits, ks, ke, topk)


def register(register_op: Any, backend: str = "hygon") -> None:
    """Register the DCU adapters (called from the family's ``hwlayer_register_ops``)."""
    register_op("sparse_mla_attention", dcu_flash_mla_sparse_attention, backend=backend,
                supports=dcu_flash_mla_sparse_supports)
    register_op("moe_route", lightop_moe_route, backend=backend, supports=lightop_moe_route_supports)
    register_op("lightning_indexer", dcu_lightning_indexer, backend=backend, supports=dcu_indexer_supports)
