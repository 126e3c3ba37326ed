"""The continuous-batching engine on the real tiny model, stepped synchronously in this process.

Every generated token is checked against an independent reference: the full-context logits of
``model.generate.score`` (no cache, no batching), so chunked prefill, mixed prefill/decode batches, paged
blocks and preemption must all reproduce plain greedy decoding.
"""

import pytest
import torch

model_pkg = pytest.importorskip("model")

from model.generate import score  # noqa: E402
from serving.block_manager import BlockManager  # noqa: E402
from serving.engine import Engine, SamplingParams  # noqa: E402


def make_engine(tiny, **overrides):
    model, tokenizer = tiny
    kwargs = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                  eos_token_ids=[])
    kwargs.update(overrides)
    return Engine(model, tokenizer, **kwargs)


def run_all(engine, requests):
    """Submit ``(prompt_ids, params)`` pairs, step until all finish; returns (token ids, events) per request."""
    events = [[] for _ in requests]
    seqs = [engine.submit(p, sp, events[i].append) for i, (p, sp) in enumerate(requests)]
    for _ in range(10_000):
        if all(e and e[-1].finished for e in events):
            break
        engine.step()
    return [s.output_ids for s in seqs], events


def assert_greedy(model, prompt, output, tol=1e-3):
    """Each generated token is (up to float noise) the argmax of the uncached full-context logits."""
    ids = torch.tensor([prompt + output])
    logits = score(model, ids)[0, len(prompt) - 1:-1]
    for step, token in enumerate(output):
        assert logits[step, token] >= logits[step].max() - tol, f"token {step}: {token} is not the greedy choice"


def prompts(tokenizer, n):
    texts = ["Hello, world", "The quick brown fox jumps over the lazy dog and keeps running", "GLM", "1 2 3 4 5 6"]
    return [tokenizer.encode(texts[i % len(texts)] + f" #{i}", add_special_tokens=False).ids for i in range(n)]


def test_block_manager_refcounts_and_free_list():
    alloc = BlockManager(4, block_size=2)
    a = alloc.allocate(3)
    assert alloc.num_free == 1 and alloc.num_used == 3 and len(set(a)) == 3
    with pytest.raises(RuntimeError):
        alloc.allocate(2)
    alloc.acquire(a[:1])  # a second holder of the first block
    alloc.free(a)
    assert alloc.num_free == 3 and alloc.ref[a[0]] == 1
    alloc.free(a[:1])
    assert alloc.num_free == 4
    with pytest.raises(RuntimeError):
        alloc.free(a[:1])


def test_batched_chunked_greedy_matches_uncached_reference(tiny):
    model, tokenizer = tiny
    engine = make_engine(tiny, max_num_batched_tokens=7)  # prompts arrive in chunks of <= 7 tokens
    batch = prompts(tokenizer, 3)
    outputs, events = run_all(engine, [(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in batch])
    for prompt, output, ev in zip(batch, outputs, events, strict=True):
        assert len(output) == 6 and ev[-1].finish_reason == "length" and ev[-1].completion_tokens == 6
        assert_greedy(model, prompt, output)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not engine.running and not engine.waiting


def test_preemption_keeps_results_and_returns_blocks(tiny):
    """Blocks are taken on demand: when they run out (here the free blocks are taken behind the
    scheduler's back) the newest sequences are preempted, recompute later and still produce the
    greedy tokens, while the oldest keeps going."""
    model, tokenizer = tiny
    batch = prompts(tokenizer, 3)
    engine = make_engine(tiny, enable_prefix_caching=False)
    events = [[] for _ in batch]
    seqs = [engine.submit(p, SamplingParams(max_tokens=8, temperature=0.0), events[i].append)
            for i, p in enumerate(batch)]
    engine.step()
    assert engine.num_running == 3
    stolen = engine.allocator.allocate(engine.allocator.num_free)
    for _ in range(8):
        engine.step()
        if engine.num_preemptions:
            break
    assert engine.num_preemptions > 0 and engine.num_running < 3
    assert seqs[0] in engine.running and seqs[-1] in engine.waiting  # the newest went, the oldest kept going
    engine.allocator.free(stolen)
    while engine.has_work():
        engine.step()
    for prompt, seq in zip(batch, seqs, strict=True):
        assert len(seq.output_ids) == 8
        assert_greedy(model, prompt, seq.output_ids)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_requests_wait_for_blocks_and_max_num_seqs(tiny):
    _, tokenizer = tiny
    engine = make_engine(tiny, max_num_seqs=2)
    batch = prompts(tokenizer, 5)
    events = [[] for _ in batch]
    for i, p in enumerate(batch):
        engine.submit(p, SamplingParams(max_tokens=3, temperature=0.0), events[i].append)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 3
    while engine.has_work():
        engine.step()
    assert all(e[-1].finished for e in events)
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_abort_frees_blocks_within_one_step(tiny):
    _, tokenizer = tiny
    engine = make_engine(tiny)
    events = []
    seq = engine.submit(prompts(tokenizer, 1)[0], SamplingParams(max_tokens=100, temperature=0.0), events.append)
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_used > 0 and not seq.finished
    engine.abort(seq.request_id)
    engine.step()
    assert seq.finished and events[-1].finish_reason == "abort"
    assert engine.allocator.num_free == engine.allocator.num_blocks and not engine.running


def test_eos_stop_strings_and_seeded_sampling(tiny):
    model, tokenizer = tiny
    prompt = prompts(tokenizer, 1)[0]
    (greedy,), _ = run_all(make_engine(tiny), [(prompt, SamplingParams(max_tokens=6, temperature=0.0))])
    # the 3rd greedy token as an eos id: generation stops there, the eos token is not in the text
    (out,), (ev,) = run_all(make_engine(tiny, eos_token_ids=[greedy[2]]),
                            [(prompt, SamplingParams(max_tokens=6, temperature=0.0))])
    assert out == greedy[:out.index(greedy[2]) + 1] and ev[-1].finish_reason == "stop"
    text = "".join(e.text for e in ev)
    assert text == tokenizer.decode(out[:-1], skip_special_tokens=False)
    # a stop string cuts the text before it
    full = tokenizer.decode(greedy, skip_special_tokens=False)
    if len(full) > 3:
        stop = full[2:4]
        (_,), (ev,) = run_all(make_engine(tiny), [(prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                                          stop=[stop]))])
        assert "".join(e.text for e in ev) == full[:full.index(stop)] and ev[-1].finish_reason == "stop"
    # same seed, same tokens, also when batched with other requests; another seed differs
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    (a,), _ = run_all(make_engine(tiny), [(prompt, sampled)])
    (b, _), _ = run_all(make_engine(tiny), [(prompt, sampled), (prompts(tokenizer, 2)[1], sampled)])
    (c,), _ = run_all(make_engine(tiny), [(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=8))])
    assert a == b and a != c


def test_check_fits(tiny):
    engine = make_engine(tiny, num_blocks=8, block_size=4, max_model_len=256)
    assert engine.check_fits(10, 20) is None
    assert "maximum context length is 256" in engine.check_fits(200, 100)
    assert "KV blocks" in engine.check_fits(10, 30)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_prompt_logprobs_match_a_full_forward_across_chunks_and_the_prefix_cache(tiny, prefix_caching):
    """``prompt_logprobs=k``: each prompt token's logprob and the k best at its position (the first token
    None), on the first event, equal to log_softmax of an uncached full forward; the prompt arrives in
    chunks of 5 and, with prefix caching, its blocks are already cached by an earlier request."""
    model, tokenizer = tiny
    prompt = list(range(30, 53))
    engine = make_engine(tiny, max_num_batched_tokens=5, enable_prefix_caching=prefix_caching)
    run_all(engine, [(prompt, SamplingParams(max_tokens=2, temperature=0.0))])  # fills the prefix cache
    (out,), (ev,) = run_all(engine, [(prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2))])
    got = ev[0].prompt_logprobs
    assert got is not None and len(got) == len(prompt) and got[0] is None
    assert all(e.prompt_logprobs is None for e in ev[1:])
    want = score(model, torch.tensor([prompt]))[0].log_softmax(-1)
    for i in range(1, len(prompt)):
        lp = got[i]
        assert lp.token_id == prompt[i] and abs(lp.logprob - float(want[i - 1, prompt[i]])) < 1e-4
        top_vals, top_ids = want[i - 1].topk(2)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert all(abs(v - float(w)) < 1e-4 for (_, v), w in zip(lp.top, top_vals, strict=True))
    assert len(out) == 3 and engine.allocator.num_free == engine.allocator.num_blocks


def test_max_tokens_zero_finishes_after_the_prefill(tiny):
    model, tokenizer = tiny
    prompt = list(range(40, 50))
    engine = make_engine(tiny, max_num_batched_tokens=4)
    (out,), (ev,) = run_all(engine, [(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))])
    assert out == [] and len(ev) == 1 and ev[0].finished and ev[0].finish_reason == "length"
    assert ev[0].completion_tokens == 0 and ev[0].text == ""
    want = score(model, torch.tensor([prompt]))[0].log_softmax(-1)
    assert [round(lp.logprob, 4) for lp in ev[0].prompt_logprobs[1:]] == \
        [round(float(want[i - 1, prompt[i]]), 4) for i in range(1, len(prompt))]
    assert engine.allocator.num_free == engine.allocator.num_blocks and engine.num_computed_tokens == len(prompt)


def test_greedy_batch_skips_the_sort_of_plan_sample(tiny):
    """A batch the host knows is all greedy takes argmax; a sampled row in it goes through plan.sample."""
    model, tokenizer = tiny
    engine = make_engine(tiny)
    calls = []
    real = model.plan.sample

    class Spy:
        def __getattr__(self, name):
            return getattr(model.plan, name)

        def sample(self, *args, **kwargs):
            calls.append(args[0].shape[0])
            return real(*args, **kwargs)

    spy = Spy()
    engine.runner.model = type("M", (), {"plan": spy})()
    run_all(engine, [(prompts(tokenizer, 1)[0], SamplingParams(max_tokens=3, temperature=0.0))])
    assert calls == []
    run_all(engine, [(prompts(tokenizer, 1)[0], SamplingParams(max_tokens=3, temperature=0.0)),
                     (prompts(tokenizer, 2)[1], SamplingParams(max_tokens=3, temperature=0.8, seed=1))])
    assert calls and max(calls) == 2
