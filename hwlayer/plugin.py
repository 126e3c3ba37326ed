"""Helpers for backend plugins: the boilerplate every vendor plugin would otherwise repeat.

* :func:`lazy_import` -- import a vendor module when first needed, turning any failure into a
  one-line reason (for ``detect`` and for ``supports`` predicates) instead of an exception;
* :func:`emulation_note` / :func:`device_type` -- the test-only emulation switch: hwlayer's
  ``conformance/emulators`` installs a marker module ``hwlayer_emulation`` naming the emulated
  backend; nothing else creates it, so in production these say "not emulated";
* :func:`as_registered` -- the :class:`~hwlayer.backend.Backend` to register: itself, or under that
  emulation a CPU twin that detects as available and says "emulated" in ``verified``;
* :func:`register_all` -- register a table ``{op: (fn, supports)}`` for one backend.

A minimal plugin is then its ``Backend``, its adapters and two three-line hooks::

    @hookimpl
    def hwlayer_register_backends(register):
        register(as_registered(BACKEND))

    @hookimpl
    def hwlayer_register_ops(register):
        register_all(register, BACKEND.name, IMPLEMENTATIONS)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import sys
from types import ModuleType
from typing import Callable

from .backend import Availability, Backend

MARKER = "hwlayer_emulation"


@functools.cache
def _import_cached(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # ImportError, or a vendor runtime that fails to initialise
        return None, f"{name} is not importable ({type(exc).__name__}: {exc})"


def lazy_import(name: str) -> tuple[ModuleType | None, str]:
    """``(module, "")``, or ``(None, one-line reason)`` when ``name`` cannot be imported. Tried once per
    process (a module that failed stays failed), except under the test emulation, which swaps modules."""
    if MARKER in sys.modules:
        try:
            return importlib.import_module(name), ""
        except Exception as exc:
            return None, f"{name} is not importable ({type(exc).__name__}: {exc})"
    return _import_cached(name)


def emulation_note(backend: str) -> str | None:
    """The note of a test-only emulation of ``backend`` (conformance/emulators), else None (always None
    in production)."""
    marker = sys.modules.get(MARKER)
    return getattr(marker, "NOTE", None) if getattr(marker, "BACKEND", None) == backend else None


def device_type(backend: str, real: str) -> str:
    """The torch device type ``backend``'s adapters accept: ``real``, or ``cpu`` under its emulation."""
    return "cpu" if emulation_note(backend) else real


def as_registered(backend: Backend) -> Backend:
    """``backend`` as it should be registered now: itself, or under the test emulation of its libraries a
    CPU twin that detects as available ("EMULATED: ...") and says so in ``verified``."""
    note = emulation_note(backend.name)
    if note is None:
        return backend
    return dataclasses.replace(backend, device_type="cpu", detect=lambda: Availability(True, f"EMULATED: {note}"),
                               verified=f"{note}; {backend.verified}")


def register_all(register: Callable, backend: str,
                 implementations: dict[str, tuple[Callable, Callable | None]]) -> None:
    """``register(op, fn, backend=backend, supports=supports)`` for each ``op: (fn, supports)``."""
    for op, (fn, supports) in implementations.items():
        register(op, fn, backend=backend, supports=supports)
