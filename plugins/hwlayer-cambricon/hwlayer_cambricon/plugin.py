"""Backend ``cambricon``: Cambricon MLU through torch_mlu (device ``mlu``, collectives ``cncl``).

Detection imports torch_mlu only when asked (``hwlayer info``, backend selection), never at
registration. Ops: rms_norm, rope, moe_route, grouped_gemm on torch_mlu_ops, each guarded by a
``supports_*`` check; everything else (and every declined call) runs hwlayer's generic torch ops.
"""

from __future__ import annotations

from typing import Callable

from hwlayer import Availability, Backend, hookimpl
from hwlayer.plugin import as_registered, register_all

from . import adapters

HWLAYER_HOOKSPEC_VERSION = "2.0"

NAME = "cambricon"
VERIFIED = ("written against torch_mlu_ops 1.12.1 _ops.py API docs; emulated in CI from them "
            "(conformance --emulated); not run on hardware")
INSTALL_HINT = ("install Cambricon's torch_mlu and torch_mlu_ops builds matching your torch (vendor channel), "
                "with the Neuware/CNToolkit runtime; check devices with `cnmon`")


def detect() -> Availability:
    try:
        import torch_mlu  # noqa: F401  (registers torch.mlu)
    except Exception as exc:
        return Availability(False, f"torch_mlu is not importable ({type(exc).__name__}: {exc})")
    import torch

    if not torch.mlu.is_available():
        return Availability(False, "torch.mlu.is_available() is False "
                                   "(no MLU visible; check MLU_VISIBLE_DEVICES and `cnmon`)")
    _, why = adapters._import("torch_mlu_ops")
    ops_note = "torch_mlu_ops kernels enabled" if not why else f"generic ops only: {why}"
    return Availability(True, f"{torch.mlu.device_count()} MLU device(s): {torch.mlu.get_device_name(0)}; {ops_note}")


BACKEND = Backend(
    name=NAME,
    vendor="Cambricon",
    device_type="mlu",
    dist_backend="cncl",
    detect=detect,
    visible_devices_env="MLU_VISIBLE_DEVICES",
    priority=50,
    verified=VERIFIED,
    install_hint=INSTALL_HINT,
    description="Cambricon MLU via torch_mlu; kernels from torch_mlu_ops",
)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(as_registered(BACKEND))  # under hwlayer's test-only emulation: a CPU twin saying "emulated"


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    register_all(register, NAME, {
        "rms_norm": (adapters.rms_norm, adapters.supports_rms_norm),
        "rope": (adapters.rope, adapters.supports_rope),
        "moe_route": (adapters.moe_route, adapters.supports_moe_route),
        "grouped_gemm": (adapters.grouped_gemm, adapters.supports_grouped_gemm),
    })
