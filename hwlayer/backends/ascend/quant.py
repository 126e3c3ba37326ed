"""Ascend INT8 W8A8 (dynamic per-token activations): ``quant_linear`` and ``quant_grouped_gemm``.

Written against the torch-npu 2.14 API documentation (``npu_dynamic_quant``, ``npu_quant_matmul``,
``npu_grouped_matmul``) and the way vllm-ascend's ``W8A8_DYNAMIC`` scheme calls them
(vllm-project/vllm-ascend ``vllm_ascend/quantization/methods/w8a8/w8a8_dynamic.py``: per-token
``npu_dynamic_quant`` -> ``npu_quant_matmul(x_q, w[K, N], weight_scale, pertoken_scale=...,
output_dtype=x.dtype)``; MoE: ``npu_grouped_matmul([x_q], [w[E, K, N]], scale=[w_scale bf16],
per_token_scale=[pertoken_scale], split_item, group_type=0, group_list_type=1 (counts),
output_dtype=bfloat16)``). NOT run on Ascend hardware. The 910B has no FP8: ``fp8_block`` runs
generic here, and the loader requantizes an FP8 checkpoint to int8 (``weight_formats=("int8",)``).

Layouts: our weights are nn.Linear "NT" (``[N, K]``, ``[E, N, K]``); the NPU ops take ``[K, N]`` /
``[E, K, N]``. ``npu_int8_linear_args`` passes the transposed view (the documented transposed-x2
case); ``npu_int8_grouped_args`` copies per call, as ``grouped_gemm``'s adapter does (a model storing
NPU-layout weights, NZ-cast at load like vllm-ascend, would skip it). Known deviations from the
contract, all within the bf16 conformance tolerances but unmeasured on hardware: the grouped op
takes the weight scales in bf16 (as vllm-ascend passes them), and ``npu_dynamic_quant``'s rounding
mode (half to even?) is not stated in the docs we read.
"""

from __future__ import annotations

from typing import Any

import torch

from hwlayer.ops.quant import QuantizedWeight


def _npu() -> Any:
    import torch_npu

    return torch_npu


def npu_int8_linear_args(qweight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x2 int8 [K, N], scale fp32 [N])`` for ``npu_quant_matmul`` from an int8 ``[N, K]`` weight."""
    return qweight.data.t(), qweight.scale


def npu_int8_grouped_args(qweight: QuantizedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight int8 [E, K, N] contiguous, scale bf16 [E, N])`` for ``npu_grouped_matmul``."""
    return qweight.data.transpose(1, 2).contiguous(), qweight.scale.to(torch.bfloat16)


def _int8_on_npu(x: Any, qweight: Any, ndim: int) -> bool | str:
    if not isinstance(x, torch.Tensor) or not isinstance(qweight, QuantizedWeight):
        return "argument types outside the contract"
    if qweight.format != "int8":
        return f"{qweight.format}: the 910B has no FP8 units (int8 only)"
    if x.device.type != "npu" or qweight.device.type != "npu":
        return "needs NPU tensors"
    if x.dtype != torch.bfloat16:
        return "W8A8 dynamic path written for bf16 activations (vllm-ascend's)"
    if qweight.dim() != ndim or qweight.shape[-1] != x.shape[-1]:
        return "shapes outside the contract"
    return True


def quant_linear_supports(x: Any, qweight: Any) -> bool | str:
    return _int8_on_npu(x, qweight, 2)


def quant_linear(x: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    npu = _npu()
    x2 = x.reshape(-1, x.shape[-1])
    xq, pertoken_scale = npu.npu_dynamic_quant(x2)  # int8 [M, K], fp32 [M]
    w, scale = npu_int8_linear_args(qweight)
    out = npu.npu_quant_matmul(xq, w, scale, pertoken_scale=pertoken_scale, output_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], qweight.shape[0])


def quant_grouped_gemm_supports(x: Any, qweight: Any, group_sizes: Any) -> bool | str:
    ok = _int8_on_npu(x, qweight, 3)
    if ok is not True:
        return ok
    if not isinstance(group_sizes, torch.Tensor) or group_sizes.shape != (qweight.shape[0],):
        return "group_sizes outside the contract"
    return True


def quant_grouped_gemm(x: torch.Tensor, qweight: QuantizedWeight, group_sizes: torch.Tensor) -> torch.Tensor:
    npu = _npu()
    xq, pertoken_scale = npu.npu_dynamic_quant(x)
    w, scale = npu_int8_grouped_args(qweight)
    out = npu.npu_grouped_matmul(
        [xq], [w], scale=[scale], per_token_scale=[pertoken_scale], bias=None,
        group_list=group_sizes.long(), split_item=2, group_type=0, group_list_type=1,  # counts
        output_dtype=x.dtype,
    )
    return out[0]


IMPLEMENTATIONS = {
    "quant_linear": (quant_linear, quant_linear_supports),
    "quant_grouped_gemm": (quant_grouped_gemm, quant_grouped_gemm_supports),
}
