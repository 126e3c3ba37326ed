"""torch_npu adapters: our op contracts in, torch_npu's conventions out (conversions in ``convert.py``).

Written against the torch_npu op documentation -- Ascend/op-plugin master 517f2e7d0f20 (2026-08-21),
``docs/zh/custom_APIs/torch_npu/torch_npu-<op>.md`` -- and the torch-npu 2.14.0 wheel's prototypes,
plus vllm-ascend's usage; NOT run on hardware. CI runs them against CPU emulators of those docs
(``conformance/emulators/torch_npu.py``). ``torch_npu`` is imported inside the adapters only. Each
``*_supports`` declines calls whose tensors are not on the backend's device or whose shapes/dtypes
the op's documentation excludes (Atlas A2/A3 limits); those go to generic torch. Calls outside our
contracts never get here: the dispatcher validates each call first (hook specs 2.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from hwlayer.ops.cache import AttentionLayout, PagedKV, SplitKV
from hwlayer.ops.layout import AttentionMetadata, groups_covering_rows, meta_supported

from . import convert
from .device import device_type


def _npu() -> Any:
    import torch_npu

    return torch_npu


def _on_npu(*tensors: Any) -> bool:
    dev = device_type()
    return all(isinstance(t, torch.Tensor) and t.device.type == dev for t in tensors)


HALF_DTYPES = (torch.float16, torch.bfloat16)
FLOAT_DTYPES = (*HALF_DTYPES, torch.float32)
# npu_rms_norm's documented (self, gamma) dtype pairs on Atlas A2/A3.
RMS_NORM_PAIRS = {(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                  (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)}
SFA_HEADS = (1, 2, 4, 8, 16, 32, 64, 128)  # npu_sparse_flash_attention N1 on Atlas A2/A3


# --------------------------------------------------------------------------------------------
# rms_norm: npu_rms_norm / npu_add_rms_norm


def rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if not _on_npu(x, weight) or (residual is not None and not _on_npu(residual)):
        return "needs NPU tensors"
    if not 2 <= x.dim() <= 8:
        return "npu_rms_norm takes 2-8-D input"
    if residual is not None and (residual.dtype != x.dtype or x.numel() == 0):
        return "npu_add_rms_norm takes x2 of x1's dtype and no empty tensors"
    return True


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    npu = _npu()
    # npu_rms_norm takes an fp32 gamma with fp16/bf16 input: never round the weight to x's dtype
    # (the contract multiplies by the weight in fp32). Other pairs: fp32 gamma, an exact upcast.
    gamma = weight if (x.dtype, weight.dtype) in RMS_NORM_PAIRS else weight.float()
    if residual is None:
        y, _rstd = npu.npu_rms_norm(x, gamma, epsilon=eps)
        return y
    if weight.dtype == x.dtype:
        y, _rstd, x_sum = npu.npu_add_rms_norm(x, residual, weight, eps)  # gamma must have x1's dtype
        return y, x_sum
    # npu_add_rms_norm wants gamma in x1's dtype, which would round an fp32 weight: add, then norm.
    x_sum = x + residual
    y, _rstd = npu.npu_rms_norm(x_sum, gamma, epsilon=eps)
    return y, x_sum


# --------------------------------------------------------------------------------------------
# rope: npu_rotary_mul


def rope_supports(x: Any, positions: Any, cos_sin_cache: Any, interleaved: bool, *, meta: Any = None) -> bool | str:
    if (ok := meta_supported(meta, x)) is not True:
        return ok
    if not _on_npu(x, positions, cos_sin_cache):
        return "needs NPU tensors"
    D = x.shape[-1]
    if D % 2 or D >= 896 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D:
        return "npu_rotary_mul takes an even D < 896"
    if x.dim() == 3 and x.shape[1] >= 1000:
        return "npu_rotary_mul takes fewer than 1000 heads (B*N < 1000)"
    return True


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool, *,
         meta: AttentionMetadata | None = None) -> torch.Tensor:
    T, D = x.shape[0], x.shape[-1]
    tables = meta.backend if meta is not None and isinstance(meta.backend, AscendStepTables) else None
    if interleaved and tables is not None and tables.rope_cache is cos_sin_cache and tables.rope_r1.shape[-1] == D:
        r1, r2 = tables.rope_r1, tables.rope_r2  # built once per step, not per layer
    else:
        r1, r2 = convert.rope_cos_sin(cos_sin_cache, positions, interleaved)
    # SBND with S = tokens, B = 1, N = heads; r1/r2 as S11D, the one broadcast form the doc lists for
    # both "half" and "interleave" modes.
    # All three in fp32 (a documented dtype for each): the contract rotates with fp32 cos/sin, and
    # cos/sin rounded to bf16 move a bf16 result by up to |x| * 2^-9, beyond the contract.
    x4 = x.float().reshape(T, 1, -1, D)
    mode = convert.rotary_mode(interleaved)
    out = _npu().npu_rotary_mul(x4, r1.view(T, 1, 1, D), r2.view(T, 1, 1, D), rotary_mode=mode)
    return out.to(x.dtype).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# The Ascend attention layout (hook specs 2.0): separate nope / rope latent caches, per-step tables


@dataclass(frozen=True)
class AscendStepTables:
    """What the DSA kernels take per step, built once per step (not per layer) by the layout."""

    actual_seq_lengths_query: torch.Tensor  # int32 [B]: TND cumulative query ends
    actual_seq_lengths_kv: torch.Tensor  # int32 [B]: each sequence's context length
    block_table: torch.Tensor  # int32 [B, max_blocks]
    # npu_rotary_mul's full-width "interleave" tables (fp32 [T, D]) from meta's rope rows, and the cache
    # they come from (None when the step's meta has no rope rows)
    rope_r1: torch.Tensor | None = None
    rope_r2: torch.Tensor | None = None
    rope_cache: torch.Tensor | None = None


class AscendLayout(AttentionLayout):
    """The MLA latent cache as two contiguous caches, ``c`` ``[blocks, bs, kv_lora_rank]`` and ``k_pe``
    ``[blocks, bs, rope_dim]``: Atlas A2/A3's ``npu_sparse_flash_attention`` takes ``key`` and
    ``key_rope`` as separate contiguous PA_BSND tensors (no strided views), and vllm-ascend keeps them
    apart likewise (vllm-ascend@182b75e ``vllm_ascend/attention/sfa_v1.py:903``: ``kv_cache[0]`` (nope)
    and ``kv_cache[1]`` (rope), written by ``npu_kv_rmsnorm_rope_cache``; here the generic
    ``kv_cache_write`` writes both through ``SplitKV.write``, two indexed copies). The indexer
    cache stays canonical (PA_BSND is a view of it). Block sizes: the PA_BSND kernels take multiples
    of 16 up to 1024; others are allocatable and served by the generic ops."""

    name = "ascend-nope-rope"
    canonical = False
    default_block_size = 128

    def block_size_ok(self, block_size: int) -> bool | str:
        if block_size % 16 or block_size > 1024:
            return f"PA_BSND block_size must be a multiple of 16 and <= 1024, got {block_size}"
        return True

    def latent_cache(self, num_blocks: int, block_size: int, latent_dim: int, rope_dim: int, dtype: torch.dtype,
                     device: torch.device) -> PagedKV:
        return SplitKV((torch.zeros(num_blocks, block_size, latent_dim, dtype=dtype, device=device),
                        torch.zeros(num_blocks, block_size, rope_dim, dtype=dtype, device=device)))

    def step_tables(self, meta: Any, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                    block_table: torch.Tensor) -> AscendStepTables:
        r1 = r2 = None
        if getattr(meta, "rope_cos", None) is not None:  # GPT-J pairs: cos_i at 2i, 2i+1; sin likewise (+sin at 2i+1)
            r1, r2 = meta.rope_cos[:, 0], meta.rope_sin[:, 0, 1::2].repeat_interleave(2, dim=-1)
        return AscendStepTables(convert.tnd_actual_seq_lengths(cu_seqlens_q), convert.kv_actual_seq_lengths(seq_lens),
                                block_table.to(torch.int32), r1, r2, getattr(meta, "cos_sin_cache", None))


LAYOUT = AscendLayout()


def _tables(meta: AttentionMetadata | None, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
            block_table: torch.Tensor) -> AscendStepTables:
    """The step's tables from ``meta`` (built once per step), else converted for this call."""
    if meta is not None and isinstance(meta.backend, AscendStepTables):
        return meta.backend
    return LAYOUT.step_tables(meta, cu_seqlens_q, seq_lens, block_table)


# --------------------------------------------------------------------------------------------
# DSA: npu_lightning_indexer, npu_sparse_flash_attention (absorbed MLA, TND query, PA_BSND caches)
# The dispatcher has checked each call against the op's contract; these state kernel limits only.


def lightning_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    keys = k_cache.canonical if isinstance(k_cache, PagedKV) else k_cache
    if not isinstance(keys, torch.Tensor):
        return "npu_lightning_indexer takes one contiguous key cache"
    if not _on_npu(q, weights, keys, block_table, cu_seqlens_q, seq_lens):
        return "needs NPU tensors"
    if q.dtype not in HALF_DTYPES or q.shape[1] > 64 or q.shape[2] != 128:
        return "npu_lightning_indexer takes fp16/bf16 query [T, N<=64, 128]"
    if keys.dtype != q.dtype:
        return "npu_lightning_indexer takes a key cache of the query's dtype (converting would copy the cache)"
    if (ok := LAYOUT.block_size_ok(keys.shape[1])) is not True:
        return ok
    if not (1 <= topk <= 2048 or topk in (3072, 4096, 5120, 6144, 7168, 8192)):
        return "sparse_count must be 1..2048 or a documented larger size"
    if scale <= 0:
        return "scale must be positive (it is dropped: it does not change the top-k)"
    return True


def lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: PagedKV | torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    # The NPU op scores sum_h w_h * relu(q_h . k). Our scale > 0 multiplies every score of a token
    # by the same factor (relu(s x) = s relu(x)), so the top-k is unchanged without it. Weights stay
    # fp32 (allowed on Atlas A2/A3 whatever the query dtype).
    keys = k_cache.canonical if isinstance(k_cache, PagedKV) else k_cache
    tables = _tables(meta, cu_seqlens_q, seq_lens, block_table)
    out = _npu().npu_lightning_indexer(
        q.contiguous(),
        convert.to_pa_bsnd(keys),  # a view: the cache is the PA_BSND key as stored
        weights.float().contiguous(),
        actual_seq_lengths_query=tables.actual_seq_lengths_query,
        actual_seq_lengths_key=tables.actual_seq_lengths_kv,
        block_table=tables.block_table,
        layout_query="TND",
        layout_key="PA_BSND",
        sparse_count=topk,
        sparse_mode=3,  # right-aligned causal, our convention
    )
    return convert.indexer_output_to_positions(out, topk)


def _sfa_caches(kv_cache: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The Ascend layout's (nope, rope) caches, or None for another layout."""
    if isinstance(kv_cache, SplitKV) and len(kv_cache.parts) == 2:
        return kv_cache.parts
    return None


def sparse_mla_attention_supports(
    q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float, v_dim: int,
    *, meta: Any = None, return_lse: bool = False,
) -> bool | str:
    if return_lse:
        return "npu_sparse_flash_attention gives no lse with a paged cache (return_softmax_lse is training-only)"
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    caches = _sfa_caches(kv_cache)
    if caches is None:
        return "npu_sparse_flash_attention takes separate nope / rope caches (the Ascend layout)"
    nope, rope = caches
    if not _on_npu(q, nope, rope, indices, block_table, cu_seqlens_q, seq_lens):
        return "needs NPU tensors"
    if q.dtype not in HALF_DTYPES or nope.dtype != q.dtype or rope.dtype != q.dtype:
        return "npu_sparse_flash_attention takes fp16/bf16 q and caches of q's dtype"
    if nope.shape[-1] != 512 or rope.shape[-1] != 64 or v_dim != 512:
        return "npu_sparse_flash_attention takes D 512 with a rope part of 64 (Dk 576, v_dim 512)"
    if q.shape[1] not in SFA_HEADS:
        return f"npu_sparse_flash_attention takes 1/2/4/.../128 query heads on Atlas A2/A3, got {q.shape[1]}"
    if (ok := LAYOUT.block_size_ok(nope.shape[1])) is not True:
        return ok
    if indices.shape[1] == 0:
        return "npu_sparse_flash_attention takes at least one sparse index per token"
    return True


def sparse_mla_attention(
    q: torch.Tensor, kv_cache: PagedKV, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int, *,
    meta: AttentionMetadata | None = None, return_lse: bool = False,
) -> torch.Tensor:
    nope, rope = kv_cache.parts  # the Ascend layout: two contiguous caches, passed as PA_BSND views
    q_nope, q_rope = convert.split_query(q, v_dim)
    sparse = convert.valid_first(indices.to(torch.int32)).unsqueeze(1).contiguous()  # [T, KV_N=1, K]
    tables = _tables(meta, cu_seqlens_q, seq_lens, block_table)
    out, _softmax_max, _softmax_sum = _npu().npu_sparse_flash_attention(
        q_nope, convert.to_pa_bsnd(nope), convert.to_pa_bsnd(nope), sparse, scale,
        block_table=tables.block_table,
        actual_seq_lengths_query=tables.actual_seq_lengths_query,
        actual_seq_lengths_kv=tables.actual_seq_lengths_kv,
        query_rope=q_rope, key_rope=convert.to_pa_bsnd(rope),
        sparse_block_size=1,
        layout_query="TND", layout_kv="PA_BSND",
        sparse_mode=0,  # attend to exactly the given positions (the indexer already applied causality)
        attention_mode=2,  # absorbed MLA: key and value are the same latent cache
        return_softmax_lse=False,  # training-only with a paged cache; no caller of ours asks (supports)
    )
    empty = ~(indices >= 0).any(dim=1)
    return out.masked_fill(empty[:, None, None], 0.0)


# --------------------------------------------------------------------------------------------
# MoE: npu_moe_gating_top_k, npu_grouped_matmul, npu_swiglu, npu_moe_init_routing_v2,
# npu_moe_token_unpermute


def moe_route_supports(
    router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float,
) -> bool | str:
    if not _on_npu(router_logits) or (correction_bias is not None and not _on_npu(correction_bias)):
        return "needs NPU tensors"
    E = router_logits.shape[1]
    if not renormalize:
        return "npu_moe_gating_top_k (sigmoid) always renormalises the top-k weights"
    if E > 2048 or n_group < 1 or E % n_group or E // n_group <= 2 or not 1 <= topk_group <= n_group:
        return "npu_moe_gating_top_k needs E <= 2048 split into groups of more than 2 experts"
    if math.ceil(E // n_group / 32) * 32 * n_group > 2048:
        return "npu_moe_gating_top_k needs align32(E / group_count) * group_count <= 2048"
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
    if w.shape[0] > 1024:
        return "npu_grouped_matmul takes at most 1024 groups"
    return True


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    # Our weights are [E, N, K] (y = x @ w^T); the op takes [E, K, N] and documents "weight
    # transposed" as supported, so a transposed view is passed: no copy (vllm-ascend moe_mlp.py does
    # the same). Cumulative group ends (group_list_type=0) have no length-1 restriction.
    weight = convert.nt_weights_as_kn_view(w.to(x.dtype).contiguous())
    out = _npu().npu_grouped_matmul(
        [x.contiguous()], [weight],
        # the op wants the last cumulative end == rows: padding rows join the last group (output unspecified)
        group_list=convert.counts_to_cumulative(groups_covering_rows(group_sizes, x.shape[0])),
        split_item=2, group_type=0, group_list_type=0,
    )
    return out[0]


def silu_and_mul_supports(x: Any) -> bool | str:
    if not _on_npu(x):
        return "needs NPU tensors"
    if not 1 <= x.dim() <= 8:
        return "npu_swiglu takes 1-8-D input"
    if x.numel() == 0:
        return "npu_swiglu takes no empty tensors"
    return True


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    # swish(first half) * second half: gate first, as ours. npu_swiglu takes no non-contiguous input.
    return _npu().npu_swiglu(x.contiguous(), dim=-1)


def moe_permute_supports(x: Any, topk_ids: Any, num_experts: int) -> bool | str:
    if not _on_npu(x, topk_ids):
        return "needs NPU tensors"
    if x.dtype not in FLOAT_DTYPES:
        return "npu_moe_init_routing_v2 takes fp16/bf16/fp32 x unquantised"
    if not 1 <= num_experts <= 10240:
        return "npu_moe_init_routing_v2 takes expert_num in [1, 10240]"
    if topk_ids.numel() == 0:
        return "no assignments (nothing to sort)"
    return True


def moe_permute(
    x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Ids outside [0, num_experts) are dropped by the contract; the op sorts ids below the active
    # range last and leaves them out of the counts, so they become -1 (ids above expert_num are not
    # allowed by its doc).
    ids = topk_ids.to(torch.int32)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, torch.full_like(ids, -1))
    expanded_x, row_idx, counts, _ = _npu().npu_moe_init_routing_v2(
        x, ids, active_num=-1, expert_num=num_experts, drop_pad_mode=0,
        expert_tokens_num_type=1, expert_tokens_num_flag=True,  # per-expert counts
        active_expert_range=[0, num_experts],
        row_idx_type=1,  # scatter index: sorted row j came from flat assignment row_idx[j] = our `order`
    )
    # The contract's layout (sync-free): all T*k rows, the kept ones first; rows past the kept count are
    # uninitialised in both outputs, so their order entries become -1 (their x rows may hold anything).
    kept = counts.sum()
    rows = torch.arange(row_idx.shape[0], device=row_idx.device)
    order = torch.where(rows < kept, row_idx.long(), torch.full_like(rows, -1))
    return expanded_x, counts.long(), order


def moe_unpermute_supports(y: Any, order: Any, topk_weights: Any, num_tokens: int) -> bool | str:
    if not _on_npu(y, order, topk_weights):
        return "needs NPU tensors"
    if y.dtype != torch.bfloat16:
        return "npu_moe_token_unpermute takes bfloat16 tokens only"
    if num_tokens < 1 or y.shape[0] != num_tokens * topk_weights.shape[1] or order.shape[0] != y.shape[0]:
        return "npu_moe_token_unpermute needs one row per assignment (moe_permute's T*k layout)"
    if topk_weights.shape[1] > 512 or y.shape[0] >= 16777215:
        return "npu_moe_token_unpermute takes topK <= 512 and fewer than 16777215 rows"
    return True


def moe_unpermute(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
    # npu_moe_token_unpermute takes a GATHER index: flat output slot t*k+s reads permuted row idx[t*k+s]
    # (op-plugin@517f2e7d0f20 test/test_custom_ops/test_npu_moe_token_permute_and_unpermute.py: the op on
    # idx equals Megatron's unpermute on argsort(idx); vllm-ascend@182b75e token_dispatcher.py:424-455 feeds
    # it npu_moe_init_routing_v2's row_idx_type=0 output). Our `order` is the SCATTER index (row j came from
    # assignment order[j]), so it is inverted here, on the device. The op wants a full permutation: the
    # dropped rows (order -1, always last) are zeroed and given the assignments no kept row names (a
    # stable sort puts those flat indices first, in order); probs are bf16 per the doc.
    order = order.long()
    n = order.shape[0]
    kept = order >= 0
    named = torch.zeros(n + 1, dtype=torch.int32, device=order.device)
    named.scatter_(0, torch.where(kept, order, n), torch.ones_like(order, dtype=torch.int32))
    unnamed = torch.argsort(named[:n], stable=True)  # flat indices no kept row names, ascending, first
    rows = torch.arange(n, device=order.device)
    scatter = torch.where(kept, order, unnamed[(rows - kept.sum()).clamp(min=0)])  # row j -> assignment
    gather = torch.empty_like(scatter).scatter_(0, scatter, rows)  # assignment i <- row gather[i]
    y = torch.where(kept.unsqueeze(1), y, torch.zeros((), dtype=y.dtype, device=y.device))
    return _npu().npu_moe_token_unpermute(y, gather, probs=topk_weights.to(torch.bfloat16))


IMPLEMENTATIONS = {
    "rms_norm": (rms_norm, rms_norm_supports),
    "rope": (rope, rope_supports),
    "lightning_indexer": (lightning_indexer, lightning_indexer_supports),
    "sparse_mla_attention": (sparse_mla_attention, sparse_mla_attention_supports),
    "moe_route": (moe_route, moe_route_supports),
    "grouped_gemm": (grouped_gemm, grouped_gemm_supports),
    "silu_and_mul": (silu_and_mul, silu_and_mul_supports),
    "moe_permute": (moe_permute, moe_permute_supports),
    "moe_unpermute": (moe_unpermute, moe_unpermute_supports),
}
