"""Portable Triton tier: Triton kernels for the hot ops, usable by any backend Triton runs on.

As a backend of its own (``GLM_BACKEND=triton``) it runs on a CUDA or ROCm device, or on CPU
tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` is set (slow; for testing the kernels
on a machine without an accelerator). Its priority is below the CPU reference, so auto-detection
never picks it: it is chosen by name, inherited by a backend (``Backend.inherits=("triton",)``, as
the CUDA family does), or opted into by ``HWLAYER_TRITON`` (see :mod:`hwlayer.dispatch`).

Why the interpreter is not switched on automatically: it is orders of magnitude slower than the
CPU reference, and Triton decides interpreted-or-compiled when each ``@triton.jit`` function is
defined -- its own ``tl.sum`` etc. at ``import triton`` -- so the variable only works when set before
triton is first imported, i.e. in the environment that starts Python. Setting it from hwlayer would
work or silently not depending on import order. So: without a GPU and without ``TRITON_INTERPRET=1``
the backend reports itself unavailable and says how to enable it, and if the variable was set too
late it says that instead.

Kernels (``kernels.py``, all ``@triton.jit``): rms_norm (with fused residual), rope (interleaved and
NeoX), lightning_indexer scoring (selection: ``torch.topk`` on the scored tile, on the device),
sparse_mla_attention (online softmax over gathered latent rows, returns lse; split-K decode with an
lse merge, or one pass for prefill, chosen from host-known sizes), moe_route (sigmoid, group limit,
top-k by repeated argmax), grouped_gemm, silu_and_mul, and fused_experts (vLLM's fused_moe design:
expert-aligned row blocks, gate-up GEMM with SwiGLU epilogue, down GEMM with the router weight).
``quant_kernels.py``: fp8_block / int8 activation quantization and GEMMs for quant_linear /
quant_grouped_gemm. Each is registered with a ``supports`` predicate; what it declines runs the next
tier (generic torch at the end). The adapters read nothing on the host (see ``adapters.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from typing import Callable

from hwlayer.backend import Availability, Backend
from hwlayer.hookspecs import hookimpl

from .adapters import IMPLEMENTATIONS, interpreter_problem, interpreting
from .quant_adapters import IMPLEMENTATIONS as QUANT_IMPLEMENTATIONS

HWLAYER_HOOKSPEC_VERSION = "2.0"

INSTALL_HINT = "pip install .[triton] (or triton>=3.0); on CPU set TRITON_INTERPRET=1 before starting"


def _gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()  # true on CUDA and ROCm (HIP) builds alike


def _detect() -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed")
    version = importlib.metadata.version("triton")
    if interpreting():
        problem = interpreter_problem()
        if problem:
            return Availability(False, problem)
        return Availability(True, f"triton {version} interpreter (TRITON_INTERPRET=1): kernels run on CPU, slowly")
    if _gpu_present():
        import torch

        kind = "ROCm" if torch.version.hip else "CUDA"
        return Availability(True, f"triton {version} on {kind} device {torch.cuda.get_device_name(0)}")
    return Availability(False, "no CUDA/ROCm device; set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter")


def _device_type() -> str:
    if interpreting() or importlib.util.find_spec("triton") is None:
        return "cpu"
    return "cuda" if _gpu_present() else "cpu"


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(
        Backend(
            name="triton",
            vendor="OpenAI Triton (portable)",
            device_type=_device_type(),
            dist_backend="nccl" if _device_type() == "cuda" else "gloo",
            detect=_detect,
            visible_devices_env="CUDA_VISIBLE_DEVICES",
            priority=-10,  # below cpu: never auto-selected
            verified="conformance run under TRITON_INTERPRET=1 on CPU (interpreter); the split-K attention and "
                     "fused MoE kernels not run on GPU (an earlier kernel set passed conformance on an H200)",
            install_hint=INSTALL_HINT,
            description="portable Triton kernels; the tier the CUDA family inherits",
            weight_formats=("fp8_block", "int8"),  # quant_kernels.py (fp8 needs sm_89+ on a GPU)
        )
    )


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    for op, (fn, supports) in (IMPLEMENTATIONS | QUANT_IMPLEMENTATIONS).items():
        register(op, fn, backend="triton", supports=supports)
