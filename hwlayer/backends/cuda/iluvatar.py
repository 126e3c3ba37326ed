"""Iluvatar CoreX natives through ixformer, as Iluvatar's vLLM plugin and mojo_opset's Iluvatar backend call them.

Written against vllm_iluvatar 0.1.0 / ixformer 0.7.0 (the indexer) and the ixformer SDK's Python layer /
mojo_opset@b97e98b (MoE), emulated in CI (``conformance/emulators/ixformer``),
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
* **moe_route** (wired): ``moe_grouped_topk(gating_output, topk, num_expert_group, topk_group, scoring_func,
  e_score_correction_bias, renormalize=)`` from ixformer's Python layer (the SDK copy in
  dylanyunlon/project_6@87a19d2 ``ixformer_sdk/inference/functions/moe.py``, whose ``ref_moe_grouped_topk``
  gives the arithmetic): sigmoid scores, the bias for the choice only, weights the unbiased scores
  renormalized, unscaled (the routed scaling factor is applied here). Its group rule ranks groups by their
  max score where noaux_tc sums the top two, so it is taken only when no group is dropped
  (``topk_group == n_group``: GLM-5 routes with 1 group of 1); bf16 gating only with a bf16 bias (the kernel
  types the bias as the gating).
* **grouped_gemm / quant_grouped_gemm** (wired): ``moe_w16a16_group_gemv(input, weight, output_dtype,
  tokens_per_experts_gpu, format="TN")`` and ``moe_w8a8_group_gemv(input, weight, i_scales, w_scales,
  output_dtype, tokens_per_experts, format=0)``, the group GEMVs XPU-Forces/mojo_opset@b97e98b's Iluvatar
  backend (``backends/ixformer/operators/moe.py``) runs under CUDA-graph capture: the per-expert row counts
  stay on the device (vllm_iluvatar's MoE methods call the GEMM twins with ``expert_sizes_gpu.cpu()``, a host
  read every layer, which the contract forbids). Arithmetic: mojo_opset's ``MojoExperts`` /
  ``MojoQuantExperts`` references (its Iluvatar CI holds the backend to them) and the SDK's
  ``ref_moe_w8a8_group_gemm``. The int8 weight is the "NN" ``[E, K, N]`` layout mojo_opset's load hook makes,
  made here once by ``prepare_weight`` (``data`` stays the logical ``[E, N, K]`` view of it); activations
  are quantized per token by the contract's rounding. Padding rows (moe_permute's dropped assignments) join
  the last expert's count, so the counts cover every row.
* **sparse MLA** (not wired): no public DeepSeek-V3.2 / GLM-5 sparse-MLA call was found. The public
  sparse MLA calls are DeepSeek-V4's, in vllm_iluvatar's ``IluDeepseekV4MLAAttention`` (the V4 W4A8 layer,
  bf16 caches): prefill ``ixfops.ds4_flash_mla_sparse_fwd(q=, kv=[N, 1, D], indices=[T, 1, K],
  sm_scale=, attn_sink=, topk_length=, output=)`` over a gathered workspace, decode
  ``ixfops.ds4_flash_mla_with_kvcache(q=[T, 1, H, D], k_cache=[blocks, bs, 1, D], indices=, topk_length=,
  sm_scale=, attn_sink=, extra_k_cache=, extra_indices=, extra_topk_length=, output=)``. Their output has
  q's shape (V4's value is the whole 512-wide row, with an attention sink); GLM-5's rows are 576 wide
  (latent 512 + rope 64) with a 512-wide value, and nothing public shows these kernels taking D = 576,
  returning an lse, or running without V4's sink, so they are not wired. The other public ixformer MLA
  calls (``vllm_paged_attention_mla(_int8)``) are dense paged decode; docs/backends.md lists what else was
  searched (xllm, mojo_opset, vllm-plugin-FL).
* **MoE permutation** (not wired): ``moe_compute_token_index(_ep)`` returns ``expert_sizes_cpu`` (a host
  copy) unless handed a GDR buffer, and ``moe_topk_softmax`` is softmax routing; hwlayer's device-only
  ``moe_permute`` / ``moe_unpermute`` stay generic.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops import token_positions
from hwlayer.ops.cache import AttentionLayout, PagedKV
from hwlayer.ops.layout import AttentionMetadata, groups_covering_rows
from hwlayer.ops.quant import QuantizedWeight, quantize_activation

from . import native

IXFORMER = "ixformer.inference.functions"
KERNEL_BLOCKS = (16, 32, 64)  # others take ixformer's reference fallback (slow, same result)
VERIFIED = ("written against vllm_iluvatar 0.1.0 / ixformer 0.7.0 (ixformer.inference.functions "
            "dsa_indexer_mqa_logits_with_blocks + dsa_update_topk_indices) and the ixformer SDK's moe.py / "
            "mojo_opset@b97e98b (moe_grouped_topk, moe_w16a16_group_gemv, moe_w8a8_group_gemv), emulated in CI, "
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


# --------------------------------------------------------------------------------------------
# moe_route: ixformer moe_grouped_topk (ref_moe_grouped_topk), group rule moot


def _ixf_with(name: str) -> Any:
    """``ixformer.inference.functions`` when it imports and has ``name``, else None."""
    if not native.importable(IXFORMER):
        return None
    ixf = sys.modules[IXFORMER]
    return ixf if hasattr(ixf, name) else None


def ixformer_moe_route_supports(router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
                                renormalize: bool, routed_scaling_factor: float) -> bool | str:
    if _ixf_with("moe_grouped_topk") is None:
        return f"{IXFORMER}.moe_grouped_topk is not importable"
    if not native._cuda_tensors(router_logits, *(() if correction_bias is None else (correction_bias,))):
        return "needs CUDA tensors"
    if router_logits.dtype not in (torch.float32, torch.bfloat16):
        return f"moe_grouped_topk takes fp32/bf16 gating, got {router_logits.dtype}"
    if correction_bias is not None and router_logits.dtype != torch.float32 and correction_bias.dtype != torch.bfloat16:
        return ("moe_grouped_topk types the bias as the gating (bf16 here): rounding the correction bias to bf16 "
                "could change the choice")
    if topk_group != n_group:
        return ("moe_grouped_topk ranks groups by their max score (ref_moe_grouped_topk), noaux_tc by the sum of "
                "their top two: they agree only when no group is dropped (topk_group == n_group; GLM-5: 1 of 1)")
    return True


def ixformer_moe_route(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM-5's sigmoid + correction-bias routing through ``moe_grouped_topk`` with every group kept; the
    kernel renormalizes without the routed scaling factor, applied here."""
    ixf = _ixf_with("moe_grouped_topk")
    bias = None if correction_bias is None else correction_bias.to(router_logits.dtype).contiguous()
    weights, ids = ixf.moe_grouped_topk(router_logits.contiguous(), top_k, n_group, topk_group, "sigmoid", bias,
                                        renormalize=renormalize)
    return weights * routed_scaling_factor, ids


# --------------------------------------------------------------------------------------------
# grouped_gemm / quant_grouped_gemm: ixformer moe_w16a16_group_gemv / moe_w8a8_group_gemv (device row counts)


def _device_counts(group_sizes: torch.Tensor, num_rows: int) -> torch.Tensor:
    """int32 row counts covering every row (the padding rows past the sum join the last expert: their
    output is unspecified by the contract), on the device: nothing read back."""
    return groups_covering_rows(group_sizes, num_rows).to(torch.int32)


def ixformer_grouped_gemm_supports(x: Any, w: Any, group_sizes: Any) -> bool | str:
    if _ixf_with("moe_w16a16_group_gemv") is None:
        return f"{IXFORMER}.moe_w16a16_group_gemv is not importable"
    if not native._cuda_tensors(x, w, group_sizes):
        return "needs CUDA tensors"
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype:
        return f"moe_w16a16_group_gemv takes bf16/fp16 rows and weights of one dtype, got {x.dtype} and {w.dtype}"
    if not w.is_contiguous():
        return "moe_w16a16_group_gemv reads a contiguous [E, N, K] weight (format TN)"
    return True


def ixformer_grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    """Rows grouped by expert times ``W_e^T`` through the group GEMV with the counts on the device."""
    M = x.shape[0]
    if M == 0 or w.shape[0] == 0:
        return x.new_zeros(M, w.shape[1])
    ixf = _ixf_with("moe_w16a16_group_gemv")
    return ixf.moe_w16a16_group_gemv(input=x.contiguous(), weight=w, output_dtype=x.dtype,
                                     tokens_per_experts_gpu=_device_counts(group_sizes, M), format="TN")


def _nn_storage(qweight: QuantizedWeight) -> torch.Tensor | None:
    """The ``[E, K, N]`` contiguous int8 storage behind ``qweight.data`` when :func:`ixformer_prepare_weight`
    laid it out so, else None."""
    nn = qweight.data.transpose(1, 2)
    return nn if nn.is_contiguous() else None


def ixformer_prepare_weight(name: str, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """int8 expert stacks kept as the transposed view of ``[E, K, N]`` contiguous storage, the "NN" weight
    the group GEMV takes (mojo_opset's load hook transposes them so), once at load; everything else as is."""
    if isinstance(weight, QuantizedWeight) and weight.format == "int8" and weight.data.dim() == 3 \
            and _nn_storage(weight) is None:
        nn = weight.data.transpose(1, 2).contiguous()
        return dataclasses.replace(weight, data=nn.transpose(1, 2), prepared=None)
    return weight


def ixformer_prepare_weight_supports(name: Any, weight: Any) -> bool | str:
    if not (isinstance(weight, QuantizedWeight) and weight.format == "int8" and weight.data.dim() == 3):
        return "only int8 expert stacks change layout (for moe_w8a8_group_gemv)"
    if _ixf_with("moe_w8a8_group_gemv") is None:
        return f"{IXFORMER}.moe_w8a8_group_gemv is not importable: the layout the Triton tier reads stays"
    if not native._cuda_tensors(weight.data):
        return "needs CUDA tensors"
    return True


def ixformer_quant_grouped_gemm_supports(x: Any, qweight: Any, group_sizes: Any) -> bool | str:
    if _ixf_with("moe_w8a8_group_gemv") is None:
        return f"{IXFORMER}.moe_w8a8_group_gemv is not importable"
    if not isinstance(qweight, QuantizedWeight) or qweight.format != "int8" or qweight.act_scale_fmt is not None:
        return "moe_w8a8_group_gemv takes the int8 format with plain per-token activation scales"
    if not native._cuda_tensors(x, qweight.data, group_sizes):
        return "needs CUDA tensors"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"moe_w8a8_group_gemv writes bf16/fp16, got {x.dtype} rows"
    if _nn_storage(qweight) is None:
        return "moe_w8a8_group_gemv reads the [E, K, N] int8 layout this backend's prepare_weight makes at load"
    return True


def ixformer_quant_grouped_gemm(x: torch.Tensor, qweight: QuantizedWeight, group_sizes: torch.Tensor) -> torch.Tensor:
    """The contract's per-token int8 activation (round half even, clamp +-127), then the int8 group GEMV
    with the counts on the device: ``(x_q . w_q) * x_scale * w_scale`` per row (ref_moe_w8a8_group_gemm)."""
    M = x.shape[0]
    if M == 0 or qweight.shape[0] == 0:
        return x.new_zeros(M, qweight.shape[1])
    x_q, x_scale = quantize_activation(x, "int8")
    ixf = _ixf_with("moe_w8a8_group_gemv")
    return ixf.moe_w8a8_group_gemv(input=x_q.contiguous(), weight=_nn_storage(qweight), i_scales=x_scale.contiguous(),
                                   w_scales=qweight.scale.float().contiguous(), output_dtype=x.dtype,
                                   tokens_per_experts=_device_counts(group_sizes, M), format=0)


def register(register_op: Any, backend: str = "iluvatar") -> None:
    """Register the ixformer adapters (called from the family's ``hwlayer_register_ops``)."""
    register_op("lightning_indexer", ixformer_lightning_indexer, backend=backend, supports=ixformer_indexer_supports)
    register_op("moe_route", ixformer_moe_route, backend=backend, supports=ixformer_moe_route_supports)
    register_op("grouped_gemm", ixformer_grouped_gemm, backend=backend, supports=ixformer_grouped_gemm_supports)
    register_op("quant_grouped_gemm", ixformer_quant_grouped_gemm, backend=backend,
                supports=ixformer_quant_grouped_gemm_supports)
    register_op("prepare_weight", ixformer_prepare_weight, backend=backend, supports=ixformer_prepare_weight_supports)
