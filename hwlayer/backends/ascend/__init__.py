"""Huawei Ascend backend: torch device ``npu``, collectives over ``hccl``, devices limited by
``ASCEND_RT_VISIBLE_DEVICES``.

``torch_npu`` is imported only when this backend is probed (``hwlayer info``, auto-detection) and
when its adapters run; importing hwlayer or building another backend's plan never imports it.
Detection says why Ascend is unavailable: torch_npu missing, the CANN environment not sourced, a
torch-npu version that does not match torch, or no NPU visible.

Native adapters (``adapters.py``, each behind a ``supports`` check): npu_rms_norm / npu_add_rms_norm,
npu_rotary_mul, npu_lightning_indexer + npu_sparse_flash_attention (absorbed MLA, TND query,
PA_BSND caches: the backend's layout keeps the latent ``c`` and ``k_pe`` in separate caches, so
nothing is copied per call) for DSA, npu_moe_gating_top_k for routing, npu_grouped_matmul + npu_swiglu for the
expert GEMMs (the ``fused_experts`` composite picks them up). Expert-parallel dispatch/combine use the
generic ``all_to_all_single`` over hccl: ``npu_moe_distribute_dispatch_v2`` delivers rows grouped by
expert with its own combine metadata, not the source-rank order the ``ep_dispatch`` contract fixes.
INT8 W8A8 (``quant.py``): npu_dynamic_quant + npu_quant_matmul / npu_grouped_matmul with per-token
scales for quant_linear / quant_grouped_gemm.

Written against the torch-npu 2.14 API documentation (Ascend/op-plugin docs @517f2e7d0f20,
2026-08-21); emulated in CI from those docs (``pytest conformance --backend ascend --emulated``,
conformance/emulators/torch_npu.py); not run on Ascend hardware.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable

from hwlayer.backend import Availability, Backend, DeviceGraph
from hwlayer.hookspecs import hookimpl
from hwlayer.plugin import as_registered, register_all

from . import mc2
from .adapters import IMPLEMENTATIONS, LAYOUT
from .quant import IMPLEMENTATIONS as QUANT_IMPLEMENTATIONS

HWLAYER_HOOKSPEC_VERSION = "2.0"

INSTALL_HINT = (
    "pip install .[ascend] with the torch-npu release matching your torch (torch-npu X.Y needs torch X.Y), "
    "and source the CANN toolkit first: source /usr/local/Ascend/ascend-toolkit/set_env.sh"
)

CANN_ENV_VARS = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")  # exported by CANN's set_env.sh


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _detect() -> Availability:
    if importlib.util.find_spec("torch_npu") is None:
        return Availability(False, "torch_npu is not installed")
    if not any(os.environ.get(v) for v in CANN_ENV_VARS):
        return Availability(False, "torch_npu is installed but the CANN environment is not set "
                                   f"({'/'.join(CANN_ENV_VARS)} unset)")
    import torch

    try:
        import torch_npu
    except Exception as exc:
        return Availability(False, f"import torch_npu failed: {type(exc).__name__}: {exc}")
    npu_version = getattr(torch_npu, "__version__", "?")
    if _major_minor(npu_version) != _major_minor(torch.__version__):
        return Availability(False, f"torch-npu {npu_version} does not match torch {torch.__version__}")
    if not torch.npu.is_available():
        return Availability(False, f"torch_npu {npu_version} imported but no NPU is visible")
    return Availability(True, f"torch_npu {npu_version}, {torch.npu.device_count()} NPU(s): "
                              f"{torch.npu.get_device_name(0)}")


BACKEND = Backend(
    name="ascend",
    vendor="Huawei",
    device_type="npu",
    dist_backend="hccl",
    detect=_detect,
    visible_devices_env="ASCEND_RT_VISIBLE_DEVICES",
    priority=70,
    verified=("written against torch_npu 2.14 / Ascend op-plugin docs @517f2e7d0f20 (2026-08-21), emulated in CI "
              "from them (pytest conformance --emulated), not run on hardware"),
    install_hint=INSTALL_HINT,
    description="Huawei Ascend NPUs through torch_npu",
    # ACL graphs: torch_npu's torch.npu.NPUGraph / torch.npu.graph (what vllm-ascend captures with)
    device_graph=DeviceGraph("torch.npu", "NPUGraph", "written against torch_npu's NPUGraph API docs, not run"),
    weight_formats=("int8", "w8a8_static", "w4a8"),  # 910B int8 cube units, no FP8: W8A8 (static, dynamic), W4A8
    attention_layout=LAYOUT,  # separate nope / rope latent caches, per-step int32 tables (adapters.py)
)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(as_registered(BACKEND))  # under the test-only emulation: a CPU twin saying "emulated"


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    register_all(register, "ascend", IMPLEMENTATIONS | QUANT_IMPLEMENTATIONS)
    mc2.register(register, backend="ascend")  # fixed-capacity ep_dispatch / ep_combine through MC2
