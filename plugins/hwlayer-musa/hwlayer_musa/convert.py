"""Pure argument conversions between hwlayer's op contracts and mate's (FlashMLA / DeepGEMM style)
conventions. No vendor import: plain torch, unit-tested on CPU (tests/test_vendor_plugins.py).

Nothing here reads a device value on the host: every output size comes from host ints (a tensor's
shape, the step's ``max_seqlen_k``, the alignment), so a decode step can be captured as a graph.
"""

from __future__ import annotations

import torch

from hwlayer.ops import positions_to_slots, token_positions
from hwlayer.ops.layout import AttentionMetadata

# DeepGEMM's M alignment for the contiguous grouped layout (get_mk_alignment_for_contiguous_layout()
# returns 128 upstream); mate's value is read at run time when it exposes the getter.
DEFAULT_GROUP_ALIGNMENT = 128
# FlashMLA's sparse prefill wants top-k in whole blocks: SM90 asserts ``topk % (2 * B_TOPK) == 0`` with
# B_TOPK 64 (deepseek-ai/FlashMLA 9241ae3 ``csrc/sm90/prefill/sparse/phase1.cuh``) and ``topk > 0``;
# mate mirrors that API. 128 satisfies every kernel generation.
FLASH_MLA_TOPK_BLOCK = 128


def pad_last_dim(t: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    """``t`` with its last dim padded up to a multiple of ``multiple`` with ``value`` (contiguous)."""
    pad = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, pad), value=value).contiguous() if pad else t


# ---- sparse MLA: hwlayer positions in a paged cache -> FlashMLA global kv row indices


def sparse_kv_indices(
    indices: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int, meta: AttentionMetadata | None = None,
) -> torch.Tensor:
    """hwlayer ``indices`` (int32 ``[T, K]`` positions within each token's sequence, -1 unused) ->
    ``flash_mla_sparse_fwd`` indices: int32 ``[T, 1, K]`` rows of the flattened cache
    ``[num_blocks * block_size, 1, Dk]`` (one kv head), -1 kept as "invalid". ``meta``: the step's
    tables (token -> sequence, key slots), used when built for this block size."""
    if meta is not None and meta.block_size == block_size:
        slots = meta.key_slots.index_select(0, meta.seq_idx).gather(1, indices.long().clamp(min=0))
    else:
        seq_idx, _ = token_positions(cu_seqlens_q, seq_lens, indices.shape[0])
        slots = positions_to_slots(block_table, seq_idx, indices, block_size)
    slots = torch.where(indices >= 0, slots, -1)
    return slots.to(torch.int32).unsqueeze(1).contiguous()


def flat_kv(kv_cache: torch.Tensor) -> torch.Tensor:
    """Paged latent cache ``[num_blocks, block_size, Dk]`` -> FlashMLA's ``[s_kv, h_kv=1, Dk]`` (a view)."""
    return kv_cache.reshape(-1, 1, kv_cache.shape[-1])


# ---- grouped GEMM: counts -> DeepGEMM "contiguous" layout (per-row group ids, groups padded)


def padded_rows_bound(num_rows: int, num_groups: int, alignment: int) -> int:
    """Rows of the contiguous layout for any split of ``num_rows`` rows into ``num_groups`` groups,
    each padded to a multiple of ``alignment``: a host int, so nothing is sized by device data (the
    bound vLLM's DeepGEMM MoE path allocates, ``M + E * (alignment - 1)`` rounded up)."""
    return -(-(num_rows + num_groups * (alignment - 1)) // alignment) * alignment


def contiguous_layout(group_sizes: torch.Tensor, alignment: int, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (summing to ``num_rows``) -> ``(source_rows int64 [M_pad], m_indices int32 [M_pad])``,
    ``M_pad = padded_rows_bound(num_rows, E, alignment)``.

    ``m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)`` wants each group's rows contiguous
    and padded to a multiple of ``alignment``; ``m_indices[r]`` is row r's group, -1 on padding
    (also on the unused tail past the last group). ``source_rows[r]`` is the unpadded row that
    padded row r holds (-1 on padding). Device arithmetic only: no size read back."""
    sizes = group_sizes.long()  # E >= 1 groups
    padded = (sizes + alignment - 1) // alignment * alignment
    pad_end = torch.cumsum(padded, 0)
    rows = torch.arange(padded_rows_bound(num_rows, sizes.numel(), alignment), device=sizes.device)
    group = torch.searchsorted(pad_end, rows, right=True)  # E on the unused tail past the last group
    g = group.clamp(max=sizes.numel() - 1)
    offset = rows - (pad_end - padded).index_select(0, g)
    real = (group < sizes.numel()) & (offset < sizes.index_select(0, g))
    source_rows = torch.where(real, (torch.cumsum(sizes, 0) - sizes).index_select(0, g) + offset, -1)
    return source_rows, torch.where(real, group, -1).to(torch.int32)


def pad_rows(x: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` placed at their padded positions; padding rows are zero (a gather, no mask indexing)."""
    real = (source_rows >= 0).unsqueeze(1)
    gathered = x.index_select(0, source_rows.clamp(min=0, max=max(x.shape[0] - 1, 0)))
    return torch.where(real, gathered, torch.zeros((), dtype=x.dtype, device=x.device))


def padded_positions(group_sizes: torch.Tensor, alignment: int, num_rows: int) -> torch.Tensor:
    """int64 ``[num_rows]``: where each unpadded row sits in the contiguous layout (the inverse of
    :func:`contiguous_layout`'s ``source_rows``), for gathering the output back."""
    sizes = group_sizes.long()
    padded = (sizes + alignment - 1) // alignment * alignment
    src_end = torch.cumsum(sizes, 0)
    rows = torch.arange(num_rows, device=sizes.device)
    g = torch.searchsorted(src_end, rows, right=True).clamp(max=sizes.numel() - 1)
    return (torch.cumsum(padded, 0) - padded).index_select(0, g) + rows - (src_end - sizes).index_select(0, g)


def unpad_rows(d: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_rows`: the rows at ``positions`` (:func:`padded_positions`), in order."""
    return d.index_select(0, positions)


# ---- lightning indexer: every query token one row of the paged MQA-logits call


def paged_token_rows(
    block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
    meta: AttentionMetadata | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query token as one row of the paged MQA-logits call (``next_n = 1``): ``(context_lens int32
    [T, 1], block_table int32 [T, max_blocks])`` -- the keys a token sees (its position + 1: causal) and
    its sequence's block-table row. Device arithmetic only (``meta``'s token -> sequence map when given)."""
    if meta is not None:
        seq_idx = meta.seq_idx
        pos = (meta.first_query_pos.index_select(0, seq_idx) + torch.arange(num_tokens, device=seq_idx.device)
               - cu_seqlens_q.index_select(0, seq_idx))
    else:
        seq_idx, pos = token_positions(cu_seqlens_q, seq_lens, num_tokens)
    return (pos + 1).to(torch.int32).view(num_tokens, 1), block_table.index_select(0, seq_idx).to(torch.int32)


def topk_positions_from_logits(
    logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int
) -> torch.Tensor:
    """``[T, N]`` logits over the laid-out keys -> hwlayer's int32 ``[T, topk]`` positions within
    each token's sequence (``column - ks``), -1 where fewer than ``topk`` keys are in range."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    in_range = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())
    scores = logits.float().masked_fill(~in_range, float("-inf"))
    k = min(topk, logits.shape[1])
    vals, idx = scores.topk(k, dim=-1)
    pos = (idx - ks[:, None].long()).to(torch.int32).masked_fill(vals == float("-inf"), -1)
    return torch.nn.functional.pad(pos, (0, topk - k), value=-1) if k < topk else pos


def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation as DeepGEMM's fp8 mqa logits take keys: ``(x_fp8, scale fp32 [rows])``
    with ``x ~= x_fp8 * scale`` (each row's max maps to 448, so nothing saturates). Lossy (3 mantissa
    bits): scores near a top-k boundary may flip. Also used per (token, head) for the queries."""
    amax = x.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale[:, None]).to(torch.float8_e4m3fn), scale


def empty_rows_to_contract(
    out: torch.Tensor, lse: torch.Tensor, kv_indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hwlayer's contract for a token with no valid index: ``out = 0`` and ``lse = -inf``. FlashMLA-style
    kernels may report such rows differently (e.g. ``+inf`` lse); normalise them here, on the device
    (no "any empty row?" branch, which would read the device)."""
    empty = (kv_indices < 0).all(dim=-1).reshape(-1)  # [T] (kv_indices is [T, 1, K])
    return out.masked_fill(empty[:, None, None], 0), lse.masked_fill(empty[:, None], float("-inf"))


def parse_version(text: str) -> tuple[int, ...]:
    """'2.7.0+abc' -> (2, 7, 0); non-numeric tails are ignored."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
