"""The scheduler under KV pressure (issue 13: six long requests livelocked, preempting each other).

Engine level, stepped synchronously, no wall clock: requests whose KV together exceeds the cache all
finish, the oldest running sequence advances every step, no sequence cycles through preempt /
readmit, recomputation is bounded by what preemption threw away, and each request's tokens are
exactly those it gets alone. KV blocks are taken on demand (issue 22), so preemption does happen here.
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
    # preemption by recompute, but no preempt / readmit cycle: no sequence is evicted twice
    assert engine.num_preemptions <= len(requests) and max(s.num_preemptions for s in seqs) <= 1
    # every prompt token and every generated token but the last once, plus at most what preemption threw away
    once = sum(len(p) + m - 1 for p, m in requests)
    assert once <= engine.num_computed_tokens <= once + engine.scheduler.num_preempted_tokens
    assert [s.output_ids for s in seqs] == solo
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_blocks_on_demand_admit_both_then_preempt_the_newer_which_resumes(tiny, solo):
    """Two requests whose prompts fit but whose whole runs do not: both start at once (blocks on demand,
    nothing reserved for tokens not generated yet); when blocks run short the newer one is preempted,
    the older keeps advancing, and the newer one later recomputes and yields its solo tokens."""
    (p1, m1), (p2, m2) = workload(2)
    need = [-(-(len(p) + m - 1) // 4) for p, m in ((p1, m1), (p2, m2))]
    engine = make_engine(tiny, num_blocks=need[0] + need[1] - 1, enable_prefix_caching=False)
    a = engine.submit(p1, SamplingParams(max_tokens=m1, temperature=0.0), lambda e: None)
    b = engine.submit(p2, SamplingParams(max_tokens=m2, temperature=0.0), lambda e: None)
    engine.step()
    assert engine.running == [a, b]
    while engine.has_work():
        before = len(a.output_ids)
        engine.step()
        assert a.finished or len(a.output_ids) == before + 1  # the oldest advances every step
    assert engine.num_preemptions == 1 and b.num_preemptions == 1 and a.num_preemptions == 0
    assert [a.output_ids, b.output_ids] == solo[:2]
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_twelve_requests_without_max_tokens_stream_at_once_and_return_every_block(tiny):
    """Issue 22's goal, untimed: 12 requests without max_tokens (up to the context limit, as the API
    makes them) on a cache of 3 full contexts all stream at once (under the old reserve-to-finish
    admission at most 3 did), and every block comes back when their clients go away."""
    max_len, block = 64, 4
    engine = make_engine(tiny, num_blocks=3 * max_len // block, block_size=block, max_num_seqs=16,
                         max_model_len=max_len)
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(12)]
    events = [[] for _ in prompts]
    seqs = [engine.submit(p, SamplingParams(max_tokens=max_len - len(p), temperature=0.0), events[i].append)
            for i, p in enumerate(prompts)]
    for _ in range(6):
        engine.step()
    assert engine.num_running == 12 and all(len(s.output_ids) == 6 for s in seqs)  # all twelve streaming
    assert all(len(ev) == 6 and not ev[-1].finished for ev in events)
    for _ in range(30):  # on until the cache runs short: preemption, still no failure
        engine.step()
    assert engine.num_preemptions > 0 and engine.allocator.num_free < engine.allocator.num_blocks
    for s in seqs:  # the clients disconnect
        engine.abort(s.request_id)
    engine.step()
    assert all(ev[-1].finished and ev[-1].finish_reason == "abort" for ev in events)
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.running and not engine.waiting
