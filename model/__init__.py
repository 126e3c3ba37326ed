"""GLM-5 (`glm_moe_dsa`) on hwlayer: ``load_model(path) -> GLM5`` plus the serving ``Batch`` layout.

    from model import load_model, Batch
    from model.generate import generate, generate_speculative, score
    m = load_model(path)                    # backend: GLM_BACKEND / auto; dtype: float32 on cpu
    score(m, ids); generate(m, ids, max_new_tokens=32)
    generate_speculative(m, ids).acceptance_rate   # MTP drafts, same tokens as generate()
    cache = m.new_cache(num_blocks, block_size); m.forward_batch(batch, cache)

``glm5.py`` is the network, ``generate.py`` the generation loops (kept a module of its own, not
re-exported here, so ``model.generate`` always names the module), ``loader.py`` the checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from hwlayer.ops.quant import UNQUANTIZED_FORMATS

from .config import ConfigError, ModelConfig
from .glm5 import GLM5, Batch, PagedCache
from .loader import CheckpointError, load_state, resolve_weight_format

__all__ = ["GLM5", "Batch", "CheckpointError", "ConfigError", "ModelConfig", "PagedCache", "load_model",
           "parse_dtype"]

_DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype.lower() not in _DTYPE_NAMES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPE_NAMES)}, got {dtype!r}")
    return _DTYPE_NAMES[dtype.lower()]


def load_model(
    path: str | Path,
    backend: str | None = None,
    dtype: str | torch.dtype | None = None,
    ep: int = 1,
    ep_group=None,
    progress: bool | None = None,
    weight_format: str | None = None,
    revision: str | None = None,
    download_dir: str | None = None,
) -> GLM5:
    """Load a glm_moe_dsa checkpoint directory onto a hwlayer backend.

    ``backend``: hwlayer backend name (None: ``GLM_BACKEND`` or auto-detection). ``dtype``: None
    means float32 on cpu and the config's dtype on accelerators. ``ep > 1``: expert parallelism over
    a torch.distributed group of that world size (under torchrun the default group is created here
    when it does not exist yet: :func:`hwlayer.distributed.init_distributed`); this rank loads only
    experts ``[r*E/ep, (r+1)*E/ep)``. Attention weights are on every rank; which tokens a rank runs
    (all of them, or only its own sequences' with data-parallel attention) is the caller's choice.
    ``weight_format``: ``fp8_block`` | ``int8`` | ``bf16`` | ``fp16`` | ``fp32`` or None (the
    checkpoint's format when the backend runs it, else the best it runs; see
    :func:`model.loader.resolve_weight_format`); one the backend cannot run is a ValueError. An
    unquantized ``weight_format`` with ``dtype=None`` chooses the dtype. ``path`` may be a Hugging
    Face id (or a ModelScope id with ``HWLAYER_USE_MODELSCOPE=1``): :func:`model.hub.resolve_model`,
    with ``revision`` and ``download_dir``. Every weight goes once through ``plan.prepare_weight``.
    """
    import hwlayer
    from hwlayer.distributed import local_expert_range

    from .hub import resolve_model

    path = resolve_model(path, revision, download_dir)
    cfg = ModelConfig.from_json(path)
    plan = hwlayer.plan(backend)
    if dtype is None and weight_format in UNQUANTIZED_FORMATS:
        dtype = UNQUANTIZED_FORMATS[weight_format]  # the format chooses the dtype
    if dtype is None:
        dtype = torch.float32 if plan.device.type == "cpu" else cfg.dtype
    dtype = parse_dtype(dtype)
    weight_format = resolve_weight_format(cfg, plan.backend, weight_format, dtype)
    expert_range = None
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep: expected an integer >= 1, got {ep!r}")
    if ep > 1:
        import torch.distributed as dist

        if cfg.n_routed_experts % ep:
            raise ValueError(f"ep={ep} must divide n_routed_experts ({cfg.n_routed_experts}) in {path / 'config.json'}")
        if not (dist.is_available() and dist.is_initialized()):
            if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
                raise RuntimeError(f"ep={ep} needs an initialised torch.distributed default group of world size {ep} "
                                   f"(launch with torchrun, or call torch.distributed.init_process_group first)")
            from hwlayer.distributed import init_distributed

            init_distributed(plan)  # under torchrun: join the job (the backend's collective, HWLAYER_DIST_TIMEOUT)
        world = dist.get_world_size(ep_group)
        if world != ep:
            raise RuntimeError(f"ep={ep} but the torch.distributed group has world size {world}")
        expert_range = local_expert_range(dist.get_rank(ep_group), ep, cfg.n_routed_experts)
    state, has_mtp = load_state(path, cfg, dtype, plan.device, expert_range, progress, weight_format,
                                native_formats=plan.backend.native_weight_formats(), prepare=plan.prepare_weight)
    model = GLM5(cfg, state, plan, dtype, has_mtp, ep=ep, ep_group=ep_group)
    model.path = path
    model.weight_format = weight_format
    return model
