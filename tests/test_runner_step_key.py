"""The graph rank 0 picks for every expert-parallel rank (``ModelRunner.step_key``) and ``ModelRunner.run``.

One process, the tiny model: the multi-rank runs are in tests/test_ep_graphs.py; here the host-side
choice itself. The key is the largest rank's batch rounded up the ladder with the longest context's
bucket; any prefill or mixed batch, or one above the ladder, makes the step eager on every rank; an
empty batch (an idle data-parallel rank) replays the chosen graph on padding rows and writes nothing.
"""

from __future__ import annotations

import pytest
import torch

from model import Batch, load_model
from model.runner import ModelRunner, RecordedGraph
from model.tiny import ensure_default_model

BLOCK = 4


@pytest.fixture(scope="module")
def tiny():
    return load_model(ensure_default_model(), backend="cpu")


def decode(lens: list[int], first_block: int = 0) -> Batch:
    """One new token per sequence, contexts ``lens``, 8 blocks each from ``first_block`` on."""
    B = len(lens)
    table = torch.arange(first_block, first_block + 8 * B, dtype=torch.int32).view(B, 8)
    return Batch(torch.full((B,), 5), torch.arange(B + 1, dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                 table)


def empty() -> Batch:
    none = torch.zeros(0, dtype=torch.int32)
    return Batch(none.long(), torch.zeros(1, dtype=torch.int32), none, torch.zeros(0, 1, dtype=torch.int32))


def prefill(n: int) -> Batch:
    return Batch(torch.arange(1, n + 1), torch.tensor([0, n], dtype=torch.int32), torch.tensor([n], dtype=torch.int32),
                 torch.arange(8, dtype=torch.int32).view(1, 8))


def runner_for(model) -> ModelRunner:
    return ModelRunner(model, max_num_seqs=4, max_model_len=32, graphs=RecordedGraph, buckets=(8, 16))


def test_one_size_for_every_rank(tiny):
    runner, cache = runner_for(tiny), tiny.new_cache(64, BLOCK)
    assert runner.capture_sizes == (1, 2, 4) and runner.buckets == (8, 16, 32)
    assert runner.step_key([decode([3, 5, 7])], cache) == (4, 8)  # plain EP: the one batch
    # data-parallel attention: the larger sub-batch up the ladder, the longest context's bucket
    assert runner.step_key([decode([3]), decode([4, 12], 8)], cache) == (2, 16)
    assert runner.step_key([decode([20]), empty()], cache) == (1, 32)  # an idle rank takes the others' size
    assert runner.step_key([empty(), empty()], cache) is None


def test_a_prefill_anywhere_or_an_oversized_batch_makes_every_rank_eager(tiny):
    runner, cache = runner_for(tiny), tiny.new_cache(64, BLOCK)
    assert runner.step_key([decode([3, 5]), prefill(6)], cache) is None
    assert runner.step_key([prefill(1), decode([3])], cache) is not None  # a 1-token prefill is a decode row
    assert runner.step_key([decode([3] * 5)], cache) is None  # above max_num_seqs: eager
    eager = ModelRunner(tiny, max_num_seqs=4, max_model_len=32, graphs=None)  # --enforce-eager
    assert eager.step_key([decode([3])], cache) is None


def test_an_idle_rank_replays_padding_rows_and_writes_nothing(tiny):
    runner, cache = runner_for(tiny), tiny.new_cache(64, BLOCK)
    before = [t.clone() for t in cache.kv]
    out = runner.run(empty(), cache, (2, 8))
    assert out.shape == (0, tiny.config.vocab_size) and runner.replays == 1
    assert all(torch.equal(a, b) for a, b in zip(before, cache.kv, strict=True))


def test_a_key_that_cannot_hold_the_batch_is_a_clear_error(tiny):
    runner, cache = runner_for(tiny), tiny.new_cache(64, BLOCK)
    with pytest.raises(ValueError, match=r"graph \(1, 8\).*2 sequences.*step_key"):
        runner.run(decode([3, 4]), cache, (1, 8))
    with pytest.raises(ValueError, match=r"longest context 12.*step_key"):
        runner.run(decode([12]), cache, (1, 8))


def test_run_in_the_chosen_graph_equals_eager(tiny):
    """The same decode step: replayed in a larger graph than it needs (as a rank whose peer has more
    sequences) vs eagerly, on two copies of one cache."""
    runner, eager = runner_for(tiny), ModelRunner(tiny, max_num_seqs=4, max_model_len=32, graphs=None)
    caches = [tiny.new_cache(64, BLOCK) for _ in range(2)]
    for c in caches:
        tiny.forward_batch(prefill(6), c)
    step = Batch(torch.tensor([9]), torch.tensor([0, 1], dtype=torch.int32), torch.tensor([7], dtype=torch.int32),
                 torch.arange(8, dtype=torch.int32).view(1, 8))
    got = runner.run(step, caches[0], (4, 16))
    want = eager.run(step, caches[1], None)
    assert runner.replays == 1 and eager.eager_steps == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[0].kv[0], caches[1].kv[0], rtol=1e-5, atol=1e-5)
