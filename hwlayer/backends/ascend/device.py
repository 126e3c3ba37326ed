"""Which tensors the Ascend adapters take: ``npu`` ones, or ``cpu`` ones under the test-only emulation
(the marker handling is hwlayer's, :mod:`hwlayer.plugin`)."""

from __future__ import annotations

from hwlayer import plugin


def emulation_note() -> str | None:
    """The note of a test-only emulation of this backend, else None (always None in production)."""
    return plugin.emulation_note("ascend")


def device_type() -> str:
    """The torch device type the adapters accept: ``npu``, or ``cpu`` under the test emulation."""
    return plugin.device_type("ascend", "npu")
