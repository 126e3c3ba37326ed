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
* ``quant_fused_experts`` (int8 W8A8 expert stacks) as vllm_hcu's ``DeepGemmExperts`` runs Channel-INT8
  (``fused_moe/experts/deep_gemm_moe.py``@a38f27d): activations quantised per token
  (``lightop.quant.per_token_quant_int8``), rows grouped by expert with every expert padded to a
  multiple of 256 rows and ``m_indices`` -1 on the padding (``_HCU_HT_EP_TOKEN_ALIGNMENT``, the DCU
  DeepGEMM README's 256-row alignment), ``lightop.gemm_ops.m_grouped_w8a8_gemm_nt_contig_asm`` for
  gate/up, ``lightop.activation.fuse_silu_mul_quant`` (SwiGLU + int8 in one kernel), the same GEMM for
  down, then the routing weights and the sum over each token's slots here. The weight is the "Marlin2"
  layout ``(E, N // 16, K * 16)`` made ONCE by ``prepare_weight`` (:class:`Marlin2Int8`): vllm_hcu packs
  the int8 expert stacks it hands this kernel (DeepEP's contiguous ``DeepGemmExperts``, which at
  06845d2 calls ``lightop.m_grouped_w8a8_gemm_nt_contig_asm`` or, with the DCU DeepGEMM installed, its
  ``m_grouped_i8_gemm_nt_contiguous``) with ``weight8bit_nt_kpack2_marlin2``
  (``model_executor/layers/quantization/int8_runtime.py``@13272b6, "the audited Marlin2 layout", called
  per expert in ``compressed_tensors/compressed_tensors_moe_marlin.py``@1ec73b3): ``[E, N/16, 16, K/64,
  4, 16]`` permuted to ``[E, K/64, N/16, 4, 16, 16]``. A conflicting public pairing exists: the DCU
  DeepGEMM's older test helper ``weight8bit_nt_kpack2_marlin`` (16x16 tiles, no 64-wide K group:
  "legacy_n16_flat") feeds ``m_grouped_i8_gemm_nt_contiguous`` in its contiguous int8 test and in
  yuguo-Jack/DeepGEMM@142c2fa ``megamoe/dcu_megamoe_opt/tests/test_mega_moe_int8_baseline.py``, whose
  neighbour probes for a "k64n16" layout: the layout moved between DCU DeepGEMM versions. The one
  Hygon's own lightop caller uses is taken; on hardware this is the first thing to check. Kernel limits
  beyond the layout (N % 16, K % 64) are not public: N a multiple of 256 and K of 128 are assumed (the
  256x256x128 tile; every public caller's shapes), so GLM-5's experts (N 4096 / 6144, K 6144 / 2048)
  qualify.

Not wired: bf16 experts through ``lightop.moe.moe_gemm_marlin_w16a16`` (vllm_hcu@353fd74
``fused_moe/lightop_w16a16_runtime.py``: layout and flow public, but vllm_hcu takes it only for
E=256, hidden 2048, intermediate 512, top-8, at most 16 tokens, tensor parallel only, with a
per-shape config lookup; GLM-5's hidden 6144 / intermediate 2048 is outside it), and
``lightop.moe.fused_experts_impl_int8_marlin`` (the TP int8 path, a whole fused-experts call with its
own ``[E, K/64, N*64]`` layout: its internals, alignment shim and config gate are not public).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hwlayer.ops.cache import Fp8PagedKV, tables_for_call
from hwlayer.ops.layout import AttentionMetadata
from hwlayer.ops.quant import QuantizedWeight

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

WRITTEN_AGAINST = "vllm_hcu (HYGON-AI/vllm-plugin-das@0e048c7/063db5d/13272b6/058761f/a38f27d)"


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


# --------------------------------------------------------------------------------------------
# int8 experts: lightop's contiguous w8a8 grouped GEMM over the Marlin2 weight layout

TILE_M = 256  # each expert's rows padded to a multiple of this (vllm_hcu's _HCU_HT_EP_TOKEN_ALIGNMENT)
TILE = 16  # a Marlin2 tile: 16 rows of N x 16 columns of K
K_GROUP = 4  # tiles of K grouped by 4 (64 columns), the outermost dimension of the layout
N_MULTIPLE, K_MULTIPLE = 256, 128  # assumed kernel limits (the 256x256x128 macro tile; module docstring)


def marlin2_pack(w: torch.Tensor) -> torch.Tensor:
    """int8 ``[E, N, K]`` -> the Marlin2 storage ``(E, N/16, K*16)``: per expert, 64-column blocks of K
    outermost, then 16-row tiles of N, then the block's four 16-column tiles of K, each a row-major
    16x16 tile (vllm_hcu's ``weight8bit_nt_kpack2_marlin2``)."""
    E, N, K = w.shape
    blocks = w.reshape(E, N // TILE, TILE, K // (TILE * K_GROUP), K_GROUP, TILE)  # [E, nt, n, kb, kt, k]
    return blocks.permute(0, 3, 1, 4, 2, 5).contiguous().view(E, N // TILE, K * TILE)  # [E, kb, nt, kt, n, k]


def marlin2_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`marlin2_pack` (a new contiguous ``[E, N, K]`` tensor)."""
    E, nt, k16 = packed.shape
    kb = k16 // (TILE * TILE * K_GROUP)
    blocks = packed.view(E, kb, nt, K_GROUP, TILE, TILE)  # [E, kb, nt, kt, n, k]
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(E, nt * TILE, kb * K_GROUP * TILE)


class Marlin2Int8(torch.Tensor):
    """An int8 expert stack that reads as ``[E, N, K]`` but is stored ONLY in the Marlin2 layout
    (``.packed``), so ``prepare_weight`` keeps the :class:`~hwlayer.ops.quant.QuantizedWeight` contract
    (same logical shape and values) without a second copy resident: the DCU counterpart of an NPU
    tensor cast to FRACTAL_NZ. The lightop adapter hands ``.packed`` to the kernel; any other op on it
    (a generic fallback, ``dequantize()``, a test's golden) sees the unpacked values, materialised for
    that call. Its strides are those of the transposed ``[E, K, N]`` storage so that ``is_contiguous()``
    is False: kernels that take raw ``[E, N, K]`` pointers (the Triton tier) decline it."""

    packed: torch.Tensor

    @staticmethod
    def __new__(cls, packed: torch.Tensor) -> Marlin2Int8:
        E, nt, k16 = packed.shape
        N, K = nt * TILE, k16 // TILE
        return torch.Tensor._make_wrapper_subclass(cls, (E, N, K), strides=(N * K, 1, N), dtype=torch.int8,
                                                   device=packed.device, requires_grad=False)

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed

    def __repr__(self) -> str:
        return f"Marlin2Int8(shape={list(self.shape)}, device={self.device}, packed={list(self.packed.shape)})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        def unpack(t: Any) -> Any:
            return marlin2_unpack(t.packed) if isinstance(t, Marlin2Int8) else t

        return func(*pytree.tree_map(unpack, args), **pytree.tree_map(unpack, kwargs or {}))


def _lightop(module: str, name: str) -> Any:
    return getattr(sys.modules[module], name) if importable(module) and hasattr(sys.modules[module], name) else None


def lightop_experts_importable() -> str | None:
    """None when the three lightop entries vllm_hcu's int8 DeepGemmExperts calls import, else why not."""
    for module, name in (("lightop.gemm_ops", "m_grouped_w8a8_gemm_nt_contig_asm"),
                         ("lightop.activation", "fuse_silu_mul_quant"), ("lightop.quant", "per_token_quant_int8")):
        if _lightop(module, name) is None:
            return f"{module}.{name} is not importable"
    return None


def lightop_prepare_weight_supports(name: Any, weight: Any) -> bool | str:
    if not isinstance(weight, QuantizedWeight) or weight.format != "int8" or weight.dim() != 3:
        return "only int8 expert stacks have a lightop layout"
    if weight.act_scale_fmt is not None:
        return "lightop's per-token int8 quant has plain fp32 scales (no ue8m0)"
    if isinstance(weight.data, Marlin2Int8):
        return "already in the Marlin2 layout"
    if (why := lightop_experts_importable()) is not None:
        return why  # no kernel to read the layout: keep [E, N, K] for the Triton tier
    E, N, K = weight.shape
    if N % N_MULTIPLE or K % K_MULTIPLE:
        return f"the lightop grouped GEMM takes N % {N_MULTIPLE} and K % {K_MULTIPLE} (assumed), got N={N}, K={K}"
    if not _cuda_tensors(weight.data, weight.scale):
        return "needs DCU (cuda) tensors"
    return True


def lightop_prepare_weight(name: str, weight: QuantizedWeight) -> QuantizedWeight:
    """Once at load: the expert stack into the Marlin2 layout (the ``[E, N, K]`` copy is not kept)."""
    return weight.replace(data=Marlin2Int8(marlin2_pack(weight.data)), prepared=None)


def contiguous_rows(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The contiguous layout of ``topk_ids``' assignments, built on the device for a host-known size:
    ``(dest [T*k] int64, m_indices int32 [M], M)``. Assignment ``t*k + slot`` of expert ``e`` goes to row
    ``dest`` inside expert ``e``'s slice; slices are in expert order, each padded to a multiple of 256
    rows (``m_indices`` -1 there); a dropped assignment (id outside ``[0, E)``) gets ``dest == M``.
    ``M = round_up(T*k + min(T*k, E) * 255, 256)`` bounds the padding of the experts that have rows
    (vLLM's ``compute_aligned_M`` bounds it with every local expert). The 256-row tiles past the last
    slice are empty: their first row gets expert 0 (dummy work, never gathered), because the kernel is
    taken to read a tile's expert from its first row (the DCU integrations that bound M on the host
    "sanitize every empty 256-row tile head": yuguo-Jack/DeepGEMM@142c2fa
    ``megamoe/dcu_megamoe_opt/tests/test_mega_moe_int8_baseline.py``); vllm_hcu, sizing M from DeepEP's
    host-side counts where it has them (vLLM's ``compute_aligned_M``), leaves no empty tile."""
    n = topk_ids.numel()
    M = -(-(n + min(n, num_experts) * (TILE_M - 1)) // TILE_M) * TILE_M
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)  # dropped sort last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    perm = torch.argsort(key, stable=True)
    sorted_key = key.index_select(0, perm)
    first = torch.cumsum(counts, 0) - counts  # where each expert starts in the sorted order
    rank = torch.arange(n, device=flat.device) - first.index_select(0, sorted_key)
    padded = (counts[:num_experts] + TILE_M - 1) // TILE_M * TILE_M
    start = torch.nn.functional.pad(torch.cumsum(padded, 0), (1, 0))  # [E + 1]: start[E] = rows used
    dest_sorted = torch.where(sorted_key < num_experts, start.index_select(0, sorted_key) + rank, M)
    dest = torch.empty_like(dest_sorted).scatter_(0, perm, dest_sorted)
    m_indices = torch.full((M + 1,), -1, dtype=torch.int32, device=flat.device)
    m_indices.scatter_(0, dest, torch.where(key < num_experts, key, -1).to(torch.int32))
    m_indices[:M].view(-1, TILE_M)[:, 0].clamp_(min=0)  # empty tiles' heads: expert 0 (a used tile's is its own)
    return dest, m_indices[:M], M


def lightop_int8_experts_supports(x: Any, w13: Any, w2: Any, topk_weights: Any, topk_ids: Any) -> bool | str:
    if (why := lightop_experts_importable()) is not None:
        return why
    if not (isinstance(w13, QuantizedWeight) and isinstance(w2, QuantizedWeight)) or w13.format != "int8":
        return "lightop's grouped GEMM takes int8 (W8A8) expert stacks"
    if not (isinstance(w13.data, Marlin2Int8) and isinstance(w2.data, Marlin2Int8)):
        return "needs both stacks in the Marlin2 layout plan.prepare_weight makes at load (N % 256, K % 128)"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "the contiguous ASM kernel writes bf16 / fp16"
    if not _cuda_tensors(x, w13.data.packed, w2.data.packed, topk_weights, topk_ids):
        return "needs DCU (cuda) tensors"
    return True


def lightop_int8_fused_experts(x: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
                               topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    gemm = _lightop("lightop.gemm_ops", "m_grouped_w8a8_gemm_nt_contig_asm")
    silu_mul_quant = _lightop("lightop.activation", "fuse_silu_mul_quant")
    per_token_quant = _lightop("lightop.quant", "per_token_quant_int8")
    (T, D), k, E, inter = x.shape, topk_ids.shape[1], w13.shape[0], w2.shape[2]
    if T == 0:
        return x.new_zeros(T, D)
    dest, m_indices, M = contiguous_rows(topk_ids, E)
    # per token before the rows are replicated per slot (the quantisation is per row), as vLLM quantises
    # hidden_states ahead of deepgemm_moe_permute; one spare row takes the dropped assignments
    xq, xs = per_token_quant(x.contiguous())
    token = torch.arange(T * k, device=x.device) // k
    a = xq.new_empty(M + 1, D).index_copy_(0, dest, xq.index_select(0, token))[:M]
    a_scale = xs.new_empty(M + 1).index_copy_(0, dest, xs.reshape(T).index_select(0, token))[:M]
    h = x.new_empty(M, 2 * inter)
    gemm((a, a_scale), (w13.data.packed, w13.scale), h, m_indices)
    a2, a2_scale = silu_mul_quant(h, output=xq.new_empty(M, inter), expert_ids=m_indices)
    y = x.new_empty(M, D)
    gemm((a2, a2_scale), (w2.data.packed, w2.scale), y, m_indices)
    # routing weights and the sum over each token's slots in fp32 (where(): padding rows never leak)
    kept = (dest < M).unsqueeze(1)
    rows = y.index_select(0, dest.clamp(max=M - 1)).float() * topk_weights.reshape(-1, 1).float()
    return torch.where(kept, rows, 0.0).view(T, k, D).sum(1).to(x.dtype)


def register(register_op: Any, backend: str = "hygon") -> None:
    """Register the DCU adapters (called from the family's ``hwlayer_register_ops``)."""
    register_op("sparse_mla_attention", dcu_flash_mla_sparse_attention, backend=backend,
                supports=dcu_flash_mla_sparse_supports)
    register_op("moe_route", lightop_moe_route, backend=backend, supports=lightop_moe_route_supports)
    register_op("lightning_indexer", dcu_lightning_indexer, backend=backend, supports=dcu_indexer_supports)
    register_op("prepare_weight", lightop_prepare_weight, backend=backend, supports=lightop_prepare_weight_supports)
    register_op("quant_fused_experts", lightop_int8_fused_experts, backend=backend,
                supports=lightop_int8_experts_supports)
