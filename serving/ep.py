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
from typing import Any

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


class SpecState:
    """What a speculative step keeps between its target forward and its MTP calls, on every rank:
    the step's context and hidden states, and the MTP's hidden state of the drafting rows."""

    def __init__(self) -> None:
        self.ctx: Any = None
        self.h: torch.Tensor | None = None
        self.x: torch.Tensor | None = None


def spec_hidden(model: Any, batch: Any, cache: Any, st: SpecState) -> torch.Tensor:
    st.ctx = model.context(batch, cache)
    st.h = model.hidden_states(st.ctx.input_ids, st.ctx, cache)
    return st.h


def spec_draft(model: Any, cache: Any, st: SpecState, next_ids: Any, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.as_tensor(next_ids, dtype=torch.int64).to(model.device)
    sel = torch.as_tensor(rows, dtype=torch.int64).to(model.device)
    logits, x = model.mtp(tokens, st.h, st.ctx, cache, return_hidden=True, rows=sel)
    st.x = x[sel]
    return logits, st.x


def spec_chain(model: Any, cache: Any, st: SpecState, batch: Any, live: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    sub = model.context(batch, cache)
    logits, x = model.mtp(sub.input_ids, st.x[live], sub, cache, return_hidden=True)
    st.x = st.x.clone()
    st.x[live] = x
    return logits, x


class LeaderForward:
    """Rank 0's ``forward``: send the batch to the followers, then run it here too. Under speculative
    decoding (serving/runner.py) the target step (:meth:`hidden_states`) and every MTP call
    (:meth:`draft`, :meth:`draft_chain`) are broadcast as well: the MTP layer's MoE joins the expert
    all-to-alls like any other layer, so every rank runs it on the same inputs."""

    supports_rows = True  # prompt logprobs: the same layers (and all-to-alls) as forward_batch, other rows

    def __init__(self, model: Any) -> None:
        self.model = model
        self.steps = 0
        self.spec = SpecState()
        self.cache: Any = None

    def _send(self, message: tuple) -> int:
        self.steps += 1
        _broadcast([message], f"serving step {self.steps} (broadcast)")
        return self.steps

    def __call__(self, batch: Any, cache: Any, rows: Any = None) -> torch.Tensor:
        step = self._send(("step", batch))
        with hd.rank_failure_guard(f"serving step {step} (forward)"):
            if rows is None:
                return self.model.forward_batch(batch, cache)
            from .runner import logits_of_rows

            return logits_of_rows(self.model, batch, cache, rows)

    def hidden_states(self, batch: Any, cache: Any) -> torch.Tensor:
        step = self._send(("spec_hidden", batch))
        self.cache = cache
        with hd.rank_failure_guard(f"serving step {step} (verify forward)"):
            return spec_hidden(self.model, batch, cache, self.spec)

    def draft(self, next_ids: Any, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._send(("spec_draft", (next_ids, rows)))
        with hd.rank_failure_guard(f"serving step {step} (MTP draft)"):
            return spec_draft(self.model, self.cache, self.spec, next_ids, rows)

    def draft_chain(self, batch: Any, live: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._send(("spec_chain", (batch, live)))
        with hd.rank_failure_guard(f"serving step {step} (MTP draft)"):
            return spec_chain(self.model, self.cache, self.spec, batch, live)


def leader_forward(model: Any) -> LeaderForward:
    """Rank 0's ``forward`` (:class:`LeaderForward`)."""
    return LeaderForward(model)


def keepalive() -> None:
    _broadcast([("noop", None)], "keep-alive")


def follower_loop(model: Any, num_blocks: int, block_size: int) -> None:
    """Ranks > 0: run every step rank 0 broadcasts, until ``shutdown``.

    Raises :class:`hwlayer.distributed.RankFailure` when a collective fails (the group is broken
    then, so it is left as it is)."""
    cache = model.new_cache(num_blocks, block_size)
    rank = hd.current().rank
    spec = SpecState()
    while True:
        message: list = [None]
        _broadcast(message, f"rank {rank} waiting for a step")
        kind, batch = message[0]
        if kind == "shutdown":
            break
        with hd.rank_failure_guard(f"rank {rank} forward"):
            if kind == "step":
                model.forward_batch(batch, cache)
            elif kind == "spec_hidden":
                spec_hidden(model, batch, cache, spec)
            elif kind == "spec_draft":
                spec_draft(model, cache, spec, *batch)
            elif kind == "spec_chain":
                spec_chain(model, cache, spec, *batch)
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
