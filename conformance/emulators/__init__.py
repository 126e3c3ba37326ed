"""Documented-API emulators of the vendor libraries the adapters call, for CPU-only CI.

No vendor adapter here has run on its hardware. These emulators hold the adapters to the vendors'
*documented* APIs instead of to our own reading of them: each one implements, in plain torch on
CPU, the functions an adapter calls with their real signatures (required, keyword-only and default
arguments, return tuples), their documented layouts and limits (raising the way the vendor's check
does) and their semantics, each citing the vendor's own test reference or kernel source it follows
(at a commit; where the prose docs and the vendor's tests or kernels disagree, those win). A missing
required argument, a wrong layout, a wrong lse base or an out-of-range shape then fails a CPU test;
tests/test_emulators_vendor_refs.py checks the emulators against vectors derived from those
references. Every emulated kernel is an opaque custom op with a fake kernel (``_common.opaque``), so a
forward under ``FakeTensorMode`` runs the adapters' own code and sees the kernels only as shapes.

Emulated backend -> libraries (module names as the adapters import them):

===========  ==============================================================================
ascend       ``torch_npu``                                    (:mod:`.torch_npu`, quantized ops
             :mod:`.torch_npu_quant`)
cuda         ``flash_mla`` (current API), ``deep_gemm``, ``vllm._C`` (:mod:`.flash_mla`,
             :mod:`.deep_gemm`, :mod:`.vllm_c`)
metax        ``mcoplib`` + ``mcoplib._C``, MACA ``flash_mla`` (natural-log lse), MACA ``deep_gemm``
             with ``bf16_mqa_logits``
hygon        ``lightop`` + ``lightop.norm`` / ``lightop.op`` (:mod:`.lightop`), DCU ``flash_mla`` +
             ``flash_mla.flash_mla_interface``, DCU ``deep_gemm`` with ``fp8_fp4_*``
cambricon    ``torch_mlu_ops``                                (:mod:`.torch_mlu_ops`)
musa         ``mate`` + ``mate.flashmla`` / ``mate.deep_gemm`` / ``mate.gemm`` (:mod:`.mate`)
kunlunxin    ``kunlun_ops`` (base-2 sparse-prefill lse)      (:mod:`.kunlun_ops`)
iluvatar     ``ixformer.inference.functions`` (DSA indexer, moe_grouped_topk, group GEMVs) (:mod:`.ixformer`)
===========  ==============================================================================

How it is switched on (tests only, never in production):

* :func:`activate` puts an import hook first on ``sys.meta_path`` that serves those module names
  (``find_spec`` sees them without importing; ``import mcoplib`` does not load ``mcoplib._C``, as
  with the real package), and a marker module ``hwlayer_emulation`` in ``sys.modules`` naming the
  backend. A backend honours the marker only for its own name: detection reports it available
  ("EMULATED ..."), its device type becomes ``cpu`` and its ``verified`` line says "emulated from
  docs, not hardware". Nothing in hwlayer creates the marker; only this package does.
* :func:`deactivate` removes all of it (modules, hook, ``torch.ops._C`` registrations, cached
  imports) and reloads the registry.

``pytest conformance/ --backend ascend --emulated`` uses this for a whole session
(conformance/conftest.py); ``tests/test_backends_emulated.py`` uses :func:`activate` per test and
checks the emulators' signatures against ``stubs/``, recorded from the vendors' own files (the
torch-npu wheel, the libraries' sources at named commits) by :mod:`.record_stubs`.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys
import types
from typing import Callable, Iterator

MARKER = "hwlayer_emulation"

BACKENDS = ("ascend", "cuda", "metax", "hygon", "cambricon", "musa", "kunlunxin", "iluvatar")

# Ops each emulated conformance run must see served by the native adapter at least once
# (conformance/conftest.py fails the session otherwise): an adapter that silently declined every
# call would leave the run comparing the generic op with itself.
EXPECTED_NATIVE = {
    "ascend": ("rms_norm", "rope", "moe_route", "grouped_gemm", "silu_and_mul", "moe_permute", "quant_linear",
               "quant_grouped_gemm", "prepare_weight"),
    "cuda": ("rms_norm",),
    "metax": ("rms_norm",),
    "hygon": ("rms_norm", "moe_route"),
    "cambricon": ("rms_norm", "rope", "moe_route", "grouped_gemm"),
    "musa": ("grouped_gemm", "moe_route"),
    "kunlunxin": ("grouped_gemm", "moe_route", "rms_norm", "rope", "quant_grouped_gemm", "prepare_weight"),
    "iluvatar": ("lightning_indexer", "moe_route", "grouped_gemm", "quant_grouped_gemm", "prepare_weight"),
}
# Native adapters the conformance cases cannot reach: the suite's DSA cases use toy widths (latent
# 32 + rope 8, 4 heads, blocks of 8) outside every vendor kernel's documented shapes (576/512, 64 or
# 128 heads, blocks of 16...), and all its unpermute cases drop ids. Hygon's int8 experts: the quantized cases'
# widths (K 144 / 160) are not multiples of 128, which lightop's grouped GEMM is taken to need, so
# neither the Marlin2 prepare_weight nor quant_fused_experts runs there (tests/test_backends_hygon.py
# runs them at documented and GLM-5 widths and through a whole int8 model). tests/test_backends_emulated.py
# runs these adapters at documented shapes against the generic ops, with call counts, and
# tests/test_real_width.py runs a GLM-5-geometry checkpoint through them end to end.
REAL_SHAPE_TESTS = {
    "ascend": ("lightning_indexer", "sparse_mla_attention", "moe_unpermute"),
    "cuda": ("sparse_mla_attention", "lightning_indexer"),
    "metax": ("sparse_mla_attention", "lightning_indexer"),
    "hygon": ("sparse_mla_attention", "lightning_indexer", "quant_fused_experts", "prepare_weight"),
    "musa": ("sparse_mla_attention", "lightning_indexer"),
    "kunlunxin": ("sparse_mla_attention", "lightning_indexer"),
}

# Environment an emulated run sets. Empty: the FP8 indexer adapters stay opt-in (FP8 scoring can
# change the top-k, which the conformance suite rightly fails); tests/test_backends_emulated.py
# exercises them with their own recall bounds.
ENVIRONMENT: dict[str, dict[str, str]] = {}


def _builders(backend: str) -> dict[str, Callable[[types.ModuleType], None]]:
    """Module name -> function filling that module, for one emulated backend."""
    from . import (
        deep_ep,
        deep_gemm,
        flash_mla,
        ixformer,
        kunlun_ops,
        lightop,
        mate,
        mcoplib,
        torch_mlu_ops,
        torch_npu,
        torch_npu_mc2,
        torch_npu_quant,
        vllm_c,
    )

    def torch_npu_all(module: types.ModuleType) -> None:  # quantized and MC2 ops live in modules of their own
        torch_npu.install(module)
        torch_npu_quant.install(module)
        torch_npu_mc2.install(module)

    table: dict[str, dict[str, Callable[[types.ModuleType], None]]] = {
        "ascend": {"torch_npu": torch_npu_all},
        "cuda": {
            "flash_mla": flash_mla.install_current,
            "deep_gemm": deep_gemm.install_nvidia,
            "vllm": vllm_c.install_package,
            "vllm._C": vllm_c.install_extension,
            "deep_ep": deep_ep.install,
        },
        "metax": {
            "mcoplib": mcoplib.install_package,
            "mcoplib._C": mcoplib.install_extension,
            "flash_mla": flash_mla.install_maca,
            "deep_gemm": deep_gemm.install_maca,
        },
        "hygon": {
            "lightop": lightop.install_package,
            "lightop.norm": lightop.install_norm,
            "lightop.op": lightop.install_op,
            "lightop.gemm_ops": lightop.install_gemm_ops,
            "lightop.activation": lightop.install_activation,
            "lightop.quant": lightop.install_quant,
            "flash_mla": flash_mla.install_dcu_package,
            "flash_mla.flash_mla_interface": flash_mla.install_dcu_interface,
            "deep_gemm": deep_gemm.install_dcu,
        },
        "cambricon": {"torch_mlu_ops": torch_mlu_ops.install},
        "musa": {
            "mate": mate.install_package,
            "mate.flashmla": mate.install_flashmla,
            "mate.deep_gemm": mate.install_deep_gemm,
            "mate.gemm": mate.install_gemm,
        },
        "kunlunxin": {"kunlun_ops": kunlun_ops.install},
        "iluvatar": {
            "ixformer": ixformer.install_package,
            "ixformer.inference": ixformer.install_package,
            "ixformer.inference.functions": ixformer.install_functions,
        },
    }
    if backend not in table:
        raise ValueError(f"no emulation for backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    return table[backend]


class _Loader(importlib.abc.Loader):
    def __init__(self, build: Callable[[types.ModuleType], None]) -> None:
        self.build = build

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        self.build(module)


class _Finder(importlib.abc.MetaPathFinder):
    """Serves the emulated module names; everything else falls through to the normal finders."""

    def __init__(self, builders: dict[str, Callable[[types.ModuleType], None]]) -> None:
        self.builders = builders

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        build = self.builders.get(name)
        if build is None:
            return None
        is_package = any(other.startswith(name + ".") for other in self.builders)
        return importlib.util.spec_from_loader(name, _Loader(build), is_package=is_package, origin="emulator")


_STATE: dict[str, object] = {}


def note(backend: str) -> str:
    return f"emulated from docs, not hardware: CPU emulators of the {backend} libraries (conformance/emulators)"


def activate(backend: str, overrides: dict[str, Callable[[types.ModuleType], None]] | None = None) -> None:
    """Install the emulators of ``backend``'s libraries and the marker; reload hwlayer's registry.
    ``overrides`` replaces module builders (e.g. ``{"flash_mla": flash_mla.install_legacy}``)."""
    import os

    import hwlayer

    if _STATE:
        deactivate()
    builders = {**_builders(backend), **(overrides or {})}
    clashes = [name for name in builders if name in sys.modules]
    if clashes:
        raise RuntimeError(f"cannot emulate {clashes[0]!r}: a module of that name is already imported")
    finder = _Finder(builders)
    sys.meta_path.insert(0, finder)
    marker = types.ModuleType(MARKER, "hwlayer test-only emulation switch (conformance/emulators)")
    marker.BACKEND = backend
    marker.DEVICE_TYPE = "cpu"
    marker.NOTE = note(backend)
    if backend == "cuda":  # the emulated NVIDIA GPU: an H100/H200 (sm90a), where FlashMLA's sparse kernels run
        marker.CUDA_CAPABILITY = (9, 0)
    sys.modules[MARKER] = marker
    saved_env = {k: os.environ.get(k) for k in ENVIRONMENT.get(backend, {})}
    os.environ.update(ENVIRONMENT.get(backend, {}))
    _STATE.update(backend=backend, finder=finder, names=tuple(builders), env=saved_env)
    _clear_caches()
    hwlayer.reset()


def deactivate() -> None:
    """Undo :func:`activate`: modules, hook, marker, ``torch.ops._C`` registrations, caches, env."""
    import os

    import hwlayer

    from . import torch_npu_mc2, vllm_c

    if not _STATE:
        return
    finder = _STATE["finder"]
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)
    for name in list(sys.modules):
        if name == MARKER or any(name == n or name.startswith(n + ".") for n in _STATE["names"]):
            del sys.modules[name]
    for key, value in _STATE["env"].items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    vllm_c.unregister()
    torch_npu_mc2.unpatch()  # the emulated get_hccl_comm_name on gloo
    _STATE.clear()
    _clear_caches()
    hwlayer.reset()


def active() -> str | None:
    return _STATE.get("backend")  # type: ignore[return-value]


@contextlib.contextmanager
def emulation(backend: str, overrides: dict[str, Callable[[types.ModuleType], None]] | None = None) -> Iterator[None]:
    """``with emulation("ascend"): ...`` -- :func:`activate` for the block only."""
    activate(backend, overrides)
    try:
        yield
    finally:
        deactivate()


def _clear_caches() -> None:
    """Forget imports the adapters cached (they were made with or without the emulators)."""
    from hwlayer.backends.cuda import native

    native.importable.cache_clear()
    native._vllm_c_ops.cache_clear()
    for plugin in ("hwlayer_musa.adapters", "hwlayer_cambricon.adapters"):
        module = sys.modules.get(plugin)
        # (a plugin on hwlayer.plugin.lazy_import caches nothing under the emulation marker)
        if module is not None and hasattr(module._import, "cache_clear"):
            module._import.cache_clear()
