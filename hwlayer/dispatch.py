"""Backend selection and the dispatch plan.

A :class:`DispatchPlan` is resolved once per backend: for every op in the catalogue it picks the
implementation (the backend's own, then those of the backends it inherits from, then the generic
torch default) and binds it as a plain attribute, so ``plan.rms_norm(x, w, eps)`` is an ordinary
function call with no hook call and no registry lookup. In front of a backend's implementation the
plan checks the call against the op's contract (:mod:`hwlayer.ops.contracts`, shapes and dtypes,
no values) so ``supports`` predicates state kernel limits only; only implementations registered
with a ``supports`` predicate pay for a guard, and only on their op. Implementations written for
hook specs 1.x are called the 1.x way (canonical cache tensors, ``(out, lse)``), decided once here.

Environment:
    GLM_BACKEND=name   select a backend (unset: the available backend with the highest priority).
    HWLAYER_STRICT=1   a non-reference backend whose plan uses generic fallbacks is an error.
    HWLAYER_TRACE=1    count calls per op and implementation (``plan.call_counts()``).
    HWLAYER_TRITON=    the portable Triton tier: ``1`` adds it to every backend's chain (after the
                       backend's own and inherited implementations, before generic torch);
                       ``op1,op2`` adds it for those ops only; ``0`` removes it from backends that
                       inherit it (e.g. the CUDA family). Unset: as each backend declares.
"""

from __future__ import annotations

import collections
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .backend import Backend
from .ops import CATALOGUE
from .ops.contracts import validated
from .registry import HwlayerPluginWarning, OpRegistration, Registry, registry, strict_mode


class BackendError(RuntimeError):
    """A backend cannot be selected: unknown, unavailable, or strict mode refused its plan."""


def _triton_setting() -> str:
    return os.environ.get("HWLAYER_TRITON", "").strip().lower()


def _tiers(backend: Backend, op: str) -> tuple[str, ...]:
    """Backends whose implementations of ``op`` are consulted, most preferred first."""
    tiers = [backend.name, *backend.inherits]
    setting = _triton_setting()
    if setting in ("0", "off", "false", "no"):
        return tuple(t for t in tiers if t != "triton" or t == backend.name)
    wanted = setting in ("1", "all", "on", "true", "yes") or op in {s.strip() for s in setting.split(",")}
    if wanted and "triton" not in tiers:
        tiers.append("triton")
    return tuple(tiers)


def _check_triton_setting() -> None:
    setting = _triton_setting()
    if setting in ("", "0", "off", "false", "no", "1", "all", "on", "true", "yes"):
        return
    unknown = [s.strip() for s in setting.split(",") if s.strip() and s.strip() not in CATALOGUE]
    if unknown:
        raise BackendError(
            f"HWLAYER_TRITON: unknown op {unknown[0]!r}; expected 1, 0 or comma-separated op names "
            f"({', '.join(CATALOGUE)})"
        )


@dataclass(frozen=True)
class PlanEntry:
    op: str
    implementation: str  # "module.function"
    origin: str  # "native", "native+fallback", "inherited:<backend>", "generic"
    reason: str
    plugin: str


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _guarded(native: Callable, supports: Callable, fallback: Callable) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        if supports(*args, **kwargs) is True:
            return native(*args, **kwargs)
        return fallback(*args, **kwargs)

    call.__wrapped__ = native  # type: ignore[attr-defined]
    return call


# Ops that gained the optional keyword ``meta`` (hookspec 1.2). An implementation whose signature
# lacks it (written for 1.0 / 1.1) is called without it: the argument never changes a result.
META_OPS = frozenset({"rope", "kv_cache_write", "lightning_indexer", "sparse_mla_attention"})


def _takes(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: assume the old one
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _takes_meta(fn: Callable) -> bool:
    return _takes(fn, "meta")


def _without_meta(fn: Callable) -> Callable:
    def call(*args: Any, meta: Any = None, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


# Ops that take the backend's cache objects (hook specs 2.0); 1.x implementations take canonical tensors.
CACHE_OPS = frozenset({"kv_cache_write", "lightning_indexer", "sparse_mla_attention"})


def _canonical_caches(fn: Callable) -> Callable:
    """``fn`` (a 1.x cache op) called with each cache object replaced by its canonical tensor."""
    from .ops.cache import PagedKV

    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(a.canonical if isinstance(a, PagedKV) else a for a in args)
        kwargs = {k: v.canonical if isinstance(v, PagedKV) else v for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


def _lse_on_request(fn: Callable, is_supports: bool) -> Callable:
    """A 1.x ``sparse_mla_attention`` (always ``(out, lse)``, no ``return_lse``) under the 2.0 contract."""
    if is_supports:
        def supports(*args: Any, return_lse: bool = False, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

        supports.__wrapped__ = fn  # type: ignore[attr-defined]
        return supports

    def call(*args: Any, return_lse: bool = False, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if isinstance(result, torch.Tensor):  # a 1.x implementation that already returns out alone
            if return_lse:
                raise TypeError(f"{_qualname(fn)} (hook specs 1.x) returned no lse; return (out, lse) as 1.x "
                                "requires, or declare HWLAYER_HOOKSPEC_VERSION = '2.0' and honour return_lse")
            return result
        out, lse = result
        return (out, lse) if return_lse else out

    call.__wrapped__ = fn  # type: ignore[attr-defined]
    return call


# Ops whose 2.0 signature gained optional arguments (``ep_dispatch``: ``topk_weights``, ``capacity``).
EP_OPS = frozenset({"ep_dispatch", "ep_combine"})


def _ep_1x(op: str, fn: Callable, is_supports: bool) -> Callable:
    """A 1.x ``ep_dispatch`` / ``ep_combine`` under the 2.0 contract: the dispatch drops
    ``topk_weights`` (its combine applies them, as 1.x did) and the fixed-capacity form, which 1.x
    has no notion of, goes to the generic op together with its combine (recognised by its handle)."""
    from .ops import ep as generic

    if op == "ep_dispatch":
        def dispatch(x: Any, topk_ids: Any, num_experts: int, group: Any = None, topk_weights: Any = None,
                     capacity: int | None = None) -> Any:
            if capacity is not None:
                return True if is_supports else generic.ep_dispatch(x, topk_ids, num_experts, group,
                                                                     topk_weights, capacity)
            return fn(x, topk_ids, num_experts, group)

        dispatch.__wrapped__ = fn  # type: ignore[attr-defined]
        return dispatch

    def combine(y: Any, handle: Any, topk_weights: Any, group: Any = None) -> Any:
        if isinstance(handle, generic.EPCapacityHandle):
            return True if is_supports else generic.ep_combine(y, handle, topk_weights, group)
        return fn(y, handle, topk_weights, group)

    combine.__wrapped__ = fn  # type: ignore[attr-defined]
    return combine


def _compatible(op: str, fn: Callable, spec: tuple[int, int] = (2, 0), is_supports: bool = False) -> Callable:
    """``fn`` as the plan calls it, decided once when the plan is built (no cost per call for current
    implementations): pre-1.2 implementations of a META_OPS op drop ``meta``; 1.x implementations of
    a CACHE_OPS op get canonical tensors, 1.x ``sparse_mla_attention`` returns the lse on request, and
    1.x EP ops keep their 1.x signature (``_ep_1x``)."""
    fn = _without_meta(fn) if op in META_OPS and not _takes_meta(fn) else fn
    if spec < (2, 0) and op in CACHE_OPS:
        if op == "sparse_mla_attention":
            fn = _lse_on_request(fn, is_supports)
        fn = _canonical_caches(fn)
    if spec < (2, 0) and op in EP_OPS and not (op == "ep_dispatch" and _takes(fn, "capacity")):
        fn = _ep_1x(op, fn, is_supports)  # (an ep_dispatch with the 2.0 signature is taken as such)
    return fn


def _counted(fn: Callable, key: tuple[str, str], counts: collections.Counter) -> Callable:
    def call(*args: Any, **kwargs: Any) -> Any:
        counts[key] += 1
        return fn(*args, **kwargs)

    call.__wrapped__ = fn  # type: ignore[attr-defined]  # a traced plan still says what it calls
    return call


class DispatchPlan:
    """Ops resolved for one backend. Each catalogue op is an attribute holding a function."""

    def __init__(self, backend: Backend, reg: Registry, trace: bool = False) -> None:
        self.backend = backend
        self.device = torch.device(backend.device_type)
        self.entries: dict[str, PlanEntry] = {}
        self._counts: collections.Counter = collections.Counter()
        self.trace = trace
        self.left_out: list[str] = []  # registrations this plan cannot call, and why
        composites = []
        for name, spec in CATALOGUE.items():
            if spec.composite:
                composites.append(name)  # built after the parts they call
                continue
            self._resolve(name, spec.default, reg)
        for name in composites:
            self._resolve(name, CATALOGUE[name].default(self), reg, composite=True)

    def _servable(self, op: str, r: OpRegistration) -> bool:
        """A 1.x cache op needs the canonical tensor: on a backend whose layout has none it is left out,
        with one line saying what to change."""
        if op not in CACHE_OPS or r.spec >= (2, 0) or self.backend.layout().canonical:
            return True
        why = (f"{op} of plugin {r.plugin!r} (hook specs {r.spec[0]}.{r.spec[1]}) left out of backend "
               f"{self.backend.name!r}: its cache layout {self.backend.layout().name!r} has no canonical tensor; "
               "declare HWLAYER_HOOKSPEC_VERSION = '2.0' and take hwlayer.ops.cache.PagedKV "
               "(docs/CONTRIBUTING-BACKEND.md)")
        self.left_out.append(why)
        warnings.warn(f"hwlayer: {why}", HwlayerPluginWarning, stacklevel=4)
        return False

    def _wrap(self, fn: Callable, op: str, label: str) -> Callable:
        return _counted(fn, (op, label), self._counts) if self.trace else fn

    def _label(self, bname: str) -> str:
        return "native" if bname == self.backend.name else f"inherited:{bname}"

    def _resolve(self, op: str, generic: Callable, reg: Registry, composite: bool = False) -> None:
        candidates = []  # (backend name, registration), most preferred first
        for bname in _tiers(self.backend, op):
            candidates += [(bname, r) for r in reversed(reg.implementations(op, bname)) if self._servable(op, r)]
        # Conditional implementations up to the first unconditional one, which ends the chain.
        chain, terminal = [], None
        for bname, r in candidates:
            if r.supports is None:
                terminal = (bname, r)
                break
            chain.append((bname, r))
        if terminal is not None:
            fn = self._wrap(_compatible(op, terminal[1].fn, terminal[1].spec), op, self._label(terminal[0]))
            fallback_name = self._label(terminal[0])
        else:
            fn = self._wrap(generic, op, "generic")
            fallback_name = "generic"
        for bname, r in reversed(chain):
            fn = _guarded(self._wrap(_compatible(op, r.fn, r.spec), op, self._label(bname)),
                          _compatible(op, r.supports, r.spec, is_supports=True), fn)
        if chain or terminal is not None:  # the contract checked once, before any backend code sees the call
            fn = validated(op, fn)
        setattr(self, op, fn)

        if chain:
            bname, first = chain[0]
            entry = PlanEntry(op, _qualname(first.fn), f"{self._label(bname)}+fallback",
                              f"where supports() accepts the call, else {fallback_name}", first.plugin)
        elif terminal is not None:
            bname, r = terminal
            entry = PlanEntry(op, _qualname(r.fn), self._label(bname), f"registered by plugin {r.plugin!r}", r.plugin)
        else:
            if composite:
                reason = "composite of the plan's parts (no fused version registered)"
            elif self.backend.reference:
                reason = "reference backend: the generic torch implementation is its own"
            else:
                reason = f"no {self.backend.name} implementation registered; generic torch fallback"
            entry = PlanEntry(op, f"hwlayer.ops.{op}", "generic", reason, "hwlayer")
        self.entries[op] = entry

    def fallbacks(self) -> list[str]:
        """Ops that run the generic torch implementation on a backend that is not the reference."""
        if self.backend.reference:
            return []
        return [e.op for e in self.entries.values() if e.origin == "generic" and not CATALOGUE[e.op].composite]

    def call_counts(self) -> dict[tuple[str, str], int]:
        """``{(op, 'native'|'generic'|'inherited:x'): calls}`` when created with trace=True."""
        return dict(self._counts)

    def __repr__(self) -> str:
        return f"DispatchPlan(backend={self.backend.name!r}, device={self.device})"


def select_backend(name: str | None = None, reg: Registry | None = None) -> Backend:
    """The backend named by ``name``, else ``GLM_BACKEND``, else the best available one."""
    reg = reg or registry()
    name = name if name is not None else os.environ.get("GLM_BACKEND") or None
    if name is not None:
        name = name.strip().lower()
        if name not in reg.backends:
            raise BackendError(
                f"unknown backend {name!r}; registered backends: {', '.join(sorted(reg.backends))}"
            )
        backend = reg.backends[name]
        status = backend.availability()
        if not status.available:
            hint = f" ({backend.install_hint})" if backend.install_hint else ""
            raise BackendError(f"backend {name!r} is unavailable: {status.reason}{hint}")
        return backend
    ranked = sorted(reg.backends.values(), key=lambda b: -b.priority)
    for backend in ranked:
        if backend.availability().available:
            return backend
    raise BackendError("no backend is available (the cpu backend should always be; is hwlayer installed intact?)")


_PLANS: dict[tuple[str, bool, str], DispatchPlan] = {}


def plan(backend: str | Backend | None = None, *, trace: bool | None = None) -> DispatchPlan:
    """The dispatch plan for a backend (by name, GLM_BACKEND, or auto-detection), cached.

    Raises :class:`BackendError` for an unknown or unavailable backend, and in strict mode
    (``HWLAYER_STRICT=1``) for a non-reference backend whose plan contains generic fallbacks.
    """
    reg = registry()
    chosen = backend if isinstance(backend, Backend) else select_backend(backend, reg)
    if trace is None:
        trace = os.environ.get("HWLAYER_TRACE", "") not in ("", "0")
    _check_triton_setting()
    key = (chosen.name, trace, _triton_setting())
    if key not in _PLANS:
        p = DispatchPlan(chosen, reg, trace=trace)
        if strict_mode() and p.fallbacks():
            raise BackendError(
                f"HWLAYER_STRICT=1: backend {chosen.name!r} has no native implementation of: "
                f"{', '.join(p.fallbacks())}"
            )
        _PLANS[key] = p
    return _PLANS[key]


def reset() -> None:
    """Forget cached plans and the registry (tests, or after installing a plugin)."""
    _PLANS.clear()
    registry(reload=True)
