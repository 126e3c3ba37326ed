"""What a backend is: plain facts about a device family, in the spirit of vLLM's Platform."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, NamedTuple

if TYPE_CHECKING:
    from .ops.cache import AttentionLayout


class Availability(NamedTuple):
    """Result of a backend's detection: whether it can run here, and a human reason either way."""

    available: bool
    reason: str


def always_available(reason: str = "runs on any machine") -> Callable[[], Availability]:
    return lambda: Availability(True, reason)


@dataclass(frozen=True)
class DeviceGraph:
    """How a backend captures a step into a device graph and replays it (CUDA graphs, ACL graphs).

    ``kind="stream"``: ``module`` is the torch device module that provides the documented capture
    API, ``graph`` its graph class; the module must offer ``<graph>()``, ``graph(g, pool=...)``,
    ``graph_pool_handle()``, ``Stream``, ``stream``, ``current_stream`` and ``synchronize`` (as
    ``torch.cuda`` does, and ``torch.npu`` once torch_npu is imported).
    ``kind="step"``: ``<module>.<graph>()`` makes an object that captures a step itself
    (``capture(fn) -> output``, ``replay()``), such as the CPU's traced step
    (:mod:`hwlayer.backends.cpu.graph`); such graphs are cheap, so the runner also keys them by a
    context-length bucket instead of sizing every one for ``max_model_len``.
    The model runner (``model/runner.py``) uses it; the backend declares only that and how, never
    captures itself. ``verified``: what the capture has run on, stated honestly.
    """

    module: str  # "torch.cuda"
    graph: str  # "CUDAGraph"
    verified: str = "not run on hardware"
    kind: str = "stream"  # "stream" (a torch device module's stream capture) or "step" (see above)

    @property
    def api(self) -> str:
        return f"{self.module}.{self.graph}"


@dataclass(frozen=True)
class Backend:
    """A backend declaration, passed to ``register`` in ``hwlayer_register_backends``.

    Attributes:
        name: the ``GLM_BACKEND`` value that selects it (lower case, e.g. ``"ascend"``).
        vendor: who makes the hardware (``"Huawei"``).
        device_type: the torch device type tensors live on (``"npu"``, ``"cuda"``, ``"cpu"``).
        dist_backend: the torch.distributed backend for collectives (``"hccl"``, ``"nccl"``).
        visible_devices_env: the environment variable that limits visible devices, if any.
        detect: called lazily; returns :class:`Availability`. It may import the vendor package.
        priority: auto-detection picks the available backend with the highest priority.
        inherits: other backends whose implementations fill ops this one does not provide,
            before the generic torch default (e.g. a vendor taking the Triton tier).
        reference: True only for the CPU reference backend: generic implementations are its
            native ones, so strict mode does not count them as fallbacks.
        verified: what the backend has actually been run on, stated honestly
            (``"conformance run on ..."`` or ``"written against ... API, not run on hardware"``).
        install_hint: what to do when ``detect`` says unavailable.
        device_graph: how the backend captures and replays a step (:class:`DeviceGraph`), or None
            when it cannot (the CPU reference; the model runner then runs every step eagerly).
            Added in hook specs 1.1.
        weight_formats: the weight formats it executes (hook specs 1.1): a tuple of names from
            :data:`hwlayer.ops.quant.WEIGHT_FORMATS`, or a function returning one (called lazily,
            e.g. to read the device's compute capability). The default, for 1.0 plugins, is the
            unquantized formats only; the model loader converts a quantized checkpoint to what the
            backend declares (see :meth:`native_weight_formats`).
        attention_layout: how the backend stores a model's paged caches and which per-step tables it
            builds (hook specs 2.0, :class:`hwlayer.ops.cache.AttentionLayout`); None, the default,
            is the canonical layout (one latent cache, one indexer cache, no tables).
    """

    name: str
    vendor: str
    device_type: str
    dist_backend: str
    detect: Callable[[], Availability] = field(default=always_available(), compare=False)
    visible_devices_env: str | None = None
    priority: int = 0
    inherits: tuple[str, ...] = ()
    reference: bool = False
    verified: str = "not run on hardware"
    install_hint: str = ""
    description: str = ""
    device_graph: DeviceGraph | None = None
    weight_formats: tuple[str, ...] | Callable[[], tuple[str, ...]] = field(
        default=("bf16", "fp16", "fp32"), compare=False)
    attention_layout: AttentionLayout | None = field(default=None, compare=False)

    def layout(self) -> AttentionLayout:
        """The backend's :class:`~hwlayer.ops.cache.AttentionLayout` (the canonical one unless it declares one)."""
        from .ops.cache import CANONICAL

        return self.attention_layout or CANONICAL

    def availability(self) -> Availability:
        """Run detection, turning an exception into an 'unavailable' answer with its message."""
        try:
            result = self.detect()
        except Exception as exc:  # detection must never take the process down
            return Availability(False, f"detection raised {type(exc).__name__}: {exc}")
        if isinstance(result, Availability):
            return result
        if isinstance(result, tuple) and len(result) == 2:
            return Availability(bool(result[0]), str(result[1]))
        return Availability(bool(result), "")

    def native_weight_formats(self) -> tuple[str, ...]:
        """The formats this backend runs (resolving a callable declaration; one that raises, or names
        an unknown format, counts as the unquantized formats only -- never a crash)."""
        from .ops.quant import UNQUANTIZED_FORMATS, WEIGHT_FORMATS

        declared = self.weight_formats
        try:
            formats = tuple(declared() if callable(declared) else declared)
        except Exception:  # detection-like: must never take the process down
            formats = ()
        if any(f not in WEIGHT_FORMATS for f in formats):
            formats = ()
        return tuple(dict.fromkeys(formats + tuple(UNQUANTIZED_FORMATS)))

    def visible_devices(self) -> str | None:
        return os.environ.get(self.visible_devices_env) if self.visible_devices_env else None
