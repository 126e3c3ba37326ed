"""The hwlayer hook specifications: the whole contract between hwlayer and a backend plugin.

A plugin is a module (or object) with functions decorated by :data:`hwlayer.hookimpl`, registered
under the entry-point group ``hwlayer`` in its package metadata::

    [project.entry-points.hwlayer]
    acme = "hwlayer_acme.plugin"

Built-in backends (cpu, triton, cuda family, ascend) register through exactly these hooks.

Versioning: :data:`HOOKSPEC_VERSION` is ``MAJOR.MINOR``. A plugin may declare the version it was
written for as a module attribute ``HWLAYER_HOOKSPEC_VERSION = "2.0"``. The promise: within one
MAJOR, hooks and their arguments are only ever added (MINOR bumps), never removed or changed, so a
plugin written for ``2.x`` with ``x <= MINOR`` keeps working. Plugins written for ``1.x`` (or that
declare nothing) keep working on the canonical layouts: the dispatcher calls them the 1.x way
(:data:`LEGACY_SPEC`). Any other version is refused with a message saying which versions match.
Migrating from 1.x: docs/CONTRIBUTING-BACKEND.md.

Changelog:

* 2.0: backends own their layouts. ``Backend.attention_layout``
  (:class:`hwlayer.ops.cache.AttentionLayout`, default canonical) allocates the paged caches and
  builds the backend's per-step tables (``AttentionMetadata.backend``); ``kv_cache_write``,
  ``lightning_indexer`` and ``sparse_mla_attention`` take the layout's cache objects
  (:class:`hwlayer.ops.cache.PagedKV`) where 1.x took tensors (1.x implementations still get the
  canonical tensor, and are left out on a non-canonical layout). ``sparse_mla_attention`` returns
  ``out`` alone unless called with ``return_lse=True``. The dispatcher validates each op's
  arguments against its contract once, so ``supports`` states only kernel limits. Plugin
  boilerplate (lazy import, the test emulation marker) is in :mod:`hwlayer.plugin`.
  ``ep_dispatch`` takes optional ``topk_weights`` (combine may then sum on the expert's rank) and
  ``capacity`` (the fixed-capacity, graph-capturable form) and returns an opaque handle (1.x
  implementations keep their four arguments; the fixed-capacity form goes to the generic pair).
  New ops: ``prepare_weight`` (a weight converted once at load, identity by default), and the
  weight formats ``w8a8_static`` and ``w4a8`` (msmodelslim W8A8 / W4A8).
* 1.2: ``rope``, ``kv_cache_write``, ``lightning_indexer`` and ``sparse_mla_attention`` take an
  optional keyword argument ``meta`` (:class:`hwlayer.ops.layout.AttentionMetadata`, the step's
  tables built once for every layer; implementations may use it or ignore it, results never
  depend on it). An implementation (or ``supports``) whose signature has no ``meta`` is called
  without it, so 1.0 and 1.1 plugins keep working unchanged. ``DeviceGraph`` gained ``kind``
  (default ``"stream"``, the torch device-module capture of 1.1; ``"step"``: a class that captures a
  step itself, as the CPU backend's traced step does).
* 1.1: two optional ``Backend`` fields with defaults, so 1.0 plugins keep working:
  ``device_graph`` (default None): how a backend captures and replays a step in a device graph
  (:class:`hwlayer.backend.DeviceGraph`); ``weight_formats`` (default the unquantized formats): the
  weight formats it executes (``fp8_block``, ``int8``, ``bf16``, ``fp16``, ``fp32``). New ops:
  ``quant_linear`` / ``quant_grouped_gemm`` / ``quant_fused_experts``.
* 1.0: ``hwlayer_register_backends``, ``hwlayer_register_ops``; the first version.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT_NAME = "hwlayer"
ENTRY_POINT_GROUP = "hwlayer"
HOOKSPEC_VERSION = "2.0"
LEGACY_SPEC = (1, 2)  # the newest 1.x: plugins declaring 1.0 .. 1.2 (or nothing) are served the 1.x way

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def hwlayer_register_backends(register: Callable) -> None:
    """Declare backends.

    Call ``register(Backend(...))`` once per backend (see :class:`hwlayer.backend.Backend` for
    the fields: name, vendor, torch device type, torch.distributed backend, visible-devices
    variable, detection function, auto-detection priority). Detection must be cheap and must not
    import a vendor package at registration time: do the import inside ``detect``.
    """


@hookspec
def hwlayer_register_ops(register: Callable) -> None:
    """Provide op implementations.

    Call ``register(op_name, fn, backend=NAME, supports=None)`` per implementation. ``op_name``
    is one of the ops in :mod:`hwlayer.ops`; ``fn`` must honour that op's contract (same
    signature, same semantics). ``supports``, when given, is called with the op's arguments
    before every call and returns ``True`` to take the call or a string saying why it declines
    (for example ``"head_dim 96 not in (64, 128)"``); a declined call goes to the next
    implementation and finally to the generic torch one. The dispatcher has already checked the
    call against the op's contract, so ``supports`` states only the kernel's limits (2.0). Leave
    ``supports`` out when ``fn`` takes every call the contract allows.
    """
