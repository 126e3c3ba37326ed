"""Expert-parallel serving under torchrun: rank 0 serves HTTP and schedules, every rank runs each step.

    torchrun --nproc-per-node N serve.py --ep N

Every rank joins the process group (:func:`hwlayer.distributed.init_distributed`: the collective
backend is the hwlayer backend's ``dist_backend``, gloo on CPU) and loads the model with ``ep=N``
(each rank holds ``n_routed_experts / N`` experts). Each step rank 0 broadcasts the step's
:class:`model.Batch` (``broadcast_object_list``) and then every rank calls ``forward_batch`` on its
own copy of the paged cache (same geometry, same block ids), so the expert all-to-alls inside the
model line up. Followers loop until rank 0 broadcasts ``shutdown``. While idle, rank 0 broadcasts a
keep-alive every few seconds so the followers' collective timeout never fires on a quiet server.

This module raises, :mod:`serving.server` reports: a configuration that cannot work is a
:class:`hwlayer.distributed.DistConfigError` (one line, exit 2, before any weight is read); a rank
failure is a :class:`hwlayer.distributed.RankFailure` (on rank 0 it surfaces on the engine thread: the
engine fails in-flight requests, the API answers 503, and the process exits non-zero).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from hwlayer import distributed as hd

KEEPALIVE_SECONDS = 10.0


def start(ep: int, plan: Any, config: dict) -> hd.DistContext:
    """Check the EP configuration (before any weight is read) and join the process group.

    Raises :class:`hwlayer.distributed.DistConfigError` naming what is wrong."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    hd.check_ep_config(ep, int(config.get("n_routed_experts") or 0), world)
    return hd.init_distributed(plan)


def _broadcast(message: list, what: str) -> None:
    ctx = hd.current()
    device = ctx.device if ctx is not None and ctx.dist_backend != "gloo" else None
    with hd.rank_failure_guard(what):
        dist.broadcast_object_list(message, src=0, device=device)


def leader_forward(model: Any) -> Callable[[Any, Any], torch.Tensor]:
    """Rank 0's ``forward``: send the batch to the followers, then run it here too."""
    step = {"n": 0}

    def forward(batch: Any, cache: Any, rows: Any = None) -> torch.Tensor:
        step["n"] += 1
        _broadcast([("step", batch)], f"serving step {step['n']} (broadcast)")
        with hd.rank_failure_guard(f"serving step {step['n']} (forward)"):
            if rows is None:
                return model.forward_batch(batch, cache)
            # prompt logprobs: the same layers (and all-to-alls) as the followers' forward_batch, other rows
            from .runner import logits_of_rows

            return logits_of_rows(model, batch, cache, rows)

    forward.supports_rows = True
    return forward


def keepalive() -> None:
    _broadcast([("noop", None)], "keep-alive")


def follower_loop(model: Any, num_blocks: int, block_size: int) -> None:
    """Ranks > 0: run every step rank 0 broadcasts, until ``shutdown``.

    Raises :class:`hwlayer.distributed.RankFailure` when a collective fails (the group is broken
    then, so it is left as it is)."""
    cache = model.new_cache(num_blocks, block_size)
    rank = hd.current().rank
    while True:
        message: list = [None]
        _broadcast(message, f"rank {rank} waiting for a step")
        kind, batch = message[0]
        if kind == "shutdown":
            break
        if kind == "step":
            with hd.rank_failure_guard(f"rank {rank} forward"):
                model.forward_batch(batch, cache)
    hd.shutdown()


def shutdown_followers(failed: bool) -> None:
    """Rank 0, after serving: tell the followers to stop (unless a rank already failed), leave the group.

    Raises :class:`hwlayer.distributed.RankFailure` when a follower cannot be told; the group is
    left either way."""
    try:
        if not failed:
            _broadcast([("shutdown", None)], "shutdown")
    finally:
        hd.shutdown()
