"""Prompt logprobs in the engine (``SamplingParams.prompt_logprobs``) and ``max_tokens == 0``, on the real tiny
model: every prompt token's logprob must equal the uncached full-context ``score`` of the prompt, whether the
prefill ran in one step or in chunks, and whether or not an identical prompt sits in the prefix cache."""

import pytest
import torch

pytest.importorskip("model")

from model.generate import score
from serving.engine import Engine, SamplingParams


def make_engine(tiny, **overrides):
    model, tokenizer = tiny
    kwargs = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256,
                  eos_token_ids=[])
    kwargs.update(overrides)
    return Engine(model, tokenizer, **kwargs)


def run(engine, prompt, params):
    events = []
    seq = engine.submit(prompt, params, events.append)
    for _ in range(1000):
        if events and events[-1].finished:
            break
        engine.step()
    return seq, events


def reference(model, prompt, k):
    logp = score(model, torch.tensor([prompt]))[0].log_softmax(-1)
    out = [None]
    for p in range(len(prompt) - 1):
        top = logp[p].topk(k) if k else None
        out.append((prompt[p + 1], logp[p, prompt[p + 1]].item(),
                    [] if top is None else [int(i) for i in top.indices]))
    return out


def check(entries, expected):
    assert len(entries) == len(expected) and entries[0] is None
    for got, (token, lp, top_ids) in zip(entries[1:], expected[1:], strict=True):
        assert got.token_id == token
        assert got.logprob == pytest.approx(lp, abs=2e-3)
        assert [t for t, _ in got.top] == top_ids


@pytest.mark.parametrize("budget", [64, 5])  # one prefill step, or chunks of 5 tokens
def test_prompt_logprobs_match_the_full_context_score(tiny, budget):
    model, tokenizer = tiny
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog", add_special_tokens=False).ids
    engine = make_engine(tiny, max_num_batched_tokens=budget)
    seq, events = run(engine, prompt, SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3))
    check(events[0].prompt_logprobs, reference(model, prompt, 3))
    assert all(e.prompt_logprobs is None for e in events[1:])  # handed out once, on the first event
    assert events[-1].completion_tokens == 2


def test_prefix_cache_hit_does_not_lose_prompt_rows(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("1 2 3 4 5 6 7 8 9 10 11 12 13 14", add_special_tokens=False).ids
    engine = make_engine(tiny)
    run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0))  # fills the prefix cache
    before = engine.num_computed_tokens
    _, events = run(engine, prompt, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    assert engine.num_computed_tokens - before == len(prompt)  # every prompt row recomputed
    check(events[0].prompt_logprobs, reference(model, prompt, 0))


def test_max_tokens_zero_finishes_after_the_prefill(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("Hello, world", add_special_tokens=False).ids
    engine = make_engine(tiny)
    seq, events = run(engine, prompt, SamplingParams(max_tokens=0, prompt_logprobs=1))
    assert len(events) == 1 and events[0].finished and events[0].finish_reason == "length"
    assert events[0].completion_tokens == 0 and seq.output_ids == [] and events[0].text == ""
    check(events[0].prompt_logprobs, reference(model, prompt, 1))
    assert engine.allocator.num_used == 0 and not engine.running  # the blocks came back
