"""Pure argument conversions between hwlayer's op contracts and torch_mlu_ops conventions.

No vendor import here: everything is plain torch, unit-tested on CPU (tests/test_vendor_plugins.py).
The tmo conventions below come from call sites in dlinfer (camb vendor ops) and vllm-mlu; where no
source confirmed a detail it is marked "unverified".
"""

from __future__ import annotations

import weakref

import torch


def rms_norm_rows(x: torch.Tensor) -> torch.Tensor:
    """``tmo.fused_rms_norm`` takes 2-D ``[tokens, hidden]`` (dlinfer flattens 3-D input): a view."""
    return x.reshape(-1, x.shape[-1])


def rope_full_tables(cos_sin_cache: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hwlayer's ``[max_pos, D]`` cache (cos of the D/2 frequencies, then sin) -> full-width
    ``(cos [max_pos, D], sin [max_pos, D])`` as ``tmo.apply_rotary`` takes them (dlinfer passes
    ``cos``/``sin`` of shape ``(seq, head_dim)``).

    Interleaved (GPT-J, "cross" in tmo): pair ``(2i, 2i+1)`` uses frequency ``i`` -> each value
    repeated twice. Fold (NeoX): halves ``i`` and ``i + D/2`` share frequency ``i`` -> the half
    table concatenated with itself. Full-width layout per pair is unverified against tmo docs.
    """
    half = cos_sin_cache.shape[-1] // 2
    cos, sin = cos_sin_cache[:, :half].float(), cos_sin_cache[:, half:].float()
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def rotate_with_full_tables(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """``x * cos + rotate(x) * sin`` with full-width tables already gathered per token: the formula
    the full-width layout stands for (used by the unit test to pin :func:`rope_full_tables`)."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    if xf.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (xf * cos + rotated * sin).to(x.dtype)


def packed_rope_args(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The whole token batch as one packed sequence for ``tmo.apply_rotary``: ``(position_ids int32
    [T], cu_seqlens int32 [0, T], max_seqlen T)``; ``discrete=True`` makes tmo read each token's row
    of the tables from ``position_ids`` (as in dlinfer's 3-D call). ``cu_seqlens`` is made on the
    device (no host->device copy, which a captured graph could not replay)."""
    T = positions.shape[0]
    cu = torch.arange(2, dtype=torch.int32, device=positions.device) * T
    return positions.to(torch.int32).contiguous(), cu, T


_TABLES: dict[tuple[int, bool], tuple[weakref.ref, tuple[torch.Tensor, torch.Tensor]]] = {}


def rope_tables(cos_sin_cache: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rope_full_tables` of ``cos_sin_cache``, built once per cache tensor and kept while it lives
    (the model's cache is built once at load): no per-call rebuild of ``[max_pos, D]`` fp32 tables."""
    key = (id(cos_sin_cache), interleaved)
    hit = _TABLES.get(key)
    if hit is not None and hit[0]() is cos_sin_cache:
        return hit[1]
    tables = rope_full_tables(cos_sin_cache, interleaved)
    _TABLES[key] = (weakref.ref(cos_sin_cache, lambda _ref, key=key: _TABLES.pop(key, None)), tables)
    return tables


def rows_from_meta(rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width ``(cos [T, D], sin [T, D])`` rows of this step's tokens from the step's
    :class:`~hwlayer.ops.layout.AttentionMetadata` rope rows (fp32 ``[T, 1, D]``, pair-expanded:
    ``(cos_i, cos_i)`` and ``(-sin_i, sin_i)`` at ``2i, 2i+1``), in :func:`rope_full_tables`' layout:
    what ``tmo.apply_rotary`` reads at ``position_ids = 0 .. T-1``. Gathered once per step for every
    layer, so no per-call table is built at all."""
    cos, sin = rope_cos[:, 0], rope_sin[:, 0]
    if interleaved:  # (cos_i, cos_i) already; sin_i at both slots of the pair
        return cos, sin[:, 1::2].repeat_interleave(2, dim=-1)
    cos_half, sin_half = cos[:, 0::2], sin[:, 1::2]
    return torch.cat((cos_half, cos_half), dim=-1), torch.cat((sin_half, sin_half), dim=-1)


def routing_group_args(n_group: int, topk_group: int) -> tuple[int, int]:
    """hwlayer's ``(n_group, topk_group)`` -> tmo's ``(num_expert_group, topk_group)``.

    vllm-mlu passes the model config's values straight through; grouping is off when every group
    is kept, which tmo spells ``num_expert_group=-1`` in moe_softmax_topk call sites (its meaning in
    moe_sigmoid_topk with -1 is unverified, hence the explicit mapping kept in one place)."""
    if n_group <= 1 or topk_group >= n_group:
        return -1, 0
    return n_group, topk_group


def group_counts(group_sizes: torch.Tensor) -> torch.Tensor:
    """``tmo.group_gemm`` takes per-expert row counts (``m_list``, int32; dlinfer passes the
    ``token_count`` from ``tmo.moe_gen_idx``) -- the same counts hwlayer's grouped_gemm gets."""
    return group_sizes.to(torch.int32).contiguous()
