"""Triton kernels for quantized weights: per-token(-group) activation quantization and the block-FP8 /
INT8 W8A8 GEMMs, grouped over expert row tiles (a plain linear is one expert).

Imported lazily by ``quant_adapters.py`` (``TRITON_INTERPRET`` is read when ``@triton.jit`` runs).
Design after vLLM's ``w8a8_block_fp8_matmul`` / DeepGEMM (activations quantized by a separate
per-token-group kernel; the GEMM walks K in 128-wide steps so each step has one activation scale
per row and one weight scale per 128 output columns, and applies them to the fp32 partial product)
and vLLM's ``triton_scaled_mm`` (INT8: exact int32 accumulation, both scales applied once at the end).
Read, not copied: vllm/model_executor/layers/quantization/utils/fp8_utils.py and
vllm/model_executor/layers/quantization/compressed_tensors/triton_scaled_mm.py.

Rounding follows the contract in :mod:`hwlayer.ops.quant`: scale ``max(amax, 1e-10) / qmax`` and the
quotient ``x / s`` with correctly rounded fp32 division (``tl.div_rn``), e4m3 by the round-to-nearest-
even cast, int8 by round half to even. In the interpreter (``TRITON_INTERPRET=1``) the float8 cast and
``tl.dot`` on e4m3 / int8 operands are emulated with numpy, which is what CI runs.
"""

from __future__ import annotations

import triton
import triton.language as tl

GROUP = 128  # activation group width and weight scale block


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3_grid(v):
    """``v`` (|v| <= 448) rounded to the nearest e4m3 value, ties to even, in fp32 arithmetic: step
    2^(e-3) in binade e, subnormal step 2^-9 below 2^-6. Used under the interpreter only: its
    fp32 -> float8e4nv cast drops the carry when rounding crosses a power of two (127.9 -> 64, not
    128; Triton 3.9), while the GPU's cvt.rn.satfinite rounds correctly."""
    a = tl.abs(v)
    e = tl.maximum(tl.floor(tl.log2(tl.maximum(a, 1e-30))), -6.0)
    step = tl.exp2(e - 3.0)
    r = _round_half_even(a / step) * step
    return tl.where(v < 0, -r, r)


@triton.jit
def fp8_act_quant_kernel(x_ptr, q_ptr, s_ptr, K, KB, GROUP_SIZE: tl.constexpr, ROUND_IN_FP32: tl.constexpr):
    """Grid (T, ceil(K/128)): one token's one 128-wide group -> e4m3 values and one fp32 scale."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = offs < K
    x = tl.load(x_ptr + t * K + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.div_rn(tl.maximum(tl.max(tl.abs(x), 0), 1e-10), 448.0)
    q = tl.minimum(tl.maximum(tl.div_rn(x, s), -448.0), 448.0)
    if ROUND_IN_FP32:
        q = _round_to_e4m3_grid(q)
    tl.store(q_ptr + t * K + offs, q.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + t * KB + g, s)


@triton.jit
def int8_act_quant_kernel(x_ptr, q_ptr, s_ptr, K, BLOCK: tl.constexpr):
    """Grid (T,): one token -> int8 values and one fp32 scale (two passes over K: amax, then quantize)."""
    t = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + t * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.div_rn(tl.maximum(tl.max(amax, 0), 1e-10), 127.0)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + t * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_round_half_even(tl.div_rn(x, s)), -127.0), 127.0)
        tl.store(q_ptr + t * K + offs, q.to(tl.int8), mask=offs < K)
    tl.store(s_ptr + t, s)


@triton.jit
def fp8_block_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_expert, tile_row0, tile_row1, E, N, K, KB, NB,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr):
    """Grid (row tiles, ceil(N/BLOCK_N)). ``a`` e4m3 [M, K] + ``as`` fp32 [M, KB]; ``b`` e4m3 [E, N, K] +
    ``bs`` fp32 [E, NB, KB]; a tile's rows [row0, row1) all belong to expert ``tile_expert``."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert + pid_t).to(tl.int64)
    if e >= E:  # a spare tile (the tile count is a host-side bound)
        return
    row0 = tl.load(tile_row0 + pid_t)
    row1 = tl.load(tile_row1 + pid_t)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row1
    mask_n = offs_n < N
    b_base = b_ptr + e * N * K
    bs_base = bs_ptr + e * NB * KB
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, KB):
        offs_k = kb * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        a_s = tl.load(as_ptr + offs_m.to(tl.int64) * KB + kb, mask=mask_m, other=0.0)
        b_s = tl.load(bs_base + (offs_n // GROUP_SIZE) * KB + kb, mask=mask_n, other=0.0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def int8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, tile_expert, tile_row0, tile_row1, E, N, K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (row tiles, ceil(N/BLOCK_N)). ``a`` int8 [M, K] + ``as`` fp32 [M]; ``b`` int8 [E, N, K] +
    ``bs`` fp32 [E, N]. int32 accumulation (exact), scaled once: ``acc * as[m] * bs[n]``."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert + pid_t).to(tl.int64)
    if e >= E:  # a spare tile (the tile count is a host-side bound)
        return
    row0 = tl.load(tile_row0 + pid_t)
    row1 = tl.load(tile_row1 + pid_t)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row1
    mask_n = offs_n < N
    b_base = b_ptr + e * N * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(b_base + offs_n[:, None].to(tl.int64) * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc += tl.dot(a, tl.trans(b), out_dtype=tl.int32)
    a_s = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
    b_s = tl.load(bs_ptr + e * N + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    c = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
