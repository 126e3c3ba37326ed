"""Plugin loading: built-in backends and installed entry points go through the same hooks.

Environment:
    HWLAYER_PLUGINS=a,b   load only these installed entry-point plugins (built-ins always load;
                          an empty value loads none).
    HWLAYER_STRICT=1      a plugin that fails to load or register is an error, not a warning.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pluggy

from . import hookspecs
from .backend import Backend

BUILTIN_PLUGINS = (
    "hwlayer.backends.cpu",
    "hwlayer.backends.triton",
    "hwlayer.backends.cuda",
    "hwlayer.backends.ascend",
)


class PluginError(RuntimeError):
    """A plugin could not be loaded or registered (raised only in strict mode)."""


class HwlayerPluginWarning(UserWarning):
    pass


@dataclass(frozen=True)
class OpRegistration:
    op: str
    backend: str
    fn: Callable
    supports: Callable | None
    plugin: str
    spec: tuple[int, int] = hookspecs.LEGACY_SPEC  # the hook specs the plugin was written for


@dataclass
class Registry:
    """Everything the loaded plugins declared, in registration order."""

    backends: dict[str, Backend]
    backend_plugins: dict[str, str]
    ops: list[OpRegistration]
    plugins: list[str]
    skipped: dict[str, str]

    def implementations(self, op: str, backend: str) -> list[OpRegistration]:
        return [r for r in self.ops if r.op == op and r.backend == backend]


def strict_mode() -> bool:
    return os.environ.get("HWLAYER_STRICT", "").strip().lower() in ("1", "true", "yes", "on")


def _check_spec_version(name: str, plugin: Any) -> tuple[int, int]:
    """The hook specs ``plugin`` was written for (undeclared: 1.x, the legacy calling convention);
    raises :class:`PluginError` for a version this hwlayer cannot serve."""
    declared = getattr(plugin, "HWLAYER_HOOKSPEC_VERSION", None)
    if declared is None:
        return hookspecs.LEGACY_SPEC
    ours_major, ours_minor = (int(p) for p in hookspecs.HOOKSPEC_VERSION.split("."))
    try:
        major, minor = (int(p) for p in str(declared).split("."))
    except ValueError:
        raise PluginError(
            f"plugin {name!r} declares HWLAYER_HOOKSPEC_VERSION={declared!r}; expected 'MAJOR.MINOR'"
        ) from None
    legacy_major, legacy_minor = hookspecs.LEGACY_SPEC
    if (major == ours_major and minor <= ours_minor) or (major == legacy_major and minor <= legacy_minor):
        return major, minor
    raise PluginError(
        f"plugin {name!r} was built for hook specs {declared}, this hwlayer provides "
        f"{hookspecs.HOOKSPEC_VERSION} (compatible: {legacy_major}.0 to {legacy_major}.{legacy_minor}, served on "
        f"the canonical layouts, and {ours_major}.0 to {hookspecs.HOOKSPEC_VERSION}); see docs/CONTRIBUTING-BACKEND.md"
    )


def _skip(name: str, reason: str, skipped: dict[str, str]) -> None:
    if strict_mode():
        raise PluginError(f"hwlayer plugin {name!r} failed: {reason}")
    skipped[name] = reason
    warnings.warn(f"hwlayer: skipping plugin {name!r}: {reason}", HwlayerPluginWarning, stacklevel=3)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    eps = list(importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP))
    allowed = os.environ.get("HWLAYER_PLUGINS")
    if allowed is not None:
        names = {n.strip() for n in allowed.split(",") if n.strip()}
        eps = [ep for ep in eps if ep.name in names]
    # Several installs of one distribution can list the same entry point twice.
    unique: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in eps:
        unique.setdefault(ep.name, ep)
    return list(unique.values())


def load_registry(extra_plugins: tuple[Any, ...] = ()) -> Registry:
    """Load built-in plugins, installed entry points and ``extra_plugins``; collect registrations.

    Each plugin's hooks are called separately so that one faulty plugin is skipped with a warning
    (an error under HWLAYER_STRICT=1) while the others keep working.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    skipped: dict[str, str] = {}

    candidates: list[tuple[str, Callable[[], Any]]] = [
        (mod, lambda mod=mod: importlib.import_module(mod)) for mod in BUILTIN_PLUGINS
    ]
    candidates += [(ep.name, ep.load) for ep in _entry_points()]
    candidates += [(getattr(p, "__name__", repr(p)), lambda p=p: p) for p in extra_plugins]

    specs: dict[str, tuple[int, int]] = {}
    for name, load in candidates:
        try:
            plugin = load()
            specs[name] = _check_spec_version(name, plugin)
            pm.register(plugin, name=name)
        except PluginError as exc:
            _skip(name, str(exc), skipped)
        except Exception as exc:
            _skip(name, f"import failed: {type(exc).__name__}: {exc}", skipped)

    backends: dict[str, Backend] = {}
    backend_plugins: dict[str, str] = {}
    ops: list[OpRegistration] = []

    for impl in pm.hook.hwlayer_register_backends.get_hookimpls():
        name = impl.plugin_name
        declared: list[Backend] = []

        def register_backend(backend: Backend, _declared: list[Backend] = declared) -> None:
            if not isinstance(backend, Backend):
                raise TypeError(f"register() expects hwlayer.Backend, got {type(backend).__name__}")
            _declared.append(backend)

        try:
            impl.function(register=register_backend)
        except Exception as exc:
            _skip(name, f"hwlayer_register_backends raised {type(exc).__name__}: {exc}", skipped)
            continue
        # A plugin that repeats a name already taken (by another plugin or by itself) is refused whole:
        # none of its backends stays registered to serve generic torch without the plugin's ops.
        names = [b.name for b in declared]
        taken = next((n for n in names if n in backends or names.count(n) > 1), None)
        if taken is not None:
            owner = backend_plugins.get(taken, name)
            _skip(name, f"backend {taken!r} already registered by {owner!r}", skipped)
            continue
        for backend in declared:
            backends[backend.name] = backend
            backend_plugins[backend.name] = name

    from .ops import CATALOGUE  # late: ops imports torch

    for impl in pm.hook.hwlayer_register_ops.get_hookimpls():
        name = impl.plugin_name
        if name in skipped:  # its backend hook failed: a skipped plugin contributes nothing
            continue
        pending: list[OpRegistration] = []

        def register_op(
            op_name: str,
            fn: Callable,
            backend: str,
            supports: Callable | None = None,
            _pending: list[OpRegistration] = pending,
            _plugin: str = name,
        ) -> None:
            if op_name not in CATALOGUE:
                raise ValueError(f"unknown op {op_name!r}; known ops: {', '.join(sorted(CATALOGUE))}")
            if not callable(fn):
                raise TypeError(f"implementation of {op_name!r} is not callable")
            if supports is not None and not callable(supports):
                raise TypeError(f"supports for {op_name!r} is not callable")
            spec = specs.get(_plugin, hookspecs.LEGACY_SPEC)
            _pending.append(OpRegistration(op_name, backend, fn, supports, _plugin, spec))

        try:
            impl.function(register=register_op)
        except Exception as exc:
            _skip(name, f"hwlayer_register_ops raised {type(exc).__name__}: {exc}", skipped)
            for bname in [b for b, owner in backend_plugins.items() if owner == name]:
                del backends[bname], backend_plugins[bname]  # no half-registered backend
            continue
        ops.extend(pending)

    loaded = [n for n, _ in candidates if n not in skipped and pm.has_plugin(n)]
    return Registry(backends, backend_plugins, ops, loaded, skipped)


_REGISTRY: Registry | None = None


def registry(reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = load_registry()
    return _REGISTRY
