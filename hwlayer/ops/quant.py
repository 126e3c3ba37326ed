"""Quantized weights: formats, :class:`QuantizedWeight`, ``quant_linear``, ``quant_grouped_gemm`` and the
``quant_fused_experts`` composite, with the activation quantization inside each contract.

Weight formats (``WEIGHT_FORMATS``):

* ``fp8_block`` -- the DeepSeek-V3 / GLM-5-FP8 checkpoint layout. ``data``: ``float8_e4m3fn``
  ``[..., N, K]``; ``scale``: fp32 ``[..., ceil(N/128), ceil(K/128)]`` (the checkpoint's
  ``weight_scale_inv``), one per 128x128 block, ``w[n, k] = data[n, k] * scale[n // 128, k // 128]``.
  Activations are quantized **per token in groups of 128 along K** (the last group may be shorter):
  ``s = max(amax(|x_group|), 1e-10) / 448`` in fp32, ``q = e4m3(x / s)`` with the cast's
  round-to-nearest-even (saturated to +-448), ``x ~= q * s``. Scales are plain fp32 (no power-of-two
  rounding).
* ``int8`` -- per-output-channel W8A8 with dynamic per-token activations (vllm-ascend
  ``W8A8_DYNAMIC``, SGLang ``w8a8_int8``). ``data``: ``int8`` ``[..., N, K]`` in ``[-127, 127]``;
  ``scale``: fp32 ``[..., N]``, ``w[n, k] = data[n, k] * scale[n]``. Activations: one scale per token,
  ``s = max(amax(|x_row|), 1e-10) / 127``, ``q = clamp(round_half_even(x / s), -127, 127)``.
* ``w8a8_static`` -- msmodelslim / vllm-ascend ``W8A8`` (static, GLM-5 recipe: the attention
  projections). ``data``: ``int8`` ``[N, K]`` (symmetric per-channel weights); ``scale``: fp32
  ``[N]`` = the checkpoint's ``deq_scale`` (= input_scale x weight_scale); ``input_scale`` /
  ``input_offset``: fp32 ``[1]``, ONE asymmetric scale and integer offset for the whole activation
  tensor, calibrated offline; ``bias``: int32 ``[N]`` = ``quant_bias`` = ``round(-rowsum(data) x
  input_offset)``. Activations: ``q = clamp(round_half_even(fp32(x) / input_scale + input_offset),
  -128, 127)`` (torch_npu ``npu_quantize`` with ``div_mode=False`` multiplies by the reciprocal:
  the same up to one fp32 rounding of the quotient); ``out = (q @ data^T + bias) x scale`` (exact
  int32 accumulation, or fp32).
* ``w4a8`` -- msmodelslim / vllm-ascend ``W4A8_DYNAMIC`` (GLM-5 recipe: the routed experts).
  ``data``: ``int8`` ``[..., N/2, K]``, two signed int4 values per byte **along N** as msmodelslim
  packs them (``save/utils/pack.py`` ``w4a8_pack_int4``: row ``2i`` in the low nibble, row ``2i+1``
  in the high nibble; values in ``[-8, 7]``); the logical weight is ``[..., N, K]`` (``shape``).
  ``scale``: fp32 ``[..., N]`` per channel (``group_size`` 0, what vllm-ascend runs), or
  ``[..., N, K / group_size]`` per group (``w[n, k] = int4[n, k] * scale[n, k // group_size]``).
  Activations quantized per token exactly as ``int8``.
* ``bf16`` / ``fp16`` / ``fp32`` -- unquantized: plain tensors, ``F.linear``; not a QuantizedWeight.

Contract option ``act_scale_fmt="ue8m0"`` (DeepSeek-V3.1/3.2 configs' ``scale_fmt``; fp8_block and
int8): every dynamic activation scale is rounded UP to a power of two, ``s = 2^ceil(log2(s))``
(the scale an e8m0 exponent can hold), before quantizing. A backend that cannot honour it must
decline (``supports``), never ignore it.

The arithmetic every implementation must match (within the conformance tolerances): quantize the
activation as above, then ``out[t, n] = sum_k deq(x)[t, k] * deq(w)[n, k]`` accumulated in fp32 (an
exact int32 accumulation of the int8 products, scaled afterwards, is allowed: it only removes fp32
rounding), cast once to ``x.dtype``. The generic implementations below do literally that:
dequantize both operands to fp32 and matmul -- slow and exact, weights stay quantized in memory.

``prepare_weight`` (op): called by the loader ONCE per loaded weight; a backend may return the same
values in the layout its kernels want (transposed contiguous storage, an NPU FRACTAL_NZ cast, packed
int32), so no forward copies or converts a weight. The generic returns the weight unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail

FP8_BLOCK = 128  # rows x cols of one weight scale block, and the activation group width
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127
INT4_MIN, INT4_MAX = -8, 7
SCALE_FLOOR = 1e-10  # amax floor: an all-zero group quantizes to zeros with a finite scale

QUANTIZED_FORMATS: tuple[str, ...] = ("fp8_block", "int8", "w8a8_static", "w4a8")
# Formats whose activations are quantized dynamically per token with int8 (one scale per row).
PER_TOKEN_INT8 = ("int8", "w4a8")
ACT_SCALE_FMTS = (None, "ue8m0")
UNQUANTIZED_FORMATS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FORMATS: tuple[str, ...] = QUANTIZED_FORMATS + tuple(UNQUANTIZED_FORMATS)
_DATA_DTYPE = {"fp8_block": torch.float8_e4m3fn, "int8": torch.int8, "w8a8_static": torch.int8, "w4a8": torch.int8}


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


def check_format(fmt: str, where: str = "weight_format") -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"{where}: expected one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
    return fmt


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized linear weight ``[N, K]`` or expert stack ``[E, N, K]`` (nn.Linear "NT" layout).

    ``data`` and ``scale`` as the format says (module docstring); ``w8a8_static`` adds its static
    activation ``input_scale`` / ``input_offset`` (fp32 ``[1]``) and int32 ``bias`` (``quant_bias``);
    ``w4a8`` its ``group_size`` (0 = per channel). ``act_scale_fmt``: None or ``"ue8m0"``
    (power-of-two dynamic activation scales). ``data`` may be any strided view (a backend's
    ``prepare_weight`` may keep it as the transposed view of ``[..., K, N]`` contiguous storage).
    Kept quantized in device memory; ``dequantize()`` materialises one fp32 copy on demand.
    """

    format: str
    data: torch.Tensor
    scale: torch.Tensor
    input_scale: torch.Tensor | None = None
    input_offset: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    group_size: int = 0
    act_scale_fmt: str | None = None
    # Backend-owned tensors made once by that backend's ``prepare_weight`` (e.g. the NPU's int64
    # scales, the W4A8 kernel's scale_bias): resident, never read by the generic ops, dropped by
    # ``to()`` and indexing (prepare again).
    prepared: dict[str, torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        fmt = self.format
        if fmt not in QUANTIZED_FORMATS:
            raise ValueError(f"QuantizedWeight: format expected one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
        d, s = self.data, self.scale
        if not isinstance(d, torch.Tensor) or d.dtype != _DATA_DTYPE[fmt] or d.dim() not in (2, 3):
            got = f"{getattr(d, 'dtype', type(d).__name__)} {list(getattr(d, 'shape', []))}"
            want = "[N/2, K] or [E, N/2, K] (two int4 per byte along N)" if fmt == "w4a8" else "[N, K] or [E, N, K]"
            raise ValueError(f"QuantizedWeight({fmt}): data expected {_DATA_DTYPE[fmt]} {want}, got {got}")
        N, K = self.shape[-2:]
        lead = tuple(d.shape[:-2])
        if fmt == "fp8_block":
            want = (*lead, _blocks(N), _blocks(K))
        elif fmt == "w4a8" and self.group_size:
            if self.group_size < 0 or K % self.group_size:
                raise ValueError(f"QuantizedWeight(w4a8): group_size {self.group_size} does not divide K={K}")
            want = (*lead, N, K // self.group_size)
        else:
            want = (*lead, N)
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != want:
            got = f"{getattr(s, 'dtype', type(s).__name__)} {list(getattr(s, 'shape', []))}"
            raise ValueError(f"QuantizedWeight({fmt}): scale expected float32 {list(want)} for data "
                             f"{list(d.shape)}, got {got}")
        if s.device != d.device:
            raise ValueError(f"QuantizedWeight({fmt}): scale on {s.device}, data on {d.device}")
        if self.act_scale_fmt not in ACT_SCALE_FMTS:
            raise ValueError(f"QuantizedWeight({fmt}): act_scale_fmt expected None or 'ue8m0', "
                             f"got {self.act_scale_fmt!r}")
        if self.act_scale_fmt and fmt not in ("fp8_block", "int8"):
            raise ValueError(f"QuantizedWeight({fmt}): act_scale_fmt 'ue8m0' applies to fp8_block / int8 only")
        if fmt == "w8a8_static":
            for name, t, dt, shape in (("input_scale", self.input_scale, torch.float32, (*lead, 1)),
                                       ("input_offset", self.input_offset, torch.float32, (*lead, 1)),
                                       ("bias", self.bias, torch.int32, (*lead, N))):
                if not isinstance(t, torch.Tensor) or t.dtype != dt or tuple(t.shape) != shape or t.device != d.device:
                    got = f"{getattr(t, 'dtype', type(t).__name__)} {list(getattr(t, 'shape', []))}"
                    raise ValueError(f"QuantizedWeight(w8a8_static): {name} expected {dt} {list(shape)} on "
                                     f"{d.device}, got {got}")
        elif self.input_scale is not None or self.input_offset is not None or self.bias is not None:
            raise ValueError(f"QuantizedWeight({fmt}): input_scale / input_offset / bias belong to w8a8_static")
        if fmt != "w4a8" and self.group_size:
            raise ValueError(f"QuantizedWeight({fmt}): group_size belongs to w4a8")

    @property
    def shape(self) -> torch.Size:
        """The logical weight shape ``[..., N, K]`` (w4a8: twice the packed rows)."""
        if self.format == "w4a8":
            return torch.Size((*self.data.shape[:-2], 2 * self.data.shape[-2], self.data.shape[-1]))
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Every tensor this weight holds (what stays resident)."""
        extra = tuple(self.prepared.values()) if self.prepared else ()
        return tuple(t for t in (self.data, self.scale, self.input_scale, self.input_offset, self.bias, *extra)
                     if t is not None)

    @property
    def nbytes(self) -> int:
        """Bytes resident: quantized data plus scales (and static activation parameters)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def replace(self, **changes: Any) -> QuantizedWeight:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> QuantizedWeight:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return self.replace(data=self.data.to(device), scale=self.scale.to(device), input_scale=mv(self.input_scale),
                            input_offset=mv(self.input_offset), bias=mv(self.bias), prepared=None)

    def __getitem__(self, e: int) -> QuantizedWeight:
        """Expert ``e`` of a stack, as a 2-D weight (views, no copy)."""
        if self.data.dim() != 3:
            raise ValueError(f"QuantizedWeight: indexing needs an expert stack [E, N, K], got {list(self.shape)}")

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[e]

        return self.replace(data=self.data[e], scale=self.scale[e], input_scale=pick(self.input_scale),
                            input_offset=pick(self.input_offset), bias=pick(self.bias), prepared=None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self, dtype)


# ------------------------------------------------------------------------------------------------
# Weights


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int4 values ``[..., N, K]`` (int8 holding -8..7, N even) -> msmodelslim's packed ``[..., N/2, K]``:
    row ``2i`` in the low nibble, row ``2i+1`` in the high nibble of byte ``[i, k]``."""
    if q.shape[-2] % 2:
        raise ValueError(f"pack_int4: N must be even, got {list(q.shape)}")
    lo, hi = q[..., 0::2, :].to(torch.int16), q[..., 1::2, :].to(torch.int16)
    packed = ((hi << 4) | (lo & 0xF)) & 0xFF
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., N/2, K]`` -> int8 values ``[..., N, K]`` in [-8, 7]."""
    b = packed.to(torch.int16) & 0xFF
    lo, hi = b & 0xF, b >> 4
    lo, hi = torch.where(lo > 7, lo - 16, lo), torch.where(hi > 7, hi - 16, hi)
    out = torch.stack((lo, hi), dim=-2)  # [..., N/2, 2, K]
    return out.reshape(*packed.shape[:-2], 2 * packed.shape[-2], packed.shape[-1]).to(torch.int8)


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = 0) -> QuantizedWeight:
    """``w`` ``[N, K]`` or ``[E, N, K]`` float -> :class:`QuantizedWeight` (computed in fp32).

    ``fp8_block``: ``scale = max(amax(|block|), 1e-10) / 448`` per 128x128 block, ``data = e4m3(w / scale)``.
    ``int8``: ``scale = max(amax(|row|), 1e-10) / 127`` per output channel, ``data = round_half_even(w / scale)``.
    ``w4a8``: ``scale = max(amax, 1e-10) / 7`` per channel (or per ``group_size`` columns), ``round_half_even``,
    clamp to [-8, 7], packed (:func:`pack_int4`). ``w8a8_static`` needs activation statistics:
    :func:`quantize_weight_static`.
    """
    if fmt not in ("fp8_block", "int8", "w4a8"):
        raise ValueError(f"quantize_weight: format expected fp8_block, int8 or w4a8, got {fmt!r}")
    if w.dim() not in (2, 3) or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_weight: expected a float [N, K] or [E, N, K] tensor, got {w.dtype} {list(w.shape)}")
    w = w.float()
    if fmt == "w4a8":
        N, K = w.shape[-2:]
        g = group_size or K
        if K % g:
            raise ValueError(f"quantize_weight(w4a8): group_size {group_size} does not divide K={K}")
        grouped = w.reshape(*w.shape[:-1], K // g, g)
        scale = grouped.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) / INT4_MAX  # [..., N, K/g]
        q = torch.round(grouped / scale.unsqueeze(-1)).clamp(INT4_MIN, INT4_MAX).reshape(w.shape).to(torch.int8)
        scale = scale if group_size else scale.squeeze(-1)
        return QuantizedWeight(fmt, pack_int4(q), scale.contiguous(), group_size=group_size)
    if fmt == "int8":
        scale = w.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) / INT8_MAX
        data = torch.round(w / scale.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return QuantizedWeight(fmt, data.contiguous(), scale.contiguous())
    lead, (N, K) = w.shape[:-2], w.shape[-2:]
    nb, kb = _blocks(N), _blocks(K)
    padded = w.new_zeros(*lead, nb * FP8_BLOCK, kb * FP8_BLOCK)
    padded[..., :N, :K] = w
    blocks = padded.view(*lead, nb, FP8_BLOCK, kb, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=SCALE_FLOOR) / FP8_MAX  # [..., nb, kb]
    q = (blocks / scale[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    data = q.view(*lead, nb * FP8_BLOCK, kb * FP8_BLOCK)[..., :N, :K].to(torch.float8_e4m3fn)
    return QuantizedWeight(fmt, data.contiguous(), scale.contiguous())


def static_activation_params(amin: float, amax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric per-tensor int8 parameters from a calibrated range (msmodelslim's ``minmax``,
    ``symmetric: False``): ``input_scale = (max - min) / 255``, integer ``input_offset = -128 -
    round(min / input_scale)``, so ``[min, max]`` maps onto ``[-128, 127]``. fp32 ``[1]`` each."""
    lo, hi = min(float(amin), 0.0), max(float(amax), 0.0)
    scale = max((hi - lo) / 255.0, SCALE_FLOOR)
    offset = float(min(max(-128 - round(lo / scale), -128), 127))
    return torch.tensor([scale], dtype=torch.float32), torch.tensor([offset], dtype=torch.float32)


def quantize_weight_static(w: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> QuantizedWeight:
    """``w8a8_static`` as msmodelslim's saver writes it (Ascend/msmodelslim@3de0a3c4
    ``save/ascendv1.py`` ``on_w8a8_static``): symmetric per-channel int8 weights, ``deq_scale =
    input_scale x weight_scale``, ``quant_bias = round(-rowsum(w_q) x input_offset)`` (no float bias)."""
    if w.dim() != 2 or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_weight_static: expected a float [N, K] tensor, got {w.dtype} {list(w.shape)}")
    q = quantize_weight(w, "int8")
    input_scale = input_scale.float().reshape(1).to(w.device)
    input_offset = input_offset.float().reshape(1).to(w.device)
    deq = (input_scale * q.scale).contiguous()
    bias = torch.round(-q.data.float().sum(-1) * input_offset).to(torch.int32)
    return QuantizedWeight("w8a8_static", q.data, deq, input_scale, input_offset, bias)


def expand_block_scale(scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """fp8_block scales ``[..., ceil(N/128), ceil(K/128)]`` -> one per element ``[..., N, K]``."""
    return scale.repeat_interleave(FP8_BLOCK, -2)[..., :N, :].repeat_interleave(FP8_BLOCK, -1)[..., :K]


def weight_values(qw: QuantizedWeight) -> torch.Tensor:
    """The integer / e4m3 weight values ``[..., N, K]`` (w4a8 unpacked), in their storage dtype."""
    return unpack_int4(qw.data) if qw.format == "w4a8" else qw.data


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the format represents, in ``dtype`` (computed in fp32). ``w8a8_static``: the
    per-channel weight scale is ``deq_scale / input_scale``."""
    N, K = qw.shape[-2:]
    if qw.format == "int8":
        w = qw.data.float() * qw.scale.unsqueeze(-1)
    elif qw.format == "w8a8_static":
        w = qw.data.float() * (qw.scale / qw.input_scale).unsqueeze(-1)
    elif qw.format == "w4a8":
        s = qw.scale.repeat_interleave(qw.group_size, -1) if qw.group_size else qw.scale.unsqueeze(-1)
        w = unpack_int4(qw.data).float() * s
    else:
        w = qw.data.float() * expand_block_scale(qw.scale, N, K)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------
# Activations


def _scale(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """``fp32(amax) / qmax`` as IEEE division on every device: CUDA divides by a Python scalar as a
    multiply by its reciprocal, one ulp off the quotient, which moves ties of ``x / s`` (seen on an
    H200: one int8 code of a token whose amax was 9). A 0-dim tensor divisor takes the true division."""
    return amax.clamp(min=SCALE_FLOOR) / torch.full((), qmax, dtype=amax.dtype, device=amax.device)


def _ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Scales rounded up to powers of two (what an e8m0 exponent holds)."""
    return torch.exp2(torch.ceil(torch.log2(s)))


def quantize_activation(x: torch.Tensor, fmt: str, act_scale_fmt: str | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization as the format's contract fixes it, for ``x`` ``[T, K]``.

    ``fp8_block``: returns ``(e4m3 [T, K], fp32 scales [T, ceil(K/128)])``, one scale per token and
    128-wide group along K. ``int8`` / ``w4a8``: ``(int8 [T, K], fp32 scales [T])``, one scale per
    token. ``act_scale_fmt="ue8m0"``: scales rounded up to powers of two first.
    """
    x = x.float()
    T, K = x.shape
    if fmt in PER_TOKEN_INT8:
        s = _scale(x.abs().amax(dim=-1), INT8_MAX)
        if act_scale_fmt == "ue8m0":
            s = _ue8m0(s)
        q = torch.round(x / s.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, s
    if fmt != "fp8_block":
        raise ValueError(f"quantize_activation: format expected one of fp8_block, {', '.join(PER_TOKEN_INT8)}, "
                         f"got {fmt!r}")
    kb = _blocks(K)
    padded = x.new_zeros(T, kb * FP8_BLOCK)
    padded[:, :K] = x
    groups = padded.view(T, kb, FP8_BLOCK)
    s = _scale(groups.abs().amax(dim=-1), FP8_MAX)  # [T, kb]
    if act_scale_fmt == "ue8m0":
        s = _ue8m0(s)
    q = (groups / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).view(T, kb * FP8_BLOCK)[:, :K].to(torch.float8_e4m3fn)
    return q, s


def quantize_activation_static(x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor) -> torch.Tensor:
    """``w8a8_static``: ``clamp(round_half_even(fp32(x) / input_scale + input_offset), -128, 127)`` int8."""
    return torch.round(x.float() / input_scale + input_offset).clamp(-128, 127).to(torch.int8)


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`, fp32 ``[T, K]``."""
    if fmt in PER_TOKEN_INT8:
        return q.float() * s.unsqueeze(-1)
    return q.float() * s.repeat_interleave(FP8_BLOCK, -1)[:, : q.shape[1]]


def _activation_dequantized(x2: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    return dequantize_activation(*quantize_activation(x2, qweight.format, qweight.act_scale_fmt), qweight.format)


# ------------------------------------------------------------------------------------------------
# Ops


def _check_qweight(op: str, name: str, qw: Any, ndim: int, K: int) -> None:
    if not isinstance(qw, QuantizedWeight):
        fail(op, name, "a hwlayer.ops.quant.QuantizedWeight", type(qw).__name__)
    if qw.data.dim() != ndim or qw.shape[-1] != K:
        want = "[N, K]" if ndim == 2 else "[E, N, K]"
        fail(op, name, f"{qw.format} weight {want} with K={K}", list(qw.shape))
    if ndim == 3 and qw.format == "w8a8_static":
        fail(op, name, "an expert stack in a dynamic-activation format (fp8_block, int8, w4a8)", qw.format)


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``x @ W^T`` with a quantized weight and quantized activations.

    ``x``: ``[..., K]`` float; ``qweight``: :class:`QuantizedWeight` ``[N, K]`` in any quantized
    format. The rows of ``x`` are quantized as the weight's format says (fp8_block: per token,
    128-wide groups along K, e4m3 round-to-nearest-even; int8 / w4a8: per token, round half to
    even, clamp +-127; w8a8_static: the weight's static per-tensor scale and offset, clamp
    [-128, 127], then ``(q @ data^T + bias) x scale``), multiplied with the dequantized weight with
    fp32 accumulation, and the result is cast once to ``x.dtype``: ``[..., N]``. ``T = 0`` rows
    give an empty result.
    """
    op = "quant_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    _check_qweight(op, "qweight", qweight, 2, x.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    N = qweight.shape[0]
    if qweight.format == "w8a8_static":
        q = quantize_activation_static(x2, qweight.input_scale, qweight.input_offset)
        out = (q.float() @ qweight.data.float().t() + qweight.bias.float()) * qweight.scale
    else:
        out = _activation_dequantized(x2, qweight) @ qweight.dequantize(torch.float32).t()
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


def quant_grouped_gemm(x: torch.Tensor, qweight: QuantizedWeight, group_sizes: torch.Tensor) -> torch.Tensor:
    """``grouped_gemm`` with a quantized expert stack: ``out[rows of e] = q(x[rows of e]) @ W_e^T``.

    ``x``: ``[M, K]`` rows grouped by expert, experts in order; ``qweight``: ``[E, N, K]``;
    ``group_sizes``: int ``[E]`` row counts on the device with ``sum <= M``: rows past the sum are
    padding (dropped assignments) and their output rows are unspecified (the generic writes
    zeros). Activation quantization, accumulation and output cast exactly as ``quant_linear`` (per
    row: a row's quantization depends on nothing else). Returns ``[M, N]`` in ``x.dtype``.
    Implementations must not need the sizes on the host (no device->host read in a forward).
    """
    op = "quant_grouped_gemm"
    check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
    _check_qweight(op, "qweight", qweight, 3, x.shape[1])
    check_tensor(op, "group_sizes", group_sizes, ndim=1, dtypes=INDEX_DTYPES, shape=[qweight.shape[0]])
    M, N = x.shape[0], qweight.shape[1]
    if os.environ.get("HWLAYER_CHECK", "") not in ("", "0") and int(group_sizes.sum()) > M:  # a value check
        fail(op, "group_sizes", f"counts summing to at most {M} rows", int(group_sizes.sum()))
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    if M == 0:
        return out.to(x.dtype)
    xd = _activation_dequantized(x, qweight)
    ends = group_sizes.long().cumsum(0)
    expert = torch.searchsorted(ends, torch.arange(M, device=x.device), right=True)  # E: padding
    for e in range(qweight.shape[0]):  # E x the flops, but the sizes stay on the device
        mine = (expert == e).unsqueeze(1)
        out = torch.where(mine, xd @ qweight[e].dequantize(torch.float32).t(), out)
    return out.to(x.dtype)


def quant_fused_experts_factory(plan: Any) -> Callable:
    def quant_fused_experts(
        x: torch.Tensor,
        w13: QuantizedWeight,
        w2: QuantizedWeight,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
    ) -> torch.Tensor:
        """``fused_experts`` with quantized expert stacks: ``sum_k w_k * W2_e q(silu(W1_e q(x)) * W3_e q(x))``.

        ``w13``: ``[E, 2I, D]`` (gate rows then up rows), ``w2``: ``[E, D, I]``, both
        :class:`QuantizedWeight` of one format; other arguments as ``fused_experts``. Both GEMMs
        quantize their input rows as ``quant_linear`` does; the SwiGLU output is rounded to
        ``x.dtype`` before the second quantization (allowed, as between the unquantized GEMMs).
        The default runs ``moe_permute -> quant_grouped_gemm -> silu_and_mul -> quant_grouped_gemm
        -> moe_unpermute`` through the plan. Returns ``[T, D]`` in ``x.dtype``.
        """
        op = "quant_fused_experts"
        check_tensor(op, "x", x, ndim=2, dtypes=FLOAT_DTYPES)
        _check_qweight(op, "w13", w13, 3, x.shape[1])
        _check_qweight(op, "w2", w2, 3, w13.shape[1] // 2)
        if w2.shape[0] != w13.shape[0] or w2.shape[1] != x.shape[1] or w2.format != w13.format:
            fail(op, "w2", f"{w13.format} [{w13.shape[0]}, {x.shape[1]}, {w13.shape[1] // 2}]",
                 f"{w2.format} {list(w2.shape)}")
        xs, sizes, order = plan.moe_permute(x, topk_ids, w13.shape[0])
        h = plan.silu_and_mul(plan.quant_grouped_gemm(xs, w13, sizes))
        y = plan.quant_grouped_gemm(h, w2, sizes)
        return plan.moe_unpermute(y, order, topk_weights, x.shape[0])

    return quant_fused_experts


def linear(plan: Any, x: torch.Tensor, w: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """The model's one linear call: ``plan.quant_linear`` for a quantized weight, ``F.linear`` otherwise."""
    if isinstance(w, QuantizedWeight):
        return plan.quant_linear(x, w)
    return torch.nn.functional.linear(x, w)


def concat_rows(a: torch.Tensor | QuantizedWeight, b: torch.Tensor | QuantizedWeight
                ) -> torch.Tensor | QuantizedWeight | tuple[QuantizedWeight, QuantizedWeight]:
    """``[a; b]`` along N (a fused gate/up weight). Quantized weights fuse only when the result is one
    weight of the same format: same format and options, ``fp8_block`` rows of ``a`` ending on a
    128-row block boundary, never ``w8a8_static`` (each weight has its own static activation
    scale); otherwise the two weights are returned as a tuple, to run apart."""
    if not isinstance(a, QuantizedWeight) and not isinstance(b, QuantizedWeight):
        return torch.cat([a, b], dim=0)
    if not (isinstance(a, QuantizedWeight) and isinstance(b, QuantizedWeight)) or a.format != b.format or (
            a.format == "fp8_block" and a.shape[0] % FP8_BLOCK) or a.format == "w8a8_static" or (
            a.group_size, a.act_scale_fmt) != (b.group_size, b.act_scale_fmt):
        return (a, b)
    return a.replace(data=torch.cat([a.data, b.data], 0), scale=torch.cat([a.scale, b.scale], 0), prepared=None)


def prepare_weight(name: str, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """Called by the loader ONCE for every weight it loads (``name``: the checkpoint tensor name, or
    ``...mlp.experts.w13`` / ``.w2`` for a stacked expert weight), after conversion and stacking.

    Returns a weight representing the same values that the backend's ops accept: same type
    (tensor or :class:`QuantizedWeight` of the same format), same logical shape and
    ``dequantize()``; a backend may change its strides / storage layout / memory format (e.g. keep
    ``data`` as the transposed view of ``[..., K, N]`` contiguous storage, an NPU FRACTAL_NZ cast),
    so that no forward converts a weight. It must not keep the input alive (no second copy
    resident). The generic returns ``weight`` unchanged.
    """
    if not isinstance(name, str):
        fail("prepare_weight", "name", "a checkpoint tensor name (str)", type(name).__name__)
    if not isinstance(weight, (torch.Tensor, QuantizedWeight)):
        fail("prepare_weight", "weight", "a torch.Tensor or QuantizedWeight", type(weight).__name__)
    return weight
