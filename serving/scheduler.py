"""The scheduler: which sequences run this step, with how many tokens, on which KV blocks.

It owns the queue (``waiting``), the batch (``running``) and the KV manager
(:class:`serving.block_manager.BlockManager`); it never touches the model, the logits or the text
(the runner and the output processor do, see :mod:`serving.engine`).

**KV blocks on demand.** A sequence holds the blocks of what it has computed plus what this step
computes (for a decode: its next token, and its draft tokens under speculative decoding), taken as
it grows and returned when it finishes, errors, is cancelled or is preempted. Nothing is reserved
for tokens not generated yet, so a request without ``max_tokens`` costs what it holds, not
``--max-model-len`` (vLLM v1's ``KVCacheManager.allocate_slots`` does the same).

**Preemption by recompute, with a progress guarantee.** ``running`` is in admission order and is
stepped oldest first. When a sequence cannot grow, the newest running sequence that shares its
block pool is preempted (its blocks are freed; it goes back to the FRONT of the queue keeping its
output and generator, and recomputes its context when readmitted: blocks that stayed in the prefix
cache are taken back instead of recomputed) until it can, possibly itself when it is the newest.
Why this always progresses:

* the oldest running sequence is never a victim while another exists, and alone it always fits
  (:meth:`Scheduler.check_fits` refuses a request whose prompt + ``max_tokens`` exceeds the cache),
  so it advances every step and finishes within ``max_model_len`` steps;
* the queue is first come, first served (preempted sequences return to its front) and nothing is
  admitted in a step that preempted, so a preempted sequence is never overtaken by a newer one and
  is not readmitted into the shortage that evicted it;
* a sequence is (re)admitted only when the free blocks cover its whole current context plus one
  block of headroom per running sequence (each may cross a block boundary next step), which is
  what keeps preempt / readmit cycles from repeating step after step (issue 13's livelock).

Prefix caching: an admitted sequence starts from the longest cached run of its leading full
blocks (shared, reference counted) and computes the rest, at least its last token. A sequence
that asks for prompt logprobs bypasses the lookup: its prompt rows' logits are needed.
"""

from __future__ import annotations

import collections
from typing import Any

from .request import Sequence


class Scheduler:
    """Continuous batching over one pool of KV blocks (``allocator``: a :class:`BlockManager` or one
    with its interface). ``num_lookahead_tokens``: extra slots a decode step computes (speculative
    draft tokens). All methods run on the engine thread."""

    def __init__(self, allocator: Any, *, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, metrics: Any = None, num_lookahead_tokens: int = 0) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.metrics = metrics
        self.num_lookahead_tokens = num_lookahead_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.rejected: list[tuple[Sequence, str]] = []  # (sequence, why): the engine finishes them with an error
        self.num_preemptions = 0
        self.num_preempted_tokens = 0  # computed rows preemptions threw away (at most this much is recomputed)

    # ---- sizes ------------------------------------------------------------------------------
    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request can never run (one line), or None."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            return (f"this model's maximum context length is {self.max_model_len} tokens, but the request needs "
                    f"{total} ({prompt_len} in the prompt + {max_tokens} max_tokens); shorten the prompt or "
                    "lower max_tokens")
        need = self.blocks_needed(self._final_len(prompt_len, max_tokens))
        if need > self.pool_blocks:
            return (f"the request needs {need} KV blocks ({total} tokens) but the whole cache "
                    f"has {self.pool_blocks}; lower max_tokens or start the server with a larger KV cache "
                    "(--kv-cache-memory-bytes, --gpu-memory-utilization or --num-kv-blocks)")
        return None

    @property
    def pool_blocks(self) -> int:
        """Blocks one sequence may use at most (the whole cache; one rank's share under DP attention)."""
        return self.allocator.num_blocks

    def _final_len(self, prompt_len: int, max_tokens: int) -> int:
        """Cache rows a sequence holds at most: its last sampled token is never run, but a decode step
        computes ``num_lookahead_tokens`` draft slots beyond its next token."""
        return min(prompt_len + max_tokens, self.max_model_len) - 1 + self.num_lookahead_tokens

    # ---- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def release(self, seq: Sequence) -> None:
        """``seq`` is finished: out of the queue or the batch, its blocks back to the pool (its computed
        full blocks first offered to the prefix cache)."""
        self.register_full_blocks(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []

    # ---- the policy -------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's ``(sequence, new tokens)`` pairs (the policy: see the module docstring). A
        decode's count includes its draft tokens."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preemptions = self.num_preemptions
        # Running sequences first, oldest first: decodes (1 token + drafts) and unfinished prefills.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._tokens_to_run(seq, budget)
            if not self._make_room(seq, self._rows_to_hold(seq, n)):
                continue  # seq itself went (the newest of its pool): the next one now sits at i
            scheduled.append((seq, n))
            budget -= n
            i += 1
        if self.num_preemptions > preemptions:
            return scheduled  # never readmit in the step that evicted
        # Then admit from the head of the queue while the budget, the batch size and the blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            why = self.check_fits(len(seq.prompt_ids), seq.params.max_tokens)
            if why is not None:  # only when the API's check was skipped
                self.waiting.popleft()
                self.rejected.append((seq, why))
                continue
            n = self._admit(seq, budget)
            if n is None:
                break  # the head waits for blocks to come back (first come, first served)
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, n))
            budget -= n
        return scheduled

    def _tokens_to_run(self, seq: Sequence, budget: int) -> int:
        pending = seq.num_tokens - seq.num_computed
        if pending == 1 and seq.draft_ids:  # a decode with drafts: verify them in the same step
            return 1 + len(seq.draft_ids) if budget >= 1 + len(seq.draft_ids) else 1
        return min(pending, budget)

    def _rows_to_hold(self, seq: Sequence, n: int) -> int:
        """Cache rows ``seq`` holds blocks for in a step computing ``n`` rows: those, plus room for the
        draft slots of the next steps (speculative decoding), never beyond what it can need at most."""
        rows = seq.num_computed + n
        if not self.num_lookahead_tokens:
            return rows
        final = self._final_len(len(seq.prompt_ids), seq.params.max_tokens)
        return max(rows, min(rows + self.num_lookahead_tokens, final))

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow running ``seq`` to ``num_tokens`` cache rows, preempting the newest running sequences of
        its pool while blocks are short. False when ``seq`` itself was the newest left and had to go."""
        while not self._grow(seq, num_tokens):
            victim = self._victim(seq)
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _victim(self, seq: Sequence) -> Sequence:
        """Whom a shortage of ``seq``'s blocks preempts: the newest running sequence (one pool here)."""
        return self.running[-1]

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(num_tokens) - len(seq.blocks)
        if need > self.allocator.num_free:
            return False
        if need > 0:
            seq.blocks += self.allocator.allocate(need)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks; it recomputes its context when readmitted (blocks that
        stayed in the prefix cache are taken back instead)."""
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        self.num_preempted_tokens += seq.num_computed
        seq.blocks = []
        seq.num_computed = 0
        seq.num_registered = 0
        seq.draft_ids = []  # drafts are re-proposed after the recompute
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        if self.metrics:
            self.metrics.preemptions.inc()

    def _headroom(self, seq: Sequence) -> int:
        """Blocks kept free for the running sequences of ``seq``'s pool to grow by next step."""
        return len(self.running)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for ``seq``'s leading full blocks; the last token is always left to compute."""
        if not self.allocator.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt row's logits: recompute them
        tokens = seq.tokens
        self.allocator.hash_blocks(tokens, seq.block_hashes)
        return self.allocator.match(seq.block_hashes, (len(tokens) - 1) // self.block_size)

    def _room_to_admit(self, seq: Sequence, hits: list[int], need: int) -> bool:
        """Whether ``need`` new blocks for ``seq`` (besides the cached ``hits``) leave the headroom."""
        free = self.allocator.num_free - self.allocator.count_free(hits)
        return free >= need + self._headroom(seq)

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Admit the head of the queue when the free blocks cover its whole current context (prompt, or
        prompt + output for a preempted one) plus the headroom: its first chunk's size, or None."""
        hits = self._cached_prefix(seq)
        need = self.blocks_needed(seq.num_tokens + self.num_lookahead_tokens) - len(hits)
        if not self._room_to_admit(seq, hits, need):
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
        if not self._grow(seq, self._rows_to_hold(seq, n)):  # cannot happen: need covers the first chunk
            raise RuntimeError(f"KV accounting: {seq.request_id} admitted without blocks for its first chunk")
        return n

    # ---- after a step -----------------------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly completed full blocks to the prefix cache."""
        # rows whose tokens are known (a verify step's accepted drafts join the tokens after it)
        full = min(seq.num_computed, seq.num_tokens, len(seq.blocks) * self.block_size) // self.block_size
        if not self.allocator.enable_prefix_caching or full <= seq.num_registered:
            return
        self.allocator.hash_blocks(seq.tokens, seq.block_hashes)
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.blocks[i], seq.block_hashes[i])
        seq.num_registered = full

    def trim(self, seq: Sequence) -> None:
        """Return blocks past ``seq``'s computed rows (rejected draft slots), keeping one for its next token."""
        keep = self.blocks_needed(seq.num_computed + 1)
        if len(seq.blocks) > keep:
            extra, seq.blocks = seq.blocks[keep:], seq.blocks[:keep]
            self.allocator.free(extra)

