"""Backend ``kunlunxin``: Kunlunxin (Baidu) XPUs, kernels from ``kunlun_ops``.

The XPU is torch device ``cuda`` with collectives ``nccl`` (vLLM-Kunlun 09869ee ``vllm_kunlun/platforms/
kunlun.py:26-37``: ``dist_backend = "nccl"``, ``device_type`` "always cuda"); devices are selected with
``XPU_VISIBLE_DEVICES`` (its docs and CI environment). Detection is hwlayer's CUDA-family probe, which
tells a Kunlunxin machine from an NVIDIA one (``torch_xmlir``) and imports nothing at registration.
Native ops (each behind a ``supports_*`` check; see adapters.py): sparse_mla_attention, lightning_indexer
(int8, opt-in: HWLAYER_KUNLUN_INT8_INDEXER=1), moe_route, grouped_gemm, rms_norm, rope, kv_cache_write (the
MLA latent cache), quant_grouped_gemm (int8, moe_fc W8A8) with prepare_weight; everything else is generic torch.
"""

from __future__ import annotations

from typing import Callable

from hwlayer import Backend, hookimpl
from hwlayer.plugin import as_registered, register_all

from . import adapters

HWLAYER_HOOKSPEC_VERSION = "2.0"

VERIFIED = ("written against vLLM-Kunlun@09869ee (kunlun_ops as vllm_kunlun/ops/_custom_ops.py calls it), "
            "emulated in CI (conformance --emulated), not run on Kunlunxin hardware; collective nccl as "
            "vLLM-Kunlun declares it (BKCL underneath, unverified)")


def detect():
    from hwlayer.backends.cuda.detect import detect as family_detect

    return family_detect(adapters.NAME)


BACKEND = Backend(
    name=adapters.NAME,
    vendor="Kunlunxin",
    device_type="cuda",
    dist_backend="nccl",
    detect=detect,
    visible_devices_env="XPU_VISIBLE_DEVICES",
    priority=60,
    verified=VERIFIED,
    install_hint="install the Kunlunxin XPU build of torch (torch_xmlir) and kunlun_ops from the Kunlunxin channel",
    description="Kunlunxin XPUs; kernels from kunlun_ops (no Triton tier: none documented for Kunlunxin)",
    weight_formats=("int8",),  # experts through moe_fc's W8A8 path; int8 linears dequantized by the generic op
    attention_layout=adapters.LAYOUT,
)

IMPLEMENTATIONS = {
    "sparse_mla_attention": (adapters.sparse_mla_attention, adapters.supports_sparse_mla_attention),
    "lightning_indexer": (adapters.lightning_indexer, adapters.supports_lightning_indexer),
    "moe_route": (adapters.moe_route, adapters.supports_moe_route),
    "grouped_gemm": (adapters.grouped_gemm, adapters.supports_grouped_gemm),
    "rms_norm": (adapters.rms_norm, adapters.supports_rms_norm),
    "rope": (adapters.rope, adapters.supports_rope),
    "kv_cache_write": (adapters.kv_cache_write, adapters.supports_kv_cache_write),
    "quant_grouped_gemm": (adapters.quant_grouped_gemm, adapters.supports_quant_grouped_gemm),
    "prepare_weight": (adapters.prepare_weight, None),
}


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    register(as_registered(BACKEND))  # under hwlayer's test-only emulation: a CPU twin saying "emulated"


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    register_all(register, BACKEND.name, IMPLEMENTATIONS)
