"""Expert-parallel serving under torchrun: rank 0 serves HTTP and schedules, every rank runs each step.

    torchrun --nproc-per-node N serve.py --ep N

Every rank joins the process group (:func:`hwlayer.distributed.init_distributed`: the collective
backend is the hwlayer backend's ``dist_backend``, gloo on CPU) and loads the model with ``ep=N``
(each rank holds ``n_routed_experts / N`` experts). Each step rank 0 broadcasts the step's
:class:`model.Batch` (``broadcast_object_list``) and then every rank calls ``forward_batch`` on its
own copy of the paged cache (same geometry, same block ids), so the expert all-to-alls inside the
model line up. Followers loop until rank 0 broadcasts ``shutdown``. While idle, rank 0 broadcasts a
keep-alive every few seconds so the followers' collective timeout never fires on a quiet server.

A rank failure surfaces as :class:`hwlayer.distributed.RankFailure` on rank 0's engine thread: the
engine fails in-flight requests, the API answers 503, and the process exits non-zero.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

KEEPALIVE_SECONDS = 10.0


def _fail(message: str) -> None:
    from .server import fail

    fail(message)


def start(ep: int, plan: Any, config: dict) -> Any:
    """Check the EP configuration (before any weight is read) and join the process group."""
    from hwlayer import distributed as hd
    from model import load_model

    world = int(os.environ.get("WORLD_SIZE", "1"))
    num_experts = int(config.get("n_routed_experts") or 0)
    try:
        hd.check_ep_config(ep, num_experts, world)
    except hd.DistConfigError as exc:
        _fail(str(exc))
    if "ep" not in inspect.signature(load_model).parameters:
        _fail(f"--ep {ep}: expert parallelism is not available yet (model.load_model takes no ep= argument)")
    try:
        return hd.init_distributed(plan)
    except hd.DistConfigError as exc:
        _fail(str(exc))


def load(load_model: Callable, path: Path, plan: Any, ep: int) -> Any:
    return load_model(path, backend=plan.backend.name, ep=ep)


def _broadcast(message: list, what: str) -> None:
    import torch.distributed as dist

    from hwlayer import distributed as hd

    ctx = hd.current()
    device = ctx.device if ctx is not None and ctx.dist_backend != "gloo" else None
    with hd.rank_failure_guard(what):
        dist.broadcast_object_list(message, src=0, device=device)


def leader_forward(model: Any) -> Callable[[Any, Any], torch.Tensor]:
    """Rank 0's ``forward``: send the batch to the followers, then run it here too."""
    step = {"n": 0}

    def forward(batch: Any, cache: Any) -> torch.Tensor:
        from hwlayer import distributed as hd

        step["n"] += 1
        _broadcast([("step", batch)], f"serving step {step['n']} (broadcast)")
        with hd.rank_failure_guard(f"serving step {step['n']} (forward)"):
            return model.forward_batch(batch, cache)

    return forward


def keepalive() -> None:
    _broadcast([("noop", None)], "keep-alive")


def follower_loop(model: Any, num_blocks: int, block_size: int) -> int:
    """Ranks > 0: run every step rank 0 broadcasts, until ``shutdown``. Returns the exit status."""
    from hwlayer import distributed as hd

    cache = model.new_cache(num_blocks, block_size)
    rank = hd.current().rank
    try:
        while True:
            message: list = [None]
            _broadcast(message, f"rank {rank} waiting for a step")
            kind, batch = message[0]
            if kind == "shutdown":
                break
            if kind == "step":
                with hd.rank_failure_guard(f"rank {rank} forward"):
                    model.forward_batch(batch, cache)
    except hd.RankFailure as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr, flush=True)
        return 1
    hd.shutdown()
    return 0


def shutdown_followers(failed: bool) -> None:
    from hwlayer import distributed as hd

    if not failed:
        try:
            _broadcast([("shutdown", None)], "shutdown")
        except hd.RankFailure as exc:
            print(f"serve.py: error: {exc}", file=sys.stderr, flush=True)
    hd.shutdown()
