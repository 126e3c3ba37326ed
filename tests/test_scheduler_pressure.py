"""The scheduler under KV pressure (issue 13: six long requests livelocked, preempting each other).

Engine level, stepped synchronously, no wall clock: requests whose KV together exceeds the cache all
finish, the oldest running sequence advances every step, nothing is preempted or computed twice, and
each request's tokens are exactly those it gets alone.
"""

import random

import pytest

pytest.importorskip("model")
pytestmark = pytest.mark.slow  # hundreds of model steps

from serving.engine import Engine, SamplingParams  # noqa: E402


def make_engine(tiny, **overrides):
    model, tokenizer = tiny
    kwargs = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                  eos_token_ids=[])
    kwargs.update(overrides)
    return Engine(model, tokenizer, **kwargs)


def workload(n=6, seed=0):
    """``n`` requests of different lengths: prompts of 17..32 tokens, 6..11 new tokens each."""
    rnd = random.Random(seed)
    return [([rnd.randrange(10, 400) for _ in range(17 + 3 * i)], 6 + i) for i in range(n)]


@pytest.fixture(scope="module")
def solo(tiny):
    """Each request of :func:`workload` run alone: its greedy tokens."""
    requests = workload()
    engine = make_engine(tiny, enable_prefix_caching=False)
    outputs = []
    for prompt, max_tokens in requests:
        seq = engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), lambda e: None)
        while engine.has_work():
            engine.step()
        outputs.append(seq.output_ids)
    return outputs


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_requests_exceeding_the_cache_all_finish_without_thrash(tiny, solo, prefix_caching):
    requests = workload()
    blocks = [-(-(len(p) + m) // 4) for p, m in requests]
    num_blocks = max(blocks) + 4  # one request always fits, all of them together never do
    assert sum(blocks) > 3 * num_blocks
    engine = make_engine(tiny, num_blocks=num_blocks, enable_prefix_caching=prefix_caching)
    events = [[] for _ in requests]
    seqs = [engine.submit(p, SamplingParams(max_tokens=m, temperature=0.0), events[i].append)
            for i, (p, m) in enumerate(requests)]
    schedule, stalled = engine.schedule, []

    def schedule_checking_the_oldest_advances():
        oldest = engine.running[0] if engine.running else None
        scheduled = schedule()
        if oldest is not None and (not scheduled or scheduled[0][0] is not oldest):
            stalled.append(oldest.request_id)
        return scheduled

    engine.schedule = schedule_checking_the_oldest_advances
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 2000, "no progress"
    assert not stalled
    assert all(ev[-1].finished and ev[-1].finish_reason == "length" for ev in events)
    assert engine.num_preemptions == 0
    # nothing was computed twice: every prompt token and every generated token but the last, once
    assert engine.num_computed_tokens == sum(len(p) + m - 1 for p, m in requests)
    assert [s.output_ids for s in seqs] == solo
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_admission_reserves_blocks_to_finish_not_only_the_first_chunk(tiny):
    (p1, m1), (p2, m2) = workload(2)
    need = [-(-(len(p) + m - 1) // 4) for p, m in ((p1, m1), (p2, m2))]
    # both prompts fit at once, but not both requests run to the end: the second must wait
    engine = make_engine(tiny, num_blocks=need[0] + need[1] - 1)
    assert -(-len(p1) // 4) + -(-len(p2) // 4) <= engine.allocator.num_blocks
    a = engine.submit(p1, SamplingParams(max_tokens=m1, temperature=0.0), lambda e: None)
    b = engine.submit(p2, SamplingParams(max_tokens=m2, temperature=0.0), lambda e: None)
    engine.step()
    assert engine.running == [a] and list(engine.waiting) == [b]
    while not a.finished:
        engine.step()
        assert b.num_computed == 0 or a.finished
    while engine.has_work():
        engine.step()
    assert engine.num_preemptions == 0 and len(b.output_ids) == m2
