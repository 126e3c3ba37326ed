"""Telling the CUDA-family vendors apart.

Five vendors present their devices to torch as ``cuda``: NVIDIA, Hygon (ROCm/HIP build), MetaX
(MACA build), Iluvatar (CoreX) and Kunlunxin (through torch_xmlir). Vendor identity, torch device
type and collective backend are separate facts, so detection looks at vendor signals first and
calls a device plain NVIDIA only when none is present.

Every signal comes from a :class:`Probes` callable, so tests can inject them and check which vendor
wins when several signals are present, without any of the hardware.
"""

from __future__ import annotations

import importlib
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Callable

from hwlayer.backend import Availability


def _hip_version() -> str | None:
    import torch

    return getattr(torch.version, "hip", None)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""


def _module_available(name: str) -> bool:
    # find_spec does not import the module, so probing never runs vendor code.
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import_module(name: str) -> bool:
    """Import a vendor package (some, like torch_xmlir, must be imported before torch sees the device)."""
    try:
        importlib.import_module(name)
        return True
    except Exception:  # a broken vendor install is "not this vendor", never a crash
        return False


def _on_path(tool: str) -> bool:
    return shutil.which(tool) is not None


@dataclass(frozen=True)
class Probes:
    """The signals detection reads. Defaults query torch, importlib and PATH; tests pass lambdas."""

    hip_version: Callable[[], str | None] = _hip_version  # torch.version.hip: set on ROCm/HIP builds
    cuda_available: Callable[[], bool] = _cuda_available  # torch.cuda.is_available()
    device_name: Callable[[], str] = _device_name  # torch.cuda.get_device_name(0), "" without one
    module_available: Callable[[str], bool] = _module_available  # importable, without importing
    on_path: Callable[[str], bool] = _on_path  # a vendor command-line tool (hy-smi, mx-smi, ...)
    import_module: Callable[[str], bool] = _import_module  # only for a package find_spec found


FAMILY = ("kunlunxin", "hygon", "metax", "iluvatar", "cuda")


def identify(probes: Probes | None = None) -> tuple[str | None, str]:
    """Which CUDA-family backend this machine is: ``(name or None, reason)``.

    Order (vendor signals before plain NVIDIA): torch_xmlir -> Kunlunxin; a HIP build -> Hygon when
    ``hy-smi`` is present or the device name says Hygon/DCU (another HIP device is AMD, which this
    family does not cover); mcoplib or "MetaX" in the device name -> MetaX; "Iluvatar" in the device
    name -> Iluvatar; otherwise a CUDA device with no HIP build -> NVIDIA.
    """
    p = probes or Probes()
    if p.module_available("torch_xmlir"):
        if p.import_module("torch_xmlir") and p.cuda_available():
            return "kunlunxin", "torch_xmlir importable and a device visible"
        return None, "torch_xmlir is importable but no Kunlunxin device is visible"
    hip = p.hip_version()
    if not p.cuda_available():
        return None, "no CUDA-compatible device visible to torch" + (f" (HIP build {hip})" if hip else "")
    name = p.device_name() or ""
    lowered = name.lower()
    if hip:
        if p.on_path("hy-smi") or "hygon" in lowered or "dcu" in lowered:
            return "hygon", f"ROCm/HIP build {hip}, device {name!r}"
        return None, f"HIP build {hip} on {name!r} without Hygon signals (hy-smi): AMD GPUs use GLM_BACKEND=triton"
    if p.module_available("mcoplib") or "metax" in lowered:
        return "metax", f"MACA build: mcoplib importable or MetaX device {name!r}"
    if "iluvatar" in lowered:
        return "iluvatar", f"Iluvatar CoreX device {name!r}"
    return "cuda", f"NVIDIA device {name!r}"


VENDOR_LABELS = {
    "cuda": "NVIDIA",
    "hygon": "Hygon DCU",
    "metax": "MetaX",
    "iluvatar": "Iluvatar CoreX",
    "kunlunxin": "Kunlunxin",
}


def detect(backend: str, probes: Probes | None = None) -> Availability:
    """Availability of one family member: available only if :func:`identify` names it."""
    found, why = identify(probes)
    if found == backend:
        return Availability(True, why)
    if found is None:
        return Availability(False, why)
    return Availability(False, f"this machine is {VENDOR_LABELS[found]} ({why}), not {VENDOR_LABELS[backend]}")
