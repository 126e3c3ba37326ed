"""rms_norm, layer_norm, silu_and_mul: plain, fused residual, 3-D and non-contiguous inputs, the
model's real widths, and rows of small magnitude where eps matters."""

from __future__ import annotations

import pytest
import torch

from . import golden
from .cases import generator, randn
from .checks import UNIT_ROUNDOFF, Tolerance, triton_interpreter

HIDDEN = 64
EPS = 1e-6
MODEL_EPS = 1e-5  # GLM-5 rms_norm_eps

# GLM-5's normalised widths (reference config): the hidden size, the q and kv LoRA ranks. At 64,
# accumulating the mean square in bf16 hides inside the tolerance; at 6144 it does not.
WIDTH_CASES = {"hidden-6144": 6144, "q_lora_rank-2048": 2048, "kv_lora_rank-512": 512}


def _graded_rows(gen, dtype, device, D: int) -> torch.Tensor:
    """Rows whose RMS runs from 1 down to 3e-4, below sqrt(eps) = 3.2e-3: there eps dominates the
    denominator, so an implementation that drops eps (or squares in fp16, where x^2 ~ 1e-7 is
    subnormal) is off by a large factor, while the unit rows keep the usual scale."""
    rms = torch.tensor([1.0, 0.1, 1e-2, 3e-3, 1e-3, 3e-4], dtype=torch.float64)
    return (torch.randn(len(rms), D, generator=gen, dtype=torch.float64) * rms[:, None]).to(device=device, dtype=dtype)


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


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_rms_norm_model_widths(checker, dtype, device, case):
    """Real widths and small-magnitude rows, with the model's eps, plain and with the residual."""
    ck = checker("rms_norm", case)
    gen = generator("rms_norm", case, dtype)
    D = WIDTH_CASES[case]
    x = _graded_rows(gen, ck.dtype, device, D)
    residual = _graded_rows(gen, ck.dtype, device, D)
    w = randn(gen, (D,), ck.dtype, device, scale=0.5) + 1
    out = ck.fn(x, w, MODEL_EPS)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    want = golden.rms_norm(x, w, MODEL_EPS)
    ck.close("out", out, want)
    _row_scale(ck, "out", out, want)
    out, new_residual = ck.fn(x, w, MODEL_EPS, residual=residual)
    s = (golden._f64(x) + golden._f64(residual)).to(ck.dtype)
    ck.close("residual (x + residual)", new_residual, golden._f64(s))
    want = golden.rms_norm(s, w, MODEL_EPS)
    ck.close("out with residual", out, want)
    _row_scale(ck, "out with residual", out, want)


SIGNIFICAND_BITS = {"fp32": 24, "bf16": 8, "fp16": 11}


def _row_scale(ck, what: str, out: torch.Tensor, want: torch.Tensor) -> None:
    """Each row's least-squares scale ``sum(out * g) / sum(g^2)`` is 1 within the noise of unbiased
    rounding. That noise averages over the row, but only over as many independent errors as the
    input has distinct significands: rounding x * rsqrt(ms) to the dtype gives equal relative errors
    to equal mantissas, so N = min(D, 2^p) (p significand bits). Bound: 16 u / sqrt(N) (a few
    sigma of two round-to-nearest roundings, measured std 3.6 u / sqrt(N) in fp16 at 6144), plus
    the fp32 tolerance for the mean square's own accumulation. A per-row scale error (eps dropped,
    a mean square accumulated in half precision) is the same on every element and shows here
    before single elements cross the element-wise tolerance; in bf16 (N = 256) the bound is as wide
    as the HF double rounding's own per-row noise, so there the element-wise check does the work.
    The Triton interpreter's bf16 conversion truncates (biased, see tolerances.yaml): bf16 is not
    checked there."""
    if ck.dtype_name == "bf16" and triton_interpreter():
        return
    o, g = golden._f64(out).reshape(-1, out.shape[-1]), want.reshape(-1, want.shape[-1])
    scale = (o * g).sum(-1) / (g * g).sum(-1)
    n = min(out.shape[-1], 2 ** SIGNIFICAND_BITS[ck.dtype_name])
    bound = 16 * UNIT_ROUNDOFF[ck.dtype_name] / n**0.5 + ck.tolerance_of("fp32").rtol
    ck.close(f"{what}: per-row scale vs golden", scale, torch.ones_like(scale), tol=Tolerance(bound, 0.0))


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


@pytest.mark.parametrize("case", ["small-variance", "large-mean"])
def test_layer_norm_conditioning(checker, dtype, device, case):
    """The indexer key norm's width (128). small-variance: rows of std 1 down to 3e-4, where eps
    (1e-6 here, the indexer's) dominates the variance. large-mean: rows of mean 100 and std 1, where
    a one-pass E[x^2] - E[x]^2 variance cancels catastrophically in fp32."""
    ck = checker("layer_norm", case)
    gen = generator("layer_norm", case, dtype)
    D = 128
    if case == "small-variance":
        x = _graded_rows(gen, ck.dtype, device, D)
    else:
        x = (torch.randn(6, D, generator=gen, dtype=torch.float64) + 100.0).to(device=device, dtype=ck.dtype)
    w = randn(gen, (D,), ck.dtype, device, scale=0.5) + 1
    b = randn(gen, (D,), ck.dtype, device, scale=0.5)
    out = ck.fn(x, w, b, EPS)
    ck.shape_dtype("out", out, x.shape, ck.dtype)
    tol = ck.tol
    if case == "large-mean":
        # Any fp32 algorithm rounds the mean (|mean| 2^-24 absolute); divided by the std (1) and
        # times |w| that is the error floor of a correct two-pass or Welford norm. A one-pass
        # variance is ~|mean|/std times worse than this and still fails.
        tol = Tolerance(tol.atol + 4 * 2.0**-24 * 100.0 * float(w.abs().max()), tol.rtol)
    ck.close("out", out, golden.layer_norm(x, w, b, EPS), tol=tol)


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
