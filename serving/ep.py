"""Expert-parallel serving under torchrun: rank 0 serves HTTP and schedules, every rank runs each step.

    torchrun --nproc-per-node N serve.py --ep N

Every rank joins the process group (:func:`hwlayer.distributed.init_distributed`: the collective
backend is the hwlayer backend's ``dist_backend``, gloo on CPU) and loads the model with ``ep=N``
(each rank holds ``n_routed_experts / N`` experts). Each step rank 0 broadcasts the step's
:class:`model.Batch` (``broadcast_object_list``) and then every rank calls ``forward_batch`` on its
own copy of the paged cache (same geometry, same block ids), so the expert all-to-alls inside the
model line up. With a :class:`model.runner.ModelRunner` on every rank (``serve.py`` builds one unless
``--enforce-eager``), decode steps replay device graphs: rank 0 picks the graph
(:meth:`~model.runner.ModelRunner.step_key`) and sends it with the batch, so every rank replays the
same size and the MoE layers take the fixed-capacity all-to-all (DeepEP low-latency, Ascend MC2);
prefill and mixed steps run eagerly on every rank (the exact all-to-all). Followers loop until rank 0
broadcasts ``shutdown``. While idle, rank 0 broadcasts a
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
    all-to-alls like any other layer, so every rank runs it on the same inputs. ``runner`` (optional, a
    :class:`model.runner.ModelRunner`; every follower holds one built alike): plain steps run through
    it, decode steps in the graph rank 0 picks for all ranks; speculative steps stay eager."""

    supports_rows = True  # prompt logprobs: the same layers (and all-to-alls) as forward_batch, other rows

    def __init__(self, model: Any, runner: Any = None) -> None:
        self.model, self.runner = model, runner
        self.steps = 0
        self.spec = SpecState()
        self.cache: Any = None

    @property
    def uses_graphs(self) -> bool:
        return self.runner is not None and self.runner.uses_graphs

    def capture(self, cache: Any) -> None:
        """Capture the decode graphs on every rank at once (each capture runs the step's all-to-alls)."""
        if self.uses_graphs:
            step = self._send(("capture", None))
            with hd.rank_failure_guard(f"serving step {step} (graph capture)"):
                self.runner.capture(cache)

    def _send(self, message: tuple) -> int:
        self.steps += 1
        _broadcast([message], f"serving step {self.steps} (broadcast)")
        return self.steps

    def __call__(self, batch: Any, cache: Any, rows: Any = None) -> torch.Tensor:
        # The graph every rank replays (None: all eager), decided here and sent with the batch.
        key = self.runner.step_key([batch], cache) if self.runner is not None and rows is None else None
        step = self._send(("step", (batch, key)))
        with hd.rank_failure_guard(f"serving step {step} (forward)"):
            if rows is None:
                return run_step(self.model, self.runner, batch, cache, key)
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


def leader_forward(model: Any, runner: Any = None) -> LeaderForward:
    """Rank 0's ``forward`` (:class:`LeaderForward`)."""
    return LeaderForward(model, runner)


def keepalive() -> None:
    _broadcast([("noop", None)], "keep-alive")


def run_step(model: Any, runner: Any, batch: Any, cache: Any, key: Any) -> torch.Tensor:
    """One broadcast step on this rank: through ``runner`` in graph ``key`` (None: eagerly), or the
    model itself when the rank has no runner (then rank 0 must have picked no graph)."""
    if runner is not None:
        return runner.run(batch, cache, key)
    if key is not None:
        raise RuntimeError(f"rank {hd.current().rank}: rank 0 replays decode graph {key} but this rank has no "
                           "runner; start every rank with the same flags")
    return model.forward_batch(batch, cache)


def follower_loop(model: Any, num_blocks: int, block_size: int, runner: Any = None) -> None:
    """Ranks > 0: run every step rank 0 broadcasts, until ``shutdown``. ``runner``: this rank's
    :class:`model.runner.ModelRunner` (built with rank 0's flags), which replays the decode graphs
    rank 0 picks; without one every step runs eagerly.

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
                run_step(model, runner, batch[0], cache, batch[1])
            elif kind == "capture":
                run_capture(runner, cache, rank)
            elif kind == "spec_hidden":
                spec_hidden(model, batch, cache, spec)
            elif kind == "spec_draft":
                spec_draft(model, cache, spec, *batch)
            elif kind == "spec_chain":
                spec_chain(model, cache, spec, *batch)
    hd.shutdown()


def run_capture(runner: Any, cache: Any, rank: int) -> None:
    """A follower's share of rank 0's graph capture (the same sizes, the same all-to-alls)."""
    if runner is None:
        raise RuntimeError(f"rank {rank}: rank 0 captures decode graphs but this rank has no runner; start every "
                           "rank with the same flags")
    runner.capture(cache)


def shutdown_followers(failed: bool) -> None:
    """Rank 0, after serving: tell the followers to stop (unless a rank already failed), leave the group.

    Raises :class:`hwlayer.distributed.RankFailure` when a follower cannot be told; the group is
    left either way."""
    try:
        if not failed:
            _broadcast([("shutdown", None)], "shutdown")
    finally:
        hd.shutdown()
