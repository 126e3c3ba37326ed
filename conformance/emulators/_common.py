"""Helpers shared by the emulators."""

from __future__ import annotations

import types
from typing import Any, Callable

import torch


class VendorCheckError(RuntimeError):
    """Raised where the vendor's own argument check fails (TORCH_CHECK, DG_HOST_ASSERT, ...)."""


def check(condition: Any, message: str) -> None:
    """The emulated library's argument check: raise the way the real op fails (a RuntimeError)."""
    if not condition:
        raise VendorCheckError(message)


def fill(module: types.ModuleType, source: str, version: str, *functions: Callable, **attrs: Any) -> None:
    """Populate an emulated module with ``functions`` (by their names) and attributes."""
    module.__version__ = version
    module.EMULATED_FROM = source
    for fn in functions:
        setattr(module, fn.__name__, fn)
    for key, value in attrs.items():
        setattr(module, key, value)


def pad_with_garbage(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` grown to ``rows`` rows whose tail is undefined (NaN / a large index), as an op whose
    output rows past the valid count are documented as uninitialised: the caller must slice."""
    if t.shape[0] >= rows:
        return t
    tail_shape = (rows - t.shape[0], *t.shape[1:])
    value = float("nan") if t.is_floating_point() else 2**30
    return torch.cat((t, torch.full(tail_shape, value, dtype=t.dtype)))


# Emulated vendor kernels are opaque custom ops with fake (meta) kernels, as the real libraries'
# ops are to torch (torch_npu registers meta kernels, FlashMLA / DeepGEMM are extension calls): under
# FakeTensorMode only the adapter's own code runs, so a host read there is caught, while the
# emulator's internals (which may read values freely: they stand in for a kernel) stay out of sight.
NAMESPACE = "hwlayer_emu"


def opaque(name: str, impl: Callable, fake: Callable, mutates_args: tuple[str, ...] = ()) -> Any:
    """``torch.library.custom_op("hwlayer_emu::<name>", impl)`` with ``fake`` as its fake kernel.
    ``impl`` needs type annotations (the op schema is inferred from them). Returns the op."""
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=mutates_args)
    op.register_fake(fake)
    return op
