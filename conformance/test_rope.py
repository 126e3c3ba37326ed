"""rope: interleaved (GPT-J) and NeoX pairs, 2-D and 3-D, strided views, random positions."""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, randn, step_meta

THETA = 10000.0
MAX_POS = 4096


def cos_sin_cache(dim: int, device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """The fp32 ``[MAX_POS, dim]`` cache (cos then sin), built in float64 then rounded once."""
    inv_freq = golden.rope_inv_freq(dim, THETA)
    angles = torch.arange(MAX_POS, dtype=torch.float64)[:, None] * torch.tensor(inv_freq, dtype=torch.float64)
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1).to(device=device, dtype=torch.float32)
    return cache, inv_freq


@pytest.mark.parametrize(
    "case",
    ["interleaved-2d", "interleaved-3d", "interleaved-strided", "neox-3d", "neox-2d-int32-positions",
     "interleaved-3d+meta", "neox-2d+meta"],
)
def test_rope(checker, dtype, device, case):
    """``+meta``: with the step's AttentionMetadata (its rope rows gathered from the same cache)."""
    ck = checker("rope", case)
    gen = generator("rope", case, dtype)
    interleaved = case.startswith("interleaved")
    T, H, D = 9, 3, 16
    if case.endswith("strided"):  # the rope dims sliced off the end of wider heads, as the model does
        x = randn(gen, (T, H, 24 + D), ck.dtype, device)[..., 24:]
    elif "2d" in case:
        x = randn(gen, (T, D), ck.dtype, device)
    else:
        x = randn(gen, (T, H, D), ck.dtype, device)
    index_dtype = torch.int32 if "int32" in case else torch.int64
    positions = torch.randint(0, MAX_POS, (T,), generator=gen).to(device=device, dtype=index_dtype)
    cache, inv_freq = cos_sin_cache(D, device)
    x_before = x.clone()
    meta = {}
    if case.endswith("+meta"):  # one sequence per token, at its position: one block of MAX_POS slots each
        lens = [p + 1 for p in positions.tolist()]
        meta["meta"] = step_meta([1] * T, lens, MAX_POS, device, cos_sin_cache=cache)
    out = ck.fn(x, positions, cache, interleaved, **meta)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    ck.close("out", out, golden.rope(x, positions.cpu(), inv_freq, interleaved))
    ck.exact("x unmodified", x, x_before)
    if case == "interleaved-3d":
        ck.time(x, positions, cache, interleaved)
