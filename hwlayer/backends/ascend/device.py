"""Which tensors the Ascend adapters take: ``npu`` ones, or ``cpu`` ones under the test-only emulation."""

from __future__ import annotations

import sys


def emulation_note() -> str | None:
    """The note of a test-only emulation of this backend, else None (always None in production).

    ``conformance/emulators`` installs a marker module ``hwlayer_emulation`` naming the emulated
    backend next to CPU emulators of torch_npu; nothing else creates it. Under it the backend
    reports available, runs on CPU tensors and says "emulated" in ``verified``."""
    marker = sys.modules.get("hwlayer_emulation")
    return getattr(marker, "NOTE", None) if getattr(marker, "BACKEND", None) == "ascend" else None


def device_type() -> str:
    """The torch device type the adapters accept: ``npu``, or ``cpu`` under the test emulation."""
    return "cpu" if emulation_note() else "npu"
