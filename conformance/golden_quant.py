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


def _pow2_up(s: float) -> float:
    """ue8m0: the smallest power of two >= s (frexp: s = m * 2^e with 0.5 <= m < 1)."""
    m, e = math.frexp(s)
    return math.ldexp(1.0, e - 1) if m == 0.5 else math.ldexp(1.0, e)


def quant_act(x: torch.Tensor, fmt: str, variant: str = "", ue8m0: bool = False) -> np.ndarray:
    """The activation rows as the contract quantizes and dequantizes them, float64 ``[T, K]``
    (``ue8m0``: scales rounded up to powers of two; ``variant="plain_scale"`` ignores that)."""
    a = x.detach().cpu().to(torch.float32).numpy().astype(np.float64)
    T, K = a.shape
    out = np.zeros_like(a)
    pow2 = ue8m0 and variant != "plain_scale"
    if fmt in ("int8", "w4a8"):
        for t in range(T):
            amax = np.abs(a).max(initial=0.0) if variant == "per_tensor" else np.abs(a[t]).max(initial=0.0)
            s = _f32(_f32(max(amax, 1e-10)) / 127)
            s = _pow2_up(s) if pow2 else s
            v = _div32(a[t], s)
            q = np.trunc(v) if variant == "truncate" else np.rint(v)
            out[t] = np.clip(q, -127, 127) * s
        return out
    width = K if variant == "per_token" else BLOCK
    for t in range(T):
        for g0 in range(0, K, width):
            grp = a[t, g0 : g0 + width]
            s = _f32(_f32(max(np.abs(grp).max(initial=0.0), 1e-10)) / E4M3_MAX)
            s = _pow2_up(s) if pow2 else s
            out[t, g0 : g0 + width] = round_e4m3(np.clip(_div32(grp, s), -E4M3_MAX, E4M3_MAX),
                                                 truncate=variant == "truncate") * s
    return out


def dequant_weight(data: torch.Tensor, scale: torch.Tensor, fmt: str, variant: str = "") -> np.ndarray:
    """One 2-D weight, float64 ``[N, K]``, block by block (``variant="transposed"``: scale[k_blk, n_blk])."""
    if fmt == "w4a8":
        d = unpack_nibbles(data, swap=variant == "nibble_swap")
        s = scale.detach().cpu().numpy().astype(np.float64)
        if s.ndim == 1:
            return d * s[:, None]
        return d * np.repeat(s, d.shape[1] // s.shape[1], axis=1)
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


def unpack_nibbles(packed: torch.Tensor, swap: bool = False) -> np.ndarray:
    """msmodelslim's int4 packing undone byte by byte, float64 ``[N, K]``: byte ``[i, k]`` holds row
    ``2i`` in its low nibble and row ``2i+1`` in its high nibble, two's complement (``swap``: the
    wrong reading, high nibble first)."""
    b = packed.detach().cpu().numpy().astype(np.int64) & 0xFF
    half, K = b.shape
    out = np.zeros((2 * half, K))
    for i in range(half):
        for k in range(K):
            lo, hi = b[i, k] & 0xF, b[i, k] >> 4
            lo, hi = (hi, lo) if swap else (lo, hi)
            out[2 * i, k] = lo - 16 if lo > 7 else lo
            out[2 * i + 1, k] = hi - 16 if hi > 7 else hi
    return out


def quant_linear(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fmt: str,
                 act_variant: str = "", weight_variant: str = "", ue8m0: bool = False) -> torch.Tensor:
    """float64 ``[..., N]``."""
    x2 = x.reshape(-1, x.shape[-1])
    w = dequant_weight(data, scale, fmt, weight_variant)
    y = quant_act(x2, fmt, act_variant, ue8m0) @ w.T
    return torch.from_numpy(y).reshape(*x.shape[:-1], w.shape[0])


def quant_linear_static(x: torch.Tensor, data: torch.Tensor, deq_scale: torch.Tensor, input_scale: float,
                        input_offset: float, quant_bias: torch.Tensor, variant: str = "") -> torch.Tensor:
    """``w8a8_static``, float64 ``[..., N]``: ``q = clip(rint(fp32(fp32(x) / s) + offset), -128, 127)``
    (the quotient one fp32 division, the offset an integer), ``(q @ data^T + quant_bias) * deq_scale``
    with the integer products summed exactly. ``variant``: ``"symmetric"`` (offset ignored),
    ``"no_bias"`` (quant_bias not added), ``"truncate"``."""
    a = x.reshape(-1, x.shape[-1]).detach().cpu().to(torch.float32).numpy().astype(np.float64)
    v = (_div32(a, input_scale).astype(np.float32) + np.float32(0 if variant == "symmetric" else input_offset))
    v = v.astype(np.float64)
    q = np.clip(np.trunc(v) if variant == "truncate" else np.rint(v), -128, 127)
    d = data.detach().cpu().numpy().astype(np.int64)
    acc = q.astype(np.int64) @ d.T
    if variant != "no_bias":
        acc = acc + quant_bias.detach().cpu().numpy().astype(np.int64)[None, :]
    y = acc.astype(np.float64) * deq_scale.detach().cpu().numpy().astype(np.float64)[None, :]
    return torch.from_numpy(y).reshape(*x.shape[:-1], data.shape[0])


def quant_grouped_gemm(x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, fmt: str,
                       sizes: list[int], act_variant: str = "", weight_variant: str = "") -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(sizes):
        out.append(quant_linear(x[start : start + n], data[e], scale[e], fmt, act_variant, weight_variant))
        start += n
    n_out = data.shape[1] * (2 if fmt == "w4a8" else 1)
    return torch.cat(out) if out else torch.zeros(0, n_out, dtype=torch.float64)


def quant_fused_experts(x: torch.Tensor, w13: tuple[torch.Tensor, torch.Tensor],
                        w2: tuple[torch.Tensor, torch.Tensor], fmt: str, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, act_variant: str = "") -> torch.Tensor:
    """Per token and slot: gate/up (rounded to x.dtype), SwiGLU in float64 (rounded to x.dtype),
    down, weighted sum. Ids outside ``[0, E)`` contribute nothing."""
    E = w13[0].shape[0]
    inter = w13[0].shape[1] // 2 * (2 if fmt == "w4a8" else 1)
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
