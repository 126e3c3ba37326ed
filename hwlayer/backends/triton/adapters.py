"""The Triton tier's op implementations: contract in, kernel launch, contract out.

Every function here has the signature of its op in :mod:`hwlayer.ops` and is registered with a
``supports`` predicate. The predicate declines (with a reason) whatever the kernel does not take:
tensors on a device Triton cannot run on, unusual dtypes or sizes, and malformed input, which then
reaches the generic implementation and its ``ValueError`` naming the bad argument. So this module
only launches kernels on input it has already accepted.

``triton`` and the kernels are imported on first use (see ``kernels.py`` for why).

Sync-free: nothing here reads a device tensor on the host. Launch grids and temporaries are sized
from shapes and from the host-side sizes the contracts pass (``max_seqlen_k``), or from host-known
bounds (expert blocks: ``numel + E * (block_m - 1)`` rows; their extra programs return at once).
Predicates check shapes and dtypes only; checks of values (slots, positions, group sizes in range)
run only under ``HWLAYER_CHECK=1`` (:func:`hwlayer.ops.layout.value_checks`), where they decline so
the generic op raises its error. ``tests/test_triton_kernels.py`` runs the adapters under
FakeTensorMode, where any host read of device data raises.
"""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import sys
from typing import Any

import torch

from hwlayer.ops.cache import PagedKV
from hwlayer.ops.layout import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    AttentionMetadata,
    check_varlen,
    meta_supported,
    token_positions,
    value_checks,
)

# Sizes a single program keeps in registers; larger calls go to the next tier.
MAX_NORM_DIM = 16384
MAX_LATENT_DIM = 1024
MAX_ROPE_DIM = 256
MAX_INDEXER_HEADS = 128
MAX_INDEXER_DIM = 256
MAX_EXPERTS = 1024
MAX_ROUTE_TOPK = 64


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def interpreter_problem() -> str | None:
    """Why the interpreter cannot run kernels in this process, or None when it can.

    Triton decides interpreted-or-compiled when each ``@triton.jit`` function is defined, its own
    library functions (``tl.sum``...) included, so ``TRITON_INTERPRET=1`` must be set before
    ``triton`` is first imported.
    """
    if not interpreting():
        return "TRITON_INTERPRET=1 is not set"
    tl = sys.modules.get("triton.language")
    if tl is not None and type(getattr(tl, "sum", None)).__name__ != "InterpretedFunction":
        return "TRITON_INTERPRET=1 was set after triton was imported; set it before starting Python"
    return None


@functools.cache
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _kernels() -> Any:
    from . import kernels

    return kernels


def _device_ok(*tensors: torch.Tensor) -> bool | str:
    """Triton runs on CUDA/ROCm tensors, or CPU tensors under the interpreter."""
    if not triton_importable():
        return "triton is not installed"
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return "tensors on different devices"
    if dev.type == "cuda":
        return True
    if dev.type == "cpu":
        problem = interpreter_problem()
        return True if problem is None else f"triton runs CPU tensors only in its interpreter: {problem}"
    return f"triton cannot run on {dev.type} tensors"


LOG2_E = 1.4426950408889634

# Launches per kernel path, counted on the host (no device work): tests and benchmarks read it to
# know which path served a call, e.g. split-K decode vs one-pass prefill attention.
LAUNCHES: collections.Counter = collections.Counter()


def _launched(path: str) -> None:
    LAUNCHES[path] += 1


def _is_tensor(*items: Any) -> bool:
    return all(isinstance(t, torch.Tensor) for t in items)


def _p2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def _f32_dot(dtype: torch.dtype) -> bool:
    """Upcast tl.dot operands to fp32: for fp32 inputs, and always in the interpreter (no bf16 math)."""
    return dtype == torch.float32 or interpreting()


# --------------------------------------------------------------------------------------------
# rms_norm


def rms_norm_supports(x: Any, weight: Any, eps: float, residual: Any = None) -> bool | str:
    if x.dim() < 1:
        return "a 0-D x has no row to normalise"
    if x.shape[-1] > MAX_NORM_DIM:
        return f"last dim {x.shape[-1]} > {MAX_NORM_DIM}"
    return _device_ok(x, weight, *(() if residual is None else (residual,)))


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    rows = x2.shape[0]
    out = torch.empty_like(x2)
    summed = torch.empty_like(x2) if residual is not None else out
    res = residual.reshape(-1, D).contiguous() if residual is not None else x2
    if rows:
        _kernels().rms_norm_kernel[(rows,)](
            x2, res, weight.contiguous(), out, summed, D, float(eps),
            HAS_RESIDUAL=residual is not None, BLOCK_D=_p2(D),
        )
    if residual is not None:
        return out.view(x.shape), summed.view(x.shape)
    return out.view(x.shape)


def layer_norm_supports(x: Any, weight: Any, bias: Any, eps: float) -> bool | str:
    if x.dim() < 1:
        return "a 0-D x has no row to normalise"
    if x.shape[-1] > MAX_NORM_DIM:
        return f"last dim {x.shape[-1]} > {MAX_NORM_DIM}"
    return _device_ok(x, weight, *(() if bias is None else (bias,)))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    out = torch.empty_like(x2)
    if x2.shape[0]:
        _kernels().layer_norm_kernel[(x2.shape[0],)](
            x2, weight.contiguous(), bias.contiguous() if bias is not None else weight, out, D, float(eps),
            HAS_BIAS=bias is not None, BLOCK_D=_p2(D),
        )
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# kv_cache_write


def _canonical(cache: Any) -> Any:
    """The canonical ``[blocks, bs, D]`` tensor of a cache argument (hook specs 2.0: a ``PagedKV``), or
    None for a layout without one (the kernels address that layout only)."""
    return cache.canonical if isinstance(cache, PagedKV) else cache


def kv_cache_write_supports(cache: Any, rows: Any, slot_mapping: Any, *, meta: Any = None) -> bool | str:
    if (ok := meta_supported(meta, rows)) is not True:
        return ok
    if (cache := _canonical(cache)) is None:
        return "the kernel writes the canonical cache layout"
    if not cache.is_contiguous():
        return "the kernel writes a contiguous cache"
    if value_checks() and slot_mapping.numel() and int(slot_mapping.max()) >= cache.shape[0] * cache.shape[1]:
        return "slot out of range"  # the generic op names it
    return _device_ok(cache, rows, slot_mapping)


def kv_cache_write(cache: PagedKV | torch.Tensor, rows: torch.Tensor, slot_mapping: torch.Tensor, *,
                   meta: AttentionMetadata | None = None) -> None:
    cache = _canonical(cache)
    T, D = rows.shape
    if T and D:
        block = min(1024, _p2(D))
        _kernels().kv_cache_write_kernel[(T, triton_cdiv(D, block))](
            # torch casts (round-to-nearest, exactly as the contract's ``rows.to(cache.dtype)``);
            # the kernel then only moves bits
            cache, rows.to(cache.dtype).contiguous(), slot_mapping.contiguous(), D, BLOCK_D=block
        )


# --------------------------------------------------------------------------------------------
# rope


def rope_supports(x: Any, positions: Any, cos_sin_cache: Any, interleaved: bool, *, meta: Any = None) -> bool | str:
    if (ok := meta_supported(meta, x)) is not True:
        return ok
    if x.shape[-1] // 2 * (x.shape[1] if x.dim() == 3 else 1) > MAX_NORM_DIM:
        return "heads x rotary dim too large for one program"
    if value_checks() and positions.numel() and (
            int(positions.min()) < 0 or int(positions.max()) >= cos_sin_cache.shape[0]):
        return "positions outside the cache"  # the generic path raises torch's index error
    return _device_ok(x, positions, cos_sin_cache)


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool, *,
         meta: AttentionMetadata | None = None) -> torch.Tensor:
    T, D = x.shape[0], x.shape[-1]
    x3 = x.reshape(T, x.shape[1] if x.dim() == 3 else 1, D).contiguous()
    H = x3.shape[1]
    out = torch.empty_like(x3)
    if T and H:
        _kernels().rope_kernel[(T,)](
            x3, positions.contiguous(), cos_sin_cache.contiguous(), out, H, D,
            INTERLEAVED=bool(interleaved), BLOCK_H=_p2(H), BLOCK_HALF=_p2(D // 2),
        )
    return out.view(x.shape)


# --------------------------------------------------------------------------------------------
# DSA: lightning indexer and sparse MLA attention


def _varlen_ok(op: str, cu_seqlens_q: Any, seq_lens: Any, T: int) -> bool | str:
    """The layout check of the generic ops (:func:`hwlayer.ops.layout.check_varlen`), as a reason."""
    try:
        check_varlen(op, cu_seqlens_q, seq_lens, T)
    except ValueError as exc:
        return str(exc)
    return True


def lightning_indexer_supports(
    q: Any, weights: Any, k_cache: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: Any = None,
) -> bool | str:
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    T, Hi, Di = q.shape
    if (k_cache := _canonical(k_cache)) is None:
        return "the kernel reads the canonical cache layout"
    if Hi > MAX_INDEXER_HEADS or Di > MAX_INDEXER_DIM:
        return f"indexer heads {Hi} / head dim {Di} above {MAX_INDEXER_HEADS}/{MAX_INDEXER_DIM}"
    ok = _varlen_ok("lightning_indexer", cu_seqlens_q, seq_lens, T)
    if ok is not True:
        return ok
    return _device_ok(q, weights, k_cache, block_table)


def indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """The Triton-scored tile: fp32 ``[T, S]``, ``-inf`` at non-causal positions, where ``S`` is
    ``max_seqlen_k`` (a host int; a captured step passes the cache capacity) capped at what the
    block table can address. ``None`` reads ``max(seq_lens)`` from the device (outside a forward)."""
    T, Hi, Di = q.shape
    seq_idx, qpos = token_positions(cu_seqlens_q, seq_lens, T)
    if max_seqlen_k is None:
        max_seqlen_k = int(seq_lens.max()) if seq_lens.numel() else 0
    S = min(int(max_seqlen_k), block_table.shape[1] * k_cache.shape[1])
    scores = torch.empty(T, S, dtype=torch.float32, device=q.device)
    if T and S:
        block_s = 64
        _kernels().indexer_score_kernel[(T, triton_cdiv(S, block_s))](
            q.contiguous(), weights.float().contiguous(), k_cache.contiguous(),
            block_table.contiguous(), seq_idx, qpos, scores,
            Hi, Di, k_cache.shape[1], block_table.shape[1], S, float(scale),
            BLOCK_H=_p2(Hi, 16), BLOCK_D=_p2(Di, 16), BLOCK_S=block_s, F32_DOT=_f32_dot(q.dtype),
        )
    return scores


def lightning_indexer(
    q: torch.Tensor, weights: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, topk: int, scale: float,
    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, *, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    # Scoring is the Triton kernel; the selection is torch.topk on the scored tile, on the device:
    # sizes come from shapes and max_seqlen_k, so the whole op can sit in a captured graph (a Triton
    # radix-select would save the [T, S] tile; not written yet).
    scores = indexer_scores(q, weights, _canonical(k_cache), block_table, cu_seqlens_q, seq_lens, scale, max_seqlen_k)
    T, S = scores.shape
    out = torch.full((T, topk), -1, dtype=torch.int32, device=q.device)
    k = min(topk, S)
    if T and k:
        vals, idx = scores.topk(k, dim=-1)
        out[:, :k] = idx.to(torch.int32).masked_fill_(vals == float("-inf"), -1)
    return out


def sparse_mla_attention_supports(
    q: Any, kv_cache: Any, indices: Any, block_table: Any, cu_seqlens_q: Any, seq_lens: Any, scale: float, v_dim: int,
    *, meta: Any = None, return_lse: bool = False,
) -> bool | str:
    if (ok := meta_supported(meta, q)) is not True:
        return ok
    if (kv_cache := _canonical(kv_cache)) is None:
        return "the kernel reads the canonical cache layout"
    T, H, Dk = q.shape
    if value_checks() and indices.numel() and seq_lens.numel() and int(indices.max()) >= int(seq_lens.max()):
        return "indices past the longest context"  # the generic op names it
    if v_dim > MAX_LATENT_DIM or Dk - v_dim > MAX_ROPE_DIM:
        return f"latent {v_dim} / rope {Dk - v_dim} above {MAX_LATENT_DIM}/{MAX_ROPE_DIM}"
    ok = _varlen_ok("sparse_mla_attention", cu_seqlens_q, seq_lens, T)
    if ok is not True:
        return ok
    return _device_ok(q, kv_cache, indices, block_table)


# Split-K (flash-decoding) when the (token, head tile) programs alone would leave most of the
# device idle: at T=1 one program per head tile would stream all K selected rows through one SM.
MLA_DECODE_BLOCK_K = 32  # keys per inner step of the decode path: short splits, more of them
MLA_PREFILL_BLOCK_K = 64  # prefill: longer [heads x keys] tl.dot tiles, one pass over the keys
MLA_MIN_KEYS_PER_SPLIT = 64  # a split below this costs more in the merge than it saves
MLA_MAX_SPLITS = 64
INTERPRETER_PROGRAM_TARGET = 8  # the interpreter runs programs one after another: a small "device"


@functools.cache
def _device_program_target(device: torch.device) -> int:
    """Programs that fill the device once: its SM count (a host-side property query, no sync)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAM_TARGET


def mla_head_block(num_heads: int, v_dim: int) -> int:
    """Heads per program: all of them up to 64 (each gathered row is then read once per token), 32
    for a wide latent (the [heads, v_dim] fp32 accumulator lives in registers); tl.dot needs >= 16."""
    return min(_p2(num_heads, 16), 32 if v_dim > 256 else 64)


def mla_num_splits(num_tokens: int, num_heads: int, num_keys: int, v_dim: int, programs_target: int) -> int:
    """How many splits of each token's K selected rows: 1 (the prefill path) when the (token, head
    tile) programs already fill the device, else enough splits to fill it, each at least
    ``MLA_MIN_KEYS_PER_SPLIT`` keys. Host-known sizes only."""
    base = num_tokens * triton_cdiv(num_heads, mla_head_block(num_heads, v_dim))
    if base >= programs_target or num_keys < 2 * MLA_MIN_KEYS_PER_SPLIT:
        return 1
    return max(1, min(triton_cdiv(programs_target, base), num_keys // MLA_MIN_KEYS_PER_SPLIT, MLA_MAX_SPLITS))


def sparse_mla_attention(
    q: torch.Tensor, kv_cache: PagedKV | torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int, *,
    meta: AttentionMetadata | None = None, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    # The kernels produce the lse anyway (split-K merges through it): returning it costs nothing.
    out, lse = _sparse_mla(q, _canonical(kv_cache), indices, block_table, cu_seqlens_q, seq_lens, scale, v_dim)
    return (out, lse) if return_lse else out


def _sparse_mla(
    q: torch.Tensor, kv_cache: torch.Tensor, indices: torch.Tensor, block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, v_dim: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two launch shapes of one kernel, chosen from host-known sizes (:func:`mla_num_splits`):
    prefill: grid (T, head tiles), each program one pass over its token's K rows; decode (split-K):
    grid (T, head tiles, splits) writing fp32 partials, then ``sparse_mla_merge_kernel`` combines
    them through their lse."""
    T, H, Dk = q.shape
    K = indices.shape[1]
    rope_dim = Dk - v_dim
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, T)
    out = torch.empty(T, H, v_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    if T == 0:
        return out, lse
    kern = _kernels()
    block_h = mla_head_block(H, v_dim)
    splits = mla_num_splits(T, H, K, v_dim, _device_program_target(q.device))
    block_k = MLA_PREFILL_BLOCK_K if splits == 1 else MLA_DECODE_BLOCK_K
    keys_per_split = triton_cdiv(triton_cdiv(K, splits), block_k) * block_k
    splits = triton_cdiv(K, keys_per_split) if K else 1
    if splits > 1:
        part_out = torch.empty(T, H, splits, v_dim, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, H, splits, dtype=torch.float32, device=q.device)
    else:
        part_out, part_lse = out, lse
    args = (q.contiguous(), kv_cache.contiguous(), indices.contiguous(), block_table.contiguous(), seq_idx,
            part_out, part_lse, H, Dk, v_dim, rope_dim, K, kv_cache.shape[1], block_table.shape[1],
            float(scale) * LOG2_E, max(keys_per_split, 1), splits)
    _launched("sparse_mla_split" if splits > 1 else "sparse_mla_prefill")
    kern.sparse_mla_kernel[(T, triton_cdiv(H, block_h), splits)](
        *args, BLOCK_H=block_h, BLOCK_V=_p2(v_dim, 16), BLOCK_R=_p2(rope_dim, 16), BLOCK_K=block_k,
        F32_DOT=_f32_dot(q.dtype), num_warps=8 if v_dim > 256 else 4,
    )
    if splits > 1:
        block_v = min(_p2(v_dim), 128)
        _launched("sparse_mla_merge")
        kern.sparse_mla_merge_kernel[(T * H, triton_cdiv(v_dim, block_v))](
            part_out, part_lse, out, lse, v_dim, splits, BLOCK_S=_p2(splits), BLOCK_V=block_v,
        )
    return out, lse


# --------------------------------------------------------------------------------------------
# MoE


def moe_route_supports(
    router_logits: Any, correction_bias: Any, top_k: int, n_group: int, topk_group: int,
    renormalize: bool, routed_scaling_factor: float,
) -> bool | str:
    E = router_logits.shape[1]
    if E > MAX_EXPERTS or top_k > MAX_ROUTE_TOPK:
        return f"{E} experts / top_k {top_k} above {MAX_EXPERTS}/{MAX_ROUTE_TOPK}"
    if top_k > topk_group * (E // n_group):
        return "top_k exceeds the experts of the kept groups"
    return _device_ok(router_logits, *(() if correction_bias is None else (correction_bias,)))


def moe_route(
    router_logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, n_group: int,
    topk_group: int, renormalize: bool, routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    T, E = router_logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=router_logits.device)
    if T:
        logits = router_logits.contiguous()
        bias = correction_bias.contiguous() if correction_bias is not None else logits
        group_size = E // n_group
        _kernels().moe_route_kernel[(T,)](
            logits, bias, weights, ids, E, group_size, n_group, topk_group, top_k, float(routed_scaling_factor),
            HAS_BIAS=correction_bias is not None, RENORMALIZE=bool(renormalize),
            LIMIT_GROUPS=n_group > 1 and topk_group < n_group,
            BLOCK_G=_p2(n_group), BLOCK_EG=_p2(group_size), BLOCK_TOPK=_p2(top_k),
        )
    return weights, ids


def grouped_gemm_supports(x: Any, w: Any, group_sizes: Any) -> bool | str:
    if value_checks() and (int(group_sizes.sum()) > x.shape[0] or bool((group_sizes < 0).any())):
        return "group_sizes do not fit the rows"  # the generic op names it
    return _device_ok(x, w, group_sizes)


def _row_tiles(group_sizes: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Row tiles that never straddle experts: (expert, first row, end row) per tile, int32, for a
    fixed number of tiles, ``cdiv(num_rows, block_m) + E`` (a bound known on the host: each expert
    adds at most one partial tile). Tiles past the last one get expert ``E``. No host read."""
    sizes = group_sizes.long()
    E = sizes.numel()
    max_tiles = triton_cdiv(num_rows, block_m) + E
    ends = sizes.cumsum(0)
    starts = ends - sizes
    tiles = (sizes + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)
    index = torch.arange(max_tiles, device=sizes.device)
    expert = torch.searchsorted(tiles_end, index, right=True)  # E past the last tile
    safe = expert.clamp(max=E - 1)
    row0 = starts[safe] + (index - (tiles_end - tiles)[safe]) * block_m
    return expert.to(torch.int32), row0.to(torch.int32), ends[safe].to(torch.int32)


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor:
    M, Kdim = x.shape
    E, N = w.shape[0], w.shape[1]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = 32, 64, 32
    if M and N and E:
        expert, row0, row1 = _row_tiles(group_sizes, M, block_m)
        _kernels().grouped_gemm_kernel[(expert.numel(), triton_cdiv(N, block_n))](
            x.contiguous(), w.contiguous(), out, expert, row0, row1, E, N, Kdim,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, F32_DOT=_f32_dot(x.dtype),
        )
    return out


def silu_and_mul_supports(x: Any) -> bool | str:
    return _device_ok(x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter).contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        block = min(1024, _p2(inter))
        _kernels().silu_and_mul_kernel[(x2.shape[0], triton_cdiv(inter, block))](x2, out, inter, BLOCK=block)
    return out.view(*x.shape[:-1], inter)


# --------------------------------------------------------------------------------------------
# fused_experts: one pass over expert-sorted token blocks (vLLM's fused_moe design)


def fused_experts_supports(x: Any, w13: Any, w2: Any, topk_weights: Any, topk_ids: Any) -> bool | str:
    if not _is_tensor(x, w13, w2, topk_weights, topk_ids):
        return "non-tensor argument"
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or w13.dim() != 3 or w2.dim() != 3:
        return "x/w13/w2 outside the contract"
    E, two_i, D = w13.shape
    if D != x.shape[1] or two_i % 2 or w2.shape != (E, D, two_i // 2):
        return "w13/w2 shapes outside the contract"  # the composite names the argument
    if w13.dtype not in FLOAT_DTYPES or w2.dtype not in FLOAT_DTYPES:
        return "weights are not float (a quantized format has its own kernel)"
    if topk_ids.dim() != 2 or topk_ids.dtype not in INDEX_DTYPES or topk_ids.shape[0] != x.shape[0]:
        return "topk_ids outside the contract"
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype not in FLOAT_DTYPES:
        return "topk_weights outside the contract"
    if topk_ids.shape[1] > MAX_ROUTE_TOPK:
        return f"top_k {topk_ids.shape[1]} above {MAX_ROUTE_TOPK}"
    return _device_ok(x, w13, w2, topk_weights, topk_ids)


def moe_block_m(num_assignments: int, num_experts: int) -> int:
    """Rows per expert block: 16 (tl.dot's minimum) when experts get a few rows each (decode),
    larger when they get many (prefill). Host-known sizes only."""
    per_expert = num_assignments / max(1, num_experts)
    return 16 if per_expert <= 16 or interpreting() else 32 if per_expert <= 64 else 64


MOE_ALIGN_ONE_PROGRAM = 1024  # assignments up to which the one-launch Triton alignment runs
MAX_ALIGN_EXPERTS = 512


def moe_align_block_size(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, use_kernel: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-sorted assignment rows, each expert's rows padded to a multiple of ``block_m``.

    Returns ``(sorted_ids int32 [max_rows], block_expert int32 [max_rows // block_m])``:
    ``sorted_ids[j] = t * k + slot`` of the assignment in row ``j`` (stable in token order) or
    ``numel`` for padding; ``block_expert[b]`` = the expert of row block ``b``, or ``num_experts``
    for a block past the last expert's rows (its programs return at once). Ids outside
    ``[0, num_experts)`` get no row. All on the device with fixed-size outputs: ``max_rows`` is the
    host-known bound ``numel + min(numel, E) * (block_m - 1)``, so nothing is read back.

    Decode-sized batches (``numel <= MOE_ALIGN_ONE_PROGRAM``) use ``moe_align_kernel``, one launch;
    larger ones (and ``use_kernel=False``) a dozen torch ops with the same result.
    """
    numel = topk_ids.numel()
    E = num_experts
    device = topk_ids.device
    max_rows = triton_cdiv(numel + min(numel, E) * (block_m - 1), block_m) * block_m
    if use_kernel is None:
        use_kernel = numel <= MOE_ALIGN_ONE_PROGRAM and E <= MAX_ALIGN_EXPERTS
    if use_kernel:
        sorted_ids = torch.empty(max_rows, dtype=torch.int32, device=device)
        block_expert = torch.empty(max_rows // block_m, dtype=torch.int32, device=device)
        if max_rows:
            _kernels().moe_align_kernel[(1,)](
                topk_ids.contiguous().view(-1).to(torch.int32), sorted_ids, block_expert, numel, E, max_rows,
                BLOCK_M=block_m, BLOCK_N=32, BLOCK_E=_p2(E),
            )
        return sorted_ids, block_expert
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < E), flat, E)  # E: dropped, sorts last
    counts = torch.zeros(E + 1, dtype=torch.long, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts + block_m - 1) // block_m * block_m
    padded[E] = 0
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    cnt_start = counts.cumsum(0) - counts
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    rank = torch.arange(numel, device=device) - cnt_start[sorted_key]
    dest = torch.where(sorted_key < E, pad_start[sorted_key] + rank, max_rows)  # dropped: the spare slot
    sorted_ids = torch.full((max_rows + 1,), numel, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_start = torch.arange(0, max_rows, block_m, device=device)
    block_expert = torch.searchsorted(pad_end[:E], block_start, right=True)  # E past the last rows
    return sorted_ids[:max_rows], block_expert.to(torch.int32)


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Align the assignments to expert blocks on the device, then gate-up GEMM with SwiGLU in its
    epilogue, down GEMM with the router weight in its epilogue, and the per-token sum over slots:
    three Triton launches over row blocks, no moe_permute / moe_unpermute round trip, no host read."""
    T, D = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    k = topk_ids.shape[1]
    numel = T * k
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if numel == 0 or D == 0:
        return out.zero_()
    kern = _kernels()
    block_m = moe_block_m(numel, E)
    block_n, block_k = (32, 32) if interpreting() else (64, 64)
    sorted_ids, block_expert = moe_align_block_size(topk_ids, E, block_m)
    n_blocks = block_expert.numel()
    f32 = _f32_dot(x.dtype)
    h = torch.empty(numel, inter, dtype=x.dtype, device=x.device)  # activations rounded to x.dtype (allowed)
    y = torch.empty(numel, D, dtype=torch.float32, device=x.device)
    ids = topk_ids.contiguous()
    _launched("fused_moe")
    if inter:
        kern.fused_moe_gate_up_kernel[(n_blocks, triton_cdiv(inter, block_n))](
            x.contiguous(), w13.contiguous(), h, sorted_ids, block_expert, numel, k, E, inter, D,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, F32_DOT=f32,
        )
    else:
        h.zero_()
    kern.fused_moe_down_kernel[(n_blocks, triton_cdiv(D, block_n))](
        h, w2.contiguous(), topk_weights.float().contiguous(), y, sorted_ids, block_expert, numel, E, inter, D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, F32_DOT=f32,
    )
    block_d = min(_p2(D), 256)
    kern.moe_sum_kernel[(T, triton_cdiv(D, block_d))](y, ids, out, k, E, D, BLOCK_K=_p2(k), BLOCK_D=block_d)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# op name -> (implementation, supports); the registration list of the tier.
IMPLEMENTATIONS = {
    "rms_norm": (rms_norm, rms_norm_supports),
    "layer_norm": (layer_norm, layer_norm_supports),
    "rope": (rope, rope_supports),
    "kv_cache_write": (kv_cache_write, kv_cache_write_supports),
    "lightning_indexer": (lightning_indexer, lightning_indexer_supports),
    "sparse_mla_attention": (sparse_mla_attention, sparse_mla_attention_supports),
    "moe_route": (moe_route, moe_route_supports),
    "grouped_gemm": (grouped_gemm, grouped_gemm_supports),
    "silu_and_mul": (silu_and_mul, silu_and_mul_supports),
    "fused_experts": (fused_experts, fused_experts_supports),
}
