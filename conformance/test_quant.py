"""Quantized ops: quant_linear (partial groups and blocks, 3-D input, empty), quant_grouped_gemm (empty
groups), quant_fused_experts (dropped ids), in fp8_block and int8, against the float64 goldens of
``golden_quant.py``. Each case also checks that its data tells the contract apart from a wrong
reading of it (per-token instead of per-group scales, transposed weight-scale blocks, truncation,
one scale per tensor): an implementation making that mistake would fail the case."""

from __future__ import annotations

import pytest
import torch

from hwlayer.ops.quant import QuantizedWeight, quantize_weight, quantize_weight_static, static_activation_params

from . import golden_quant as gq
from .cases import generator, randn
from .checks import error_figures

FORMATS = ("fp8_block", "int8", "w4a8")
MUTANTS = {"fp8_block": [("per_token", ""), ("truncate", ""), ("", "transposed")],
           "int8": [("truncate", ""), ("per_tensor", "")],
           "w4a8": [("truncate", ""), ("", "nibble_swap")]}


def _activations(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Rows whose 128-wide groups differ in magnitude by up to 10^4 (so grouping matters)."""
    K = shape[-1]
    groups = -(-K // gq.BLOCK)
    factor = 10 ** (torch.rand(*shape[:-1], groups, generator=gen, dtype=torch.float64) * 4 - 2)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * factor.repeat_interleave(gq.BLOCK, -1)[..., :K]
    return x.to(device=device, dtype=dtype)


def _weight(gen: torch.Generator, shape: tuple[int, ...], fmt: str, device, group_size: int = 0) -> QuantizedWeight:
    """A weight whose 128x128 blocks (fp8_block) or rows (int8) differ in magnitude by up to 10^2."""
    N, K = shape[-2:]
    nb, kb = -(-N // gq.BLOCK), -(-K // gq.BLOCK)
    factor = 10 ** (torch.rand(*shape[:-2], nb, kb, generator=gen, dtype=torch.float64) * 2 - 1)
    factor = factor.repeat_interleave(gq.BLOCK, -2)[..., :N, :].repeat_interleave(gq.BLOCK, -1)[..., :K]
    w = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.05 * factor
    return quantize_weight(w.float(), fmt, group_size).to(device)


def _mutants_fail(golden_fn, fmt: str, golden: torch.Tensor, tol, k: int, dtype: str) -> None:
    """The case's data must tell each wrong reading of the contract apart from the contract. Checked
    at fp32, whose tolerance is tight; bf16/fp16 output rounding can hide a mistake in one case, and
    the fp32 run of the same implementation catches it."""
    if dtype != "fp32":
        return
    for act_variant, weight_variant in MUTANTS[fmt]:
        wrong = golden_fn(act_variant, weight_variant)
        fig = error_figures(wrong, golden, tol.atol_at(k), tol.rtol)
        assert fig.ratio > 1, f"test data: variant {act_variant or weight_variant!r} is within tolerance of the golden"


LINEAR_CASES = {
    # name: (x shape, N): K = 200 and N = 300 leave partial groups and blocks
    "partial-blocks": ((5, 200), 300),
    "3d-input": ((2, 3, 256), 130),
    "empty": ((0, 256), 128),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_quant_linear(checker, plan, dtype, device, fmt, case):
    ck = checker("quant_linear", f"{fmt}-{case}")
    gen = generator("quant_linear", fmt, case, dtype)
    xshape, N = LINEAR_CASES[case]
    x = _activations(gen, xshape, ck.dtype, device)
    qw = plan.prepare_weight("w", _weight(gen, (N, xshape[-1]), fmt, device))  # as the loader does, once
    out = ck.fn(x, qw)
    ck.shape_dtype("out", out, (*xshape[:-1], N), ck.dtype)
    tol, K = gq.TOLERANCES[dtype], xshape[-1]
    golden = gq.quant_linear(x, qw.data, qw.scale, fmt)
    ck.close("out", out, golden, k=K, tol=tol)
    if case != "empty":
        _mutants_fail(lambda a, w: gq.quant_linear(x, qw.data, qw.scale, fmt, a, w), fmt, golden, tol, K, dtype)
    if case == "partial-blocks":
        ck.time(x, qw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", ["empty-groups", "padding-rows"])
def test_quant_grouped_gemm(checker, plan, dtype, device, fmt, case):
    """Experts with no rows; and rows past sum(group_sizes) (moe_permute's dropped assignments),
    whose output the contract leaves unspecified, so only the grouped rows are compared."""
    ck = checker("quant_grouped_gemm", f"{fmt}-{case}")
    gen = generator("quant_grouped_gemm", fmt, case, dtype)
    sizes, K, N = [3, 0, 2, 4], 160, 144
    M = sum(sizes) + (3 if case == "padding-rows" else 0)
    x = _activations(gen, (M, K), ck.dtype, device)
    qw = plan.prepare_weight("experts.w13", _weight(gen, (len(sizes), N, K), fmt, device))
    out = ck.fn(x, qw, torch.tensor(sizes, dtype=torch.int64, device=device))
    ck.shape_dtype("out", out, (M, N), ck.dtype)
    tol, rows = gq.TOLERANCES[dtype], sum(sizes)
    golden = gq.quant_grouped_gemm(x[:rows], qw.data, qw.scale, fmt, sizes)
    ck.close("out", out[:rows], golden, k=K, tol=tol)
    _mutants_fail(lambda a, w: gq.quant_grouped_gemm(x[:rows], qw.data, qw.scale, fmt, sizes, a, w),
                  fmt, golden, tol, K, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_fused_experts(checker, plan, dtype, device, fmt):
    ck = checker("quant_fused_experts", f"{fmt}-dropped-ids")
    gen = generator("quant_fused_experts", fmt, dtype)
    T, k, E, D, inter = 6, 2, 4, 144, 128
    # Plain normal rows: between the GEMMs the contract rounds to x.dtype, and in bf16/fp16 one ulp
    # there can move a group's amax and so every fp8 step of the group; wide ranges magnify that.
    x = randn(gen, (T, D), ck.dtype, device)
    w13 = plan.prepare_weight("experts.w13", _weight(gen, (E, 2 * inter, D), fmt, device))
    w2 = plan.prepare_weight("experts.w2", _weight(gen, (E, D, inter), fmt, device))
    ids = torch.randint(0, E, (T, k), generator=gen, dtype=torch.int32)
    ids[1, 0], ids[4, 1] = -1, E  # dropped: not an expert of this rank
    weights = randn(gen, (T, k), torch.float32, torch.device("cpu"), scale=0.5).abs()
    out = ck.fn(x, w13, w2, weights.to(device), ids.to(device))
    ck.shape_dtype("out", out, (T, D), ck.dtype)
    golden = gq.quant_fused_experts(x.cpu(), (w13.data.cpu(), w13.scale.cpu()), (w2.data.cpu(), w2.scale.cpu()),
                                    fmt, weights, ids)
    tol = gq.FUSED_FP8_LOWP if fmt == "fp8_block" and dtype != "fp32" else gq.FUSED_TOLERANCES[dtype]
    ck.close("out", out, golden, k=D, tol=tol)


@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_quant_linear_w8a8_static(checker, plan, dtype, device, case):
    """msmodelslim W8A8 (static): one asymmetric scale + integer offset for the whole activation,
    int32 ``quant_bias`` and ``deq_scale``. The activation range is calibrated on other data, so
    some values clamp at -128 / 127 (as a deployed static scale does)."""
    ck = checker("quant_linear", f"w8a8_static-{case}")
    gen = generator("quant_linear", "w8a8_static", case, dtype)
    xshape, N = LINEAR_CASES[case]
    K = xshape[-1]
    x = (randn(gen, xshape, torch.float32, torch.device("cpu")) + 0.7).to(device=device, dtype=ck.dtype)
    w = randn(gen, (N, K), torch.float32, torch.device("cpu"), scale=0.05)
    s, o = static_activation_params(-2.0, 3.0)
    qw = plan.prepare_weight("o_proj", quantize_weight_static(w, s, o).to(device))
    out = ck.fn(x, qw)
    ck.shape_dtype("out", out, (*xshape[:-1], N), ck.dtype)
    tol = gq.TOLERANCES[dtype]
    args = (x, qw.data, qw.scale, float(qw.input_scale), float(qw.input_offset), qw.bias)
    golden = gq.quant_linear_static(*args)
    ck.close("out", out, golden, k=K, tol=tol)
    if case != "empty" and dtype == "fp32":
        for variant in ("symmetric", "no_bias", "truncate"):
            fig = error_figures(gq.quant_linear_static(*args, variant=variant), golden, tol.atol_at(K), tol.rtol)
            assert fig.ratio > 1, f"test data: variant {variant!r} is within tolerance of the golden"


@pytest.mark.parametrize("fmt", ("fp8_block", "int8"))
def test_quant_linear_ue8m0(checker, plan, dtype, device, fmt):
    """``act_scale_fmt="ue8m0"`` (DeepSeek-V3.1/3.2 ``scale_fmt``): power-of-two activation scales."""
    ck = checker("quant_linear", f"{fmt}-ue8m0")
    gen = generator("quant_linear", fmt, "ue8m0", dtype)
    x = _activations(gen, (6, 256), ck.dtype, device)
    qw = plan.prepare_weight("w", _weight(gen, (130, 256), fmt, device).replace(act_scale_fmt="ue8m0"))
    out = ck.fn(x, qw)
    tol = gq.TOLERANCES[dtype]
    golden = gq.quant_linear(x, qw.data, qw.scale, fmt, ue8m0=True)
    ck.close("out", out, golden, k=256, tol=tol)
    if dtype == "fp32":
        wrong = gq.quant_linear(x, qw.data, qw.scale, fmt, "plain_scale", ue8m0=True)
        assert error_figures(wrong, golden, tol.atol_at(256), tol.rtol).ratio > 1


def test_quant_linear_w4a8_per_group(checker, plan, dtype, device):
    """w4a8 with ``group_size`` 64: one weight scale per 64 columns."""
    ck = checker("quant_linear", "w4a8-group64")
    gen = generator("quant_linear", "w4a8", "group64", dtype)
    x = _activations(gen, (5, 256), ck.dtype, device)
    qw = plan.prepare_weight("w", _weight(gen, (96, 256), "w4a8", device, group_size=64))
    out = ck.fn(x, qw)
    tol = gq.TOLERANCES[dtype]
    ck.close("out", out, gq.quant_linear(x, qw.data, qw.scale, "w4a8"), k=256, tol=tol)


def test_quant_linear_rejects_bad_input(plan, device):
    x = torch.randn(2, 64, device=device)
    qw = quantize_weight(torch.randn(32, 64), "int8").to(device)
    with pytest.raises(ValueError, match=r"quant_linear: .*qweight.*QuantizedWeight"):
        plan.quant_linear(x, torch.randn(32, 64, device=device))
    with pytest.raises(ValueError, match=r"quant_linear: .*K=48"):
        plan.quant_linear(torch.randn(2, 48, device=device), qw)
    with pytest.raises(ValueError, match=r"QuantizedWeight\(fp8_block\): scale expected float32 \[1, 1\]"):
        QuantizedWeight("fp8_block", torch.zeros(32, 64, dtype=torch.float8_e4m3fn), torch.ones(32))
    with pytest.raises(ValueError, match=r"QuantizedWeight\(w4a8\): group_size 48 does not divide K=64"):
        QuantizedWeight("w4a8", torch.zeros(16, 64, dtype=torch.int8), torch.ones(32, 1), group_size=48)
    with pytest.raises(ValueError, match=r"QuantizedWeight\(w8a8_static\): input_scale expected torch.float32 \[1\]"):
        QuantizedWeight("w8a8_static", torch.zeros(32, 64, dtype=torch.int8), torch.ones(32))
