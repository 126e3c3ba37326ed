"""Rotary position embedding: ``rope`` over a vLLM-layout cos/sin cache (GPT-J or NeoX pairing)."""

from __future__ import annotations

import torch

from .layout import FLOAT_DTYPES, INDEX_DTYPES, AttentionMetadata, check_meta, check_tensor, fail


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool, *,
         meta: AttentionMetadata | None = None) -> torch.Tensor:
    """Rotate ``x`` by its token positions; returns a new tensor of ``x``'s shape and dtype.

    ``x``: ``[T, D]`` or ``[T, H, D]`` (the whole last dim rotates; slice rope dims out first).
    ``positions``: int ``[T]``. ``cos_sin_cache``: fp32 ``[max_pos, D]``, row ``p`` holding
    ``cos(p * f_i)`` for ``i < D/2`` then ``sin(p * f_i)`` (vLLM layout; scaling such as YaRN's
    mscale is folded into the cache). ``interleaved=True``: GPT-J pairs ``(x[2i], x[2i+1])``
    rotate by ``f_i`` and stay interleaved (GLM-5, DeepSeek). ``interleaved=False``: NeoX halves
    ``(x[i], x[i + D/2])``. Computes in fp32. ``meta``: the step's
    :class:`~hwlayer.ops.layout.AttentionMetadata` (optional; its rope rows, when built from this
    ``cos_sin_cache``, replace the gather).
    """
    check_tensor("rope", "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("rope", "positions", positions, ndim=1, dtypes=INDEX_DTYPES, shape=[x.shape[0]])
    D = x.shape[-1]
    check_tensor("rope", "cos_sin_cache", cos_sin_cache, ndim=2, shape=[None, D])
    if D % 2:
        fail("rope", "x", "an even last dim", D)
    xf = x.float()
    if meta is not None:
        check_meta("rope", meta, x.shape[0])
    if meta is not None and meta.rope_cos is not None:
        if meta.cos_sin_cache is not cos_sin_cache:
            fail("rope", "meta", "rope rows gathered from this cos_sin_cache", "rows of another cache")
        cos, sin = meta.rope_cos, meta.rope_sin  # [T, 1, D], pair-expanded: (cos_i, cos_i), (-sin_i, sin_i)
        if x.dim() == 2:
            cos, sin = cos[:, 0], sin[:, 0]
        if interleaved:
            # x * cos + (pairs swapped) * sin: per element the same two products and one sum as below
            # (a + (-b) is a - b exactly), so the same bits, in 6 calls instead of 12.
            swapped = xf.unflatten(-1, (D // 2, 2)).flip(-1).flatten(-2)
            return (xf * cos + swapped * sin).to(x.dtype)
        cos, sin = cos[..., 0::2], sin[..., 1::2]  # the halves, for NeoX pairs
    else:
        cs = cos_sin_cache.index_select(0, positions).float()  # index_select takes int32 or int64 indices
        cos, sin = cs[:, : D // 2], cs[:, D // 2 :]
        if x.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # Real arithmetic on purpose: a complex multiply would be fewer ops but rounds differently
    # (fused multiply-adds), which moves near-tie routing / top-k decisions downstream.
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
