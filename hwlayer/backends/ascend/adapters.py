"""torch_npu adapters: our op contracts in, torch_npu's conventions out (conversions in ``convert.py``).

Written against the torch-npu 2.14 op documentation and vllm-ascend's usage; NOT run on hardware.
``torch_npu`` is imported inside the adapters only. Each ``*_supports`` declines calls whose tensors
are not on an NPU or whose shapes/dtypes the op's documentation excludes; those go to generic torch.
"""

from __future__ import annotations

from typing import Any

import torch

from . import convert


def _npu() -> Any:
    import torch_npu  # noqa: PLC0415 - lazy: only on an Ascend machine

    return torch_npu


def _on_npu(*tensors: Any) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "npu" for t in tensors)


HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# rms_norm: npu_rms_norm / npu_add_rms_norm


def rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if not _on_npu(x, weight) or (residual is not None and not _on_npu(residual)):
        return "needs NPU tensors"
    if x.dtype not in (*HALF_DTYPES, torch.float32) or x.dim() < 2 or weight.dim() != 1:
        return "npu_rms_norm takes 2-8-D fp16/bf16/fp32 input"
    if weight.shape[0] != x.shape[-1] or (residual is not None and residual.shape != x.shape):
        return "shapes outside the contract"
    if residual is not None and (residual.dtype != x.dtype or x.dtype not in HALF_DTYPES):
        return "npu_add_rms_norm takes fp16/bf16 inputs of one dtype"
    return True


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    npu = _npu()
    gamma = weight.to(x.dtype)  # the ops want gamma in the input's dtype
    if residual is None:
        y, _rstd = npu.npu_rms_norm(x, gamma, epsilon=eps)
        return y
    y, _rstd, x_sum = npu.npu_add_rms_norm(x, residual, gamma, eps)
    return y, x_sum


# --------------------------------------------------------------------------------------------
# rope: npu_rotary_mul


def rope_supports(x: Any, positions: Any, cos_sin_cache: Any, interleaved: bool) -> bool | str:
    if not _on_npu(x, positions, cos_sin_cache):
        return "needs NPU tensors"
    if x.dim() not in (2, 3) or x.dtype not in (*HALF_DTYPES, torch.float32):
        return "x outside the contract"
    D = x.shape[-1]
    if D % 2 or D >= 896 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D:
        return "npu_rotary_mul takes an even D < 896"
    if positions.dim() != 1 or positions.shape[0] != x.shape[0]:
        return "positions outside the contract"
    return True


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    T, D = x.shape[0], x.shape[-1]
    r1, r2 = convert.rope_cos_sin(cos_sin_cache, positions, interleaved)
    x4 = x.reshape(T, 1, -1, D)  # BSND with B = tokens, S = 1, N = heads
    r1 = r1.to(x.dtype).view(T, 1, 1, D)
    r2 = r2.to(x.dtype).view(T, 1, 1, D)
    out = _npu().npu_rotary_mul(x4, r1, r2, rotary_mode=convert.rotary_mode(interleaved))
    return out.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# DSA: npu_lightning_indexer, npu_sparse_flash_attention (absorbed MLA, TND query, PA_BSND cache)


def lightning_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> bool | str:
    if not _on_npu(q, weights, k_cache, block_table, cu_seqlens_q, seq_lens):
        return "needs NPU tensors"
    if q.dim() != 3 or q.dtype not in HALF_DTYPES or q.shape[1] > 64 or q.shape[2] != 128:
        return "npu_lightning_indexer takes fp16/bf16 query [T, N<=64, 128]"
    if k_cache.dim() != 3 or k_cache.shape[-1] != 128 or weights.shape != q.shape[:2]:
        return "k_cache/weights outside the contract"
    if not (1 <= topk <= 2048 or topk in (3072, 4096, 5120, 6144, 7168, 8192)):
        return "sparse_count must be 1..2048 or a documented larger size"
    if scale <= 0:
        return "scale must be positive (it is dropped: it does not change the top-k)"
    return True


def lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
) -> torch.Tensor:
    # The NPU op scores sum_h w_h * relu(q_h . k). Our scale > 0 multiplies every score of a token
    # by the same factor (relu(s x) = s relu(x)), so the top-k is unchanged without it.
    out = _npu().npu_lightning_indexer(
        q.contiguous(),
        convert.to_pa_bsnd(k_cache.to(q.dtype)),
        weights.to(q.dtype).contiguous(),
        actual_seq_lengths_query=convert.tnd_actual_seq_lengths(cu_seqlens_q),
        actual_seq_lengths_key=convert.kv_actual_seq_lengths(seq_lens),
        block_table=block_table.to(torch.int32),
        layout_query="TND",
        layout_key="PA_BSND",
        sparse_count=topk,
        sparse_mode=3,  # right-aligned causal, our convention
    )
    return convert.indexer_output_to_positions(out, topk)


def sparse_mla_attention_supports(
    q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float, v_dim: int
) -> bool | str:
    if not _on_npu(q, kv_cache, indices, block_table, cu_seqlens_q, seq_lens):
        return "needs NPU tensors"
    if q.dim() != 3 or q.dtype not in HALF_DTYPES or kv_cache.dim() != 3 or kv_cache.shape[-1] != q.shape[-1]:
        return "npu_sparse_flash_attention takes fp16/bf16 q and cache of one width"
    if not 0 < v_dim < q.shape[-1]:
        return "absorbed MLA needs a rope part (v_dim < Dk)"
    if indices.dim() != 2 or indices.shape[0] != q.shape[0] or indices.shape[1] == 0:
        return "indices outside the contract"
    return True


def sparse_mla_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    q_nope, q_rope = convert.split_query(q, v_dim)
    c_cache, pe_cache = convert.split_latent_cache(kv_cache.to(q.dtype), v_dim)
    sparse = convert.valid_first(indices.to(torch.int32)).unsqueeze(1)  # [T, KV_N=1, K]
    out, softmax_max, softmax_sum = _npu().npu_sparse_flash_attention(
        q_nope, c_cache, c_cache, sparse, scale,
        block_table=block_table.to(torch.int32),
        actual_seq_lengths_query=convert.tnd_actual_seq_lengths(cu_seqlens_q),
        actual_seq_lengths_kv=convert.kv_actual_seq_lengths(seq_lens),
        query_rope=q_rope, key_rope=pe_cache,
        sparse_block_size=1,
        layout_query="TND", layout_kv="PA_BSND",
        sparse_mode=0,  # attend to exactly the given positions (the indexer already applied causality)
        attention_mode=2,  # absorbed MLA: key and value are the same latent cache
        return_softmax_lse=True,
    )
    lse = convert.lse_from_max_sum(softmax_max, softmax_sum)
    empty = ~(indices >= 0).any(dim=1)
    out = out.masked_fill(empty[:, None, None], 0.0)
    return out, lse.masked_fill(empty[:, None], float("-inf"))


# --------------------------------------------------------------------------------------------
# MoE: npu_moe_gating_top_k, npu_grouped_matmul, npu_swiglu


def moe_route_supports(
    router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float,
) -> bool | str:
    if not _on_npu(router_logits) or (correction_bias is not None and not _on_npu(correction_bias)):
        return "needs NPU tensors"
    if router_logits.dim() != 2:
        return "router_logits outside the contract"
    E = router_logits.shape[1]
    if not renormalize:
        return "npu_moe_gating_top_k (sigmoid) always renormalises the top-k weights"
    if E > 2048 or n_group < 1 or E % n_group or E // n_group <= 2 or not 1 <= topk_group <= n_group:
        return "npu_moe_gating_top_k needs E <= 2048 split into groups of more than 2 experts"
    if not 1 <= top_k <= E // n_group * topk_group:
        return "top_k exceeds the experts of the kept groups"
    return True


def moe_route(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, n_group: int,
    topk_group: int, renormalize: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    weights, ids, _ = _npu().npu_moe_gating_top_k(
        router_logits.float(),
        k=top_k,
        bias=correction_bias.float() if correction_bias is not None else None,
        k_group=topk_group,
        group_count=n_group,
        group_select_mode=1,  # group score = sum of its top-2 (our contract)
        renorm=0,
        norm_type=1,  # sigmoid
        routed_scaling_factor=routed_scaling_factor,
        eps=1e-20,
    )
    return weights.float(), ids.to(torch.int32)


def grouped_gemm_supports(x: Any, w: Any, group_sizes: Any) -> bool | str:
    if not _on_npu(x, w, group_sizes):
        return "needs NPU tensors"
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1] or group_sizes.shape != (w.shape[0],):
        return "shapes outside the contract"
    if x.dtype not in (*HALF_DTYPES, torch.float32):
        return "npu_grouped_matmul takes fp16/bf16/fp32"
    return True


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    # Our weights are [E, N, K]; the op multiplies x @ w with w [E, K, N]: a copy per call (a model
    # storing NPU-layout weights would skip it).
    out = _npu().npu_grouped_matmul(
        [x], [convert.nt_to_nn_weights(w.to(x.dtype))],
        group_list=group_sizes.long(), split_item=2, group_type=0, group_list_type=1,  # counts
    )
    return out[0]


def silu_and_mul_supports(x: Any) -> bool | str:
    if not _on_npu(x):
        return "needs NPU tensors"
    if x.dtype not in (*HALF_DTYPES, torch.float32) or x.shape[-1] % 2:
        return "x outside the contract"
    return True


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return _npu().npu_swiglu(x, dim=-1)  # swish(first half) * second half: gate first, as ours


IMPLEMENTATIONS = {
    "rms_norm": (rms_norm, rms_norm_supports),
    "rope": (rope, rope_supports),
    "lightning_indexer": (lightning_indexer, lightning_indexer_supports),
    "sparse_mla_attention": (sparse_mla_attention, sparse_mla_attention_supports),
    "moe_route": (moe_route, moe_route_supports),
    "grouped_gemm": (grouped_gemm, grouped_gemm_supports),
    "silu_and_mul": (silu_and_mul, silu_and_mul_supports),
}
