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
* ``bf16`` / ``fp16`` / ``fp32`` -- unquantized: plain tensors, ``F.linear``; not a QuantizedWeight.

The arithmetic every implementation must match (within the conformance tolerances): quantize the
activation as above, then ``out[t, n] = sum_k deq(x)[t, k] * deq(w)[n, k]`` accumulated in fp32 (an
exact int32 accumulation of the int8 products, scaled afterwards, is allowed: it only removes fp32
rounding), cast once to ``x.dtype``. The generic implementations below do literally that:
dequantize both operands to fp32 and matmul -- slow and exact, weights stay quantized in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .layout import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, fail

FP8_BLOCK = 128  # rows x cols of one weight scale block, and the activation group width
FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127
SCALE_FLOOR = 1e-10  # amax floor: an all-zero group quantizes to zeros with a finite scale

QUANTIZED_FORMATS: tuple[str, ...] = ("fp8_block", "int8")
UNQUANTIZED_FORMATS: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHT_FORMATS: tuple[str, ...] = QUANTIZED_FORMATS + tuple(UNQUANTIZED_FORMATS)
_DATA_DTYPE = {"fp8_block": torch.float8_e4m3fn, "int8": torch.int8}


def _blocks(n: int) -> int:
    return -(-n // FP8_BLOCK)


def check_format(fmt: str, where: str = "weight_format") -> str:
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"{where}: expected one of {', '.join(WEIGHT_FORMATS)}, got {fmt!r}")
    return fmt


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized linear weight ``[N, K]`` or expert stack ``[E, N, K]`` (nn.Linear "NT" layout).

    ``data`` and ``scale`` as the format says (module docstring). Kept quantized in device memory;
    ``dequantize()`` materialises one fp32 copy on demand (the generic ops do that per call).
    """

    format: str
    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        fmt = self.format
        if fmt not in QUANTIZED_FORMATS:
            raise ValueError(f"QuantizedWeight: format expected one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
        d, s = self.data, self.scale
        if not isinstance(d, torch.Tensor) or d.dtype != _DATA_DTYPE[fmt] or d.dim() not in (2, 3):
            got = f"{getattr(d, 'dtype', type(d).__name__)} {list(getattr(d, 'shape', []))}"
            raise ValueError(f"QuantizedWeight({fmt}): data expected {_DATA_DTYPE[fmt]} [N, K] or [E, N, K], got {got}")
        N, K = d.shape[-2:]
        want = (*d.shape[:-2], _blocks(N), _blocks(K)) if fmt == "fp8_block" else (*d.shape[:-2], N)
        if not isinstance(s, torch.Tensor) or s.dtype != torch.float32 or tuple(s.shape) != want:
            got = f"{getattr(s, 'dtype', type(s).__name__)} {list(getattr(s, 'shape', []))}"
            raise ValueError(f"QuantizedWeight({fmt}): scale expected float32 {list(want)} for data "
                             f"{list(d.shape)}, got {got}")
        if s.device != d.device:
            raise ValueError(f"QuantizedWeight({fmt}): scale on {s.device}, data on {d.device}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dim(self) -> int:
        return self.data.dim()

    @property
    def nbytes(self) -> int:
        """Bytes resident: quantized data plus scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(self.format, self.data.to(device), self.scale.to(device))

    def __getitem__(self, e: int) -> QuantizedWeight:
        """Expert ``e`` of a stack, as a 2-D weight (views, no copy)."""
        if self.data.dim() != 3:
            raise ValueError(f"QuantizedWeight: indexing needs an expert stack [E, N, K], got {list(self.shape)}")
        return QuantizedWeight(self.format, self.data[e], self.scale[e])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self, dtype)


# ------------------------------------------------------------------------------------------------
# Weights


def quantize_weight(w: torch.Tensor, fmt: str) -> QuantizedWeight:
    """``w`` ``[N, K]`` or ``[E, N, K]`` float -> :class:`QuantizedWeight` (computed in fp32).

    ``fp8_block``: ``scale = max(amax(|block|), 1e-10) / 448`` per 128x128 block, ``data = e4m3(w / scale)``.
    ``int8``: ``scale = max(amax(|row|), 1e-10) / 127`` per output channel, ``data = round_half_even(w / scale)``.
    """
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"quantize_weight: format expected one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
    if w.dim() not in (2, 3) or w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"quantize_weight: expected a float [N, K] or [E, N, K] tensor, got {w.dtype} {list(w.shape)}")
    w = w.float()
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


def expand_block_scale(scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """fp8_block scales ``[..., ceil(N/128), ceil(K/128)]`` -> one per element ``[..., N, K]``."""
    return scale.repeat_interleave(FP8_BLOCK, -2)[..., :N, :].repeat_interleave(FP8_BLOCK, -1)[..., :K]


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight the format represents, in ``dtype`` (computed in fp32)."""
    N, K = qw.data.shape[-2:]
    if qw.format == "int8":
        w = qw.data.float() * qw.scale.unsqueeze(-1)
    else:
        w = qw.data.float() * expand_block_scale(qw.scale, N, K)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------
# Activations


def quantize_activation(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization as the format's contract fixes it, for ``x`` ``[T, K]``.

    ``fp8_block``: returns ``(e4m3 [T, K], fp32 scales [T, ceil(K/128)])``, one scale per token and
    128-wide group along K. ``int8``: ``(int8 [T, K], fp32 scales [T])``, one scale per token.
    """
    x = x.float()
    T, K = x.shape
    if fmt == "int8":
        s = x.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) / INT8_MAX
        q = torch.round(x / s.unsqueeze(-1)).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        return q, s
    if fmt != "fp8_block":
        raise ValueError(f"quantize_activation: format expected one of {', '.join(QUANTIZED_FORMATS)}, got {fmt!r}")
    kb = _blocks(K)
    padded = x.new_zeros(T, kb * FP8_BLOCK)
    padded[:, :K] = x
    groups = padded.view(T, kb, FP8_BLOCK)
    s = groups.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) / FP8_MAX  # [T, kb]
    q = (groups / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).view(T, kb * FP8_BLOCK)[:, :K].to(torch.float8_e4m3fn)
    return q, s


def dequantize_activation(q: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    """Inverse of :func:`quantize_activation`, fp32 ``[T, K]``."""
    if fmt == "int8":
        return q.float() * s.unsqueeze(-1)
    return q.float() * s.repeat_interleave(FP8_BLOCK, -1)[:, : q.shape[1]]


# ------------------------------------------------------------------------------------------------
# Ops


def _check_qweight(op: str, name: str, qw: Any, ndim: int, K: int) -> None:
    if not isinstance(qw, QuantizedWeight):
        fail(op, name, "a hwlayer.ops.quant.QuantizedWeight", type(qw).__name__)
    if qw.data.dim() != ndim or qw.shape[-1] != K:
        want = "[N, K]" if ndim == 2 else "[E, N, K]"
        fail(op, name, f"{qw.format} weight {want} with K={K}", list(qw.shape))


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``x @ W^T`` with a quantized weight and dynamically quantized activations.

    ``x``: ``[..., K]`` float; ``qweight``: :class:`QuantizedWeight` ``[N, K]`` (``fp8_block`` or
    ``int8``). The rows of ``x`` are quantized as the weight's format says (fp8_block: per token,
    128-wide groups along K, e4m3 round-to-nearest-even; int8: per token, round half to even,
    clamp +-127), multiplied with the dequantized weight with fp32 accumulation, and the result is
    cast once to ``x.dtype``: ``[..., N]``. ``T = 0`` rows give an empty result.
    """
    op = "quant_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES)
    _check_qweight(op, "qweight", qweight, 2, x.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    xd = dequantize_activation(*quantize_activation(x2, qweight.format), qweight.format)
    out = xd @ qweight.dequantize(torch.float32).t()
    return out.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


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
    xd = dequantize_activation(*quantize_activation(x, qweight.format), qweight.format)
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
    """``[a; b]`` along N (a fused gate/up weight). For ``fp8_block`` this needs ``a``'s rows to end on
    a 128-row block boundary; otherwise the two weights are returned as a tuple, to run apart."""
    if not isinstance(a, QuantizedWeight) and not isinstance(b, QuantizedWeight):
        return torch.cat([a, b], dim=0)
    if not (isinstance(a, QuantizedWeight) and isinstance(b, QuantizedWeight)) or a.format != b.format or (
            a.format == "fp8_block" and a.shape[0] % FP8_BLOCK):
        return (a, b)
    return QuantizedWeight(a.format, torch.cat([a.data, b.data], 0), torch.cat([a.scale, b.scale], 0))
