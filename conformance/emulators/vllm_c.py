"""CPU registration of the vLLM-compatible ``torch.ops._C`` norm ops (``vllm._C`` / ``mcoplib._C``).

Schemas as registered by MetaX-MACA/mcoplib f722323 (2026-02-09) ``op/vllm/torch_bindings.cpp``
(``TORCH_LIBRARY_EXPAND(TORCH_EXTENSION_NAME, ops)`` with the extension built as ``_C``; vLLM's own
``csrc/torch_bindings.cpp`` declares the same two schemas)::

    rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()
    fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()

Checks and rounding from ``op/vllm/layernorm_kernels.cu``: ``out`` contiguous, ``input.stride(-1) == 1``,
``weight`` contiguous; the fused op wants weight, input and residual in one dtype and a contiguous
residual; the variance is accumulated in fp32 and the output is ``(scalar_t)(x * rstd) * weight``
(rounded to the input dtype before the weight multiply). The fused op writes ``residual <- input +
residual`` and ``input <- norm(residual)`` in place. vLLM's own test reference is
``tests/kernels/core/test_layernorm.py`` (vllm-project/vllm at 2e1874a: the kernels against
``RMSNorm.forward_native``: fp32 variance, ``x * rsqrt(var + eps)`` cast to the input dtype, then times
the weight; the fused op adds the residual first and returns the
sum as the new residual); tests/test_emulators_vendor_refs.py checks the emulation against it.

The registrations are real ``torch.library`` definitions for the CPU dispatch key, made when the
emulated ``vllm._C`` / ``mcoplib._C`` module is imported and destroyed by :func:`unregister`.
"""

from __future__ import annotations

import types

import torch

from ._common import check, fill

_LIBRARIES: list[torch.library.Library] = []
OPS = ("rms_norm", "fused_add_rms_norm")


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).to(x.dtype) * weight


def _rms_norm(result: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    check(result.is_contiguous(), "rms_norm: out must be contiguous")
    check(input.stride(-1) == 1, "rms_norm: input.stride(-1) must be 1")
    check(weight.is_contiguous(), "rms_norm: weight must be contiguous")
    check(weight.dtype == input.dtype == result.dtype, "rms_norm: expected one scalar type for out, input and weight")
    result.copy_(_norm(input, weight, epsilon))


def _fused_add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, epsilon: float) -> None:
    check(weight.dtype == input.dtype, "fused_add_rms_norm: weight.scalar_type() == input.scalar_type()")
    check(input.dtype == residual.dtype, "fused_add_rms_norm: input.scalar_type() == residual.scalar_type()")
    check(
        residual.is_contiguous() and weight.is_contiguous(),
        "fused_add_rms_norm: residual and weight must be contiguous",
    )
    residual.copy_((input.float() + residual.float()).to(input.dtype))
    input.copy_(_norm(residual, weight, epsilon))


def register() -> None:
    """Define and implement ``torch.ops._C.rms_norm`` / ``fused_add_rms_norm`` for CPU tensors."""
    if _LIBRARIES:
        return
    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("rms_norm(Tensor! result, Tensor input, Tensor weight, float epsilon) -> ()")
    lib.define("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()")
    lib.impl("rms_norm", _rms_norm, "CPU")
    lib.impl("fused_add_rms_norm", _fused_add_rms_norm, "CPU")
    # Fake kernels (both ops only write their mutable arguments): under FakeTensorMode the ops are
    # opaque, as vLLM's compiled ones are, and only the adapter's own code runs.
    torch.library.register_fake("_C::rms_norm", lambda result, input, weight, epsilon: None, lib=lib)
    torch.library.register_fake("_C::fused_add_rms_norm", lambda input, residual, weight, epsilon: None, lib=lib)
    _LIBRARIES.append(lib)


def unregister() -> None:
    for lib in _LIBRARIES:
        lib._destroy()
    _LIBRARIES.clear()
    namespace = torch.ops._C
    for name in OPS:
        namespace.__dict__.pop(name, None)  # the namespace caches resolved op packets


def install_package(module: types.ModuleType) -> None:
    fill(module, "vLLM (csrc/torch_bindings.cpp schemas)", "0.0.0+emulated")


def install_extension(module: types.ModuleType) -> None:
    register()
    fill(module, "vLLM _C extension (rms_norm / fused_add_rms_norm only)", "0.0.0+emulated")
