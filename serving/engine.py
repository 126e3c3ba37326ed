"""Continuous batching over a paged KV cache.

Every step the scheduler builds ONE :class:`model.Batch` holding all running sequences: one token
for each decoding sequence plus prefill chunks, under a token budget (chunked prefill), then runs
``forward_batch`` once, samples the sequences whose context is complete with per-row parameters
(``plan.sample``), and hands each request its new text. Requests join and leave the batch at any
step.

KV blocks (:class:`serving.block_manager.BlockManager`): a sequence holds ``ceil(tokens in cache /
block_size)`` blocks, taken as it grows and returned when it finishes, errors or is cancelled. With
prefix caching, a full computed block is registered under a hash of its tokens and its prefix; an
admitted sequence starts from the longest cached run of its leading full blocks (shared, reference
counted) and computes the rest, at least its last token (whose logits it needs).

Scheduling guarantees progress under KV pressure (no thrash):

* Admission reserves: the head of the queue (first come, first served) is admitted only when the
  free blocks cover every block it will need to finish (prompt + max_tokens, less its cached prefix)
  on top of the blocks every running sequence may still take to finish. So the running batch can
  always run to completion, and a request never takes blocks that a running one will need.
* Running sequences are stepped oldest first. Should one still be unable to grow (only when the
  reservation was bypassed), the newest other running sequence is preempted (blocks freed, it goes
  back to the front of the queue and recomputes later, output and generator kept); no request is
  admitted in a step that preempted, and a preempted one comes back only under the reservation rule.

A request whose prompt + max_tokens could never fit the whole cache is refused before it is queued
(:meth:`Engine.check_fits`).

Threading: :meth:`Engine.submit` and :meth:`Engine.abort` may be called from any thread; all
sequence state is touched only by the engine thread (:meth:`Engine.start`), which runs the model.
Results go out through each request's ``on_event`` callback, called on the engine thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .block_manager import BlockManager
from .sampling import TokenLogprob, apply_logit_bias, apply_min_p, apply_penalties, ban_tokens, logprobs_of
from .structured import GrammarSpec, apply_bitmask, fill_bitmask

log = logging.getLogger("serving.engine")

# GLM markup the reasoning and tool-call parsers read: kept in the text when special tokens are skipped
# (GLM's own tokenizer does not mark them special; the other added tokens, e.g. <sop>, are dropped).
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                 "</arg_value>")


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that ``skip_special_tokens`` drops from the text: the tokenizer's special added tokens but GLM markup."""
    decoder = getattr(tokenizer, "get_added_tokens_decoder", None)
    if decoder is None:
        return set()
    return {i for i, tok in decoder().items() if tok.special and tok.content not in MARKUP_TOKENS}


@dataclass
class SamplingParams:
    """One sequence's generation parameters (the API maps OpenAI/vLLM fields here; see serving/sampling.py
    for the processors). ``skip_special_tokens`` defaults to False at this level (the engine's text is the
    raw decode); the HTTP API defaults it to True as OpenAI and vLLM do."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k >= 0: the sampled token's logprob and the k most likely
    skip_special_tokens: bool = False
    include_stop_str_in_output: bool = False
    stop_after_token_ids: list[int] = field(default_factory=list)  # end generation, keeping the token's text
    structured: GrammarSpec | None = None  # grammar-constrained decoding (serving/structured.py)
    # None: none; k >= 0: each prompt token's logprob and the k most likely alternatives at its position (the
    # first token: None), from the prefill forward's rows; such a request bypasses the prefix cache
    prompt_logprobs: int | None = None

    @property
    def needs_processing(self) -> bool:
        """Whether any logits processor (serving/sampling.py) applies."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0 or (self.min_p > 0 and self.temperature > 0))


@dataclass
class EngineEvent:
    """What a request learns after a step: new text (and token ids), and whether it is finished."""

    text: str = ""
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token generated since the last event, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on the first event, when asked for (first: None)


class IncrementalDetokenizer:
    """Text of a growing id list, produced piece by piece without splitting multi-byte characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False)
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        full = decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""  # an incomplete UTF-8 sequence: wait for the next token


_request_counter = itertools.count()


class Sequence:
    """One request's state; owned by the engine thread once submitted."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, on_event: Callable[[EngineEvent], None],
                 tokenizer: Any, device: torch.device, request_id: str | None = None) -> None:
        self.request_id = request_id or f"seq-{next(_request_counter)}"
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.on_event = on_event
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed)
        self.blocks: list[int] = []
        self.num_computed = 0  # tokens whose KV is in the cache
        self.block_hashes: list[bytes] = []  # prefix-cache hash chain of the full blocks of ``tokens``
        self.num_registered = 0  # leading blocks registered in the prefix cache
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.detok = IncrementalDetokenizer(tokenizer)
        self.text = ""  # output text so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already handed to the consumer
        self.finished = False
        self.counted_prompt = False
        self.matcher = params.structured.new_matcher() if params.structured is not None else None
        self.grammar_active = params.structured is not None and params.structured.start_after is None
        self.pending_logprobs: list[TokenLogprob] = []
        # prompt_logprobs: entry i is prompt token i's (entry 0: None); handed out once, on the first event
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class Engine:
    """Continuous-batching scheduler and step loop around one model and one paged cache.

    ``forward``: how a built batch is run, default ``model.forward_batch``; serve.py passes a
    :class:`model.runner.ModelRunner` (decode steps replayed from device graphs where the backend
    has them), expert parallelism one that first broadcasts the batch to the other ranks. ``metrics``: a
    :class:`serving.metrics.ServingMetrics` or None.
    """

    def __init__(self, model: Any, tokenizer: Any, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, eos_token_ids: list[int],
                 forward: Callable[[Any, Any], torch.Tensor] | None = None, metrics: Any = None,
                 on_idle: Callable[[], None] | None = None, idle_interval: float = 10.0,
                 enable_prefix_caching: bool = True) -> None:
        from model import Batch  # the model package defines the batch layout

        self._Batch = Batch
        self.model = model
        self.tokenizer = tokenizer
        self.cache = model.new_cache(num_blocks, block_size)
        self.block_size = block_size
        self.allocator = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.special_ids = special_token_ids(tokenizer)
        self.forward = forward or model.forward_batch
        self.metrics = metrics
        self.on_idle = on_idle  # called on the engine thread every idle_interval seconds without work
        self.idle_interval = idle_interval
        self.device = getattr(model, "device", torch.device("cpu"))

        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._inbox: list[Sequence] = []
        self._aborts: set[str] = set()
        self._abort_all: str | None = None  # set by abort_all(): the error every request is finished with
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.fatal_error: str | None = None  # set when the engine cannot continue (e.g. a rank died)
        self.on_fatal: Callable[[str], None] | None = None
        self.steps = 0
        self.num_preemptions = 0
        self.num_computed_tokens = 0  # tokens run through the model: recomputation shows up here
        # prompt logprobs need every prefill row's hidden state: only a forward run here (not one broadcast to
        # other ranks) can hand them out
        from model.runner import ModelRunner

        self.supports_prompt_logprobs = forward is None or isinstance(forward, ModelRunner)

    # ---- thread-safe API --------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run (one line), or None."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            return (f"this model's maximum context length is {self.max_model_len} tokens, but the request needs "
                    f"{total} ({prompt_len} in the prompt + {max_tokens} max_tokens); shorten the prompt or "
                    "lower max_tokens")
        if self.blocks_needed(total) > self.allocator.num_blocks:
            return (f"the request needs {self.blocks_needed(total)} KV blocks ({total} tokens) but the whole cache "
                    f"has {self.allocator.num_blocks}; lower max_tokens or start the server with more --num-kv-blocks")
        return None

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
                fatal = type(exc).__name__ == "RankFailure"  # a rank is gone: no step can succeed again
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
        self.waiting.extend(inbox)
        if abort_all:
            for seq in list(self.running) + list(self.waiting):
                self._finish(seq, "abort", error=abort_all)
            self.waiting.clear()
        if aborts:
            for seq in [s for s in self.waiting if s.request_id in aborts]:
                self.waiting.remove(seq)
                self._finish(seq, "abort")
            for seq in [s for s in self.running if s.request_id in aborts]:
                self._finish(seq, "abort")

    # ---- scheduling (engine thread) ---------------------------------------------------------
    def _final_len(self, seq: Sequence) -> int:
        """Tokens in the cache when ``seq`` finishes at the latest (its last sampled token is never run)."""
        return min(len(seq.prompt_ids) + max(seq.params.max_tokens, 1), self.max_model_len) - 1

    def _blocks_to_finish(self, seq: Sequence) -> int:
        """Blocks ``seq`` may still take before it finishes: what admission keeps in reserve for it."""
        return max(0, self.blocks_needed(self._final_len(seq)) - len(seq.blocks))

    def _preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks; it recomputes its context when readmitted (blocks that
        stayed in the prefix cache are taken back instead)."""
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if self.metrics:
            self.metrics.preemptions.inc()

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(num_tokens) - len(seq.blocks)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            seq.blocks += self.allocator.allocate(need)
        return True

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow running ``seq`` to ``num_tokens``, preempting the newest running sequences while blocks are
        short. False when ``seq`` itself was the newest left and had to go."""
        while not self._grow(seq, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for ``seq``'s leading full blocks; the last token is always left to compute."""
        if not self.allocator.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs: every prompt row is computed
        tokens = seq.tokens
        self.allocator.hash_blocks(tokens, seq.block_hashes)
        return self.allocator.match(seq.block_hashes, (len(tokens) - 1) // self.block_size)

    def _admit(self, seq: Sequence, budget: int, reserved: int) -> int | None:
        """Admit the head of the queue when the free blocks cover everything it needs to finish on top of
        ``reserved`` (the running sequences' needs): its first chunk's size, or None (it keeps waiting)."""
        hits = self._cached_prefix(seq)
        need = self.blocks_needed(self._final_len(seq)) - len(hits)
        if self.allocator.num_free - self.allocator.count_free(hits) < need + reserved:
            return None
        self.allocator.acquire(hits)
        seq.blocks = list(hits)
        seq.num_registered = len(hits)
        seq.num_computed = len(hits) * self.block_size
        if not seq.counted_prompt:  # first admission: count the prompt and its prefix-cache lookup
            seq.counted_prompt = True
            seq.num_cached_tokens = min(seq.num_computed, len(seq.prompt_ids))
            self.allocator.record_lookup(len(seq.prompt_ids), seq.num_cached_tokens)
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
                if self.allocator.enable_prefix_caching:
                    self.metrics.prefix_cache_queries.inc(len(seq.prompt_ids))
                    self.metrics.prefix_cache_hits.inc(seq.num_cached_tokens)
        n = min(seq.num_tokens - seq.num_computed, budget)
        if not self._grow(seq, seq.num_computed + n):  # cannot happen: need >= the first chunk's blocks
            raise RuntimeError(f"KV accounting: {seq.request_id} admitted without blocks for its first chunk")
        return n

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly completed full blocks to the prefix cache."""
        full = seq.num_computed // self.block_size
        if not self.allocator.enable_prefix_caching or full <= seq.num_registered:
            return
        self.allocator.hash_blocks(seq.tokens, seq.block_hashes)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.blocks[i], seq.block_hashes[i])
        seq.num_registered = full

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick this step's (sequence, number of new tokens) pairs (the policy: see the module docstring)."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preemptions = self.num_preemptions
        # Running sequences first, oldest first: decodes (1 token) and unfinished prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._make_room(seq, seq.num_computed + n):
                break  # seq was the newest: nothing after it
            scheduled.append((seq, n))
            budget -= n
            i += 1
        if self.num_preemptions > preemptions:
            return scheduled  # never readmit in the step that evicted
        # Then admit from the head of the queue while the budget, the batch size and the reservation allow.
        reserved = sum(self._blocks_to_finish(seq) for seq in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.blocks_needed(self._final_len(seq)) > self.allocator.num_blocks:  # only when check_fits was skipped
                self.waiting.popleft()
                self._finish(seq, "error", error=self.check_fits(len(seq.prompt_ids), seq.params.max_tokens))
                continue
            n = self._admit(seq, budget, reserved)
            if n is None:
                break  # the head waits for blocks to come back (first come, first served)
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
            reserved += self._blocks_to_finish(seq)
        return scheduled

    def build_batch(self, scheduled: list[tuple[Sequence, int]]) -> Any:
        ids, cu, lens = [], [0], []
        for seq, n in scheduled:
            ids += seq.tokens[seq.num_computed:seq.num_computed + n]
            cu.append(cu[-1] + n)
            lens.append(seq.num_computed + n)
        width = max(len(seq.blocks) for seq, _ in scheduled)
        table = torch.zeros(len(scheduled), width, dtype=torch.int32)
        for b, (seq, _) in enumerate(scheduled):
            table[b, :len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.int32)
        return self._Batch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor(lens, dtype=torch.int32),
            block_table=table,
        )

    def step(self) -> int:
        """One scheduling step; returns the number of sequences that ran."""
        started = time.perf_counter()
        self._take_inbox()
        scheduled = self.schedule()
        if not scheduled:
            return 0
        batch = self.build_batch(scheduled)
        prompt_rows = self._prompt_rows(scheduled)
        try:
            forward_started = time.perf_counter()
            if prompt_rows:
                logits, hidden = self._forward_keeping_rows(batch, [row for row, _, _ in prompt_rows])
            else:
                logits = self.forward(batch, self.cache)
            if self.metrics:
                self.metrics.forward_seconds.observe(time.perf_counter() - forward_started)
        except Exception as exc:
            if type(exc).__name__ == "RankFailure":
                raise
            log.exception("forward_batch failed")
            for seq, _ in scheduled:
                self._finish(seq, "error", error=f"model step failed: {type(exc).__name__}: {exc}")
            return len(scheduled)
        self.steps += 1
        if prompt_rows:
            self._record_prompt_logprobs(hidden, prompt_rows)
        rows, ready = [], []
        for b, (seq, n) in enumerate(scheduled):
            seq.num_computed += n
            self.num_computed_tokens += n
            self._register_full_blocks(seq)
            if seq.num_computed == seq.num_tokens and seq.params.max_tokens == 0:
                self._finish(seq, "length")  # max_tokens 0: the prefill alone (prompt logprobs), no token
            elif seq.num_computed == seq.num_tokens:  # context complete: this row's logits predict a token
                rows.append(b)
                ready.append(seq)
        if ready:
            self._sample_and_emit(logits[rows], ready)
        if self.metrics:
            self.metrics.step_seconds.observe(time.perf_counter() - started)
        return len(scheduled)

    # ---- prompt logprobs ----------------------------------------------------------------------
    def _prompt_rows(self, scheduled: list[tuple[Sequence, int]]) -> list[tuple[int, Sequence, int]]:
        """``(flat row, sequence, position)`` of this step's rows whose logits score a prompt token (the row at
        position p predicts prompt token p + 1), for the sequences asking for prompt logprobs."""
        out, start = [], 0
        for seq, n in scheduled:
            if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
                del seq.prompt_logprobs[seq.num_computed + 1:]  # recomputed after a preemption: from here on
                last = min(seq.num_computed + n, len(seq.prompt_ids) - 1)
                out.extend((start + p - seq.num_computed, seq, p) for p in range(seq.num_computed, last))
            start += n
        return out

    def _forward_keeping_rows(self, batch: Any, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's forward (the same as ``model.forward_batch``) that also keeps the final hidden states of
        ``rows``: ``(logits of each sequence's last new token, hidden [len(rows), D])``. Eager: a step with
        prefill rows never runs in a decode graph."""
        model = self.model
        ctx = model.context(batch, self.cache)
        with torch.inference_mode():
            h = model.hidden_states(ctx.input_ids, ctx, self.cache)
            last = model.logits(h[ctx.cu_seqlens_q[1:].long() - 1])
            return last, h[torch.tensor(rows, dtype=torch.int64, device=h.device)]

    def _record_prompt_logprobs(self, hidden: torch.Tensor, rows: list[tuple[int, Sequence, int]],
                                chunk: int = 256) -> None:
        """Score each row's next prompt token (raw logprobs, as for generated tokens); ``chunk`` rows at a time
        so the ``[rows, vocab]`` logits stay small."""
        for at in range(0, len(rows), chunk):
            part = rows[at:at + chunk]
            targets = [seq.prompt_ids[p + 1] for _, seq, p in part]
            target_dev = torch.tensor(targets, dtype=torch.int64, device=hidden.device)
            with torch.inference_mode():
                logits = self.model.logits(hidden[at:at + len(part)])
            found = logprobs_of(logits, list(range(len(part))), target_dev, targets,
                                [seq.params.prompt_logprobs for _, seq, _ in part])
            for (_, seq, _), entry in zip(part, found, strict=True):
                seq.prompt_logprobs.append(entry)

    def _take_prompt_logprobs(self, seq: Sequence) -> list[TokenLogprob | None] | None:
        """The prompt logprobs for ``seq``'s first event once its prompt is scored; None otherwise or later."""
        if seq.prompt_logprobs is None or seq.prompt_logprobs_sent or len(seq.prompt_logprobs) < len(seq.prompt_ids):
            return None
        seq.prompt_logprobs_sent = True
        return seq.prompt_logprobs

    def _sample_and_emit(self, logits: torch.Tensor, ready: list[Sequence]) -> None:
        params = [s.params for s in ready]
        generators = [s.generator for s in ready]
        device = logits.device
        raw = logits
        logits = self._process_logits(logits, ready)
        chosen = self.model.plan.sample(
            logits,
            torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
            torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            generators if any(g is not None for g in generators) else None,
        )
        token_ids = chosen.tolist()
        logprobs: dict[int, TokenLogprob] = {}
        rows = [b for b, p in enumerate(params) if p.logprobs is not None]
        if rows:
            found = logprobs_of(raw, rows, chosen, token_ids, [params[b].logprobs for b in rows])
            logprobs = dict(zip(rows, found, strict=True))
        now = time.monotonic()
        for b, (seq, token) in enumerate(zip(ready, token_ids, strict=True)):
            self._append_token(seq, int(token), now, logprobs.get(b))

    def _stop_ids(self, p: SamplingParams) -> set[int]:
        return set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)

    def _process_logits(self, logits: torch.Tensor, ready: list[Sequence]) -> torch.Tensor:
        """``logits`` after the processors the ready sequences ask for (a new tensor; the raw one is kept for
        logprobs), or ``logits`` itself when none applies."""
        params = [s.params for s in ready]
        grammar_rows = [b for b, s in enumerate(ready) if s.matcher is not None and s.grammar_active]
        if not grammar_rows and not any(p.needs_processing for p in params):
            return logits
        logits = logits.clone()
        if any(p.logit_bias for p in params):
            apply_logit_bias(logits, [p.logit_bias for p in params])
        ban_tokens(logits, [sorted(self._stop_ids(s.params)) if len(s.output_ids) < s.params.min_tokens else []
                            for s in ready])
        rows = [b for b, p in enumerate(params)
                if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0]
        apply_penalties(logits, rows, [ready[b].prompt_ids for b in rows], [ready[b].output_ids for b in rows],
                        [params[b].presence_penalty for b in rows], [params[b].frequency_penalty for b in rows],
                        [params[b].repetition_penalty for b in rows])
        if grammar_rows:
            bitmask = fill_bitmask([ready[b].matcher for b in grammar_rows], logits.shape[1])
            apply_bitmask(logits, torch.tensor(grammar_rows, device=logits.device), bitmask)
        rows = [b for b, p in enumerate(params) if p.min_p > 0 and p.temperature > 0]
        apply_min_p(logits, rows, [params[b].min_p for b in rows], [params[b].temperature for b in rows])
        return logits

    def _append_token(self, seq: Sequence, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        p = seq.params
        seq.output_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        if self.metrics:
            self.metrics.generation_tokens.inc()
            if seq.last_token_time is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_time)
        seq.last_token_time = now
        if seq.matcher is not None:
            if seq.grammar_active and not seq.matcher.consume_token(token):
                # only a grammar the engine cannot follow gets here (e.g. min_tokens banning the only way out)
                self._finish(seq, "error", error=f"structured output: {' '.join(seq.matcher.get_error().split())}")
                return
            if not seq.grammar_active and token == p.structured.start_after:
                seq.grammar_active = True
        reason = None
        if token in self._stop_ids(p):
            reason = "stop"  # the stop token itself is not part of the text
        else:
            if not (p.skip_special_tokens and token in self.special_ids):
                seq.text += seq.detok.add(token)
            if token in p.stop_after_token_ids:
                reason = "stop"
            elif p.stop and len(seq.output_ids) >= p.min_tokens:
                start = max(0, seq.sent - max(len(s) for s in p.stop))
                hits = [(at, at + len(s)) for s in p.stop if (at := seq.text.find(s, start)) >= 0]
                if hits:
                    at, end = min(hits)
                    seq.text = seq.text[:end if p.include_stop_str_in_output else at]
                    reason = "stop"
        if reason is None and seq.grammar_active and seq.matcher.is_stopped():
            reason = "stop"  # the grammar is complete: nothing but its end may follow
        if reason is None and len(seq.output_ids) >= p.max_tokens:
            reason = "length"
        if reason is None and seq.num_tokens >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(seq, reason)
            return
        # Hold back text that may still turn out to begin a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        upto = max(seq.sent, len(seq.text) - hold)
        event = EngineEvent(text=seq.text[seq.sent:upto], prompt_tokens=len(seq.prompt_ids),
                            completion_tokens=len(seq.output_ids), logprobs=self._take_logprobs(seq),
                            prompt_logprobs=self._take_prompt_logprobs(seq))
        seq.sent = upto
        self._emit(seq, event)

    @staticmethod
    def _take_logprobs(seq: Sequence) -> list[TokenLogprob] | None:
        if seq.params.logprobs is None:
            return None
        taken, seq.pending_logprobs = seq.pending_logprobs, []
        return taken

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        event = EngineEvent(text=seq.text[seq.sent:], finished=True, finish_reason=reason,
                            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids), error=error,
                            logprobs=self._take_logprobs(seq), prompt_logprobs=self._take_prompt_logprobs(seq))
        seq.sent = len(seq.text)
        if self.metrics:
            self.metrics.finished.labels(reason=reason).inc()
        self._emit(seq, event)

    def _emit(self, seq: Sequence, event: EngineEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a consumer's failure must not stop the batch
            log.exception("request %s: event callback failed", seq.request_id)

    def _fail_all(self, message: str, reason: str = "error") -> None:
        self._take_inbox()
        for seq in list(self.running) + list(self.waiting):
            self._finish(seq, reason, error=message)
        self.waiting.clear()
