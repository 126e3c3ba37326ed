"""Ascend W8A8 / W4A8: ``prepare_weight``, ``quant_linear`` and ``quant_grouped_gemm``.

Written against the torch-npu 2.14 API documentation (``npu_dynamic_quant``, ``npu_quantize``,
``npu_quant_matmul``, ``npu_grouped_matmul``, ``npu_format_cast``), the op-plugin tests that pin
their arithmetic (Ascend/op-plugin@517f2e7d ``test/test_custom_ops/test_npu_quantize.py``,
``test_npu_dynamic_quant.py``, ``test_npu_quant_matmul.py``, ``test_npu_grouped_matmul.py``
``test_npu_grouped_matmul_A8W4``) and the way vllm-ascend calls them
(vllm-project/vllm-ascend@182b75ea ``vllm_ascend/quantization/methods/``):

* ``int8`` (``W8A8_DYNAMIC``, ``w8a8_dynamic.py``): per-token ``npu_dynamic_quant`` ->
  ``npu_quant_matmul(x_q, w[K, N], weight_scale, pertoken_scale=...)``; MoE:
  ``npu_grouped_matmul([x_q], [w[E, K, N]], scale=[bf16 [E, N]], per_token_scale=[...],
  group_list_type=1)``.
* ``w8a8_static`` (``W8A8``, ``w8a8_static.py``): ``npu_quantize(x, 1 / input_scale (per K),
  input_offset (per K), qint8, -1, div_mode=False)`` -> ``npu_quant_matmul(x_q, w[K, N], deq_scale,
  bias=quant_bias (int32), output_dtype)``.
* ``w4a8`` (``W4A8_DYNAMIC`` MoE, ``w4a8.py`` msmodelslim path): weights ``[E, K, N/2]`` int8 viewed as
  int32 ``[E, K, N/8]`` (int4 LSB first), scales as the fp32 bit pattern in int64 ``[E, 1, N]``,
  ``bias = scale_bias = 8 x rowsum(w)`` (the kernel splits each int8 activation into a signed high
  nibble and ``low - 8``: op-plugin's A8W4 golden), ``npu_grouped_matmul(..., per_token_scale=...)``.
  Per-channel only: vllm-ascend@182b75ea rejects per-group W4A8, so ``group_size > 0`` runs generic.

``prepare_weight`` does the layout work ONCE at load, as vllm-ascend's ``process_weights_after_loading``
does: ``[.., N, K]`` -> contiguous ``[.., K, N]`` storage (kept as the transposed view, so the
QuantizedWeight contract still reads ``[.., N, K]``), ``npu_format_cast`` to FRACTAL_NZ (29) for the
expert stacks on a real NPU, and the backend tensors above in ``QuantizedWeight.prepared``. No forward
copies a weight (issue 20: the old grouped adapter made a contiguous transposed copy of the whole
expert stack on every call). NOT run on Ascend hardware; emulated in CI
(conformance/emulators/torch_npu_quant.py). Known deviations from the contract, within the bf16
conformance tolerances: vllm-ascend passes the int8 MoE weight scales in bf16, and the A8W4 kernel
rounds its per-nibble partial products through fp16 (op-plugin's golden does).
"""

from __future__ import annotations

from typing import Any

import torch

from hwlayer.ops.layout import groups_covering_rows
from hwlayer.ops.quant import QuantizedWeight, dequantize_weight

from .device import device_type

ACL_FORMAT_FRACTAL_NZ = 29


def _npu() -> Any:
    import torch_npu

    return torch_npu


def npu_int8_linear_args(qweight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x2 int8 [K, N], scale fp32 [N])`` for ``npu_quant_matmul`` from an int8 ``[N, K]`` weight:
    the transposed view (contiguous when the weight was prepared)."""
    return qweight.data.t(), qweight.scale


def npu_int8_grouped_args(qweight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight int8 [E, K, N], scale bf16 [E, N])`` for ``npu_grouped_matmul``: views and the
    prepared scale, never a copy (an unprepared stack passes its transposed view, which the op takes:
    "支持weight转置")."""
    scale = (qweight.prepared or {}).get("scale_bf16")
    return qweight.data.transpose(1, 2), scale if scale is not None else qweight.scale.to(torch.bfloat16)


def _kn(data: torch.Tensor, nz: bool) -> torch.Tensor:
    """``[.., N, K]`` -> the transposed view of contiguous ``[.., K, N]`` storage (NZ-cast on an NPU)."""
    kn = data.transpose(-1, -2).contiguous()
    if nz and kn.device.type == "npu":
        kn = _npu().npu_format_cast(kn, ACL_FORMAT_FRACTAL_NZ)
    return kn.transpose(-1, -2)


def _prepared_layout(qweight: QuantizedWeight) -> bool:
    return qweight.data.transpose(-1, -2).is_contiguous()


def prepare_weight_supports(name: Any, weight: Any) -> bool | str:
    if not isinstance(weight, QuantizedWeight):
        return "unquantized weights keep the layout F.linear / grouped_gemm take"
    if weight.device.type != device_type():
        return "needs NPU tensors"
    if weight.format not in ("int8", "w8a8_static", "w4a8"):
        return f"{weight.format}: the 910B has no FP8 units"
    if weight.format == "w4a8" and (weight.group_size or weight.dim() != 3):
        return "W4A8 runs per-channel expert stacks only (vllm-ascend rejects per-group)"
    return True


def prepare_weight(name: str, weight: QuantizedWeight) -> QuantizedWeight:
    """Once at load: NPU layouts and the backend tensors the kernels take (module docstring)."""
    stack = weight.dim() == 3
    if weight.format == "w4a8":
        kn = _kn(weight.data, nz=True)  # [E, N/2, K] view of [E, K, N/2] storage: int32 [E, K, N/8] for the kernel
        deq = dequantize_weight(weight, torch.float32)  # [E, N, K], one fp32 copy at load
        scale64 = weight.scale.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        prepared = {"scale_int64": scale64.unsqueeze(1).contiguous(),  # [E, 1, N]
                    "scale_bias": (8 * deq.sum(-1)).contiguous()}  # [E, N]
        return weight.replace(data=kn, prepared=prepared)
    if weight.format == "w8a8_static":
        K = weight.shape[-1]
        prepared = {"input_scale_reciprocal": (1 / weight.input_scale).repeat(K).to(torch.bfloat16),
                    "input_offset": weight.input_offset.repeat(K).to(torch.bfloat16)}
        return weight.replace(data=_kn(weight.data, nz=False), prepared=prepared)
    prepared = {"scale_bf16": weight.scale.to(torch.bfloat16)} if stack else None
    return weight.replace(data=_kn(weight.data, nz=stack), prepared=prepared)


def _on_npu(x: Any, qweight: Any, ndim: int, formats: tuple[str, ...]) -> bool | str:
    if not isinstance(x, torch.Tensor) or not isinstance(qweight, QuantizedWeight):
        return "argument types outside the contract"
    if qweight.format not in formats:
        return f"{qweight.format}: not an NPU path here (runs: {', '.join(formats)}; the 910B has no FP8 units)"
    if x.device.type != device_type() or qweight.device.type != device_type():
        return "needs NPU tensors"
    if x.dtype != torch.bfloat16:
        return "W8A8 / W4A8 paths written for bf16 activations (vllm-ascend's)"
    if qweight.dim() != ndim or qweight.shape[-1] != x.shape[-1]:
        return "shapes outside the contract"
    if qweight.act_scale_fmt is not None:
        return "ue8m0 activation scales: npu_dynamic_quant's scales are plain fp32"
    return True


def quant_linear_supports(x: Any, qweight: Any) -> bool | str:
    ok = _on_npu(x, qweight, 2, ("int8", "w8a8_static"))
    if ok is True and qweight.format == "w8a8_static" and not qweight.prepared:
        return "w8a8_static needs plan.prepare_weight at load (per-K input scale / offset)"
    return ok


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    npu = _npu()
    x2 = x.reshape(-1, x.shape[-1])
    w, scale = npu_int8_linear_args(qweight)
    if qweight.format == "w8a8_static":
        p = qweight.prepared
        xq = npu.npu_quantize(x2, p["input_scale_reciprocal"], p["input_offset"], torch.qint8, -1, False)
        out = npu.npu_quant_matmul(xq, w, scale, bias=qweight.bias, output_dtype=x.dtype)
    else:
        xq, pertoken_scale = npu.npu_dynamic_quant(x2)  # int8 [M, K], fp32 [M]
        out = npu.npu_quant_matmul(xq, w, scale, pertoken_scale=pertoken_scale, output_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def quant_grouped_gemm_supports(x: Any, qweight: Any, group_sizes: Any) -> bool | str:
    ok = _on_npu(x, qweight, 3, ("int8", "w4a8"))
    if ok is not True:
        return ok
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.shape != (qweight.shape[0],):
        return "group_sizes outside the contract"
    if qweight.shape[0] == 1:
        return "npu_grouped_matmul's counts (group_list_type=1) may not have length 1"
    if qweight.format == "w4a8" and not (qweight.prepared and _prepared_layout(qweight)):
        return "w4a8 needs plan.prepare_weight at load (int32-packed [E, K, N/8], int64 scales, scale_bias)"
    return True


def quant_grouped_gemm(x: torch.Tensor, qweight: QuantizedWeight, group_sizes: torch.Tensor) -> torch.Tensor:
    npu = _npu()
    xq, pertoken_scale = npu.npu_dynamic_quant(x)
    # the op wants counts covering every row: padding rows join the last group (output unspecified)
    counts = groups_covering_rows(group_sizes, x.shape[0])
    if qweight.format == "w4a8":
        p = qweight.prepared
        w = qweight.data.transpose(1, 2).view(torch.int32)  # [E, K, N/8], contiguous since prepared
        out = npu.npu_grouped_matmul(
            [xq], [w], scale=[p["scale_int64"]], bias=[p["scale_bias"]], per_token_scale=[pertoken_scale],
            group_list=counts, split_item=2, group_type=0, group_list_type=1, output_dtype=x.dtype,
        )
        return out[0]
    w, scale = npu_int8_grouped_args(qweight)
    out = npu.npu_grouped_matmul(
        [xq], [w], scale=[scale], per_token_scale=[pertoken_scale], bias=None,
        group_list=counts, split_item=2, group_type=0, group_list_type=1,
        output_dtype=x.dtype,
    )
    return out[0]


IMPLEMENTATIONS = {
    "prepare_weight": (prepare_weight, prepare_weight_supports),
    "quant_linear": (quant_linear, quant_linear_supports),
    "quant_grouped_gemm": (quant_grouped_gemm, quant_grouped_gemm_supports),
}
