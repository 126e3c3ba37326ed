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
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill, opaque

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
