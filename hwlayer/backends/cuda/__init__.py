"""The CUDA family: NVIDIA, Hygon (ROCm/HIP), MetaX (MACA), Iluvatar (CoreX).

All four put tensors on torch device ``cuda``; they differ in vendor identity (see ``detect.py``,
which tells them apart, and Kunlunxin's machines too: that backend is the out-of-tree plugin
``plugins/hwlayer-kunlun``), visible-devices variable, collective library underneath ``nccl``, and
native kernels. Op resolution per backend: its native adapters (``native.py``; ``hygon.py``,
``iluvatar.py``; ``deepep.py`` for EP; each behind a ``supports`` check that the library imports and
takes the shapes), then the Triton tier for those
Triton runs on (``inherits=("triton",)``), then generic torch.

No native adapter here has run with its vendor library; they run in CI against CPU emulators held to
the vendors' own tests and references (``pytest conformance --backend cuda|metax|hygon|iluvatar
--emulated``). The Triton tier and the generic ops of ``cuda`` ran on an NVIDIA H200 (docs/benchmarks.md).
``verified`` says which API version each follows.
"""

from __future__ import annotations

from typing import Callable

from hwlayer.backend import Backend, DeviceGraph
from hwlayer.hookspecs import hookimpl
from hwlayer.plugin import as_registered

from . import deepep, hygon, iluvatar, native
from .detect import detect

HWLAYER_HOOKSPEC_VERSION = "2.0"


def _nvidia_weight_formats() -> tuple[str, ...]:
    """FP8 tensor cores from compute capability 8.9 (Ada, Hopper); INT8 tensor cores before that."""
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 9):
        return ("fp8_block", "int8")
    return ("int8",)

NOT_RUN = "not run on hardware"
EMULATED = "emulated in CI from those APIs (pytest conformance --emulated)"
# torch.cuda.CUDAGraph capture of decode steps (model/runner.py); the CUDA-built family shares it
CUDA_GRAPHS = DeviceGraph("torch.cuda", "CUDAGraph", "written against torch.cuda.CUDAGraph docs, not run on a GPU")


def _detector(name: str) -> Callable:
    return lambda: detect(name)


BACKENDS = (
    Backend(
        name="cuda",
        vendor="NVIDIA",
        device_type="cuda",
        dist_backend="nccl",
        detect=_detector("cuda"),
        visible_devices_env="CUDA_VISIBLE_DEVICES",
        priority=50,
        inherits=("triton",),
        verified=("native adapters written against FlashMLA 9241ae3 (2026-04-29), DeepGEMM 54e2261 (2026-06-23) and "
                  f"vLLM's _C schemas, {EMULATED}, not run with those libraries; conformance for cuda and triton run "
                  "on an NVIDIA H200 (torch 2.11+cu130, triton 3.6) without them: Triton tier and generic ops served"),
        device_graph=CUDA_GRAPHS,
        # canonical caches; with HWLAYER_FP8_INDEXER=1 an FP8 paged indexer cache read by DeepGEMM in place
        attention_layout=native.CUDA_LAYOUT,
        install_hint="install a CUDA build of torch (pip install torch --index-url "
        "https://download.pytorch.org/whl/cu128); optional kernels: flash_mla, deep_gemm, vllm",
        description="NVIDIA GPUs: FlashMLA / DeepGEMM / vLLM ops where installed, Triton tier, generic",
        weight_formats=_nvidia_weight_formats,
    ),
    Backend(
        name="hygon",
        vendor="Hygon",
        device_type="cuda",
        dist_backend="nccl",  # RCCL underneath (unverified)
        detect=_detector("hygon"),
        visible_devices_env="HIP_VISIBLE_DEVICES",
        priority=60,
        inherits=("triton",),
        verified=(f"written against {hygon.WRITTEN_AGAINST}: lightop.norm, lightop.op.moe_fused_gate, DCU "
                  "flash_mla_sparse_fwd, DCU deep_gemm fp8_fp4_(paged_)mqa_logits, lightop int8 grouped experts "
                  "(m_grouped_w8a8_gemm_nt_contig_asm over vllm_hcu's Marlin2 weight layout); emulated in CI, "
                  "not run on "
                  "Hygon hardware; collective nccl->RCCL unverified; "
                  f"{NOT_RUN}"),
        install_hint="install Hygon's DTK (ROCm) build of torch, lightop and the DCU builds of flash_mla / "
        "deep_gemm from the Hygon developer channel; hy-smi must be on PATH",
        description="Hygon DCU (ROCm/HIP build of torch): DCU FlashMLA / DeepGEMM and lightop where installed",
        # canonical caches; with HWLAYER_FP8_INDEXER=1 an FP8 paged indexer cache read by DCU DeepGEMM
        attention_layout=hygon.HYGON_LAYOUT,
        # The DCU has FP8 (vllm_hcu scores the DSA indexer with DeepGEMM fp8_fp4_(paged_)mqa_logits, wired
        # here opt-in, and quantises activations with lightop.quant.per_token_quant_fp8). Checkpoint weight
        # formats offered are int8 only: no FP8 block-scaled weight GEMM is wired for the DCU; int8 experts
        # run through lightop's w8a8 grouped GEMM (Marlin2 layout prepared at load), int8 linears on Triton.
        weight_formats=("int8",),
    ),
    Backend(
        name="metax",
        vendor="MetaX",
        device_type="cuda",
        dist_backend="nccl",  # MCCL underneath
        detect=_detector("metax"),
        visible_devices_env="CUDA_VISIBLE_DEVICES",
        priority=60,
        inherits=("triton",),
        verified=("written against mcoplib f722323 (torch.ops._C via mcoplib._C), mcFlashMLA c2dbf6e and MACA "
                  f"deep_gemm as vLLM-metax 3aadf08 / 6162d93 call it, {EMULATED}; {NOT_RUN}"),
        install_hint="install MetaX's MACA build of torch and mcoplib (plus MACA flash_mla / deep_gemm) "
        "from the MetaX channel",
        description="MetaX GPUs (MACA build of torch)",
        # canonical caches; decode steps score the bf16 indexer cache in place (bf16_paged_mqa_logits)
        attention_layout=native.METAX_LAYOUT,
        weight_formats=("int8",),  # C500 int8 tensor cores; no FP8 documented (Triton tier int8 GEMM)
    ),
    Backend(
        name="iluvatar",
        vendor="Iluvatar CoreX",
        device_type="cuda",
        dist_backend="nccl",  # unverified
        detect=_detector("iluvatar"),
        visible_devices_env="CUDA_VISIBLE_DEVICES",
        priority=60,
        inherits=("triton",),
        verified=f"{iluvatar.VERIFIED}; collective nccl unverified",
        install_hint="install Iluvatar's CoreX build of torch (and ixformer) from the Iluvatar channel",
        description="Iluvatar CoreX GPUs: ixformer DSA indexer, MoE routing and group GEMVs, Triton tier, generic",
        # canonical caches; the bf16 indexer cache is read in place by ixformer, tables built once per step
        attention_layout=iluvatar.ILUVATAR_LAYOUT,
        weight_formats=("int8",),  # int8 experts through ixformer, linears through the Triton tier; no FP8 documented
    ),
)


@hookimpl
def hwlayer_register_backends(register: Callable) -> None:
    for backend in BACKENDS:
        register(as_registered(backend))  # under the test emulation: a CPU twin saying so


@hookimpl
def hwlayer_register_ops(register: Callable) -> None:
    # Later registrations are preferred, so each op lists its most specific library last.
    vllm_norm, vllm_norm_supports = native.make_vllm_rms_norm("vllm._C")
    register("rms_norm", vllm_norm, backend="cuda", supports=vllm_norm_supports)
    register("sparse_mla_attention", native.flash_mla_sparse_attention, backend="cuda",
             supports=native.flash_mla_sparse_supports)
    register("lightning_indexer", native.deep_gemm_lightning_indexer, backend="cuda",
             supports=native.deep_gemm_indexer_supports)

    mx_norm, mx_norm_supports = native.make_vllm_rms_norm("mcoplib._C")  # `import mcoplib` registers nothing
    register("rms_norm", mx_norm, backend="metax", supports=mx_norm_supports)
    register("sparse_mla_attention", native.maca_flash_mla_sparse_attention, backend="metax",
             supports=native.maca_flash_mla_sparse_supports)
    register("lightning_indexer", native.deep_gemm_lightning_indexer, backend="metax",
             supports=native.deep_gemm_indexer_supports)

    register("rms_norm", native.lightop_rms_norm, backend="hygon", supports=native.lightop_rms_norm_supports)
    hygon.register(register, backend="hygon")  # DCU FlashMLA, lightop moe_fused_gate, DCU DeepGEMM indexer
    iluvatar.register(register, backend="iluvatar")  # ixformer DSA indexer, moe_grouped_topk, group GEMVs
    deepep.register(register, backend="cuda")  # ep_dispatch / ep_combine through DeepEP
