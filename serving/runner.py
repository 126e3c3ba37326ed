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
    # speculative decoding, per scheduled sequence: cache rows that stay valid (None: all it ran), the
    # next drafts (None: leave them), and (drafts verified, accepted) of a verify step
    num_valid: list[int | None] = field(default_factory=list)
    drafts: list[list[int] | None] = field(default_factory=list)
    verified: list[tuple[int, int] | None] = field(default_factory=list)


class EngineRunner:
    """Runs scheduled steps of ``model`` on its own paged cache of ``num_blocks`` x ``block_size``.

    ``stop_ids(params)``: the token ids that end a sequence (banned while ``min_tokens`` is not reached).
    """

    def __init__(self, model: Any, *, num_blocks: int, block_size: int,
                 forward: Callable[..., torch.Tensor] | None = None,
                 stop_ids: Callable[[Any], set[int]] = lambda params: set(), num_speculative_tokens: int = 0,
                 max_model_len: int | None = None) -> None:
        from model import Batch  # the model package defines the batch layout

        self._Batch = Batch
        self.model = model
        self.cache = model.new_cache(num_blocks, block_size)
        self.block_size = block_size
        self.forward = forward or ModelForward(model)
        self.stop_ids = stop_ids
        self.device = getattr(model, "device", torch.device("cpu"))
        self.last_forward_seconds = 0.0
        self.num_speculative_tokens = num_speculative_tokens  # MTP drafts per step (0: no speculation)
        self.max_model_len = max_model_len or model.config.max_position_embeddings

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

        if self.num_speculative_tokens:
            return self._execute_speculative(scheduled)
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
        elif getattr(self.forward, "sample_step", None) is not None:  # the ranks sample (serving/dp.py)
            return self._execute_ranks_sample(scheduled, batch, ready, out, started)
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

    def _execute_ranks_sample(self, scheduled: list[tuple[Sequence, int]], batch: Any, ready: list[int],
                              out: StepOutput, started: float) -> StepOutput:
        """A step whose forward samples on the ranks that ran the rows (data-parallel attention): rows
        with plain temperature / top-k / top-p come back as token ids; rows that need rank 0's state
        (processors, logprobs, a grammar, a seeded generator) come back as logits and are sampled here."""
        import time

        wants: list[tuple[float, int, float] | str | None] = [None] * len(scheduled)
        for b in ready:
            seq = scheduled[b][0]
            p = seq.params
            if p.max_tokens <= 0:
                continue
            local = p.needs_processing or p.logprobs is not None or seq.matcher is not None or seq.generator
            wants[b] = "logits" if local else (p.temperature, p.top_k, p.top_p)
        tokens, logits = self.forward.sample_step(batch, self.cache, wants)
        self.last_forward_seconds = time.perf_counter() - started
        for b, token in tokens.items():
            out.tokens[b] = [int(token)]
        here = [b for b, w in enumerate(wants) if w == "logits"]
        if here:
            ids, lps = self.sample(logits, [scheduled[b][0] for b in here])
            for b, token, lp in zip(here, ids, lps, strict=True):
                out.tokens[b] = [token]
                out.logprobs[b] = None if lp is None else [lp]
        return out

    # ---- speculative decoding (serving/speculative.py) ---------------------------------------
    @torch.inference_mode()
    def _execute_speculative(self, scheduled: list[tuple[Sequence, int]]) -> StepOutput:
        """A step with MTP drafting: target forward over every row (verify rows included), sampling
        and verification, then the MTP layer over the same rows proposes each sequence's next drafts."""
        import time

        from .speculative import target_probs, verify_greedy, verify_sampled

        model = self.model
        B = len(scheduled)
        out = StepOutput(tokens=[[] for _ in scheduled], logprobs=[None] * B, prompt_logprobs=[None] * B,
                         num_valid=[None] * B, drafts=[None] * B, verified=[None] * B)
        batch = self.build_batch(scheduled)
        cu = batch.cu_seqlens_q.numpy()
        started = time.perf_counter()
        hidden_of = getattr(self.forward, "hidden_states", None)  # a ModelRunner replays verify steps in graphs
        ctx = None
        if hidden_of is not None:
            h = hidden_of(batch, self.cache)
        else:
            ctx = model.context(batch, self.cache)
            h = model.hidden_states(ctx.input_ids, ctx, self.cache)
        # Rows whose logits the step needs: verify rows, each other ready row's last, prompt-logprob rows.
        rows: list[int] = []
        where: dict[int, tuple[int, int]] = {}  # b -> (first index into rows, count) of its sampling rows
        prompt_at: dict[int, tuple[int, int, int]] = {}  # b -> (first index into rows, count, first position)
        for b, (seq, n) in enumerate(scheduled):
            k = n - (seq.num_tokens - seq.num_computed)  # drafts carried (> 0: a verify step)
            if k > 0:
                where[b] = (len(rows), k + 1)
                rows += range(int(cu[b]), int(cu[b + 1]))
            elif seq.num_computed + n >= seq.num_tokens and seq.params.max_tokens > 0:
                where[b] = (len(rows), 1)
                rows.append(int(cu[b + 1]) - 1)
            if seq.params.prompt_logprobs is not None and seq.prompt_logprobs is not None:
                first = max(seq.num_computed, len(seq.prompt_logprobs) - 1)
                last = min(seq.num_computed + n, len(seq.prompt_ids) - 1)
                if last > first:
                    prompt_at[b] = (len(rows), last - first, first)
                    rows += range(int(cu[b]) + first - seq.num_computed, int(cu[b]) + last - seq.num_computed)
        logits = model.logits(h[torch.tensor(rows, dtype=torch.int64, device=h.device)]) if rows else None
        self.last_forward_seconds = time.perf_counter() - started
        for b, (at, count, first) in prompt_at.items():
            seq = scheduled[b][0]
            out.prompt_logprobs[b] = _logprobs_of_targets(logits[at:at + count],
                                                          seq.prompt_ids[first + 1:first + 1 + count],
                                                          seq.params.prompt_logprobs)
        # Sample plain rows together; verify the draft rows per sequence.
        plain = [b for b, (at, count) in where.items() if count == 1]
        if plain:
            ids, lps = self.sample(logits[[where[b][0] for b in plain]], [scheduled[b][0] for b in plain])
            for b, token, lp in zip(plain, ids, lps, strict=True):
                out.tokens[b] = [token]
                out.logprobs[b] = None if lp is None else [lp]
        verifying = [b for b, (at, count) in where.items() if count > 1]
        greedy = [b for b in verifying if scheduled[b][0].params.temperature <= 0]
        if greedy:
            argmax = logits.argmax(-1).tolist()
        for b in verifying:
            seq, (at, count) = scheduled[b][0], where[b]
            drafts = seq.draft_ids[:count - 1]
            if seq.params.temperature <= 0:
                accepted, token = verify_greedy(argmax[at:at + count], drafts)
            else:
                p = seq.params
                R = torch.arange(at, at + count, device=logits.device)
                probs = target_probs(logits[R], torch.full((count,), p.temperature, device=logits.device),
                                     torch.full((count,), p.top_k, dtype=torch.int64, device=logits.device),
                                     torch.full((count,), p.top_p, device=logits.device))
                accepted, token = verify_sampled(probs, drafts, seq.generator)
            out.tokens[b] = drafts[:accepted] + [token]
            out.num_valid[b] = 1 + accepted  # the pending token and the accepted drafts; later rows are stale
            out.verified[b] = (len(drafts), accepted)
        if model.mtp is not None:
            self._propose(scheduled, batch, ctx, h, out)
        return out

    def _propose(self, scheduled: list[tuple[Sequence, int]], batch: Any, ctx: Any, h: torch.Tensor,
                 out: StepOutput) -> None:
        """Run the MTP layer over this step's rows (row i: ``h_i`` and token ``i + 1``), writing its cache
        layer, and draft up to N tokens for each sequence that decodes on (chaining the layer)."""
        from .speculative import uses_drafts

        model, N, bs = self.model, self.num_speculative_tokens, self.block_size
        cu = batch.cu_seqlens_q.numpy()
        ids = batch.input_ids.numpy()
        nxt = np.zeros(ids.shape[0], dtype=np.int64)
        draft_rows, who = [], []
        for b, (seq, n) in enumerate(scheduled):
            start = int(cu[b])
            if out.num_valid[b] is not None:  # verify: after row j comes the j-th accepted draft, then the new token
                valid, follow = out.num_valid[b], out.tokens[b]
            else:  # rows c..c+n-1 are followed by the tokens at c+1..c+n: known ones, then the sampled one
                valid = n
                follow = (seq.token_slice(seq.num_computed + 1, n) + out.tokens[b])[:n]
            nxt[start:start + len(follow)] = follow
            pos = seq.num_computed + valid  # the new pending token's position (not cached yet)
            room = min(N, self.max_model_len - pos - 1, len(seq.blocks) * bs - pos)
            if out.tokens[b] and len(follow) == valid and uses_drafts(seq) and room > 0 and b not in out.errors:
                draft_rows.append(start + valid - 1)
                who.append((b, room))
        drafter = getattr(self.forward, "draft", None)  # a ModelRunner replays the draft step in a graph
        served = drafter(nxt, np.asarray(draft_rows, dtype=np.int64)) if drafter is not None else None
        if served is not None:
            logits, hidden = served
        else:
            if ctx is None:
                ctx = model.context(batch, self.cache)
            rows = torch.tensor(draft_rows, dtype=torch.int64, device=h.device)
            tokens = torch.from_numpy(nxt).to(h.device)
            logits, x = model.mtp(tokens, h, ctx, self.cache, return_hidden=True, rows=rows)
            hidden = x[rows]
        chain = [[d] for d in logits.argmax(-1).tolist()] if draft_rows else []
        # Further drafts: the MTP layer again on its own output, one token per sequence per application.
        for j in range(1, N):
            live = [i for i, (b, room) in enumerate(who) if room > j]
            if not live:
                break
            seqs = [scheduled[who[i][0]][0] for i in live]
            positions = [s.num_computed + (out.num_valid[who[i][0]] or scheduled[who[i][0]][1]) + j - 1
                         for s, i in zip(seqs, live, strict=True)]
            width = max(len(s.blocks) for s in seqs)
            table = np.zeros((len(live), width), dtype=np.int32)
            for r, s in enumerate(seqs):
                table[r, :len(s.blocks)] = s.blocks
            step = self._Batch(input_ids=torch.tensor([chain[i][-1] for i in live], dtype=torch.int64),
                               cu_seqlens_q=torch.arange(len(live) + 1, dtype=torch.int32),
                               seq_lens=torch.tensor([p + 1 for p in positions], dtype=torch.int32),
                               block_table=torch.from_numpy(table))
            chained = getattr(self.forward, "draft_chain", None)  # expert parallelism: every rank runs it
            if chained is not None:
                logits, x = chained(step, live)
            else:
                sub = model.context(step, self.cache)
                logits, x = model.mtp(sub.input_ids, hidden[live], sub, self.cache, return_hidden=True)
            for i, d in zip(live, logits.argmax(-1).tolist(), strict=True):
                chain[i].append(d)
            hidden = hidden.clone()
            hidden[live] = x
        for (b, _), c in zip(who, chain, strict=True):
            out.drafts[b] = c

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
