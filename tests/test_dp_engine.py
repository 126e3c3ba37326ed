"""Data-parallel attention scheduling (serving/dp.py) in one process: batch splitting, rank
assignment, per-rank caches and metrics.

The distributed step itself (broadcast, gather, the MoE all-to-alls with zero rows) runs in
tests/test_dp_model.py and tests/test_dp_serve.py; here a stand-in ``forward`` runs each rank's
sub-batch on that rank's own cache in this process, so the scheduler's decisions and the split are
checked against the plain engine token for token, fast.
"""

import pytest
import torch

pytest.importorskip("model")

from model import Batch
from serving.dp import DPEngine, register_rank_metrics, split_batch
from serving.engine import Engine, SamplingParams
from serving.metrics import ServingMetrics

BLOCK, PER_RANK = 4, 16


class LocalRanks:
    """Each rank's sub-batch on its own cache, in this process (what DPLeader does across processes)."""

    def __init__(self, model, world):
        self.model, self.world = model, world
        self.caches = [None] + [model.new_cache(PER_RANK, BLOCK) for _ in range(world - 1)]
        self.tokens = [0] * world
        self.blocks = [set() for _ in range(world)]  # local block ids each rank was told to use

    def __call__(self, batch, cache):
        self.caches[0] = cache
        subs, rows = split_batch(batch, self.world, PER_RANK, BLOCK)
        out = torch.empty(batch.seq_lens.numel(), self.model.config.vocab_size)
        for r, sub in enumerate(subs):
            logits = self.model.forward_batch(sub, self.caches[r])
            self.tokens[r] += sub.input_ids.numel()
            for row, n in zip(sub.block_table.tolist(), sub.seq_lens.tolist(), strict=True):
                self.blocks[r] |= set(row[:-(-n // BLOCK)])
            if rows[r]:
                out[torch.tensor(rows[r])] = logits
        return out


def dp_engine(tiny, world, **overrides):
    model, tokenizer = tiny
    kwargs = dict(num_blocks=PER_RANK, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=64,
                  max_model_len=64, eos_token_ids=[])
    kwargs.update(overrides)
    ranks = LocalRanks(model, world)
    return DPEngine(model, tokenizer, world=world, forward=ranks, **kwargs), ranks


def run_all(engine, requests):
    events = [[] for _ in requests]
    seqs = [engine.submit(p, sp, events[i].append) for i, (p, sp) in enumerate(requests)]
    for _ in range(10_000):
        if all(e and e[-1].finished for e in events):
            break
        engine.step()
    return [s.output_ids for s in seqs]


def _requests(tokenizer, n, max_tokens=10):
    texts = ["Hello, world", "The quick brown fox jumps over the lazy dog", "GLM", "1 2 3 4 5 6", "experts"]
    return [(tokenizer.encode(texts[i % len(texts)] + f" #{i}", add_special_tokens=False).ids,
             SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)) for i in range(n)]


def test_split_batch_gives_each_rank_its_rows_with_local_blocks():
    # rows on ranks 1, 0, 1 (PER_RANK=16: global blocks 16.. are rank 1's); rank 2 has none
    batch = Batch(input_ids=torch.arange(10), cu_seqlens_q=torch.tensor([0, 5, 6, 10], dtype=torch.int32),
                  seq_lens=torch.tensor([5, 9, 4], dtype=torch.int32),
                  block_table=torch.tensor([[16, 17, 0], [3, 4, 5], [20, 0, 0]], dtype=torch.int32))
    subs, rows = split_batch(batch, 3, PER_RANK, BLOCK)
    assert rows == [[1], [0, 2], []]
    assert subs[0].input_ids.tolist() == [5] and subs[0].seq_lens.tolist() == [9]
    assert subs[0].block_table.tolist() == [[3, 4, 5]]
    assert subs[1].input_ids.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert subs[1].cu_seqlens_q.tolist() == [0, 5, 9] and subs[1].block_table.tolist() == [[0, 1], [4, 0]]
    assert subs[2].input_ids.numel() == 0 and subs[2].cu_seqlens_q.tolist() == [0]
    assert subs[2].seq_lens.numel() == 0 and subs[2].block_table.shape[0] == 0


def test_split_batch_rejects_a_row_spread_over_ranks():
    batch = Batch(input_ids=torch.arange(5), cu_seqlens_q=torch.tensor([0, 5], dtype=torch.int32),
                  seq_lens=torch.tensor([5], dtype=torch.int32),
                  block_table=torch.tensor([[15, 16]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"row 0 has blocks \[15, 16\] on more than one rank"):
        split_batch(batch, 2, PER_RANK, BLOCK)


def test_sequences_spread_over_ranks_and_match_the_single_cache_engine(tiny):
    model, tokenizer = tiny
    requests = _requests(tokenizer, 5)
    plain = Engine(model, tokenizer, num_blocks=3 * PER_RANK, block_size=BLOCK, max_num_seqs=24,
                   max_num_batched_tokens=192, max_model_len=64, eos_token_ids=[])
    want = run_all(plain, requests)

    engine, ranks = dp_engine(tiny, 3)
    seqs = [engine.submit(p, sp, lambda e: None) for p, sp in requests]
    engine.step()  # all five admitted in the first step (one prefill each), least loaded rank first
    owners = [engine.rank_of(s) for s in seqs]
    assert sorted(owners.count(r) for r in range(3)) == [1, 2, 2], owners
    stats = engine.rank_stats()
    assert [s["running"] for s in stats] == [owners.count(r) for r in range(3)]
    for r, s in enumerate(stats):
        assert s["kv_blocks_used"] == sum(len(q.blocks) for q in seqs if engine.rank_of(q) == r)
        assert s["kv_blocks_total"] == PER_RANK
        assert all(engine.rank_of(q) == r for q in seqs if q.blocks and q.blocks[0] // PER_RANK == r)
    # each rank computed attention for its own sequences' tokens only
    assert ranks.tokens == [sum(len(requests[i][0]) for i in range(5) if owners[i] == r) for r in range(3)]

    for _ in range(200):
        if all(s.finished for s in seqs):
            break
        engine.step()
    assert [s.output_ids for s in seqs] == want
    assert engine.allocator.num_used == 0
    # each rank's cache holds rows only in the blocks of its own sequences
    for r in range(3):
        written = {b for b in range(PER_RANK) if bool(ranks.caches[r].kv[0][b].abs().sum() > 0)}
        assert written == ranks.blocks[r] and written, (r, written, ranks.blocks[r])


def test_a_rank_full_of_blocks_sends_new_sequences_elsewhere(tiny):
    engine, _ = dp_engine(tiny, 2, max_model_len=64)
    _, tokenizer = tiny
    prompt = tokenizer.encode("a prompt of some length here", add_special_tokens=False).ids
    first = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0), lambda e: None)
    engine._take_inbox()
    engine.schedule()
    assert engine.rank_of(first) == 0
    engine.allocator.ranks[1].allocate(PER_RANK)  # rank 1 has no free block: the next one stays on rank 0
    second = engine.submit(prompt, SamplingParams(max_tokens=1, temperature=0.0), lambda e: None)
    engine._take_inbox()
    engine.schedule()
    assert engine.rank_of(second) == 0


def test_a_request_must_fit_one_rank(tiny):
    engine, _ = dp_engine(tiny, 2, max_model_len=128)
    assert engine.check_fits(40, 20) is None  # 15 blocks of 4 tokens: fits one rank's 16
    why = engine.check_fits(60, 20)  # 20 blocks: more than a rank holds, less than all ranks together
    assert why and "one rank's cache has 16" in why and "--dp-attention" in why


def test_rank_metrics_have_a_rank_label(tiny):
    engine, _ = dp_engine(tiny, 2)
    metrics = ServingMetrics()
    metrics.bind(engine, backend="cpu", device="cpu", model_name="tiny", block_size=BLOCK)
    register_rank_metrics(metrics, engine)
    _, tokenizer = tiny
    for p, sp in _requests(tokenizer, 3, max_tokens=10):
        engine.submit(p, sp, lambda e: None)
    engine.step()
    text = metrics.render()[0].decode()
    for r, stats in enumerate(engine.rank_stats()):
        assert f'hwlayer_rank_num_requests_running{{rank="{r}"}} {float(stats["running"])}' in text
        assert f'hwlayer_rank_kv_blocks_used{{rank="{r}"}} {float(stats["kv_blocks_used"])}' in text
        assert f'hwlayer_rank_kv_blocks_total{{rank="{r}"}} {float(PER_RANK)}' in text
        assert f'hwlayer_rank_preemptions_total{{rank="{r}"}} 0.0' in text
    assert [s["running"] for s in engine.rank_stats()] == [2, 1]
    assert f"hwlayer_kv_blocks_used {float(engine.allocator.num_used)}" in text


@pytest.mark.parametrize("args", [["--dp-attention"], ["--dp-attention", "--ep", "1"]])
def test_dp_attention_without_ep_is_one_line_exit_2(args, capsys):
    from serving.server import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["serve.py: error: --dp-attention needs --ep N with N >= 2 ranks (got --ep 1); launch with "
                     "torchrun --nproc-per-node N serve.py --ep N --dp-attention"]


def test_a_rank_out_of_blocks_preempts_its_own_sequence_not_another_ranks(tiny):
    model, tokenizer = tiny
    requests = _requests(tokenizer, 2, max_tokens=12)
    plain = Engine(model, tokenizer, num_blocks=2 * PER_RANK, block_size=BLOCK, max_num_seqs=8,
                   max_num_batched_tokens=64, max_model_len=64, eos_token_ids=[])
    want = run_all(plain, requests)

    engine, _ = dp_engine(tiny, 2)
    a, b = (engine.submit(p, sp, lambda e: None) for p, sp in requests)
    engine.step()
    assert (engine.rank_of(a), engine.rank_of(b)) == (0, 1)
    hog = engine.allocator.ranks[0].allocate(engine.allocator.ranks[0].num_free)  # rank 0 runs dry
    for _ in range(40):  # until a must grow on rank 0: it is preempted, not b (the newest, on rank 1)
        engine.step()
        if engine.preemptions_by_rank[0]:
            break
    assert engine.preemptions_by_rank == [1, 0]
    assert engine.rank_of(a) in (None, 1) and engine.rank_of(b) == 1
    for _ in range(200):
        if a.finished and b.finished:
            break
        engine.step()
    assert engine.preemptions_by_rank == [1, 0]
    assert [a.output_ids, b.output_ids] == want  # a recomputed its context on rank 1: same tokens
    engine.allocator.ranks[0].free(hog)
    assert engine.allocator.num_used == 0


def test_an_idle_ranks_empty_batch_runs_through_the_model(tiny):
    """A DP rank without sequences runs forward_batch on zero tokens (every op must take T=0)."""
    model, _ = tiny
    cache = model.new_cache(2, BLOCK)
    empty = Batch(input_ids=torch.zeros(0, dtype=torch.int64), cu_seqlens_q=torch.zeros(1, dtype=torch.int32),
                  seq_lens=torch.zeros(0, dtype=torch.int32), block_table=torch.zeros(0, 1, dtype=torch.int32))
    assert tuple(model.forward_batch(empty, cache).shape) == (0, model.config.vocab_size)
    assert all(not bool(layer.abs().sum()) for layer in cache.kv)  # nothing written


def test_a_rank_samples_its_own_rows(tiny):
    """What each rank does with its logits under DPLeader.sample_step: greedy rows by argmax (no
    plan.sample), sampled rows through plan.sample with their temperature / top-k / top-p."""
    from serving.dp import RankSampling, sample_rows

    model, _ = tiny
    logits = torch.randn(4, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    greedy = RankSampling(rows=[3, 1], temperature=[0.0, 0.0], top_k=[0, 0], top_p=[1.0, 1.0])
    assert sample_rows(model, logits, greedy).tolist() == [int(logits[3].argmax()), int(logits[1].argmax())]
    top1 = RankSampling(rows=[0, 2], temperature=[1.0, 0.7], top_k=[1, 1], top_p=[1.0, 1.0])  # top-k 1: argmax
    assert sample_rows(model, logits, top1).tolist() == [int(logits[0].argmax()), int(logits[2].argmax())]
    assert sample_rows(model, logits, RankSampling()).numel() == 0
