"""Data-parallel attention with expert-parallel MoE: every rank serves its own sequences.

    torchrun --nproc-per-node N serve.py --ep N --dp-attention

Plain expert parallelism (:mod:`serving.ep`) runs the whole batch on every rank: attention and the
paged cache are replicated. Here each sequence lives on one rank: its KV blocks are that rank's, and
only that rank computes its attention. The MoE layers are where the ranks meet: every rank routes
its own tokens and the expert all-to-alls (``ep_dispatch`` / ``ep_combine``) exchange them, so a
rank with nothing to do still joins each MoE layer, with zero rows.

Rank 0 holds the scheduling state of all ranks (:class:`DPEngine`): one block free list per rank,
the whole running batch, the sampling state. Block ids are global: rank ``r`` owns ids
``[r * B, (r + 1) * B)`` for ``B`` blocks per rank, so the unchanged scheduler of
:class:`serving.engine.Engine` builds one batch whose rows name their rank by their blocks. A new
sequence goes to the least loaded rank (fewest KV blocks in use, then fewest tokens) when its first
blocks are taken; a preempted one may land elsewhere when it comes back (it recomputes anyway).

Each step (:class:`DPLeader`) rank 0 splits the batch into one sub-batch per rank
(:func:`split_batch`, block ids made local) and broadcasts them with what each rank samples
(:class:`RankSampling`); every rank runs its own and samples its own rows, and rank 0 gathers token
ids (8 bytes a row) instead of fp32 logits (4 x vocab bytes a row, 0.6 MB at GLM-5's vocabulary).
Only rows rank 0 must process itself (logits processors, logprobs, a grammar, a seeded generator:
that state lives on rank 0) send their logits.

Decode graphs (each rank a :class:`model.runner.ModelRunner` built alike): the sub-batches differ, but
the fixed-capacity all-to-alls of a captured step need one size on every rank, so rank 0 picks the
graph for all (:meth:`~model.runner.ModelRunner.step_key`: the largest sub-batch rounded up the
ladder, the longest context's bucket) and broadcasts it with the sub-batches; a rank with no sequences
replays that graph on padding rows (slot -1). If any rank prefills, every rank runs the step eagerly
(the exact all-to-all), as vLLM's ``coordinate_batch_across_dp`` makes all ranks eager when one is.

Followers run :func:`follower_loop`. Failures are handled as in :mod:`serving.ep`: a collective that
fails is a :class:`hwlayer.distributed.RankFailure` naming the rank; rank 0 answers 503 and exits
non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist

from hwlayer import distributed as hd

from . import ep as ep_mod
from .block_manager import BlockManager
from .engine import Engine, Sequence
from .scheduler import Scheduler


class DPBlockAllocator:
    """One free list per rank behind one global block-id space: rank ``r`` owns ids
    ``[r * blocks_per_rank, (r + 1) * blocks_per_rank)``. The totals (``num_blocks``, ``num_used``,
    ``num_free``) are over all ranks, as the engine's metrics read them. No prefix caching: a
    cached block would only serve sequences on its own rank."""

    enable_prefix_caching = False

    def __init__(self, world: int, blocks_per_rank: int, block_size: int) -> None:
        self.world, self.blocks_per_rank = world, blocks_per_rank
        # each rank's local ids 0 .. blocks_per_rank-1: the engine's block manager, caching off
        self.ranks = [BlockManager(blocks_per_rank, block_size, enable_prefix_caching=False) for _ in range(world)]

    @property
    def num_blocks(self) -> int:
        return self.world * self.blocks_per_rank

    @property
    def num_free(self) -> int:
        return sum(a.num_free for a in self.ranks)

    @property
    def num_used(self) -> int:
        return sum(a.num_used for a in self.ranks)

    def rank_of(self, block: int) -> int:
        return block // self.blocks_per_rank

    def allocate_on(self, rank: int, n: int) -> list[int]:
        base = rank * self.blocks_per_rank
        return [base + b for b in self.ranks[rank].allocate(n)]

    def allocate(self, n: int) -> list[int]:
        """Blocks on the rank with the most free ones (callers that know the sequence use :meth:`allocate_on`)."""
        return self.allocate_on(max(range(self.world), key=lambda r: self.ranks[r].num_free), n)

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ranks[self.rank_of(b)].free([b % self.blocks_per_rank])

    # The engine's BlockManager interface with prefix caching off (nothing is ever cached here).
    def count_free(self, blocks: list[int]) -> int:
        return 0

    def acquire(self, blocks: list[int]) -> None:
        if blocks:
            raise RuntimeError("DPBlockAllocator: no prefix caching across data-parallel ranks")

    def record_lookup(self, queried: int, hit: int) -> None:
        pass

    num_cached = 0
    hit_rate = 0.0


class DPScheduler(Scheduler):
    """The scheduler with one block pool per rank: a sequence lives on one rank, a new one goes to the
    least loaded rank with room (fewest KV blocks in use, then fewest tokens), a shortage preempts the
    newest sequence of the short rank only, and the headroom kept at admission is that rank's."""

    def __init__(self, allocator: DPBlockAllocator, **kwargs: Any) -> None:
        super().__init__(allocator, **kwargs)
        self.world = allocator.world
        self.preemptions_by_rank = [0] * self.world

    @property
    def pool_blocks(self) -> int:
        return self.allocator.blocks_per_rank

    def rank_of(self, seq: Sequence) -> int | None:
        """The rank a sequence lives on, or None while it holds no blocks."""
        blocks = seq.blocks  # one read: /metrics calls this off the engine thread, which may replace the list
        return self.allocator.rank_of(blocks[0]) if blocks else None

    def _home(self, seq: Sequence) -> int | None:
        rank = self.rank_of(seq)
        return rank if rank is not None else getattr(seq, "dp_rank", None)

    def choose_rank(self, need: int, among: list[int] | None = None) -> int | None:
        """Least loaded rank with ``need`` free blocks: fewest blocks in use, then fewest tokens."""
        tokens = [0] * self.world
        for s in self.running:
            r = self.rank_of(s)
            if r is not None:
                tokens[r] += s.num_tokens
        ranks = self.allocator.ranks
        fits = [r for r in (range(self.world) if among is None else among) if ranks[r].num_free >= need]
        return min(fits, key=lambda r: (ranks[r].num_used, tokens[r], r), default=None)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        rank = self._home(seq)
        if rank is None or need > self.allocator.ranks[rank].num_free:
            return False
        seq.blocks += self.allocator.allocate_on(rank, need)
        return True

    def _victim(self, seq: Sequence) -> Sequence:
        """The newest running sequence on ``seq``'s rank (only those free blocks it can use)."""
        rank = self._home(seq)
        return [s for s in self.running if self._home(s) == rank][-1]

    def preempt(self, seq: Sequence) -> None:
        rank = self._home(seq)
        if rank is not None:
            self.preemptions_by_rank[rank] += 1
        super().preempt(seq)
        seq.dp_rank = None  # it comes back on whichever rank then has room

    def _room_to_admit(self, seq: Sequence, hits: list[int], need: int) -> bool:
        """Place ``seq`` on the least loaded rank whose free blocks cover ``need`` plus the headroom of
        that rank's running sequences; False when none does."""
        running = [0] * self.world
        for s in self.running:
            r = self._home(s)
            if r is not None:
                running[r] += 1
        fits = [r for r in range(self.world) if self.allocator.ranks[r].num_free >= need + running[r]]
        seq.dp_rank = self.choose_rank(0, among=fits) if fits else None
        return seq.dp_rank is not None


class DPEngine(Engine):
    """The continuous-batching engine of rank 0 with data-parallel attention over ``world`` ranks.

    ``num_blocks``, ``max_num_seqs`` and ``max_num_batched_tokens`` are per rank (the step budget of
    the whole batch is ``world`` times them). ``forward``: default :class:`DPLeader` (the
    distributed step); a test may pass another that takes the same global-block batch. ``runner``:
    rank 0's :class:`model.runner.ModelRunner` for the default leader (decode steps in graphs).
    Everything else is :class:`serving.engine.Engine`; the per-rank block pools are
    :class:`DPScheduler`'s.
    """

    def __init__(self, model: Any, tokenizer: Any, *, world: int, num_blocks: int, block_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int,
                 forward: Callable[[Any, Any], torch.Tensor] | None = None, runner: Any = None,
                 **kwargs: Any) -> None:
        if world < 1:
            raise ValueError(f"DPEngine: expected world >= 1 ranks, got {world}")
        self.world = world
        leader = forward or DPLeader(model, world, num_blocks, block_size, runner)
        kwargs.setdefault("on_idle", ep_mod.keepalive if forward is None else None)
        kwargs.pop("enable_prefix_caching", None)  # no prefix caching across ranks
        self._blocks_per_rank = num_blocks
        super().__init__(model, tokenizer, num_blocks=num_blocks, block_size=block_size,
                         max_num_seqs=max_num_seqs * world, max_num_batched_tokens=max_num_batched_tokens * world,
                         forward=leader, enable_prefix_caching=False, **kwargs)

    def _make_scheduler(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> Scheduler:
        # rank 0's cache holds num_blocks: the runner's cache is rank 0's share
        return DPScheduler(DPBlockAllocator(self.world, num_blocks, block_size), block_size=block_size,
                           max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                           max_model_len=self.max_model_len, metrics=self.metrics)

    @property
    def preemptions_by_rank(self) -> list[int]:
        return self.scheduler.preemptions_by_rank

    def rank_of(self, seq: Sequence) -> int | None:
        return self.scheduler.rank_of(seq)

    def choose_rank(self, need: int, among: list[int] | None = None) -> int | None:
        return self.scheduler.choose_rank(need, among)

    def check_fits(self, prompt_len: int, max_tokens: int) -> str | None:
        why = self.scheduler.check_fits(prompt_len, max_tokens)
        if why and "KV blocks" in why:
            total = prompt_len + max_tokens
            return (f"the request needs {self.blocks_needed(total)} KV blocks ({total} tokens) but one rank's cache "
                    f"has {self.scheduler.pool_blocks} (with --dp-attention a sequence lives on one rank); lower "
                    "max_tokens or start the server with a larger per-rank KV cache")
        return why

    def rank_stats(self) -> list[dict[str, int]]:
        """Per rank: running sequences, KV blocks used and in all (read at /metrics scrape time)."""
        running = [0] * self.world
        for s in list(self.running):  # a copy: the engine thread may change the list meanwhile
            r = self.rank_of(s)
            if r is not None:
                running[r] += 1
        return [{"running": running[r], "kv_blocks_used": self.allocator.ranks[r].num_used,
                 "kv_blocks_total": self.allocator.blocks_per_rank} for r in range(self.world)]


def _empty_batch(Batch: Any) -> Any:
    return Batch(input_ids=torch.zeros(0, dtype=torch.int64), cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                 seq_lens=torch.zeros(0, dtype=torch.int32), block_table=torch.zeros(0, 1, dtype=torch.int32))


def split_batch(batch: Any, world: int, blocks_per_rank: int, block_size: int) -> tuple[list[Any], list[list[int]]]:
    """One sub-batch per rank from a batch with global block ids: ``(sub_batches, rows)``.

    ``rows[r]``: the rows of ``batch`` that rank ``r`` runs, in order; its sub-batch holds their
    tokens, lengths and block tables with the rank's local block ids. A rank without rows gets an
    empty batch (zero tokens): it still joins every MoE all-to-all. Host work, once per step.
    """
    Batch = type(batch)
    cu = batch.cu_seqlens_q.tolist()
    lens = batch.seq_lens.tolist()
    table = batch.block_table
    ids = batch.input_ids
    n_blocks = [-(-n // block_size) for n in lens]
    owner = [int(table[b, 0]) // blocks_per_rank for b in range(len(lens))]
    subs, rows = [], []
    for r in range(world):
        mine = [b for b in range(len(lens)) if owner[b] == r]
        rows.append(mine)
        if not mine:
            subs.append(_empty_batch(Batch))
            continue
        local = torch.zeros(len(mine), max(n_blocks[b] for b in mine), dtype=torch.int32)
        for j, b in enumerate(mine):
            blocks = table[b, :n_blocks[b]].to(torch.int32)
            if int(blocks.min()) < r * blocks_per_rank or int(blocks.max()) >= (r + 1) * blocks_per_rank:
                raise ValueError(f"split_batch: row {b} has blocks {blocks.tolist()} on more than one rank "
                                 f"(rank {r} owns [{r * blocks_per_rank}, {(r + 1) * blocks_per_rank}))")
            local[j, :n_blocks[b]] = blocks - r * blocks_per_rank
        new = [cu[b + 1] - cu[b] for b in mine]
        cu_r = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        subs.append(Batch(input_ids=torch.cat([ids[cu[b]:cu[b + 1]] for b in mine]), cu_seqlens_q=cu_r,
                          seq_lens=torch.tensor([lens[b] for b in mine], dtype=torch.int32), block_table=local))
    return subs, rows


@dataclass
class RankSampling:
    """What one rank samples after its forward, decided on rank 0 and broadcast with the step:
    ``rows`` (local rows) with their temperature / top-k / top-p, drawn with the rank's own default
    generator (greedy rows by argmax, no sort when all are greedy); ``logits_rows``: local rows whose
    logits go to rank 0 instead."""

    rows: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)


def sample_rows(model: Any, logits: torch.Tensor, s: RankSampling) -> torch.Tensor:
    """int64 ``[len(s.rows)]``: this rank's tokens for ``s.rows`` of its ``logits``."""
    if not s.rows:
        return torch.zeros(0, dtype=torch.int64, device=logits.device)
    sub = logits[torch.tensor(s.rows, device=logits.device)]
    if all(t <= 0 for t in s.temperature):
        return sub.argmax(-1)
    dev = logits.device
    return model.plan.sample(sub, torch.tensor(s.temperature, dtype=torch.float32, device=dev),
                             torch.tensor(s.top_k, dtype=torch.int64, device=dev),
                             torch.tensor(s.top_p, dtype=torch.float32, device=dev))


def _gather_padded(t: torch.Tensor, width: int, rank: int, world: int) -> list[torch.Tensor] | None:
    """Gather ``t`` (``[rows, ...]``, padded to ``width`` rows) from every rank to rank 0."""
    padded = t.new_zeros(width, *t.shape[1:])
    padded[:t.shape[0]] = t
    gathered = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    return gathered


def run_sampled_step(model: Any, subs: list[Any], sampling: list[RankSampling], cache: Any, rank: int,
                     runner: Any = None, key: Any = None) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Every rank: run its own sub-batch (in graph ``key`` when rank 0 picked one), sample its rows,
    gather token ids (and the few logits rows rank 0 samples itself) to rank 0. Returns, on rank 0, per
    rank ``(token ids, logits rows)``; None elsewhere. Every rank knows ``sampling`` for all ranks, so
    all agree on which gathers run."""
    logits = ep_mod.run_step(model, runner, subs[rank], cache, key)
    mine = sampling[rank]
    world = len(subs)
    ids = sample_rows(model, logits, mine)
    width = max(len(s.rows) for s in sampling)
    id_parts = _gather_padded(ids, width, rank, world) if width else [ids[:0]] * world
    lwidth = max(len(s.logits_rows) for s in sampling)
    logit_parts = None
    if lwidth:
        sub = logits[torch.tensor(mine.logits_rows, dtype=torch.int64, device=logits.device)]
        logit_parts = _gather_padded(sub, lwidth, rank, world)
    if rank != 0:
        return None
    ids_out = [part[:len(s.rows)] for part, s in zip(id_parts, sampling, strict=True)]
    logits_out = ([part[:len(s.logits_rows)] for part, s in zip(logit_parts, sampling, strict=True)]
                  if logit_parts is not None else [logits[:0]] * world)
    return ids_out, logits_out


def run_step(model: Any, subs: list[Any], cache: Any, rank: int, runner: Any = None,
             key: Any = None) -> list[torch.Tensor] | None:
    """Every rank: run its own sub-batch (in graph ``key`` when rank 0 picked one), then gather all
    ranks' logits to rank 0.

    Returns, on rank 0, each rank's logits ``[rows of that rank, vocab]``; None elsewhere. The
    logits are padded to the largest sub-batch for one ``gather`` (collective, every rank calls it)."""
    logits = ep_mod.run_step(model, runner, subs[rank], cache, key)
    width = max(s.seq_lens.numel() for s in subs)
    padded = logits.new_zeros(width, logits.shape[1])
    padded[:logits.shape[0]] = logits
    gathered = [torch.empty_like(padded) for _ in subs] if rank == 0 else None
    dist.gather(padded, gathered, dst=0)
    if gathered is None:
        return None
    return [g[:s.seq_lens.numel()] for g, s in zip(gathered, subs, strict=True)]


class DPLeader:
    """Rank 0's ``forward`` for :class:`DPEngine`: split, broadcast, run its share, gather logits.

    Keeps, for benchmarks and /metrics, the attention tokens each rank computed (``tokens[r]``,
    cumulative) and in the last step (``last_tokens``). ``runner``: rank 0's
    :class:`model.runner.ModelRunner` (every follower holds one built alike): it picks each step's graph
    for all ranks (``last_graph``: that key, None for an eager step)."""

    def __init__(self, model: Any, world: int, blocks_per_rank: int, block_size: int, runner: Any = None) -> None:
        self.model, self.world, self.runner = model, world, runner
        self.last_graph: tuple[int, int] | None = None
        self.blocks_per_rank, self.block_size = blocks_per_rank, block_size
        self.steps = 0
        self.tokens = [0] * world
        self.last_tokens = [0] * world
        self.sampled = [0] * world  # tokens each rank sampled itself (sent to rank 0 as ids)
        self.logits_rows = 0  # rows whose logits were gathered to rank 0 instead

    @property
    def uses_graphs(self) -> bool:
        return self.runner is not None and self.runner.uses_graphs

    def capture(self, cache: Any) -> None:
        """Capture the decode graphs on every rank at once (each capture runs the all-to-alls)."""
        if self.uses_graphs:
            self.steps += 1
            ep_mod._broadcast([("capture", None)], f"serving step {self.steps} (broadcast)")
            with hd.rank_failure_guard(f"serving step {self.steps} (graph capture)"):
                self.runner.capture(cache)

    def _graph(self, subs: list[Any], cache: Any) -> tuple[int, int] | None:
        """The graph all ranks replay this step (None: all eager), one size for every rank."""
        self.last_graph = self.runner.step_key(subs, cache) if self.runner is not None else None
        return self.last_graph

    def __call__(self, batch: Any, cache: Any) -> torch.Tensor:
        subs, rows = split_batch(batch, self.world, self.blocks_per_rank, self.block_size)
        key = self._graph(subs, cache)
        self.steps += 1
        step = self.steps
        ep_mod._broadcast([("dp_step", (subs, None, key))], f"serving step {step} (broadcast)")
        with hd.rank_failure_guard(f"serving step {step} (forward)"):
            parts = run_step(self.model, subs, cache, 0, self.runner, key)
        self.last_tokens = [int(s.input_ids.numel()) for s in subs]
        self.tokens = [a + b for a, b in zip(self.tokens, self.last_tokens, strict=True)]
        out = parts[0].new_empty(batch.seq_lens.numel(), parts[0].shape[1])
        for r, part in enumerate(parts):
            if rows[r]:
                out[torch.tensor(rows[r], device=out.device)] = part
        return out

    def sample_step(self, batch: Any, cache: Any,
                    wants: list[tuple[float, int, float] | str | None]) -> tuple[dict[int, int], torch.Tensor]:
        """Run a step with the ranks sampling their own rows. ``wants[b]`` for batch row ``b``: None (no
        token this step), ``(temperature, top_k, top_p)`` (the row's rank samples it), or ``"logits"``
        (rank 0 samples it: its logits come back). Returns ``({row: token id}, logits of the "logits"
        rows in row order)``."""
        subs, rows = split_batch(batch, self.world, self.blocks_per_rank, self.block_size)
        sampling = []
        for r in range(self.world):
            s = RankSampling()
            for j, b in enumerate(rows[r]):
                want = wants[b]
                if want == "logits":
                    s.logits_rows.append(j)
                elif want is not None:
                    s.rows.append(j)
                    s.temperature.append(want[0])
                    s.top_k.append(want[1])
                    s.top_p.append(want[2])
            sampling.append(s)
        key = self._graph(subs, cache)
        self.steps += 1
        step = self.steps
        ep_mod._broadcast([("dp_step", (subs, sampling, key))], f"serving step {step} (broadcast)")
        with hd.rank_failure_guard(f"serving step {step} (forward)"):
            ids, logits = run_sampled_step(self.model, subs, sampling, cache, 0, self.runner, key)
        self.last_tokens = [int(s.input_ids.numel()) for s in subs]
        self.tokens = [a + b for a, b in zip(self.tokens, self.last_tokens, strict=True)]
        tokens: dict[int, int] = {}
        back: list[tuple[int, torch.Tensor]] = []
        for r, s in enumerate(sampling):
            self.sampled[r] += len(s.rows)
            for j, t in zip(s.rows, ids[r].tolist(), strict=True):
                tokens[rows[r][j]] = t
            back += [(rows[r][j], logits[r][i]) for i, j in enumerate(s.logits_rows)]
        back.sort(key=lambda x: x[0])
        self.logits_rows += len(back)
        vocab = self.model.config.vocab_size
        out = torch.stack([t for _, t in back]) if back else torch.zeros(0, vocab)
        return tokens, out


def follower_loop(model: Any, num_blocks: int, block_size: int, runner: Any = None) -> None:
    """Ranks > 0: run this rank's share of every step rank 0 broadcasts, until ``shutdown``.

    The cache holds ``num_blocks`` blocks for this rank's own sequences; ``runner`` (built with rank
    0's flags) replays the decode graphs rank 0 picks. Raises
    :class:`hwlayer.distributed.RankFailure` when a collective fails."""
    cache = model.new_cache(num_blocks, block_size)
    rank = hd.current().rank
    while True:
        message: list = [None]
        ep_mod._broadcast(message, f"rank {rank} waiting for a step")
        kind, payload = message[0]
        if kind == "shutdown":
            break
        if kind == "dp_step":
            subs, sampling, key = payload  # sampling None: rank 0 takes every rank's logits
            with hd.rank_failure_guard(f"rank {rank} forward"):
                if sampling is not None:
                    run_sampled_step(model, subs, sampling, cache, rank, runner, key)
                else:
                    run_step(model, subs, cache, rank, runner, key)
        elif kind == "capture":
            with hd.rank_failure_guard(f"rank {rank} graph capture"):
                ep_mod.run_capture(runner, cache, rank)
        elif kind != "noop":
            raise RuntimeError(f"rank {rank}: rank 0 sent a {kind!r} step; with --dp-attention every rank must be "
                               "started with the same flags")
    hd.shutdown()


def register_rank_metrics(metrics: Any, engine: DPEngine) -> None:
    """Per-rank series on rank 0's /metrics, labelled ``rank``: running sequences, KV blocks used
    and in all, preemptions, and attention tokens computed (when the engine runs :class:`DPLeader`)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class RankCollector:
        def collect(self):
            running = GaugeMetricFamily("hwlayer_rank_num_requests_running",
                                        "Sequences in the running batch that live on this rank", labels=["rank"])
            used = GaugeMetricFamily("hwlayer_rank_kv_blocks_used", "KV blocks of this rank held by its sequences",
                                     labels=["rank"])
            total = GaugeMetricFamily("hwlayer_rank_kv_blocks_total", "KV blocks of this rank in all",
                                      labels=["rank"])
            tokens = CounterMetricFamily("hwlayer_rank_attention_tokens",
                                         "Tokens whose attention this rank computed", labels=["rank"])
            sampled = CounterMetricFamily("hwlayer_rank_sampled_tokens",
                                          "Tokens this rank sampled itself (sent to rank 0 as ids, not logits)",
                                          labels=["rank"])
            preempted = CounterMetricFamily("hwlayer_rank_preemptions",
                                            "Sequences preempted for lack of this rank's KV blocks", labels=["rank"])
            leader = engine.forward if isinstance(engine.forward, DPLeader) else None
            for r, stats in enumerate(engine.rank_stats()):
                running.add_metric([str(r)], stats["running"])
                used.add_metric([str(r)], stats["kv_blocks_used"])
                total.add_metric([str(r)], stats["kv_blocks_total"])
                preempted.add_metric([str(r)], engine.preemptions_by_rank[r])
                if leader is not None:
                    tokens.add_metric([str(r)], leader.tokens[r])
                    sampled.add_metric([str(r)], leader.sampled[r])
            yield from (running, used, total, preempted, tokens, sampled)

    metrics.registry.register(RankCollector())
