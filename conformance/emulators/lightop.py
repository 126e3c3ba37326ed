"""CPU emulation of Hygon ``lightop.norm`` as Hygon's vLLM plugin (vllm_hcu) calls it.

Source: vllm_hcu's RMSNorm override (Hygon, 2026; the ``HcuRMSNorm.forward_hip`` module of the
vllm_hcu plugin as indexed by the code search, read 2026-11-30): ``from lightop.norm import
fused_add_rms_norm, rmsnorm_forward_autograd``; ``fused_add_rms_norm(x, residual, weight, eps)``
works in place and returns nothing (the plugin returns ``x, residual`` afterwards);
``rmsnorm_forward_autograd(x, weight, eps, training)`` returns the normalised tensor; and
"lightop's HCU RMSNorm kernel currently rejects reductions narrower than one wave"
(``_LIGHTOP_RMSNORM_MIN_COLS = 64``): widths under 64 raise here. No lightop test or source is
public; the arithmetic is the reference vllm_hcu's override replaces (vLLM ``RMSNorm.forward_native``:
fp32 variance, normalised value cast to the input dtype, times the weight), checked in
tests/test_emulators_vendor_refs.py.

``lightop.op.moe_fused_gate(input, bias, num_expert_group, topk_group, topk, num_fused_shared_experts,
routed_scaling_factor)`` as vllm_hcu calls it (HYGON-AI/vllm-plugin-das@13272b6
``vllm_hcu/model_executor/layers/fused_moe/router_runtime.py``: ``from lightop import op``, seven
positional arguments, shared experts 0, returns ``(topk_weights, topk_ids)``). Its semantics are fixed,
"sigmoid scoring followed by renormalization" (``fused_moe/lightop_routing.py``@5a61c48); the routed
scaling factor is not applied to the output (vllm_hcu hands the weights to vLLM's router unchanged, and
vLLM's DeepSeek MoE scales the output itself). The arithmetic is the biased grouped top-k of the
sgl-kernel ``moe_fused_gate`` this positional ABI matches (the reference mate's emulator follows,
:func:`.mate._fused_gate_impl`, renormalized, unscaled). No lightop source or test is public.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque
from .mate import _fused_gate_impl

MIN_COLS = 64


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    check(
        x.shape[-1] >= MIN_COLS,
        f"lightop rms norm: reduction width {x.shape[-1]} is narrower than one wave ({MIN_COLS})",
    )
    check(
        x.dtype == residual.dtype == weight.dtype, "lightop fused_add_rms_norm: x, residual and weight share one dtype"
    )
    check(x.is_contiguous() and residual.is_contiguous(), "lightop fused_add_rms_norm: contiguous x and residual")
    _fused_add(x, residual, weight, float(eps))


def _fused_add_impl(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    residual.copy_((x.float() + residual.float()).to(x.dtype))
    x.copy_(_norm(residual, weight, eps))


def rmsnorm_forward_autograd(x: torch.Tensor, weight: torch.Tensor, eps: float, training: bool) -> torch.Tensor:
    check(
        x.shape[-1] >= MIN_COLS,
        f"lightop rms norm: reduction width {x.shape[-1]} is narrower than one wave ({MIN_COLS})",
    )
    check(x.dtype == weight.dtype, "lightop rmsnorm_forward_autograd: x and weight share one dtype")
    return _rmsnorm(x, weight, float(eps))


def _rmsnorm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, weight, eps)


# The kernels, opaque to FakeTensorMode (their fakes only describe the outputs).
_fused_add = opaque("lightop_fused_add_rms_norm", _fused_add_impl, lambda x, residual, weight, eps: None,
                    mutates_args=("x", "residual"))
_rmsnorm = opaque("lightop_rmsnorm_forward", _rmsnorm_impl, lambda x, weight, eps: torch.empty_like(x))


def install_package(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop as used by vllm_hcu", "0.0.0+emulated")


def install_norm(module: types.ModuleType) -> None:
    fill(
        module, "Hygon lightop.norm as used by vllm_hcu", "0.0.0+emulated", fused_add_rms_norm, rmsnorm_forward_autograd
    )


def moe_fused_gate(
    input: torch.Tensor,
    bias: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    topk: int,
    num_fused_shared_experts: int = 0,
    routed_scaling_factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    check(input.dim() == 2 and bias.dim() == 1 and bias.shape[0] == input.shape[1],
          "lightop moe_fused_gate: input [T, E], bias [E]")
    check(input.dtype == bias.dtype, "lightop moe_fused_gate: input and bias share one dtype")
    E = input.shape[1]
    check(num_expert_group > 0 and E % num_expert_group == 0, "lightop moe_fused_gate: experts divisible into groups")
    check(0 < topk_group <= num_expert_group and 0 < topk <= E,
          "lightop moe_fused_gate: topk_group / topk out of range")
    check(num_fused_shared_experts == 0, "emulator: fused shared experts are not emulated")
    return _gate(input, bias, num_expert_group, topk_group, topk)


def _gate_impl(input: torch.Tensor, bias: torch.Tensor, num_expert_group: int, topk_group: int,
               topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fused_gate_impl(input, bias, num_expert_group, topk_group, topk, 1.0, True, False)


_gate = opaque("lightop_moe_fused_gate", _gate_impl,
               lambda input, bias, g, tg, topk: (input.new_empty(input.shape[0], topk, dtype=torch.float32),
                                                 input.new_empty(input.shape[0], topk, dtype=torch.int32)))


def install_op(module: types.ModuleType) -> None:
    fill(module, "Hygon lightop.op as vllm_hcu@13272b6 calls it", "0.0.0+emulated", moe_fused_gate)
