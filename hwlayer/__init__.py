"""hwlayer: one GLM-5 model codebase on every accelerator.

Public API::

    import hwlayer
    ops = hwlayer.plan()            # GLM_BACKEND or auto-detection; ops.rms_norm(...), ...
    hwlayer.plan("ascend")          # a named backend
    @hwlayer.hookimpl               # in a plugin: hwlayer_register_backends / hwlayer_register_ops

The op contracts live in :mod:`hwlayer.ops`, the hook specs in :mod:`hwlayer.hookspecs`.
"""

from .backend import Availability, Backend
from .dispatch import BackendError, DispatchPlan, PlanEntry, plan, reset, select_backend
from .hookspecs import HOOKSPEC_VERSION, hookimpl
from .registry import PluginError, registry

__version__ = "0.1.0"

__all__ = [
    "HOOKSPEC_VERSION",
    "Availability",
    "Backend",
    "BackendError",
    "DispatchPlan",
    "PlanEntry",
    "PluginError",
    "hookimpl",
    "plan",
    "registry",
    "reset",
    "select_backend",
]
