"""Float64 goldens for the quantized ops (``quant_linear``, ``quant_grouped_gemm``, ``quant_fused_experts``).

Written independently of :mod:`hwlayer.ops.quant`: the e4m3 rounding is computed arithmetically
(exponent, 3 mantissa bits, round half to even, subnormals below 2^-6, saturation at 448) instead
of through torch's float8 cast; int8 rounding with numpy's ``rint``; weights are dequantized block
by block in Python loops. Scales and the quotient ``x / s`` are fp32 values, as the contract computes them
(``fp32(amax) / 448``, one correctly rounded fp32 division), so the golden quantizes exactly the
values the kernel does, ties included.

``variant`` switches in a deliberately wrong reading of the contract (per-token instead of
per-group activation scales, one scale per tensor, transposed weight-scale blocks, truncation
instead of rounding):
the tests check their data tells each variant apart from the contract, so an implementation that
made one of these mistakes would fail.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .checks import Tolerance

BLOCK = 128
E4M3_MAX = 448.0

# |out - golden| <= atol + atol_per_k * K + rtol * |golden|. The golden quantizes exactly as the
# contract does, so these bound fp32 accumulation and the final cast (bf16/fp16 rows of the
# fused composite are also rounded between the GEMMs, as allowed); K = the inner dimension.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-5, atol_per_k=2e-6),
    "bf16": Tolerance(atol=1.6e-2, rtol=1.6e-2, atol_per_k=1e-4),
    "fp16": Tolerance(atol=2e-3, rtol=2e-3, atol_per_k=2e-5),
}
FUSED_TOLERANCES = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-5, atol_per_k=2e-6),
    "bf16": Tolerance(atol=3e-2, rtol=3e-2, atol_per_k=5e-4),
    "fp16": Tolerance(atol=4e-3, rtol=4e-3, atol_per_k=6e-5),
}
# fp8_block in bf16/fp16: the SwiGLU output is rounded to the dtype (implementations may differ by
# one ulp there: fused or separate silu and multiply), and requantizing it to e4m3 turns a one-ulp
# change at a rounding midpoint into a whole e4m3 step (2^-3 relative) of that element, or moves a
# group's amax. Such flips are legitimate, so the low-precision fused bound is per-K wider; fp32
# stays tight (there the rounding is the same everywhere).
FUSED_FP8_LOWP = Tolerance(atol=3e-2, rtol=3e-2, atol_per_k=3e-3)


def round_e4m3(v: np.ndarray, truncate: bool = False) -> np.ndarray:
    """Round float64 values to the nearest e4m3fn value (ties to even), saturating at +-448."""
    out = np.zeros_like(v)
    for i, x in np.ndenumerate(v):
        a = abs(float(x))
        if a == 0.0:
            continue
        e = max(math.floor(math.log2(a)), -6)  # below 2^-6: subnormal spacing 2^-9
        step = 2.0 ** (e - 3)
        m = a / step
        r = math.floor(m) if truncate else _round_half_even(m)
        out[i] = math.copysign(min(r * step, E4M3_MAX), float(x))
    return out


def _round_half_even(m: float) -> float:
    f = math.floor(m)
    d = m - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return f + 1
    return f


def _div32(v: np.ndarray, s: float) -> np.ndarray:
    """``x / s`` as the contract computes it: one correctly rounded fp32 division (the quotient's
    rounding decides ties of the subsequent rounding, so the golden must not divide in float64)."""
    return (v.astype(np.float32) / np.float32(s)).astype(np.float64)


def _f32(x: float) -> float:
    return float(np.float32(x))


def quant_act(x: torch.Tensor, fmt: str, variant: str = "") -> np.ndarray:
    """The activation rows as the contract quantizes and dequantizes them, float64 ``[T, K]``."""
    a = x.detach().cpu().to(torch.float32).numpy().astype(np.float64)
    T, K = a.shape
    out = np.zeros_like(a)
    if fmt == "int8":
        for t in range(T):
            amax = np.abs(a).max(initial=0.0) if variant == "per_tensor" else np.abs(a[t]).max(initial=0.0)
            s = _f32(_f32(max(amax, 1e-10)) / 127)
            v = _div32(a[t], s)
            q = np.trunc(v) if variant == "truncate" else np.rint(v)
            out[t] = np.clip(q, -127, 127) * s
        return out
    width = K if variant == "per_token" else BLOCK
    for t in range(T):
        for g0 in range(0, K, width):
            grp = a[t, g0 : g0 + width]
            s = _f32(_f32(max(np.abs(grp).max(initial=0.0), 1e-10)) / E4M3_MAX)
            out[t, g0 : g0 + width] = round_e4m3(np.clip(_div32(grp, s), -E4M3_MAX, E4M3_MAX),
                                                 truncate=variant == "truncate") * s
    return out


def dequant_weight(data: torch.Tensor, scale: torch.Tensor, fmt: str, variant: str = "") -> np.ndarray:
    """One 2-D weight, float64 ``[N, K]``, block by block (``variant="transposed"``: scale[k_blk, n_blk])."""
    d = data.detach().cpu().to(torch.float32).numpy().astype(np.float64)
    s = scale.detach().cpu().numpy().astype(np.float64)
    if fmt == "int8":
        return d * s[:, None]
    N, K = d.shape
    out = np.empty_like(d)
    for nb in range(0, N, BLOCK):
        for kb in range(0, K, BLOCK):
            i, j = nb // BLOCK, kb // BLOCK
            sc = s[j % s.shape[0], i % s.shape[1]] if variant == "transposed" else s[i, j]
            out[nb : nb + BLOCK, kb : kb + BLOCK] = d[nb : nb + BLOCK, kb : kb + BLOCK] * sc
    return out


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fmt: str,
                 act_variant: str = "", weight_variant: str = "") -> torch.Tensor:
    """float64 ``[..., N]``."""
    x2 = x.reshape(-1, x.shape[-1])
    y = quant_act(x2, fmt, act_variant) @ dequant_weight(data, scale, fmt, weight_variant).T
    return torch.from_numpy(y).reshape(*x.shape[:-1], data.shape[0])


def quant_grouped_gemm(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fmt: str,
                       sizes: list[int], act_variant: str = "", weight_variant: str = "") -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(sizes):
        out.append(quant_linear(x[start : start + n], data[e], scale[e], fmt, act_variant, weight_variant))
        start += n
    return torch.cat(out) if out else torch.zeros(0, data.shape[1], dtype=torch.float64)


def quant_fused_experts(x: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor],
                        w2: tuple[torch.Tensor, torch.Tensor], fmt: str, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, act_variant: str = "") -> torch.Tensor:
    """Per token and slot: gate/up (rounded to x.dtype), SwiGLU in float64 (rounded to x.dtype),
    down, weighted sum. Ids outside ``[0, E)`` contribute nothing."""
    E = w13[0].shape[0]
    inter = w13[0].shape[1] // 2
    T, k = topk_ids.shape
    out = torch.zeros(T, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            e = int(topk_ids[t, j])
            if not 0 <= e < E:
                continue
            gu = quant_linear(x[t : t + 1], w13[0][e], w13[1][e], fmt, act_variant).to(x.dtype).double()
            g, u = gu[:, :inter], gu[:, inter:]
            h = (g * torch.sigmoid(g) * u).to(x.dtype)
            y = quant_linear(h, w2[0][e], w2[1][e], fmt, act_variant)
            out[t] += float(topk_weights[t, j]) * y[0].to(x.dtype).double()
    return out
