"""Backend ``musa``: Moore Threads GPUs through torch_musa (device ``musa``, collectives ``mccl``).

Detection imports torch_musa only when asked, and requires torch_musa >= 2.7 (what mate needs).
Ops: sparse_mla_attention (mate.flashmla), lightning_indexer (mate.deep_gemm paged mqa logits over
the FP8 paged indexer cache of its layout, opt-in),
grouped_gemm (mate.deep_gemm contiguous grouped GEMM), moe_route (mate.moe_fused_gate), each
guarded by a ``supports_*`` check; everything else runs hwlayer's generic torch ops.
"""

from __future__ import annotations

from typing import Callable

from hwlayer import Availability, Backend, hookimpl
from hwlayer.plugin import as_registered, register_all

from . import adapters, convert

HWLAYER_HOOKSPEC_VERSION = "2.0"

NAME = "musa"
MIN_TORCH_MUSA = (2, 7)
VERIFIED = ("written against MooreThreads/mate 3f58cc3 (2026-05-26); emulated in CI from that API "
            "(conformance --emulated); not run on hardware")
INSTALL_HINT = ("install torch_musa >= 2.7 and mate from Moore Threads (MUSA toolkit required); "
                "check devices with `mthreads-gmi`")


def detect() -> Availability:
    try:
        import torch_musa
    except Exception as exc:
        return Availability(False, f"torch_musa is not importable ({type(exc).__name__}: {exc})")
    import importlib.metadata

    import torch

    version = getattr(torch_musa, "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version("torch_musa")
        except importlib.metadata.PackageNotFoundError:
            version = "0"
    if convert.parse_version(str(version))[:2] < MIN_TORCH_MUSA:
        return Availability(False, f"torch_musa {version} is older than 2.7 (mate needs >= 2.7)")
    if not torch.musa.is_available():
        return Availability(False, "torch.musa.is_available() is False "
                                   "(no GPU visible; check MUSA_VISIBLE_DEVICES and `mthreads-gmi`)")
    _, why = adapters._import("mate")
    ops_note = "mate kernels enabled" if not why else f"generic ops only: {why}"
    return Availability(True, f"{torch.musa.device_count()} MUSA device(s): {torch.musa.get_device_name(0)}, "
                              f"torch_musa {version}; {ops_note}")


BACKEND = Backend(
    name=NAME,
    vendor="Moore Threads",
    device_type="musa",
    dist_backend="mccl",
    detect=detect,
    visible_devices_env="MUSA_VISIBLE_DEVICES",
    priority=50,
    verified=VERIFIED,
    install_hint=INSTALL_HINT,
    description="Moore Threads GPUs via torch_musa; kernels from mate",
    attention_layout=adapters.LAYOUT,  # HWLAYER_MUSA_FP8_INDEXER=1: an FP8 paged indexer cache
)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(as_registered(BACKEND))  # under hwlayer's test-only emulation: a CPU twin saying "emulated"


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    register_all(register, NAME, {
        "sparse_mla_attention": (adapters.sparse_mla_attention, adapters.supports_sparse_mla_attention),
        "lightning_indexer": (adapters.lightning_indexer, adapters.supports_lightning_indexer),
        "grouped_gemm": (adapters.grouped_gemm, adapters.supports_grouped_gemm),
        "moe_route": (adapters.moe_route, adapters.supports_moe_route),
    })
