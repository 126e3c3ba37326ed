"""The Triton tier's quantized ops: ``quant_linear`` and ``quant_grouped_gemm`` (``quant_fused_experts``,
the composite, picks the grouped one up through the plan).

Each call: one activation-quantization launch (fp8_block: grid (T, ceil(K/128)); int8: grid (T,)),
then one GEMM launch over row tiles x N tiles (``quant_kernels.py``). ``supports`` declines what the
kernels do not take -- non-QuantizedWeight, devices Triton cannot run on, fp8 on a GPU below compute
capability 8.9 (no e4m3 tensor cores) -- and the call goes to the next tier (generic torch).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from hwlayer.ops.layout import FLOAT_DTYPES, INDEX_DTYPES
from hwlayer.ops.quant import QuantizedWeight

from .adapters import _device_ok, interpreting

BLOCK_M, BLOCK_N, INT8_BLOCK_K, ACT_BLOCK = 32, 64, 64, 256


def _qk() -> Any:
    from . import quant_kernels

    return quant_kernels


def _format_ok(qweight: QuantizedWeight) -> bool | str:
    if qweight.format not in ("fp8_block", "int8"):
        return f"{qweight.format}: no Triton kernel here (fp8_block and int8 only; the generic op runs it)"
    if qweight.act_scale_fmt is not None:
        return f"act_scale_fmt {qweight.act_scale_fmt!r}: the kernels' activation scales are plain fp32"
    if not qweight.data.is_contiguous():
        return "weight data not contiguous (prepared for another backend's layout)"
    if qweight.format == "fp8_block" and qweight.device.type == "cuda":
        if torch.cuda.get_device_capability(qweight.device) < (8, 9):
            return "fp8_block needs compute capability >= 8.9 (e4m3 tensor cores)"
    return True


def quant_linear_supports(x: Any, qweight: Any) -> bool | str:
    if not isinstance(x, torch.Tensor) or not isinstance(qweight, QuantizedWeight):
        return "x or qweight outside the contract"
    if x.dtype not in FLOAT_DTYPES or x.dim() < 1 or qweight.dim() != 2 or qweight.shape[1] != x.shape[-1]:
        return "x/qweight shapes or dtype outside the contract"
    ok = _format_ok(qweight)
    return ok if ok is not True else _device_ok(x, qweight.data, qweight.scale)


def quant_grouped_gemm_supports(x: Any, qweight: Any, group_sizes: Any) -> bool | str:
    if not isinstance(x, torch.Tensor) or not isinstance(qweight, QuantizedWeight) or not isinstance(
            group_sizes, torch.Tensor):
        return "argument types outside the contract"
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or qweight.dim() != 3 or qweight.shape[2] != x.shape[1]:
        return "x/qweight outside the contract"
    if group_sizes.dim() != 1 or group_sizes.dtype not in INDEX_DTYPES or group_sizes.shape[0] != qweight.shape[0]:
        return "group_sizes outside the contract"
    if _value_checks() and (int(group_sizes.sum()) > x.shape[0] or bool((group_sizes < 0).any())):
        return "group_sizes do not fit the rows"  # the generic op names it
    ok = _format_ok(qweight)
    return ok if ok is not True else _device_ok(x, qweight.data, qweight.scale, group_sizes)


def _value_checks() -> bool:
    """Checks that read tensor values (a device->host sync) only under HWLAYER_CHECK=1."""
    return os.environ.get("HWLAYER_CHECK", "") not in ("", "0")


def row_tiles(group_sizes: torch.Tensor, num_rows: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """Row tiles that never straddle experts, ``(expert, row0, row1)`` int32, for a number of tiles
    known on the host, ``cdiv(num_rows, block_m) + E`` (each expert adds at most one partial tile);
    tiles past the last real one get expert ``E`` and launch programs that return at once. Rows past
    ``sum(group_sizes)`` (padding) belong to no tile. No host read of the sizes."""
    sizes = group_sizes.long()
    E = sizes.numel()
    max_tiles = -(-num_rows // block_m) + E
    ends = sizes.cumsum(0)
    tiles = (sizes + block_m - 1) // block_m
    tiles_end = tiles.cumsum(0)
    index = torch.arange(max_tiles, device=sizes.device)
    expert = torch.searchsorted(tiles_end, index, right=True)
    safe = expert.clamp(max=E - 1)
    row0 = (ends - sizes)[safe] + (index - (tiles_end - tiles)[safe]) * block_m
    return expert.to(torch.int32), row0.to(torch.int32), ends[safe].to(torch.int32)


def quantize_activation(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's activation quantization on the device: fp8_block -> (e4m3 [T, K], fp32 [T, KB]);
    int8 -> (int8 [T, K], fp32 [T])."""
    k = _qk()
    x = x.contiguous()
    T, K = x.shape
    if fmt == "fp8_block":
        kb = k.cdiv(K, k.GROUP)
        q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x.device)
        s = torch.empty(T, kb, dtype=torch.float32, device=x.device)
        if T and K:
            k.fp8_act_quant_kernel[(T, kb)](x, q, s, K, kb, GROUP_SIZE=k.GROUP, ROUND_IN_FP32=interpreting())
    else:
        q = torch.empty(T, K, dtype=torch.int8, device=x.device)
        s = torch.empty(T, dtype=torch.float32, device=x.device)
        if T and K:
            k.int8_act_quant_kernel[(T,)](x, q, s, K, BLOCK=ACT_BLOCK)
    return q, s


def _gemm(x: torch.Tensor, qweight: QuantizedWeight, expert: torch.Tensor, row0: torch.Tensor,
          row1: torch.Tensor) -> torch.Tensor:
    k = _qk()
    M, K = x.shape
    N = qweight.shape[-2]
    out = torch.zeros(M, N, dtype=x.dtype, device=x.device)  # padding rows stay zero, as the generic's
    if not (expert.numel() and N and M):
        return out
    q, s = quantize_activation(x, qweight.format)
    data, scale = qweight.data.contiguous(), qweight.scale.contiguous()
    grid = (expert.numel(), k.cdiv(N, BLOCK_N))
    E = qweight.shape[0]
    if qweight.format == "fp8_block":
        k.fp8_block_gemm_kernel[grid](q, s, data, scale, out, expert, row0, row1, E, N, K, s.shape[1],
                                      scale.shape[-2], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, GROUP_SIZE=k.GROUP)
    else:
        k.int8_gemm_kernel[grid](q, s, data, scale, out, expert, row0, row1, E, N, K,
                                 BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=INT8_BLOCK_K)
    return out


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    tiles = -(-M // BLOCK_M)
    row0 = torch.arange(0, tiles * BLOCK_M, BLOCK_M, dtype=torch.int32, device=x.device)
    expert = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    row1 = torch.full((tiles,), M, dtype=torch.int32, device=x.device)
    data, scale = qweight.data.unsqueeze(0), qweight.scale.unsqueeze(0)  # one "expert"
    out = _gemm(x2, QuantizedWeight(qweight.format, data, scale), expert, row0, row1)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def quant_grouped_gemm(x: torch.Tensor, qweight: QuantizedWeight, group_sizes: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 0 or qweight.shape[0] == 0:
        return torch.zeros(x.shape[0], qweight.shape[1], dtype=x.dtype, device=x.device)
    expert, row0, row1 = row_tiles(group_sizes, x.shape[0], BLOCK_M)
    out = _gemm(x, qweight, expert, row0, row1)
    return out


IMPLEMENTATIONS = {
    "quant_linear": (quant_linear, quant_linear_supports),
    "quant_grouped_gemm": (quant_grouped_gemm, quant_grouped_gemm_supports),
}
