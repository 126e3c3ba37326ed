"""Pure argument conversions between hwlayer's op contracts and mate's (FlashMLA / DeepGEMM style)
conventions. No vendor import: plain torch, unit-tested on CPU (tests/test_vendor_plugins.py).
"""

from __future__ import annotations

import torch

from hwlayer.ops import positions_to_slots, token_positions

# DeepGEMM's M alignment for the contiguous grouped layout (get_mk_alignment_for_contiguous_layout()
# returns 128 upstream); mate's value is read at run time when it exposes the getter.
DEFAULT_GROUP_ALIGNMENT = 128
# FlashMLA's sparse kernels read top-k in whole blocks of 64 (``B_TOPK``); a partial last block is skipped.
FLASH_MLA_TOPK_BLOCK = 64


def pad_last_dim(t: torch.Tensor, multiple: int, value: int) -> torch.Tensor:
    """``t`` with its last dim padded up to a multiple of ``multiple`` with ``value`` (contiguous)."""
    pad = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, pad), value=value).contiguous() if pad else t


# ---- sparse MLA: hwlayer positions in a paged cache -> FlashMLA global kv row indices


def sparse_kv_indices(
    indices: torch.Tensor, block_table: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
    block_size: int,
) -> torch.Tensor:
    """hwlayer ``indices`` (int32 ``[T, K]`` positions within each token's sequence, -1 unused) ->
    ``flash_mla_sparse_fwd`` indices: int32 ``[T, 1, K]`` rows of the flattened cache
    ``[num_blocks * block_size, 1, Dk]`` (one kv head), -1 kept as "invalid"."""
    seq_idx, _ = token_positions(cu_seqlens_q, seq_lens)
    slots = positions_to_slots(block_table, seq_idx, indices, block_size)
    slots = torch.where(indices >= 0, slots, torch.full_like(slots, -1))
    return slots.to(torch.int32).unsqueeze(1).contiguous()


def flat_kv(kv_cache: torch.Tensor) -> torch.Tensor:
    """Paged latent cache ``[num_blocks, block_size, Dk]`` -> FlashMLA's ``[s_kv, h_kv=1, Dk]`` (a view)."""
    return kv_cache.reshape(-1, 1, kv_cache.shape[-1])


# ---- grouped GEMM: counts -> DeepGEMM "contiguous" layout (per-row group ids, groups padded)


def contiguous_layout(group_sizes: torch.Tensor, alignment: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts -> ``(source_rows int64 [M_pad], m_indices int32 [M_pad])``.

    ``m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)`` wants each group's rows contiguous
    and padded to a multiple of ``alignment``; ``m_indices[r]`` is row r's group, -1 on padding.
    ``source_rows[r]`` is the unpadded row that padded row r holds (-1 on padding)."""
    sizes = group_sizes.long()
    padded = (sizes + alignment - 1) // alignment * alignment
    groups = torch.arange(sizes.numel(), device=sizes.device)
    m_indices = torch.repeat_interleave(groups, padded)
    pad_start = torch.cumsum(padded, 0) - padded  # first padded row of each group
    src_start = torch.cumsum(sizes, 0) - sizes
    offset_in_group = torch.arange(m_indices.numel(), device=sizes.device) - pad_start[m_indices]
    real = offset_in_group < sizes[m_indices]
    source_rows = torch.where(real, src_start[m_indices] + offset_in_group, torch.full_like(offset_in_group, -1))
    m_indices = torch.where(real, m_indices, torch.full_like(m_indices, -1))
    return source_rows, m_indices.to(torch.int32)


def pad_rows(x: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` placed at their padded positions; padding rows are zero."""
    out = x.new_zeros(source_rows.numel(), x.shape[1])
    real = source_rows >= 0
    out[real] = x[source_rows[real]]
    return out


def unpad_rows(d: torch.Tensor, source_rows: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pad_rows` (rows stay in order, so a mask selects them)."""
    return d[source_rows >= 0]


# ---- lightning indexer: paged keys -> one contiguous key buffer with per-token [start, end) ranges


def indexer_key_ranges(
    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For keys of all sequences concatenated (sequence b at ``key_offset[b]``), the causal key
    range of every query token: ``(ks int32 [T], ke int32 [T], key_offset int64 [B])`` -- the
    ``cu_seq_len_k_start`` / ``cu_seq_len_k_end`` arguments of ``fp8_mqa_logits`` (end exclusive)."""
    seq_idx, pos = token_positions(cu_seqlens_q, seq_lens)
    key_offset = torch.cumsum(seq_lens.long(), 0) - seq_lens.long()
    ks = key_offset[seq_idx]
    return ks.to(torch.int32), (ks + pos + 1).to(torch.int32), key_offset


def gather_sequence_keys(k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Every sequence's keys, positions ``0 .. seq_lens[b]-1``, concatenated: ``[sum(seq_lens), Di]``."""
    lens = seq_lens.long()
    seq_idx = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    pos = torch.arange(seq_idx.numel(), device=lens.device) - (torch.cumsum(lens, 0) - lens)[seq_idx]
    slots = positions_to_slots(block_table, seq_idx, pos, k_cache.shape[1])
    return k_cache.reshape(-1, k_cache.shape[-1])[slots]


def topk_positions_from_logits(
    logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int
) -> torch.Tensor:
    """``[T, N]`` logits over the concatenated keys -> hwlayer's int32 ``[T, topk]`` positions within
    each token's sequence (``column - ks``), -1 where fewer than ``topk`` keys are in range."""
    cols = torch.arange(logits.shape[1], device=logits.device)
    in_range = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())
    scores = logits.float().masked_fill(~in_range, float("-inf"))
    k = min(topk, logits.shape[1])
    vals, idx = scores.topk(k, dim=-1)
    pos = (idx - ks[:, None].long()).to(torch.int32).masked_fill(vals == float("-inf"), -1)
    out = torch.full((logits.shape[0], topk), -1, dtype=torch.int32, device=logits.device)
    out[:, :k] = pos
    return out


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
    kernels may report such rows differently (e.g. ``+inf`` lse); normalise them here."""
    empty = (kv_indices < 0).all(dim=-1).reshape(-1)  # [T] (kv_indices is [T, 1, K])
    if bool(empty.any()):
        out = out.masked_fill(empty[:, None, None], 0)
        lse = lse.masked_fill(empty[:, None], float("-inf"))
    return out, lse


def parse_version(text: str) -> tuple[int, ...]:
    """'2.7.0+abc' -> (2, 7, 0); non-numeric tails are ignored."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)
