"""Rotary position embedding: ``rope`` over a vLLM-layout cos/sin cache (GPT-J or NeoX pairing)."""

from __future__ import annotations

import torch

from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail


def rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate ``x`` by its token positions; returns a new tensor of ``x``'s shape and dtype.

    ``x``: ``[T, D]`` or ``[T, H, D]`` (the whole last dim rotates; slice rope dims out first).
    ``positions``: int ``[T]``. ``cos_sin_cache``: fp32 ``[max_pos, D]``, row ``p`` holding
    ``cos(p * f_i)`` for ``i < D/2`` then ``sin(p * f_i)`` (vLLM layout; scaling such as YaRN's
    mscale is folded into the cache). ``interleaved=True``: GPT-J pairs ``(x[2i], x[2i+1])``
    rotate by ``f_i`` and stay interleaved (GLM-5, DeepSeek). ``interleaved=False``: NeoX halves
    ``(x[i], x[i + D/2])``. Computes in fp32.
    """
    check_tensor("rope", "x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    check_tensor("rope", "positions", positions, ndim=1, dtypes=INDEX_DTYPES, shape=[x.shape[0]])
    D = x.shape[-1]
    check_tensor("rope", "cos_sin_cache", cos_sin_cache, ndim=2, shape=[None, D])
    if D % 2:
        fail("rope", "x", "an even last dim", D)
    cs = cos_sin_cache.index_select(0, positions)  # index_select takes int32 or int64 indices
    xf = x.float()
    if interleaved:
        # GPT-J pairs as complex numbers: (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x2 cos + x1 sin),
        # one complex multiply instead of slicing, four multiplies and a stack (fewer ops per call).
        rot = torch.complex(cs[:, : D // 2].float(), cs[:, D // 2 :].float())
        if x.dim() == 3:
            rot = rot.unsqueeze(1)
        pairs = torch.view_as_complex(xf.contiguous().view(*x.shape[:-1], D // 2, 2))
        out = torch.view_as_real(pairs * rot).flatten(-2)
    else:
        cs = cs.float()
        cos, sin = cs[:, : D // 2], cs[:, D // 2 :]
        if x.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
