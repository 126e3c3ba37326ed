"""The engine's runner: one scheduled step in, token ids out.

It owns what running a step needs and nothing about requests' text: the paged KV cache
(``model.new_cache``; its layout is the backend's), the ``forward`` that runs a batch (a
:class:`model.runner.ModelRunner` replaying decode steps from device graphs, expert parallelism's
leader, data-parallel attention's leader, or plain ``model.forward_batch``), the step's host
buffers (built once per step straight into numpy, moved by the forward in one copy) and sampling
(logits processors, ``plan.sample``, logprobs). The scheduler (:mod:`serving.scheduler`) decides
what runs; the output processor (:mod:`serving.output`) turns the returned token ids into text.

``forward(batch, cache)`` returns the logits of each sequence's last new token. A forward whose
``supports_rows`` attribute is true also takes ``rows`` (flat token indices of the batch) and
returns those rows' logits instead: prompt logprobs and speculative verification need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .request import Sequence
from .sampling import TokenLogprob, apply_logit_bias, apply_min_p, apply_penalties, ban_tokens, logprobs_of
from .structured import apply_bitmask, fill_bitmask


class ModelForward:
    """``model.forward_batch`` with row selection: the default forward of a single-process engine."""

    supports_rows = True

    def __init__(self, model: Any) -> None:
        self.model = model

    @torch.inference_mode()
    def __call__(self, batch: Any, cache: Any, rows: np.ndarray | None = None) -> torch.Tensor:
        if rows is None:
            return self.model.forward_batch(batch, cache)
        return logits_of_rows(self.model, batch, cache, rows)


def logits_of_rows(model: Any, batch: Any, cache: Any, rows: np.ndarray) -> torch.Tensor:
    """fp32 ``[len(rows), vocab]``: logits of the given flat token rows of ``batch`` (eager)."""
    ctx = model.context(batch, cache)
    h = model.hidden_states(ctx.input_ids, ctx, cache)
    return model.logits(h[torch.from_numpy(rows).to(h.device)])


@dataclass
class StepOutput:
    """What one step produced, per scheduled sequence (same order as the schedule)."""

    tokens: list[list[int]] = field(default_factory=list)  # sampled ids ([] : context not complete yet)
    logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # per sampled token, when asked
    prompt_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # new prompt rows' logprobs
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that sequence cannot go on


class EngineRunner:
    """Runs scheduled steps of ``model`` on its own paged cache of ``num_blocks`` x ``block_size``.

    ``stop_ids(params)``: the token ids that end a sequence (banned while ``min_tokens`` is not reached).
    """

    def __init__(self, model: Any, *, num_blocks: int, block_size: int,
                 forward: Callable[..., torch.Tensor] | None = None,
                 stop_ids: Callable[[Any], set[int]] = lambda params: set()) -> None:
        from model import Batch  # the model package defines the batch layout

        self._Batch = Batch
        self.model = model
        self.cache = model.new_cache(num_blocks, block_size)
        self.block_size = block_size
        self.forward = forward or ModelForward(model)
        self.stop_ids = stop_ids
        self.device = getattr(model, "device", torch.device("cpu"))
        self.last_forward_seconds = 0.0

    # ---- host buffers -----------------------------------------------------------------------
    def build_batch(self, scheduled: list[tuple[Sequence, int]]) -> Any:
        """The step's :class:`model.Batch`, filled straight into numpy (no per-row tensors)."""
        B = len(scheduled)
        q = np.fromiter((n for _, n in scheduled), dtype=np.int32, count=B)
        cu = np.zeros(B + 1, dtype=np.int32)
        np.cumsum(q, out=cu[1:])
        ids = np.empty(int(cu[-1]), dtype=np.int64)
        lens = np.empty(B, dtype=np.int32)
        width = max(len(seq.blocks) for seq, _ in scheduled)
        table = np.zeros((B, width), dtype=np.int32)
        for b, (seq, n) in enumerate(scheduled):
            new = seq.token_slice(seq.num_computed, n)
            if len(new) < n:  # a decode verifying its drafts: [next token, drafts...]
                new = new + seq.draft_ids[:n - len(new)]
            ids[cu[b]:cu[b + 1]] = new
            lens[b] = seq.num_computed + n
            table[b, :len(seq.blocks)] = seq.blocks
        return self._Batch(input_ids=torch.from_numpy(ids), cu_seqlens_q=torch.from_numpy(cu),
                           seq_lens=torch.from_numpy(lens), block_table=torch.from_numpy(table))

    # ---- the step ---------------------------------------------------------------------------
    def execute(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        """Run one step and sample every sequence whose context is complete after it."""
        import time

        batch = self.build_batch(scheduled)
        cu = batch.cu_seqlens_q.numpy()
        out = StepOutput(tokens=[[] for _ in scheduled], logprobs=[None] * len(scheduled),
                         prompt_logprobs=[None] * len(scheduled))
        # Which logits rows the step needs: each ready row's last token, and prompt rows where asked.
        ready = [b for b, (seq, n) in enumerate(scheduled) if seq.num_computed + n >= seq.num_tokens]
        prompt_rows: dict[int, tuple[int, int]] = {}  # b -> (first flat row, count)
        for b, (seq, n) in enumerate(scheduled):
            if seq.params.prompt_logprobs is None or seq.prompt_logprobs is None:
                continue
            done = len(seq.prompt_logprobs)  # prompt tokens with a logprob (or None) already
            # the row at position p predicts prompt token p + 1
            first = max(seq.num_computed, done - 1)
            last = min(seq.num_computed + n, len(seq.prompt_ids) - 1)
            if last > first:
                prompt_rows[b] = (int(cu[b]) + first - seq.num_computed, last - first)
        supports_rows = getattr(self.forward, "supports_rows", False)
        if prompt_rows and not supports_rows:
            for b in prompt_rows:
                out.errors[b] = "prompt_logprobs is not supported by this server's model runner"
            prompt_rows = {}
        started = time.perf_counter()
        if prompt_rows:
            rows = [int(cu[b + 1]) - 1 for b in ready]
            extra = [r for b in prompt_rows for r in range(prompt_rows[b][0], prompt_rows[b][0] + prompt_rows[b][1])]
            logits_all = self.forward(batch, self.cache, rows=np.asarray(rows + extra, dtype=np.int64))
            sample_logits = logits_all[:len(rows)]
            at = len(rows)
            for b, (start, count) in prompt_rows.items():
                seq = scheduled[b][0]
                pos0 = start - int(cu[b]) + seq.num_computed
                targets = seq.prompt_ids[pos0 + 1:pos0 + 1 + count]
                out.prompt_logprobs[b] = _logprobs_of_targets(logits_all[at:at + count], targets,
                                                              seq.params.prompt_logprobs)
                at += count
        else:
            logits = self.forward(batch, self.cache)
            sample_logits = logits[ready] if len(ready) < len(scheduled) else logits
        self.last_forward_seconds = time.perf_counter() - started
        sample = [i for i, b in enumerate(ready) if scheduled[b][0].params.max_tokens > 0 and b not in out.errors]
        if sample:
            seqs = [scheduled[ready[i]][0] for i in sample]
            picked = sample_logits[sample] if len(sample) < sample_logits.shape[0] else sample_logits
            ids, lps = self.sample(picked, seqs)
            for i, token, lp in zip(sample, ids, lps, strict=True):
                out.tokens[ready[i]] = [token]
                out.logprobs[ready[i]] = None if lp is None else [lp]
        return out

    # ---- sampling ---------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row of ``logits`` (the rows of ``seqs``) and, where asked, its logprobs.
        A batch the host knows is all greedy skips ``plan.sample`` (and its sort): argmax."""
        params = [s.params for s in seqs]
        raw = logits
        logits = self.process_logits(logits, seqs)
        if all(p.temperature <= 0 for p in params):
            chosen = logits.argmax(-1)
        else:
            device = logits.device
            generators = [s.generator for s in seqs]
            chosen = self.model.plan.sample(
                logits,
                torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
                torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
                generators if any(g is not None for g in generators) else None,
            )
        token_ids = chosen.tolist()
        found: list[TokenLogprob | None] = [None] * len(seqs)
        rows = [b for b, p in enumerate(params) if p.logprobs is not None]
        if rows:
            for b, lp in zip(rows, logprobs_of(raw, rows, chosen, token_ids, [params[b].logprobs for b in rows]),
                             strict=True):
                found[b] = lp
        return token_ids, found

    def process_logits(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` after the processors the sequences ask for (a new tensor; the raw one is kept for
        logprobs), or ``logits`` itself when none applies."""
        params = [s.params for s in seqs]
        grammar_rows = [b for b, s in enumerate(seqs) if s.matcher is not None and s.grammar_active]
        if not grammar_rows and not any(p.needs_processing for p in params):
            return logits
        logits = logits.clone()
        if any(p.logit_bias for p in params):
            apply_logit_bias(logits, [p.logit_bias for p in params])
        ban_tokens(logits, [sorted(self.stop_ids(s.params)) if len(s.output_ids) < s.params.min_tokens else []
                            for s in seqs])
        rows = [b for b, p in enumerate(params)
                if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0]
        apply_penalties(logits, rows, [seqs[b].prompt_ids for b in rows], [seqs[b].output_ids for b in rows],
                        [params[b].presence_penalty for b in rows], [params[b].frequency_penalty for b in rows],
                        [params[b].repetition_penalty for b in rows])
        if grammar_rows:
            bitmask = fill_bitmask([seqs[b].matcher for b in grammar_rows], logits.shape[1])
            apply_bitmask(logits, torch.tensor(grammar_rows, device=logits.device), bitmask)
        rows = [b for b, p in enumerate(params) if p.min_p > 0 and p.temperature > 0]
        apply_min_p(logits, rows, [params[b].min_p for b in rows], [params[b].temperature for b in rows])
        return logits


def _logprobs_of_targets(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Each row's logprob of its target token and its ``k`` most likely tokens (raw distribution)."""
    rows = list(range(len(targets)))
    chosen = torch.tensor(targets, dtype=torch.int64, device=logits.device)
    return logprobs_of(logits, rows, chosen, targets, [k] * len(targets))
