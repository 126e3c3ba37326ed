"""rms_norm, layer_norm, silu_and_mul: plain, fused residual, 3-D and non-contiguous inputs."""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, randn

HIDDEN = 64
EPS = 1e-6


def _x(gen, dtype, device, layout: str, shape=(7, HIDDEN)) -> torch.Tensor:
    """Inputs in the requested memory layout: contiguous, a transposed view, or a column slice."""
    if layout == "transposed":  # [T, D] view of a [D, T] tensor: last-dim stride != 1
        return randn(gen, shape[::-1], dtype, device).t()
    if layout == "sliced":  # every other row of a wider tensor's leading columns
        return randn(gen, (2 * shape[0], shape[1] + 8), dtype, device)[::2, : shape[1]]
    return randn(gen, shape, dtype, device)


@pytest.mark.parametrize("case", ["plain", "3d", "transposed", "sliced"])
def test_rms_norm(checker, dtype, device, case):
    ck = checker("rms_norm", case)
    gen = generator("rms_norm", case, dtype)
    shape = (2, 5, HIDDEN) if case == "3d" else (7, HIDDEN)
    x = _x(gen, ck.dtype, device, case, shape)
    w = randn(gen, (HIDDEN,), ck.dtype, device, scale=0.5) + 1
    out = ck.fn(x, w, EPS)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    ck.close("out", out, golden.rms_norm(x, w, EPS))
    if case == "plain":
        ck.time(x, w, EPS)


@pytest.mark.parametrize("case", ["residual", "residual-transposed"])
def test_rms_norm_with_residual(checker, dtype, device, case):
    ck = checker("rms_norm", case)
    gen = generator("rms_norm", case, dtype)
    layout = "transposed" if case.endswith("transposed") else "plain"
    x, residual = _x(gen, ck.dtype, device, layout), _x(gen, ck.dtype, device, layout)
    x_before, residual_before = x.clone(), residual.clone()
    w = randn(gen, (HIDDEN,), ck.dtype, device, scale=0.5) + 1
    out, new_residual = ck.fn(x, w, EPS, residual=residual)
    # The contract forms s = x + residual in x.dtype: the golden rounds the sum the same way.
    s = (golden._f64(x) + golden._f64(residual)).to(ck.dtype)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    ck.shape_dtype("residual", new_residual, x.shape, ck.dtype)
    ck.close("residual (x + residual)", new_residual, golden._f64(s))
    ck.close("out", out, golden.rms_norm(s, w, EPS))
    ck.exact("x unmodified", x, x_before)
    ck.exact("residual argument unmodified", residual, residual_before)


@pytest.mark.parametrize("case", ["bias", "no-bias", "transposed"])
def test_layer_norm(checker, dtype, device, case):
    ck = checker("layer_norm", case)
    gen = generator("layer_norm", case, dtype)
    x = _x(gen, ck.dtype, device, "transposed" if case == "transposed" else "plain") * 2 + 0.5
    w = randn(gen, (HIDDEN,), ck.dtype, device, scale=0.5) + 1
    b = None if case == "no-bias" else randn(gen, (HIDDEN,), ck.dtype, device, scale=0.5)
    out = ck.fn(x, w, b, EPS)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    ck.close("out", out, golden.layer_norm(x, w, b, EPS))
    if case == "bias":
        ck.time(x, w, b, EPS)


@pytest.mark.parametrize("case", ["2d", "3d", "transposed", "sliced"])
def test_silu_and_mul(checker, dtype, device, case):
    ck = checker("silu_and_mul", case)
    gen = generator("silu_and_mul", case, dtype)
    shape = (3, 4, 2 * 24) if case == "3d" else (9, 2 * 24)
    x = _x(gen, ck.dtype, device, case, shape) * 2
    out = ck.fn(x)
    ck.shape_dtype("out", out, (*x.shape[:-1], x.shape[-1] // 2), ck.dtype)
    ck.close("out", out, golden.silu_and_mul(x))
    if case == "2d":
        ck.time(x)
