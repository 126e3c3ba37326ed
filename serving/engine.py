"""Continuous batching over a paged KV cache: the engine thread around three parts, as vLLM v1 splits them.

* :class:`serving.scheduler.Scheduler` (with the KV manager, :class:`serving.block_manager.BlockManager`)
  decides what runs each step: one token for each decoding sequence (plus its draft tokens under
  speculative decoding) and prefill chunks under a token budget (chunked prefill); KV blocks are taken
  on demand and a shortage preempts by recompute, with a progress guarantee (see its docstring).
* :class:`serving.runner.EngineRunner` owns the cache, the forward (device graphs live in
  :class:`model.runner.ModelRunner`), the step's host buffers and sampling; it returns token ids.
* :class:`serving.output.OutputProcessor` detokenizes, applies the stop conditions and streams events.

Threading: :meth:`Engine.submit` and :meth:`Engine.abort` may be called from any thread; all
sequence state is touched only by the engine thread (:meth:`Engine.start`), which runs the model.
Results go out through each request's ``on_event`` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch

from hwlayer.distributed import RankFailure

from .block_manager import BlockManager
from .output import OutputProcessor
from .request import MARKUP_TOKENS, EngineEvent, IncrementalDetokenizer, SamplingParams, Sequence, special_token_ids
from .runner import EngineRunner
from .scheduler import Scheduler

log = logging.getLogger("serving.engine")

__all__ = ["MARKUP_TOKENS", "Engine", "EngineEvent", "IncrementalDetokenizer", "SamplingParams", "Sequence",
           "special_token_ids"]


class Engine:
    """Continuous-batching engine around one model and one paged cache.

    ``forward``: how a built batch is run, default ``model.forward_batch`` (with row selection);
    serve.py passes a :class:`model.runner.ModelRunner` (decode steps replayed from device graphs
    where the backend has them), expert parallelism one that first broadcasts the batch to the other
    ranks. ``metrics``: a :class:`serving.metrics.ServingMetrics` or None. ``speculative``: a
    :class:`serving.speculative.MTPProposer`-like drafter (None: no speculative decoding).
    """

    def __init__(self, model: Any, tokenizer: Any, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: list[int],
                 forward: Callable[..., torch.Tensor] | None = None, metrics: Any = None,
                 on_idle: Callable[[], None] | None = None, idle_interval: float = 10.0,
                 enable_prefix_caching: bool = True, num_speculative_tokens: int = 0) -> None:
        if num_speculative_tokens and getattr(model, "mtp", None) is None:
            raise ValueError("speculative decoding with method mtp needs the checkpoint's MTP layer "
                             "(num_nextn_predict_layers >= 1 with its weights)")
        self.num_speculative_tokens = num_speculative_tokens
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.metrics = metrics
        self.on_idle = on_idle  # called on the engine thread every idle_interval seconds without work
        self.idle_interval = idle_interval
        self.device = getattr(model, "device", torch.device("cpu"))
        self.scheduler = self._make_scheduler(num_blocks, block_size, enable_prefix_caching)
        self.output = OutputProcessor(tokenizer, eos_token_ids=self.eos_token_ids, max_model_len=max_model_len,
                                      metrics=metrics, release=self.scheduler.release)
        self.runner = EngineRunner(model, num_blocks=num_blocks, block_size=block_size, forward=forward,
                                   stop_ids=self.output.stop_ids, num_speculative_tokens=num_speculative_tokens,
                                   max_model_len=max_model_len)
        self.num_draft_tokens = 0  # speculative decoding: drafts verified and accepted, for benchmarks
        self.num_accepted_tokens = 0
        self.special_ids = self.output.special_ids

        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._abort_all: str | None = None  # set by abort_all(): the error every request is finished with
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fatal_error: str | None = None  # set when the engine cannot continue (e.g. a rank died)
        self.on_fatal: Callable[[str], None] | None = None
        self.steps = 0
        self.num_computed_tokens = 0  # tokens run through the model: recomputation shows up here

    def _make_scheduler(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> Scheduler:
        return Scheduler(BlockManager(num_blocks, block_size, enable_prefix_caching), block_size=block_size,
                         max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                         max_model_len=self.max_model_len, metrics=self.metrics,
                         num_lookahead_tokens=self.num_speculative_tokens)

    @property
    def supports_prompt_logprobs(self) -> bool:
        """Whether the forward can return prompt rows' logits (the in-process runner can; data / expert
        parallel ranks do not send prefill rows back), so the API refuses such requests up front."""
        return bool(getattr(self.runner.forward, "supports_rows", False))

    # ---- the parts' state, by their old names -------------------------------------------------
    @property
    def allocator(self) -> Any:
        return self.scheduler.allocator

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self) -> Any:
        return self.scheduler.waiting

    @property
    def cache(self) -> Any:
        return self.runner.cache

    @property
    def forward(self) -> Callable[..., torch.Tensor]:
        return self.runner.forward

    @forward.setter
    def forward(self, value: Callable[..., torch.Tensor]) -> None:
        self.runner.forward = value

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    # ---- thread-safe API --------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return self.scheduler.blocks_needed(num_tokens)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run (one line), or None."""
        return self.scheduler.check_fits(prompt_len, max_tokens)

    def submit(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[EngineEvent], None],
               request_id: str | None = None) -> Sequence:
        seq = Sequence(prompt_ids, params, on_event, self.tokenizer, self.device, request_id)
        with self._cond:
            if self.fatal_error:
                raise RuntimeError(self.fatal_error)
            self._inbox.append(seq)
            self._cond.notify()
        return seq

    def abort(self, request_id: str) -> None:
        """Cancel a request; it leaves the batch (and frees its blocks) at the start of the next step."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def abort_all(self, message: str = "server shutting down") -> None:
        """Finish every queued and running request now (reason ``abort``, ``message`` as the error): the
        end of a drain that ran out of time. Requests submitted later are served as usual."""
        with self._cond:
            self._abort_all = message
            self._cond.notify()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self._inbox or self._aborts or self._abort_all or self.waiting or self.running)

    # ---- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                idle = False
                while not self._stopping and not self.has_work():
                    if not self._cond.wait(self.idle_interval if self.on_idle else None):
                        idle = True
                        break
                if self._stopping:
                    break
            try:
                if idle:
                    self.on_idle()
                    continue
                self.step()
            except Exception as exc:  # never let the loop die silently; fail what was in flight
                log.exception("engine step failed")
                message = f"{type(exc).__name__}: {exc}"
                fatal = isinstance(exc, RankFailure)  # a rank is gone: no step can succeed again
                if fatal:
                    self.fatal_error = message
                self._fail_all(message)
                if fatal:
                    if self.on_fatal:
                        self.on_fatal(message)
                    break
        self._fail_all("server shutting down", reason="abort")

    def _take_inbox(self) -> None:
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
            abort_all, self._abort_all = self._abort_all, None
        for seq in inbox:
            self.scheduler.add(seq)
        if abort_all:
            for seq in list(self.running) + list(self.waiting):
                self._finish(seq, "abort", error=abort_all)
        if aborts:
            for seq in [s for s in self.waiting if s.request_id in aborts]:
                self._finish(seq, "abort")
            for seq in [s for s in self.running if s.request_id in aborts]:
                self._finish(seq, "abort")


    # ---- one step (engine thread) -----------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's (sequence, number of new tokens) pairs: :meth:`Scheduler.schedule`."""
        return self.scheduler.schedule()

    def build_batch(self, scheduled: list[tuple[Sequence, int]]) -> Any:
        return self.runner.build_batch(scheduled)

    def step(self) -> int:
        """One scheduling step; returns the number of sequences that ran."""
        started = time.perf_counter()
        self._take_inbox()
        scheduled = self.schedule()
        for seq, why in self.scheduler.rejected:
            self._finish(seq, "error", error=why)
        self.scheduler.rejected.clear()
        if not scheduled:
            return 0
        try:
            out = self.runner.execute(scheduled)
        except RankFailure:
            raise
        except Exception as exc:
            log.exception("model step failed")
            for seq, _ in scheduled:
                self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")
            return len(scheduled)
        if self.metrics:
            self.metrics.forward_seconds.observe(self.runner.last_forward_seconds)
        self.steps += 1
        now = time.monotonic()
        for b, (seq, n) in enumerate(scheduled):
            if b in out.errors:
                self._finish(seq, "error", error=out.errors[b])
                continue
            if out.verified and out.verified[b] is not None:
                self._count_verified(*out.verified[b])
            if out.num_valid and out.num_valid[b] is not None:
                n = out.num_valid[b]  # rejected drafts' rows are stale: overwritten by later steps
            if out.drafts:
                seq.draft_ids = out.drafts[b] or []
            self._update(seq, n, out.tokens[b], out.logprobs[b], out.prompt_logprobs[b], now)
        if self.metrics:
            self.metrics.step_seconds.observe(time.perf_counter() - started)
        return len(scheduled)

    def _count_verified(self, drafts: int, accepted: int) -> None:
        self.num_draft_tokens += drafts
        self.num_accepted_tokens += accepted
        if self.metrics:
            self.metrics.spec_num_drafts.inc()
            self.metrics.spec_num_draft_tokens.inc(drafts)
            self.metrics.spec_num_accepted_tokens.inc(accepted)
            for pos in range(accepted):
                self.metrics.spec_accepted_per_pos.labels(position=str(pos)).inc()

    def _update(self, seq: Sequence, n: int, tokens: list[int], logprobs: list | None, prompt_logprobs: list | None,
                now: float) -> None:
        """Advance ``seq`` by a step that computed ``n`` rows and sampled ``tokens``."""
        seq.num_computed += n
        self.num_computed_tokens += n
        if prompt_logprobs:
            seq.prompt_logprobs.extend(prompt_logprobs)
        if seq.num_computed >= seq.num_tokens and seq.params.max_tokens == 0:
            self._finish(seq, "length")  # prompt only (e.g. prompt logprobs): done after the prefill
            return
        for i, token in enumerate(tokens):
            last = i == len(tokens) - 1
            if self.output.append_token(seq, int(token), now, logprobs[i] if logprobs else None, emit=last):
                return
        self.scheduler.register_full_blocks(seq)  # after the tokens: accepted drafts are computed rows too

    # ---- finishing ----------------------------------------------------------------------------
    def _append_token(self, seq: Sequence, token: int, now: float, logprob: Any = None) -> None:
        self.output.append_token(seq, token, now, logprob)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        self.output.finish(seq, reason, error)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        self._take_inbox()
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, reason, error=message)
