"""CPU reference backend: runs everywhere, the generic torch implementations are its kernels.

It registers no op overrides on purpose: :mod:`hwlayer.ops` is written as vectorised torch
(per-sequence and per-non-empty-expert loops at most), and conformance compares it against the
independent float64 goldens in ``conformance/``.
"""

from __future__ import annotations

from typing import Callable

from hwlayer.backend import Availability, Backend, DeviceGraph
from hwlayer.hookspecs import hookimpl

from . import graph

HWLAYER_HOOKSPEC_VERSION = "2.0"


def _detect() -> Availability:
    import torch

    return Availability(True, f"torch {torch.__version__} on {torch.get_num_threads()} CPU threads")


BACKEND = Backend(
    name="cpu",
    vendor="any",
    device_type="cpu",
    dist_backend="gloo",
    detect=_detect,
    priority=0,
    reference=True,
    verified="conformance run on x86_64 CPU in CI (make test)",
    description="reference backend: generic torch implementations",
    # Decode steps traced once and replayed from C++ (graph.py): the host skips the step's Python.
    device_graph=DeviceGraph("hwlayer.backends.cpu.graph", "TracedStepGraph",
                             "run on x86_64 CPU in CI: replays bit-identical to eager steps", kind="step")
    if graph.available() else None,
    # Every format through the generic ops: weights stay quantized, dequantized per call (slow, exact).
    weight_formats=("fp8_block", "int8", "w8a8_static", "w4a8", "bf16", "fp16", "fp32"),
)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(BACKEND)
