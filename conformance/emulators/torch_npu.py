"""CPU emulation of the ``torch_npu`` ops the Ascend adapters call.

Follows (read 2026-11-30):
* Ascend/op-plugin master 517f2e7d0f20 (2026-08-21), ``docs/zh/custom_APIs/torch_npu/``:
  ``torch_npu-npu_sparse_flash_attention.md``, ``torch_npu-npu_lightning_indexer.md``,
  ``（beta）torch_npu-npu_rms_norm.md``, ``torch_npu-npu_add_rms_norm.md``,
  ``（beta）torch_npu-npu_swiglu.md``, ``torch_npu-npu_rotary_mul.md``,
  ``torch_npu-npu_moe_gating_top_k.md``, ``torch_npu-npu_grouped_matmul.md``,
  ``torch_npu-npu_moe_init_routing_v2.md``; ``codegen/templates/_op_plugin_docs.py`` for
  ``npu_moe_token_unpermute``.
* the torch-npu 2.14.0 wheel from PyPI (git 54e365d3): prototypes in ``torch_npu/_op_plugin_docs.py``
  and ``torch_npu/op_plugin/meta/_meta_registrations.py`` (recorded in ``stubs/torch_npu-2.14.0.json``).

Where a doc lists limits per product, the Atlas A2/A3 inference limits are emulated (the stricter,
and the products vllm-ascend targets). Only the layouts the adapters use are implemented (TND query,
PA_BSND cache, the single-tensor grouped matmul, dropless unquantised routing); any other layout
raises ``NotImplementedError`` naming the emulator's limit, never a silent answer.
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
import numbers
import types
from typing import Callable

import torch

from ._common import check, fill, pad_with_garbage

SOURCE = "Ascend/op-plugin docs @517f2e7d0f20 (2026-08-21); torch-npu 2.14.0 wheel prototypes"
HALF = (torch.float16, torch.bfloat16)
INT64_MAX = 9223372036854775807


def _cumulative_to_bounds(cumulative: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in cumulative.tolist()]
    starts = [0, *ends[:-1]]
    check(
        all(e >= s for s, e in zip(starts, ends, strict=True)),
        "actual_seq_lengths_query must be non-decreasing (TND prefix sums)",
    )
    return list(zip(starts, ends, strict=True))


def _paged_keys(cache: torch.Tensor, block_table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Rows ``0 .. length-1`` of batch ``b`` from a PA_BSND cache ``[blocks, block_size, 1, D]`` -> ``[length, D]``."""
    bs = cache.shape[1]
    pos = torch.arange(length)
    blocks = block_table[b, pos // bs].long()
    return cache[blocks, pos % bs, 0]


def _check_pa_cache(name: str, cache: torch.Tensor) -> None:
    check(cache.dim() == 4, f"{name}: PA_BSND shape is [block_num, block_size, KV_N, D]")
    check(cache.shape[2] == 1, f"{name}: KV_N only supports 1")
    bs = cache.shape[1]
    check(bs % 16 == 0 and bs <= 1024, f"{name}: block_size must be a multiple of 16 and at most 1024, got {bs}")


# --------------------------------------------------------------------------------------------
# Norms, activation, rotary


def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta) npu_rms_norm: ``y = x * rsqrt(mean(x^2) + eps) * gamma``; returns ``(y, rstd fp32)``.
    Dtype pairs (A2/A3): fp16/fp32, bf16/fp32, fp16/fp16, bf16/bf16, fp32/fp32."""
    allowed = {
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    }
    check(
        (self.dtype, gamma.dtype) in allowed,
        f"npu_rms_norm: unsupported dtype pair self {self.dtype}, gamma {gamma.dtype}",
    )
    check(2 <= self.dim() <= 8, "npu_rms_norm: self must have 2-8 dims")
    n = gamma.dim()
    check(
        n < self.dim() and tuple(self.shape[self.dim() - n :]) == tuple(gamma.shape),
        "npu_rms_norm: gamma_shape = self_shape[n:]",
    )
    dims = tuple(range(self.dim() - n, self.dim()))
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


def npu_add_rms_norm(
    x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """npu_add_rms_norm: ``x = x1 + x2``; returns ``(RMSNorm(x) * gamma, rstd, x)``. gamma's dtype must
    equal x1's; no empty tensors."""
    check(x1.dtype in (*HALF, torch.float32), "npu_add_rms_norm: x1 must be float32, float16 or bfloat16")
    check(x2.dtype == x1.dtype and x2.shape == x1.shape, "npu_add_rms_norm: x2 must match x1")
    check(gamma.dtype == x1.dtype, f"npu_add_rms_norm: gamma dtype {gamma.dtype} must equal x1's {x1.dtype}")
    check(x1.numel() > 0, "npu_add_rms_norm: empty tensors are not supported")
    x = (x1.float() + x2.float()).to(x1.dtype)
    n = gamma.dim()
    dims = tuple(range(x.dim() - n, x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x1.dtype), rstd, x


def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """(beta) npu_swiglu: ``swish(A) * B`` with A the first half of ``dim``; 1-8 dims, no
    non-contiguous input, no empty tensor."""
    check(self.is_contiguous(), "npu_swiglu: non-contiguous input is not supported")
    check(self.numel() > 0, "npu_swiglu: empty tensors are not supported")
    check(1 <= self.dim() <= 8 and self.shape[dim] % 2 == 0, "npu_swiglu: 1-8 dims, the split dim divisible by 2")
    check(self.dtype in (*HALF, torch.float32), "npu_swiglu: float32, float16 or bfloat16")
    a, b = self.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(self.dtype)


def npu_rotary_mul(
    input: torch.Tensor,
    r1: torch.Tensor,
    r2: torch.Tensor,
    rotary_mode: str = "half",
    rotate: torch.Tensor | None = None,
) -> torch.Tensor:
    """npu_rotary_mul: ``x * cos + rotate(x) * sin``. 3-D/4-D input, D even and < 896; in
    ``interleave`` mode r1/r2 broadcast over all but the sequence axis (``11SD``/``1S1D``/``S11D``/``T1D``)."""
    check(input.dim() in (3, 4), "npu_rotary_mul: input must be 3-D or 4-D")
    check(r1.dim() == input.dim() and r2.shape == r1.shape, "npu_rotary_mul: r1/r2 must have input's rank")
    check(
        rotary_mode in ("half", "interleave"),
        f"npu_rotary_mul: rotary_mode must be 'half' or 'interleave', got {rotary_mode!r}",
    )
    check(rotate is None, "emulator: the rotate-matrix form is not emulated")
    D = input.shape[-1]
    check(D % 2 == 0 and D < 896, f"npu_rotary_mul: D must be even and < 896, got {D}")
    check(r1.shape[-1] == D, "npu_rotary_mul: r1/r2 last dim must equal D")
    # Assumed, not stated: one dtype for input, r1 and r2 (the doc lists the same set for each and
    # the output takes input's dtype); the stricter reading is the safe one to emulate.
    check(r1.dtype == r2.dtype == input.dtype, "npu_rotary_mul: input, r1 and r2 share one dtype")
    lead = r1.shape[:-1]
    if rotary_mode == "interleave":
        check(
            sum(1 for s in lead if s != 1) <= 1,
            f"npu_rotary_mul: interleave mode takes r1/r2 broadcast except on S, got {tuple(r1.shape)}",
        )
    torch.broadcast_shapes(input.shape, r1.shape)
    x = input.float()
    if rotary_mode == "half":
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return (x * r1.float() + rotated * r2.float()).to(input.dtype)


# --------------------------------------------------------------------------------------------
# DSA: lightning indexer and sparse flash attention (TND query, PA_BSND cache)


def npu_lightning_indexer(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: torch.Tensor,
    *,
    actual_seq_lengths_query: torch.Tensor | None = None,
    actual_seq_lengths_key: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    layout_query: str = "BSND",
    layout_key: str = "BSND",
    sparse_count: int = 2048,
    sparse_mode: int = 3,
    pre_tokens: int = INT64_MAX,
    next_tokens: int = INT64_MAX,
    return_value: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Indices = TopK(sum_g W_g * ReLU(Q_g . K^T))`` per query token (no scale). Returns
    ``(sparse_indices int32 [T, 1, sparse_count], sparse_values)``; -1 where fewer positions exist."""
    if layout_query != "TND" or layout_key != "PA_BSND":
        raise NotImplementedError("emulator covers layout_query='TND' with layout_key='PA_BSND' only")
    check(query.dtype in HALF and query.is_contiguous(), "npu_lightning_indexer: query is contiguous fp16/bf16")
    check(
        query.dim() == 3 and query.shape[1] <= 64 and query.shape[2] == 128,
        "npu_lightning_indexer: query [T, N1<=64, 128]",
    )
    check(key.dtype == query.dtype, "npu_lightning_indexer: query and key dtypes must match")
    _check_pa_cache("npu_lightning_indexer key", key)
    check(key.shape[-1] == 128, "npu_lightning_indexer: key D must be 128")
    check(
        weights.is_contiguous() and weights.shape == query.shape[:2],
        "npu_lightning_indexer: weights contiguous [T, N1]",
    )
    check(
        weights.dtype == torch.float32 or weights.dtype == query.dtype,
        "npu_lightning_indexer: weights must be float32 or query's dtype",
    )
    check(
        actual_seq_lengths_query is not None and actual_seq_lengths_query.dtype == torch.int32,
        "npu_lightning_indexer: TND needs int32 actual_seq_lengths_query",
    )
    check(
        actual_seq_lengths_key is not None and actual_seq_lengths_key.dtype == torch.int32,
        "npu_lightning_indexer: PA_BSND needs int32 actual_seq_lengths_key",
    )
    check(
        block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2,
        "npu_lightning_indexer: PA_BSND needs an int32 2-D block_table",
    )
    check(
        1 <= sparse_count <= 2048 or sparse_count in (3072, 4096, 5120, 6144, 7168, 8192),
        f"npu_lightning_indexer: sparse_count must be in [1, 2048] or 3072..8192 steps, got {sparse_count}",
    )
    check(sparse_mode in (0, 3), "npu_lightning_indexer: sparse_mode must be 0 or 3")
    check(pre_tokens == INT64_MAX and next_tokens == INT64_MAX, "npu_lightning_indexer: only default pre/next_tokens")
    check(
        not return_value,
        "npu_lightning_indexer: return_value is supported only in training with layout_key other than PA_BSND",
    )
    bounds = _cumulative_to_bounds(actual_seq_lengths_query)
    check(
        len(bounds) == actual_seq_lengths_key.shape[0] == block_table.shape[0],
        "npu_lightning_indexer: batch sizes differ",
    )
    T = query.shape[0]
    check(bounds[-1][1] == T if bounds else T == 0, "npu_lightning_indexer: last cumulative query length must equal T")
    out = torch.full((T, 1, sparse_count), -1, dtype=torch.int32)
    values = torch.zeros((T, 1, sparse_count), dtype=query.dtype)
    for b, (t0, t1) in enumerate(bounds):
        n, L = t1 - t0, int(actual_seq_lengths_key[b])
        if n == 0 or L == 0:
            continue
        keys = _paged_keys(key, block_table, b, L).float()  # [L, 128]
        scores = torch.einsum("thd,sd->ths", query[t0:t1].float(), keys).relu()
        scores = torch.einsum("ths,th->ts", scores, weights[t0:t1].float())
        if sparse_mode == 3:  # rightDownCausal: query i sees keys j <= (L - n) + i
            allowed = torch.arange(L)[None, :] <= (L - n) + torch.arange(n)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        k = min(sparse_count, L)
        vals, idx = scores.topk(k, dim=-1)
        idx = idx.to(torch.int32).masked_fill(vals == float("-inf"), -1)
        out[t0:t1, 0, :k] = idx
        values[t0:t1, 0, :k] = vals.masked_fill(vals == float("-inf"), 0).to(query.dtype)
    return out, values


def npu_sparse_flash_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    sparse_indices: torch.Tensor,
    scale_value: float,
    *,
    block_table: torch.Tensor | None = None,
    actual_seq_lengths_query: torch.Tensor | None = None,
    actual_seq_lengths_kv: torch.Tensor | None = None,
    query_rope: torch.Tensor | None = None,
    key_rope: torch.Tensor | None = None,
    sparse_block_size: int = 1,
    layout_query: str = "BSND",
    layout_kv: str = "BSND",
    sparse_mode: int = 3,
    pre_tokens: int = INT64_MAX,
    next_tokens: int = INT64_MAX,
    attention_mode: int = 0,
    return_softmax_lse: bool = False,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``softmax(Q K~^T * scale) V~`` over the KV positions ``sparse_indices`` selects (absorbed MLA:
    ``attention_mode=2``, key == value, nope 512 + rope 64). Returns ``(out, softmax_max, softmax_sum)``;
    the last two are empty unless ``return_softmax_lse``, which the doc supports only in training with
    ``layout_kv`` other than PA_BSND."""
    if layout_query != "TND" or layout_kv != "PA_BSND":
        raise NotImplementedError("emulator covers layout_query='TND' with layout_kv='PA_BSND' only")
    check(attention_mode == 2, "npu_sparse_flash_attention: attention_mode only supports 2 (MLA-absorb)")
    check(
        not return_softmax_lse,
        "npu_sparse_flash_attention: return_softmax_lse is supported only in training and when layout_kv "
        "is not PA_BSND",
    )
    check(sinks is None, "npu_sparse_flash_attention: sinks are not supported on Atlas A2/A3")
    check(
        pre_tokens == INT64_MAX and next_tokens == INT64_MAX, "npu_sparse_flash_attention: only default pre/next_tokens"
    )
    check(
        query_rope is not None and key_rope is not None,
        "npu_sparse_flash_attention: MLA-absorb needs query_rope and key_rope",
    )
    check(
        query.dtype in HALF and key.dtype == value.dtype == query.dtype == query_rope.dtype == key_rope.dtype,
        "npu_sparse_flash_attention: query/key/value/ropes share one fp16/bf16 dtype",
    )
    check(
        query.is_contiguous() and query_rope.is_contiguous() and sparse_indices.is_contiguous(),
        "npu_sparse_flash_attention: query, query_rope and sparse_indices do not support non-contiguous tensors",
    )
    check(
        key.is_contiguous() and value.is_contiguous() and key_rope.is_contiguous(),
        "npu_sparse_flash_attention: key, value and key_rope do not support non-contiguous tensors (Atlas A2/A3)",
    )
    check(
        query.dim() == 3 and query.shape[-1] == 512 and query_rope.shape == (*query.shape[:2], 64),
        "npu_sparse_flash_attention: query D must be 512 and query_rope D 64 ([T, N1, D])",
    )
    N1 = query.shape[1]
    check(
        N1 in (1, 2, 4, 8, 16, 32, 64, 128),
        f"npu_sparse_flash_attention: N1 must be 1/2/4/8/16/32/64/128 on A2/A3, got {N1}",
    )
    _check_pa_cache("npu_sparse_flash_attention key", key)
    _check_pa_cache("npu_sparse_flash_attention key_rope", key_rope)
    check(
        key.shape[-1] == 512 and key_rope.shape[-1] == 64 and key.shape[:3] == key_rope.shape[:3],
        "npu_sparse_flash_attention: key D 512, key_rope D 64, same blocks",
    )
    check(
        value.shape == key.shape and value.data_ptr() == key.data_ptr(),
        "npu_sparse_flash_attention: in MLA-absorb mode key and value share one tensor",
    )
    check(
        1 <= sparse_block_size <= 128
        and sparse_block_size & (sparse_block_size - 1) == 0
        and key.shape[1] % sparse_block_size == 0,
        "npu_sparse_flash_attention: sparse_block_size is a power of two in [1, 128] dividing block_size",
    )
    check(sparse_mode in (0, 3), "npu_sparse_flash_attention: sparse_mode must be 0 or 3")
    check(
        sparse_indices.dtype == torch.int32
        and sparse_indices.dim() == 3
        and sparse_indices.shape[:2] == (query.shape[0], 1)
        and sparse_indices.shape[2] > 0,
        "npu_sparse_flash_attention: sparse_indices int32 [T, KV_N=1, sparse_size>0]",
    )
    invalid = sparse_indices[:, 0] < 0
    check(
        not bool((invalid[:, :-1] & ~invalid[:, 1:]).any()),
        "npu_sparse_flash_attention: each sparse_indices row must hold its valid entries first, invalid ones last",
    )
    check(
        actual_seq_lengths_query is not None and actual_seq_lengths_query.dtype == torch.int32,
        "npu_sparse_flash_attention: TND needs int32 actual_seq_lengths_query",
    )
    check(
        actual_seq_lengths_kv is not None and actual_seq_lengths_kv.dtype == torch.int32,
        "npu_sparse_flash_attention: PA_BSND needs int32 actual_seq_lengths_kv",
    )
    check(
        block_table is not None and block_table.dtype == torch.int32 and block_table.dim() == 2,
        "npu_sparse_flash_attention: PA_BSND needs an int32 2-D block_table",
    )
    bounds = _cumulative_to_bounds(actual_seq_lengths_query)
    T = query.shape[0]
    check(
        bounds[-1][1] == T if bounds else T == 0,
        "npu_sparse_flash_attention: last cumulative query length must equal T",
    )
    out = torch.zeros(T, N1, 512, dtype=query.dtype)
    sbs = sparse_block_size
    for b, (t0, t1) in enumerate(bounds):
        n, L = t1 - t0, int(actual_seq_lengths_kv[b])
        if n == 0 or L == 0:
            continue
        nope = _paged_keys(key, block_table, b, L).float()
        pe = _paged_keys(key_rope, block_table, b, L).float()
        for i in range(n):
            t = t0 + i
            blocks = sparse_indices[t, 0]
            blocks = blocks[blocks >= 0].long()
            pos = (blocks[:, None] * sbs + torch.arange(sbs)[None, :]).reshape(-1)
            check(bool((pos < L).all()) or sbs > 1, "npu_sparse_flash_attention: sparse index beyond the KV length")
            pos = pos[pos < L]
            if sparse_mode == 3:
                pos = pos[pos <= (L - n) + i]
            if pos.numel() == 0:
                continue
            s = (query[t].float() @ nope[pos].T + query_rope[t].float() @ pe[pos].T) * scale_value
            out[t] = (torch.softmax(s, dim=-1) @ nope[pos]).to(query.dtype)
    empty = torch.empty(0, dtype=torch.float32)
    return out, empty, empty


# --------------------------------------------------------------------------------------------
# MoE: routing, grouped matmul, permutation


def npu_moe_gating_top_k(
    x: torch.Tensor,
    k: int,
    *,
    bias: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    tid2eid: torch.Tensor | None = None,
    k_group: int = 1,
    group_count: int = 1,
    group_select_mode: int = 0,
    renorm: int = 0,
    norm_type: int = 0,
    out_flag: bool = False,
    routed_scaling_factor: float = 1.0,
    eps: float = 1e-20,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The doc's "等价计算逻辑" (equivalent code) in torch: norm (softmax/sigmoid), bias for choice,
    group select (max or top-2 sum), top-k, weights from the unbiased scores, sigmoid renormalises
    with ``eps``, times ``routed_scaling_factor``. ``y`` has x's dtype."""
    check(x.dim() == 2 and x.dtype in (*HALF, torch.float32), "npu_moe_gating_top_k: x is a 2-D fp16/bf16/fp32 tensor")
    E = x.shape[-1]
    check(E <= 2048, f"npu_moe_gating_top_k: expert count must be <= 2048, got {E}")
    check(
        bias is None or (bias.dim() == 1 and bias.shape[0] == E and bias.dtype == x.dtype),
        "npu_moe_gating_top_k: bias is 1-D [E] with x's dtype",
    )
    check(input_ids is None and tid2eid is None, "emulator: hash routing (input_ids/tid2eid) is not emulated")
    check(
        group_count > 0 and E % group_count == 0 and E // group_count > 2,
        "npu_moe_gating_top_k: E divisible by group_count into groups of more than 2 experts",
    )
    per_group = E // group_count
    check(
        math.ceil(per_group / 32) * 32 * group_count <= 2048,
        "npu_moe_gating_top_k: align32(E / group_count) * group_count <= 2048",
    )
    check(1 <= k_group <= group_count, "npu_moe_gating_top_k: 1 <= k_group <= group_count")
    check(1 <= k <= per_group * k_group, "npu_moe_gating_top_k: 1 <= k <= E / group_count * k_group")
    check(renorm == 0, "npu_moe_gating_top_k: renorm only supports 0")
    check(
        norm_type in (0, 1) and group_select_mode in (0, 1),
        "npu_moe_gating_top_k: norm_type and group_select_mode are 0 or 1",
    )
    xf = x.float()
    scores = torch.softmax(xf, dim=-1) if norm_type == 0 else torch.sigmoid(xf)
    choice = scores + bias.float() if bias is not None else scores
    if group_count > 1:
        grouped = choice.view(-1, group_count, per_group)
        group_score = grouped.amax(-1) if group_select_mode == 0 else grouped.topk(2, dim=-1).values.sum(-1)
        keep = torch.argsort(-group_score, dim=-1, stable=True)[:, :k_group]
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        choice = grouped.masked_fill(mask[..., None], float("-inf")).view(-1, E)
    idx = torch.argsort(-choice, dim=-1, stable=True)[:, :k]
    y = scores.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), (scores if out_flag else None)


def npu_grouped_matmul(
    x: list[torch.Tensor],
    weight: list[torch.Tensor],
    *,
    bias: list[torch.Tensor] | None = None,
    scale: list[torch.Tensor] | None = None,
    offset: list[torch.Tensor] | None = None,
    antiquant_scale: list[torch.Tensor] | None = None,
    antiquant_offset: list[torch.Tensor] | None = None,
    per_token_scale: list[torch.Tensor] | None = None,
    group_list: torch.Tensor | list[int] | None = None,
    activation_input: list[torch.Tensor] | None = None,
    activation_quant_scale: list[torch.Tensor] | None = None,
    activation_quant_offset: list[torch.Tensor] | None = None,
    split_item: int = 0,
    group_type: int | None = None,
    group_list_type: int = 0,
    act_type: int = 0,
    output_dtype: torch.dtype | None = None,
    tuning_config: list[int] | None = None,
) -> list[torch.Tensor]:
    """The single-x / single-weight / single-y case (``split_item`` 2 or 3, ``group_type=0``):
    ``y[rows of g] = x[rows of g] @ weight[g]`` with weight ``[E, K, N]`` (a transposed view of an
    ``[E, N, K]`` tensor is allowed: "支持weight转置"; x may not be transposed); at most 1024 groups."""
    check(
        isinstance(x, (list, tuple)) and isinstance(weight, (list, tuple)), "npu_grouped_matmul: x and weight are lists"
    )
    quant = (
        bias,
        scale,
        offset,
        antiquant_scale,
        antiquant_offset,
        per_token_scale,
        activation_input,
        activation_quant_scale,
        activation_quant_offset,
    )
    if (
        len(x) != 1
        or len(weight) != 1
        or split_item not in (2, 3)
        or group_type != 0
        or any(q is not None for q in quant)
    ):
        raise NotImplementedError("emulator covers the unquantised single-tensor case (split_item 2/3, group_type 0)")
    a, w = x[0], weight[0]
    check(
        a.dim() == 2 and a.is_contiguous(), "npu_grouped_matmul: x is a 2-D tensor and does not support transposition"
    )
    check(w.dim() == 3 and w.shape[1] == a.shape[1], "npu_grouped_matmul: weight is 3-D [E, K, N] matching x's K")
    transposed_view = w.stride(1) == 1 and w.stride(2) == w.shape[1] and w.stride(0) == w.shape[1] * w.shape[2]
    check(
        w.is_contiguous() or transposed_view, "npu_grouped_matmul: weight must be contiguous [E, K, N] or its transpose"
    )
    check(
        a.dtype in (*HALF, torch.float32) and w.dtype == a.dtype,
        "npu_grouped_matmul: x and weight share fp16/bf16/fp32",
    )
    check(
        isinstance(group_list, torch.Tensor) and group_list.dtype == torch.int64 and group_list.dim() == 1,
        "npu_grouped_matmul: group_list must be a 1-D int64 tensor",
    )
    E = w.shape[0]
    check(
        group_list.shape[0] == E and E <= 1024,
        "npu_grouped_matmul: group_list has one entry per weight group, at most 1024",
    )
    values = group_list.tolist()
    if group_list_type == 0:
        check(
            all(v >= 0 for v in values) and values == sorted(values),
            "npu_grouped_matmul: group_list (cumsum) must be non-decreasing",
        )
        check(values[-1] == a.shape[0], "npu_grouped_matmul: last cumsum value must equal x's rows")
        counts = [e - s for s, e in zip([0, *values[:-1]], values, strict=True)]
    elif group_list_type == 1:
        check(
            all(v >= 0 for v in values) and len(values) != 1,
            "npu_grouped_matmul: counts must be non-negative, length not 1",
        )
        check(sum(values) == a.shape[0], "npu_grouped_matmul: counts must sum to x's rows")
        counts = values
    else:
        raise NotImplementedError("emulator: group_list_type 2 is int8-only")
    out = torch.empty(a.shape[0], w.shape[2], dtype=output_dtype or a.dtype)
    start = 0
    for g, n in enumerate(counts):
        out[start : start + n] = (a[start : start + n].float() @ w[g].float()).to(out.dtype)
        start += n
    return [out]


def npu_moe_init_routing_v2(
    x: torch.Tensor,
    expert_idx: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    active_num: int = -1,
    expert_capacity: int = -1,
    expert_num: int = -1,
    drop_pad_mode: int = 0,
    expert_tokens_num_type: int = 0,
    expert_tokens_num_flag: bool = False,
    quant_mode: int = -1,
    active_expert_range: list[int] = [],  # noqa: B006 - the documented default
    row_idx_type: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dropless, unquantised routing as the doc's CPU equivalent (``MoeInitRoutingV2CPU``): stable
    sort of the flattened ids (ids below the active range sort last); ``row_idx_type=1`` gives the
    scatter index (sorted position -> flat assignment), valid for the first ``available_idx_num``
    entries, the rest uninitialised; ``expanded_x`` is ``[NUM_ROWS * K, H]`` with rows past the
    active count undefined; ``expert_tokens_num_type=1`` gives per-expert counts (int64)."""
    if drop_pad_mode != 0 or quant_mode != -1 or scale is not None or offset is not None:
        raise NotImplementedError("emulator covers dropless (drop_pad_mode=0), unquantised (quant_mode=-1) routing")
    check(
        x.dim() == 2 and x.dtype in (*HALF, torch.float32, torch.int8),
        "npu_moe_init_routing_v2: x is 2-D fp16/bf16/fp32/int8",
    )
    check(
        expert_idx.dim() == 2 and expert_idx.shape[0] == x.shape[0] and expert_idx.dtype == torch.int32,
        "npu_moe_init_routing_v2: expert_idx is int32 [NUM_ROWS, K]",
    )
    check(0 <= expert_num <= 10240, "npu_moe_init_routing_v2: expert_num must be in [0, 10240]")
    start, end = (active_expert_range or [0, expert_num])[:2]
    check(0 <= start <= end <= expert_num, "npu_moe_init_routing_v2: active_expert_range within [0, expert_num]")
    check(
        row_idx_type in (0, 1) and expert_tokens_num_type in (0, 1, 2),
        "npu_moe_init_routing_v2: row_idx_type 0/1, type 0/1/2",
    )
    flat = expert_idx.reshape(-1).long()
    check(not bool((flat >= expert_num).any()), "npu_moe_init_routing_v2: expert ids must not exceed the expert count")
    k = expert_idx.shape[1]
    key = torch.where(flat < start, torch.iinfo(torch.int32).max, flat)
    order = torch.argsort(key, stable=True)
    available = int(((flat >= start) & (flat < end)).sum())
    active = available if active_num in (-1, 0) else min(active_num, available)
    expanded_x = pad_with_garbage(x[order[:active] // k], flat.numel())
    if row_idx_type == 1:
        row_idx = pad_with_garbage(order[:available].to(torch.int32), flat.numel())
    else:
        row_idx = torch.full((flat.numel(),), -1, dtype=torch.int32)
        row_idx[order[:available]] = torch.arange(available, dtype=torch.int32)
    counts = torch.bincount(key[order[:available]] - start, minlength=end - start)[: end - start]
    if not expert_tokens_num_flag:
        tokens = torch.empty(0, dtype=torch.int64)
    elif expert_tokens_num_type == 1:
        tokens = counts.long()
    elif expert_tokens_num_type == 0:
        tokens = counts.long().cumsum(0)
    else:
        nz = torch.nonzero(counts).reshape(-1)
        tokens = torch.stack((nz + start, counts[nz]), dim=1).long()
    return expanded_x, row_idx, tokens, torch.empty(0, dtype=torch.float32)


def npu_moe_token_unpermute(
    permuted_tokens: torch.Tensor,
    sorted_indices: torch.Tensor,
    probs: torch.Tensor | None = None,
    padded_mode: bool = False,
    restore_shape: list[int] | None = None,
) -> torch.Tensor:
    """``npu_moe_token_unpermute`` as op-plugin's own test defines it (Ascend/op-plugin@517f2e7d0f20
    ``test/test_custom_ops/test_npu_moe_token_permute_and_unpermute.py``, ``test_unpermute``): the fused op
    on ``sorted_indices`` equals the test's Megatron-style Python ``unpermute`` on
    ``argsort(sorted_indices)``, so ``sorted_indices`` is a GATHER index: flat output slot ``t*topK + s``
    reads permuted row ``sorted_indices[t*topK + s]`` (what ``npu_moe_init_routing_v2`` returns with
    ``row_idx_type=0``, as vllm-ascend@182b75e ``ops/fused_moe/token_dispatcher.py:424-455`` feeds it).
    With ``probs`` ``[num_tokens, topK]`` the ``topK`` rows of a token are weighted and summed.
    bf16 only, padded_mode False only, topK <= 512."""
    check(not padded_mode, "npu_moe_token_unpermute: padded_mode only supports False")
    check(
        permuted_tokens.dim() == 2 and permuted_tokens.dtype == torch.bfloat16,
        "npu_moe_token_unpermute: permuted_tokens is a 2-D bfloat16 tensor",
    )
    check(
        sorted_indices.dim() == 1
        and sorted_indices.dtype in (torch.int32, torch.int64)
        and sorted_indices.shape[0] == permuted_tokens.shape[0],
        "npu_moe_token_unpermute: sorted_indices 1-D [num_tokens*topK]",
    )
    topk = 1 if probs is None else probs.shape[1]
    check(
        probs is None or (probs.dtype == torch.bfloat16 and probs.dim() == 2),
        "npu_moe_token_unpermute: probs is 2-D bfloat16",
    )
    check(topk <= 512, "npu_moe_token_unpermute: topK must be <= 512")
    M, H = permuted_tokens.shape
    check(M % topk == 0, "npu_moe_token_unpermute: rows must be num_tokens * topK")
    check(
        bool((sorted_indices >= 0).all() and (sorted_indices < M).all()),
        "npu_moe_token_unpermute: indices in [0, rows)",
    )
    flat = permuted_tokens.float().index_select(0, sorted_indices.long()).view(M // topk, topk, H)
    if probs is not None:
        flat = flat * probs.float().unsqueeze(-1)
    return flat.sum(1).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Opaque custom ops: torch_npu's ops are kernels with meta (fake) implementations
# (torch_npu/op_plugin/meta/_meta_registrations.py in the wheel), so under FakeTensorMode or a
# graph capture the caller sees one op, never the kernel's internals. Each emulated function
# above is registered as one ``torch.library.custom_op`` with a ``register_fake`` kernel giving the
# output shapes and dtypes; the emulator's own checks (which read values) then run only inside the
# real kernel, and FakeTensorMode reports only the ADAPTER's host reads. The public functions keep
# the wheel's signatures (``functools.wraps``): arguments are bound to them, tensors (and lists of
# tensors) travel as one ``Tensor?[]``, everything else as a literal string.


def _fake_rms_norm(self, gamma, epsilon=1e-06):
    n = gamma.dim()
    return self.new_empty(self.shape), self.new_empty((*self.shape[: self.dim() - n], *([1] * n)), dtype=torch.float32)


def _fake_add_rms_norm(x1, x2, gamma, epsilon=1e-06):
    n = gamma.dim()
    rstd = x1.new_empty((*x1.shape[: x1.dim() - n], *([1] * n)), dtype=torch.float32)
    return x1.new_empty(x1.shape), rstd, x1.new_empty(x1.shape)


def _fake_swiglu(self, dim=-1):
    shape = list(self.shape)
    shape[dim] //= 2
    return self.new_empty(shape)


def _fake_rotary_mul(input, r1, r2, rotary_mode="half", rotate=None):
    return input.new_empty(input.shape)


def _fake_lightning_indexer(query, key, weights, *, sparse_count=2048, **_):
    shape = (query.shape[0], 1, sparse_count)
    return query.new_empty(shape, dtype=torch.int32), query.new_empty(shape)


def _fake_sparse_flash_attention(query, *_, **__):
    empty = query.new_empty(0, dtype=torch.float32)
    return query.new_empty(query.shape), empty, empty.clone()


def _fake_gating_top_k(x, k, *, out_flag=False, **_):
    T, E = x.shape
    scores = x.new_empty((T, E) if out_flag else (0,), dtype=torch.float32)
    return x.new_empty(T, k), x.new_empty((T, k), dtype=torch.int32), scores


def _fake_grouped_matmul(x, weight, *, output_dtype=None, **_):
    return [x[0].new_empty((x[0].shape[0], weight[0].shape[2]), dtype=output_dtype or x[0].dtype)]


def _fake_init_routing_v2(x, expert_idx, *, expert_num=-1, expert_tokens_num_type=0, expert_tokens_num_flag=False,
                          active_expert_range=(), **_):
    rows = expert_idx.numel()
    start, end = (list(active_expert_range) or [0, expert_num])[:2]
    if not expert_tokens_num_flag:
        tokens = x.new_empty(0, dtype=torch.int64)
    elif expert_tokens_num_type in (0, 1):
        tokens = x.new_empty(end - start, dtype=torch.int64)
    else:  # (expert, count) pairs of the non-empty experts: a data-dependent row count
        tokens = x.new_empty((torch.library.get_ctx().new_dynamic_size(), 2), dtype=torch.int64)
    return (x.new_empty((rows, x.shape[1])), x.new_empty(rows, dtype=torch.int32), tokens,
            x.new_empty(0, dtype=torch.float32))


def _fake_token_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    topk = 1 if probs is None else probs.shape[1]
    return permuted_tokens.new_empty((permuted_tokens.shape[0] // topk, permuted_tokens.shape[1]))


def _encode(value, tensors: list) -> object:
    """``value`` as a literal, its tensors appended to ``tensors`` and named by index."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("T", len(tensors) - 1)
    if isinstance(value, torch.dtype):
        return ("D", str(value).removeprefix("torch."))
    if isinstance(value, (list, tuple)):
        return ("L", [_encode(v, tensors) for v in value])
    if isinstance(value, dict):
        return ("M", {k: _encode(v, tensors) for k, v in value.items()})
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return ("V", value)
    if isinstance(value, numbers.Integral):
        return ("V", int(value))
    if isinstance(value, numbers.Real):  # numpy scalars and inf/nan: exact, through float.hex
        return ("F", float(value).hex())
    raise TypeError(f"emulated torch_npu: cannot pass {type(value).__name__} to an op")


def _decode(code, tensors: list) -> object:
    kind, body = code
    if kind == "T":
        return tensors[body]
    if kind == "D":
        return getattr(torch, body)
    if kind == "L":
        return [_decode(c, tensors) for c in body]
    if kind == "M":
        return {k: _decode(c, tensors) for k, c in body.items()}
    return float.fromhex(body) if kind == "F" else body


def _flat(out) -> list[torch.Tensor]:
    """An op's result as a list of tensors (``None`` as an empty tensor, never returned by these ops)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [torch.empty(0) if t is None else t for t in out]


def _opaque(fn: Callable, fake: Callable) -> Callable:
    """``fn`` as an opaque ``hwlayer_emulated_npu::<name>`` custom op with ``fake`` as its fake kernel."""
    sig = inspect.signature(fn)
    returns_tensor = sig.return_annotation in ("torch.Tensor", torch.Tensor)
    returns_list = str(sig.return_annotation).startswith("list")

    def call_with(impl: Callable, tensors: list, spec: str) -> list[torch.Tensor]:
        args, kwargs = _decode(ast.literal_eval(spec), tensors)
        return _flat(impl(*args, **kwargs))

    def kernel(tensors: list[torch.Tensor | None], spec: str) -> list[torch.Tensor]:
        # Outputs may alias neither inputs nor each other (custom-op rule): such an output is copied.
        seen = {t.untyped_storage().data_ptr() for t in tensors if t is not None and t.numel()}
        out = []
        for t in call_with(fn, tensors, spec):
            ptr = t.untyped_storage().data_ptr() if t.numel() else None
            out.append(t.clone() if ptr in seen or any(t is o for o in out) else t)
            seen.add(ptr)
        return out

    op = torch.library.custom_op(f"hwlayer_emulated_npu::{fn.__name__}", kernel, mutates_args=())
    op.register_fake(lambda tensors, spec: call_with(fake, tensors, spec))

    @functools.wraps(fn)
    def public(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        tensors: list = []
        spec = repr(_encode([list(bound.args), bound.kwargs], tensors))
        out = op(tensors, spec)
        if returns_tensor:
            return out[0]
        return list(out) if returns_list else tuple(out)

    return public


_FAKES = {
    "npu_rms_norm": _fake_rms_norm,
    "npu_add_rms_norm": _fake_add_rms_norm,
    "npu_swiglu": _fake_swiglu,
    "npu_rotary_mul": _fake_rotary_mul,
    "npu_lightning_indexer": _fake_lightning_indexer,
    "npu_sparse_flash_attention": _fake_sparse_flash_attention,
    "npu_moe_gating_top_k": _fake_gating_top_k,
    "npu_grouped_matmul": _fake_grouped_matmul,
    "npu_moe_init_routing_v2": _fake_init_routing_v2,
    "npu_moe_token_unpermute": _fake_token_unpermute,
}
KERNELS = {name: globals()[name] for name in _FAKES}  # the plain emulations, for tests of their internals
for _name, _fake in _FAKES.items():
    globals()[_name] = _opaque(KERNELS[_name], _fake)

FUNCTIONS = (
    npu_rms_norm,
    npu_add_rms_norm,
    npu_swiglu,
    npu_rotary_mul,
    npu_lightning_indexer,
    npu_sparse_flash_attention,
    npu_moe_gating_top_k,
    npu_grouped_matmul,
    npu_moe_init_routing_v2,
    npu_moe_token_unpermute,
)


def install(module: types.ModuleType) -> None:
    # __version__ must match torch's major.minor for the (non-emulated) detection; the emulated
    # detection does not look at it, but report it as the docs' release line.
    fill(module, SOURCE, "2.14.0+emulated", *FUNCTIONS)
