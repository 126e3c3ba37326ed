"""CPU emulation of the quantized ``torch_npu`` ops the Ascend quant adapters call (W8A8 / W4A8).

Installed into the emulated ``torch_npu`` module after :mod:`.torch_npu` (whose unquantized
``npu_grouped_matmul`` the quantized one here delegates to). Each op is an opaque
``torch.library.custom_op`` with a ``register_fake`` (so a traced / compiled caller sees one op, as
with the real extension), behind a Python wrapper with torch_npu's signature. The arithmetic follows
op-plugin's own tests (Ascend/op-plugin@517f2e7d0f202f38b76310706cb977ca2388ad21,
``test/test_custom_ops/``), where prose and tests disagree the tests win:

* ``npu_quantize``: ``test_npu_quantize.py`` ``cpu_op_exec_ascend_quant_v2`` -- ``div_mode=False``:
  ``clip(round(x * scales + zero_points), -128, 127)`` int8 (numpy round: half to even).
* ``npu_dynamic_quant``: ``test_npu_dynamic_quant.py`` ``supported_op_exec`` -- per row
  ``scale = amax(|x|) / 127``, ``round(x / scale)`` int8, scales fp32 ``[rows]``.
* ``npu_quant_matmul``: ``test_npu_quant_matmul.py`` ``test_npu_quant_matmul_a8w8`` /
  ``_a4w4_pertoken`` -- ``int32(x1) @ int32(x2) * scale (* pertoken_scale)``; an int32 ``bias`` is
  added to the int32 product before the scale (torch_npu-npu_quant_matmul.md); ``x2`` may be the
  transposed view of ``[N, K]``.
* ``npu_grouped_matmul`` (quantized, single tensor, ``group_list_type=1`` counts):
  int8 weights: ``(x @ w) * scale * per_token_scale`` (as vllm-ascend's W8A8_DYNAMIC MoE uses it);
  int4 weights packed in int32 ``[E, K, N/8]`` (LSB first) with int64 scales (fp32 bits in the low
  32) and a float bias: ``test_npu_grouped_matmul.py`` ``test_npu_grouped_matmul_A8W4`` golden --
  each int8 activation split into ``x // 16`` and ``(x & 15) - 8``, both multiplied by the int4
  weight, scaled and rounded through fp16 as the golden accumulates, ``16 * hi + lo + bias``, times
  the per-token scale.
* ``npu_format_cast``: the identity (the emulator has no FRACTAL_NZ; layouts stay ND).
"""

from __future__ import annotations

import types
from typing import Callable

import torch

from ._common import check

SOURCE = "Ascend/op-plugin@517f2e7d test/test_custom_ops (quantize, dynamic_quant, quant_matmul, grouped_matmul A8W4)"
_NS = "hwlayer_npu_quant_emu"


@torch.library.custom_op(f"{_NS}::quantize", mutates_args=())
def _quantize(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, div_mode: bool) -> torch.Tensor:
    x, s, z = x.float(), scales.float(), zero_points.float()
    v = x / s + z if div_mode else x * s + z
    return torch.round(v).clamp(-128, 127).to(torch.int8)


@_quantize.register_fake
def _(x, scales, zero_points, div_mode):
    return torch.empty_like(x, dtype=torch.int8)


@torch.library.custom_op(f"{_NS}::dynamic_quant", mutates_args=())
def _dynamic_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.float()
    scale = x2.abs().amax(dim=-1) / 127
    return torch.round(x2 / scale.unsqueeze(-1)).clamp(-128, 127).to(torch.int8), scale


@_dynamic_quant.register_fake
def _(x):
    return torch.empty_like(x, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::quant_matmul", mutates_args=())
def _quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, pertoken_scale: torch.Tensor | None,
                  bias: torch.Tensor | None, output_dtype: torch.dtype) -> torch.Tensor:
    acc = x1.to(torch.int64) @ x2.to(torch.int64)  # exact (int32 on the device; no overflow at these K)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    out = acc.double() * _fp32_scale(scale).double()
    if pertoken_scale is not None:
        out = out * pertoken_scale.double().unsqueeze(-1)
    return out.to(output_dtype)


@_quant_matmul.register_fake
def _(x1, x2, scale, pertoken_scale, bias, output_dtype):
    return x1.new_empty(x1.shape[0], x2.shape[1], dtype=output_dtype)


def _fp32_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as fp32: int64 holds the fp32 bit pattern in its low 32 bits (npu_trans_quant_param)."""
    if scale.dtype == torch.int64:
        return (scale & 0xFFFFFFFF).to(torch.int32).view(torch.float32)
    return scale.float()


def _unpack_int4_lsb_first(w: torch.Tensor) -> torch.Tensor:
    """int32 ``[..., N/8]`` -> int ``[..., N]`` (eight signed nibbles, least significant first)."""
    b = w.contiguous().view(torch.uint8).to(torch.int16)  # little-endian bytes: nibble pairs in N order
    lo, hi = b & 0xF, b >> 4
    v = torch.stack((lo, hi), dim=-1).reshape(*w.shape[:-1], w.shape[-1] * 8)
    return torch.where(v > 7, v - 16, v)


@torch.library.custom_op(f"{_NS}::grouped_matmul_quant", mutates_args=())
def _grouped_matmul_quant(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, per_token_scale: torch.Tensor,
                          bias: torch.Tensor | None, counts: list[int], output_dtype: torch.dtype) -> torch.Tensor:
    E = weight.shape[0]
    int4 = weight.dtype == torch.int32
    w = _unpack_int4_lsb_first(weight) if int4 else weight.to(torch.int16)  # [E, K, N]
    s = _fp32_scale(scale).reshape(E, -1)  # [E, N]
    out = torch.zeros(x.shape[0], w.shape[2], dtype=output_dtype)
    start = 0
    for e, n in enumerate(counts):
        xe = x[start : start + n].to(torch.int64)
        we = w[e].to(torch.int64)
        pts = per_token_scale[start : start + n].double().unsqueeze(-1)
        if int4:  # op-plugin's A8W4 golden: x = 16 * (x // 16) + ((x & 15) - 8) + 8
            hi, lo = torch.div(xe, 16, rounding_mode="floor"), (xe & 0xF) - 8
            mm_hi = ((hi @ we).double() * s[e].double()).to(torch.float16).double()
            mm_lo = ((lo @ we).double() * s[e].double()).to(torch.float16).double()
            y = (mm_hi * 16 + mm_lo + bias[e].double()) * pts
        else:
            y = (xe @ we).double() * s[e].double() * pts
        out[start : start + n] = y.to(output_dtype)
        start += n
    return out


@_grouped_matmul_quant.register_fake
def _(x, weight, scale, per_token_scale, bias, counts, output_dtype):
    n = weight.shape[2] * (8 if weight.dtype == torch.int32 else 1)
    return x.new_empty(x.shape[0], n, dtype=output_dtype)


# ---- torch_npu signatures ---------------------------------------------------------------------------


# Signatures: op-plugin@517f2e7d op_plugin/config/op_plugin_functions.yaml (``func:`` schemas).


def npu_quantize(self: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, dtype: torch.dtype,
                 axis: int = 1, div_mode: bool = True) -> torch.Tensor:
    check(dtype == torch.qint8, "npu_quantize: emulator covers dtype=torch.qint8 (int8 output)")
    check(axis == -1 and scales.shape[-1] in (1, self.shape[-1]), "npu_quantize: scales along the last axis")
    zp = zero_points if zero_points is not None else torch.zeros_like(scales)
    return torch.ops.hwlayer_npu_quant_emu.quantize(self, scales, zp, div_mode)


def npu_dynamic_quant(input: torch.Tensor, *, smooth_scales: torch.Tensor | None = None,
                      group_index: torch.Tensor | None = None, dst_type: torch.dtype | None = None,
                      quant_mode: str = "pertoken", dst_type_max: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    check(smooth_scales is None and group_index is None and dst_type in (None, torch.int8) and quant_mode == "pertoken",
          "npu_dynamic_quant: emulator covers the plain int8 per-token case")
    check(input.dtype in (torch.float16, torch.bfloat16), "npu_dynamic_quant: input must be float16 or bfloat16")
    return torch.ops.hwlayer_npu_quant_emu.dynamic_quant(input)


def npu_quant_matmul(x1: torch.Tensor, x2: torch.Tensor, scale: torch.Tensor, *, offset: torch.Tensor | None = None,
                     pertoken_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     output_dtype: torch.dtype | None = None, x1_dtype=None, x2_dtype=None, pertoken_scale_dtype=None,
                     scale_dtype=None, group_sizes=None, y_scale=None) -> torch.Tensor:
    check(x1.dtype == x2.dtype == torch.int8, "npu_quant_matmul: emulator covers int8 x int8")
    check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], "npu_quant_matmul: x1 [M, K], x2 [K, N]")
    check(x2.is_contiguous() or x2.t().is_contiguous(), "npu_quant_matmul: x2 contiguous or transposed")
    check(scale.dim() == 1 and scale.shape[0] in (1, x2.shape[1]), "npu_quant_matmul: scale [1] or [N]")
    check(offset is None and group_sizes is None and y_scale is None, "npu_quant_matmul: emulator covers offset, "
          "group_sizes and y_scale None")
    check(bias is None or (bias.dtype == torch.int32 and bias.shape == (x2.shape[1],)),
          "npu_quant_matmul: emulator covers an int32 [N] bias")
    check(pertoken_scale is None or pertoken_scale.shape == (x1.shape[0],), "npu_quant_matmul: pertoken_scale [M]")
    return torch.ops.hwlayer_npu_quant_emu.quant_matmul(x1, x2, scale, pertoken_scale, bias,
                                                        output_dtype or torch.int8)


def npu_format_cast(input: torch.Tensor, acl_format: int, customize_dtype=None) -> torch.Tensor:
    return input


def _grouped(unquantized: Callable) -> Callable:
    def npu_grouped_matmul(x: list[torch.Tensor], weight: list[torch.Tensor], *, bias=None, scale=None, offset=None,
                           antiquant_scale=None, antiquant_offset=None, per_token_scale=None, group_list=None,
                           activation_input=None, activation_quant_scale=None, activation_quant_offset=None,
                           split_item: int = 0, group_type: int | None = None, group_list_type: int = 0,
                           act_type: int = 0, output_dtype: torch.dtype | None = None, tuning_config=None):
        if scale is None and per_token_scale is None:
            return unquantized(x, weight, bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                               antiquant_offset=antiquant_offset, per_token_scale=per_token_scale,
                               group_list=group_list, activation_input=activation_input,
                               activation_quant_scale=activation_quant_scale,
                               activation_quant_offset=activation_quant_offset, split_item=split_item,
                               group_type=group_type, group_list_type=group_list_type, act_type=act_type,
                               output_dtype=output_dtype, tuning_config=tuning_config)
        check(len(x) == 1 and len(weight) == 1 and split_item in (2, 3) and group_type == 0 and group_list_type == 1,
              "npu_grouped_matmul: emulator covers the quantized single-tensor case with counts (group_list_type 1)")
        a, w = x[0], weight[0]
        check(a.dtype == torch.int8 and a.dim() == 2, "npu_grouped_matmul: quantized x is int8 [M, K]")
        check(w.dim() == 3 and w.shape[1] == a.shape[1] and w.dtype in (torch.int8, torch.int32),
              "npu_grouped_matmul: weight int8 [E, K, N] or int4-packed int32 [E, K, N/8]")
        int4 = w.dtype == torch.int32
        check(not int4 or w.is_contiguous(), "npu_grouped_matmul: int4 weight must be contiguous [E, K, N/8]")
        transposed = w.stride(1) == 1 and w.stride(2) == w.shape[1]
        check(w.is_contiguous() or transposed, "npu_grouped_matmul: weight contiguous [E, K, N] or its transpose")
        E, N = w.shape[0], w.shape[2] * (8 if int4 else 1)
        (s,), (pts,) = scale, per_token_scale
        check(s.numel() == E * N and (s.dtype == torch.int64 if int4 else s.dtype in (torch.bfloat16, torch.float32)),
              "npu_grouped_matmul: scale [E, N] (int4: int64 [E, 1, N] fp32 bits)")
        check(pts.shape == (a.shape[0],) and pts.dtype == torch.float32, "npu_grouped_matmul: per_token_scale [M]")
        check(not int4 or (bias is not None and bias[0].shape == (E, N)), "npu_grouped_matmul: A8W4 needs bias [E, N]")
        check(int4 or bias is None, "npu_grouped_matmul: emulator covers the int8 case without bias")
        counts = group_list.tolist()
        check(len(counts) == E and sum(counts) == a.shape[0] and min(counts) >= 0,
              "npu_grouped_matmul: counts per group summing to x's rows")
        out = torch.ops.hwlayer_npu_quant_emu.grouped_matmul_quant(a, w, s, pts, bias[0] if bias else None, counts,
                                                                  output_dtype or torch.bfloat16)
        return [out]

    return npu_grouped_matmul


def install(module: types.ModuleType) -> None:
    """Add the quantized ops to an emulated ``torch_npu`` that :func:`.torch_npu.install` filled."""
    module.npu_grouped_matmul = _grouped(module.npu_grouped_matmul)
    for fn in (npu_quantize, npu_dynamic_quant, npu_quant_matmul, npu_format_cast):
        setattr(module, fn.__name__, fn)
    module.EMULATED_FROM = f"{module.EMULATED_FROM}; {SOURCE}"
