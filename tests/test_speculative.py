"""MTP speculative decoding in the engine (serving/speculative.py, serving/runner.py).

The acceptance rule is checked statistically on a 4-token vocabulary (the emitted token must follow
the target distribution whatever the draft); the engine is checked token for token against decoding
without speculation, on the random tiny checkpoint (drafts almost always rejected) and on
``make_bigram_checkpoint`` (attention and MLP outputs zeroed: the MTP layer computes the model's own
bigram chain, so drafts are accepted).
"""

import pytest
import torch

pytest.importorskip("model")

from model.generate import score
from serving.engine import Engine, SamplingParams
from serving.metrics import ServingMetrics
from serving.speculative import parse_speculative_config, target_probs, verify_greedy, verify_sampled


@pytest.mark.parametrize("text, words", [
    ("{mtp", "not JSON"), ("[1]", "JSON object"), ('{"method": "eagle3", "num_speculative_tokens": 1}', "'eagle3'"),
    ('{"method": "mtp"}', "num_speculative_tokens None"), ('{"method": "mtp", "num_speculative_tokens": 0}', "[1, 8]"),
    ('{"method": "mtp", "num_speculative_tokens": 1, "model": "x"}', "unknown key(s) model"),
])
def test_bad_speculative_config_is_one_line(text, words):
    with pytest.raises(ValueError) as exc:
        parse_speculative_config(text)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_speculative_config():
    assert parse_speculative_config('{"method": "mtp", "num_speculative_tokens": 3}').num_speculative_tokens == 3


@pytest.mark.parametrize("draft", [0, 3])
def test_rejection_rule_keeps_the_target_distribution(draft):
    """The first emitted token of a verify step (an accepted draft or the resample at its rejection)
    is distributed as the target's p, whether the draft is likely (3) or not (0); the bonus token
    after an accepted draft follows the second row's distribution."""
    p = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    gen = torch.Generator().manual_seed(0)
    n = 6000
    first, bonus = torch.zeros(4), torch.zeros(4)
    for _ in range(n):
        accepted, token = verify_sampled(p, [draft], gen)
        first[draft if accepted else token] += 1
        if accepted:
            bonus[token] += 1
    assert torch.allclose(first / n, p[0], atol=0.02), first / n
    assert torch.allclose(bonus / bonus.sum(), p[1], atol=0.04), bonus / bonus.sum()


def test_greedy_verification_and_target_probs():
    assert verify_greedy([5, 6, 7], [5, 6]) == (2, 7)
    assert verify_greedy([5, 6, 7], [5, 9]) == (1, 6)
    assert verify_greedy([5, 6, 7], [4, 6]) == (0, 5)
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    probs = target_probs(logits, torch.tensor([1.0]), torch.tensor([2]), torch.tensor([1.0]))
    want = torch.tensor([0.0, 0.0, 2.0, 3.0]).exp() * torch.tensor([0, 0, 1, 1])  # top-2 kept
    assert torch.allclose(probs[0], want / want.sum())


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    from model import load_model
    from model.tiny import make_bigram_checkpoint
    from model.tokenizer import load_tokenizer

    path = make_bigram_checkpoint(tmp_path_factory.mktemp("bigram"))
    return load_model(path, backend="cpu"), load_tokenizer(path)


REQUESTS = [(list(range(3 + 5 * i, 9 + 7 * i)), 14 + 3 * i) for i in range(4)]


def run(pair, N, requests=REQUESTS, temperature=0.0, **overrides):
    model, tokenizer = pair
    kwargs = dict(num_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=16, max_model_len=128,
                  eos_token_ids=[], num_speculative_tokens=N, metrics=ServingMetrics())
    kwargs.update(overrides)
    engine = Engine(model, tokenizer, **kwargs)
    events = [[] for _ in requests]
    seqs = [engine.submit(p, SamplingParams(max_tokens=m, temperature=temperature, seed=1), events[i].append)
            for i, (p, m) in enumerate(requests)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert all(ev[-1].finish_reason == "length" for ev in events)
    return [s.output_ids for s in seqs], steps, engine


@pytest.mark.parametrize("N", [1, 3])
def test_greedy_output_identical_and_drafts_accepted_on_the_bigram_checkpoint(bigram, N):
    want, plain_steps, _ = run(bigram, 0)
    got, steps, engine = run(bigram, N)
    assert got == want
    assert engine.num_draft_tokens > 0 and engine.num_accepted_tokens >= 0.8 * engine.num_draft_tokens
    assert steps < plain_steps  # more than one token per step
    text = engine.metrics.render()[0].decode()
    assert f"hwlayer_spec_decode_num_draft_tokens_total {float(engine.num_draft_tokens)}" in text
    assert f"hwlayer_spec_decode_num_accepted_tokens_total {float(engine.num_accepted_tokens)}" in text
    assert 'hwlayer_spec_decode_num_accepted_tokens_per_pos_total{position="0"}' in text


def test_greedy_output_identical_when_drafts_are_rejected(tiny):
    """The random tiny checkpoint's MTP layer disagrees with the model: rejections every step, same tokens."""
    want, _, _ = run(tiny, 0)
    got, _, engine = run(tiny, 2)
    assert got == want and engine.num_draft_tokens > 0 and engine.num_accepted_tokens < engine.num_draft_tokens


def test_speculation_under_preemption_and_with_prompt_logprobs(bigram):
    """A cache too small for all four: preemption recomputes (drafts dropped and re-proposed), same tokens;
    prompt logprobs in a speculative engine equal a full forward's."""
    want, _, _ = run(bigram, 0)
    got, _, engine = run(bigram, 2, num_blocks=20)
    assert got == want and engine.num_preemptions > 0
    model, _ = bigram
    prompt = list(range(30, 45))
    e = Engine(*bigram, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=6, max_model_len=64,
               eos_token_ids=[], num_speculative_tokens=1)
    events = []
    e.submit(prompt, SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1), events.append)
    while e.has_work():
        e.step()
    ref = score(model, torch.tensor([prompt]))[0].log_softmax(-1)
    got_lp = events[0].prompt_logprobs
    assert got_lp[0] is None and len(got_lp) == len(prompt)
    assert all(abs(got_lp[i].logprob - float(ref[i - 1, prompt[i]])) < 1e-4 for i in range(1, len(prompt)))


def test_sampled_speculation_runs_and_is_reproducible_with_a_seed(bigram):
    a, _, ea = run(bigram, 2, temperature=0.3)
    b, _, _ = run(bigram, 2, temperature=0.3)
    assert a == b and ea.num_accepted_tokens > 0


def test_engine_without_mtp_layer_refuses_speculation(tiny, tmp_path):
    from model import load_model
    from model.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "nomtp", config_overrides={"num_nextn_predict_layers": 0})
    model = load_model(path, backend="cpu")
    with pytest.raises(ValueError, match="MTP layer"):
        Engine(model, tiny[1], num_blocks=8, block_size=4, max_num_seqs=2, max_num_batched_tokens=8,
               max_model_len=32, eos_token_ids=[], num_speculative_tokens=1)
