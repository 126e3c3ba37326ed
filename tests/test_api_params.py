"""Request parameters, checked twice: in the engine against an independent reference, and end to end.

Engine level (in process, the real tiny model): every generated token is checked against the uncached
full-context logits of ``model.generate.score`` with the parameter applied by a plain per-token Python
reference (penalties, logit_bias, min_p, min_tokens), and logprobs against ``log_softmax`` of them.

End to end (a real serve.py process, the official openai client): each parameter reaches the engine and
changes the output the way it must: n, logprobs / top_logprobs, logit_bias, the penalties, min_p,
min_tokens, skip_special_tokens, include_stop_str_in_output, echo, batched prompts, best_of,
parallel_tool_calls.
"""

import json
import math

import httpx
import openai
import pytest
import torch
from server_process import ServerProcess

from model.generate import score
from serving.engine import Engine, SamplingParams

pytestmark = pytest.mark.slow  # several seconds each: model steps in process, or a real server

# ---- engine level --------------------------------------------------------------------------------


def generate(tiny, prompt, params, eos=()):
    model, tokenizer = tiny
    engine = Engine(model, tokenizer, num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                    max_model_len=256, eos_token_ids=list(eos))
    events = []
    seq = engine.submit(prompt, params, events.append)
    while not (events and events[-1].finished):
        engine.step()
    return seq.output_ids, events


def reference_logits(model, prompt, output):
    """Row i: the logits that predicted output[i] (uncached, unbatched)."""
    return score(model, torch.tensor([prompt + output]))[0, len(prompt) - 1:-1].double()


def penalised(row, prompt, previous, presence=0.0, frequency=0.0, repetition=1.0, bias=None):
    """One step's logits under the OpenAI/vLLM penalty definitions, token by token."""
    row = row.clone()
    for token in set(prompt) | set(previous):
        if repetition != 1.0:
            row[token] = row[token] / repetition if row[token] > 0 else row[token] * repetition
    for token in set(previous):
        row[token] -= frequency * previous.count(token) + presence
    for token, value in (bias or {}).items():
        row[token] += value
    return row


PROMPT = [40, 41, 42, 43, 44, 45, 46, 47]


@pytest.mark.parametrize("kind", ["presence", "frequency", "repetition", "bias"])
def test_penalties_and_bias_match_a_per_token_reference(tiny, kind):
    model, _ = tiny
    options = {"presence": dict(presence_penalty=1.5), "frequency": dict(frequency_penalty=2.0),
               "repetition": dict(repetition_penalty=3.0), "bias": dict(logit_bias={100: 3.0, 200: -50.0})}[kind]
    out, _ = generate(tiny, PROMPT, SamplingParams(max_tokens=24, temperature=0.0, **options))
    plain, _ = generate(tiny, PROMPT, SamplingParams(max_tokens=24, temperature=0.0))
    assert out != plain  # the parameter changed the greedy path (else this test proves nothing)
    rows = reference_logits(model, PROMPT, out)
    ref_args = {"presence": dict(presence=1.5), "frequency": dict(frequency=2.0), "repetition": dict(repetition=3.0),
                "bias": dict(bias={100: 3.0, 200: -50.0})}[kind]
    for step, token in enumerate(out):
        row = penalised(rows[step], PROMPT, out[:step], **ref_args)
        assert row[token] >= row.max() - 1e-3, f"step {step}: {token} is not the penalised argmax"


def test_min_tokens_bans_stop_tokens_and_min_p_one_is_greedy(tiny):
    plain, _ = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=0.0))
    stop = plain[1]  # the second greedy token ends a plain run at once
    cut, events = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop]))
    assert len(cut) == 2 and events[-1].finish_reason == "stop"
    held, events = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop],
                                                         min_tokens=6))
    assert len(held) >= 6 and stop not in held[:5]
    # min_p = 1 keeps only the most likely token: sampling at temperature 1 becomes greedy decoding
    sampled, _ = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=3, min_p=1.0))
    assert sampled == plain
    free, _ = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=3))
    assert free != plain


def test_logprobs_are_the_models_log_softmax(tiny):
    model, _ = tiny
    out, events = generate(tiny, PROMPT, SamplingParams(max_tokens=10, temperature=1.0, seed=11, logprobs=4))
    entries = [e for ev in events for e in (ev.logprobs or [])]
    assert [e.token_id for e in entries] == out
    logp = reference_logits(model, PROMPT, out).log_softmax(-1)
    for step, entry in enumerate(entries):
        assert math.isclose(entry.logprob, float(logp[step, out[step]]), abs_tol=1e-3)
        top = logp[step].topk(4)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert all(math.isclose(v, float(r), abs_tol=1e-3) for (_, v), r in zip(entry.top, top.values, strict=True))


def test_skip_special_tokens_and_include_stop_str(tiny):
    _, tokenizer = tiny
    sop = tokenizer.token_to_id("<sop>")
    think = tokenizer.token_to_id("<think>")
    forced = SamplingParams(max_tokens=3, temperature=0.0, logit_bias={sop: 100.0})
    out, events = generate(tiny, PROMPT, forced)
    assert out == [sop] * 3 and "".join(e.text for e in events) == "<sop>" * 3  # engine default: raw text
    _, events = generate(tiny, PROMPT, SamplingParams(max_tokens=3, temperature=0.0, logit_bias={sop: 100.0},
                                                      skip_special_tokens=True))
    assert "".join(e.text for e in events) == ""
    _, events = generate(tiny, PROMPT, SamplingParams(max_tokens=2, temperature=0.0, logit_bias={think: 100.0},
                                                      skip_special_tokens=True))
    assert "".join(e.text for e in events) == "<think>" * 2  # GLM markup the parsers read stays
    plain, events = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=0.0))
    text = "".join(e.text for e in events)
    stop = text[3:5]
    _, events = generate(tiny, PROMPT, SamplingParams(max_tokens=12, temperature=0.0, stop=[stop],
                                                      include_stop_str_in_output=True))
    assert "".join(e.text for e in events) == text[:text.index(stop) + len(stop)]

# ---- end to end ----------------------------------------------------------------------------------


MODEL = "glm5-tiny-params"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hwlayer-cache")
    args = ["--max-model-len", "512", "--kv-block-size", "16", "--num-kv-blocks", "128", "--served-model-name", MODEL]
    with ServerProcess(args, env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CHAT = [{"role": "user", "content": "Count to ten."}]


def test_n_choices_usage_and_streaming(client):
    out = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert len({c.text for c in out.choices}) > 1  # seeds seed, seed+1, seed+2: different draws
    again = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    single = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=8, temperature=1.0, seed=5)
    assert out.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once
    assert 3 <= out.usage.completion_tokens <= 24  # summed over the choices
    texts, finishes = {}, {}
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, n=2,
                                                stream=True, extra_body=NO_THINK):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finishes[c.index] = c.finish_reason or finishes.get(c.index)
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, n=2,
                                           extra_body=NO_THINK)
    assert texts == {0: whole.choices[0].message.content or "", 1: whole.choices[1].message.content or ""}
    assert texts[0] == texts[1] and set(finishes) == {0, 1} and all(finishes.values())


def test_chat_logprobs_and_completion_logprobs(client):
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=3, extra_body=NO_THINK)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    for e in entries:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.token == e.top_logprobs[0].token and math.isclose(e.logprob, e.top_logprobs[0].logprob)  # greedy
        assert sum(math.exp(t.logprob) for t in e.top_logprobs) <= 1 + 1e-6
    none = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, extra_body=NO_THINK)
    assert none.choices[0].logprobs is None
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                    extra_body={"skip_special_tokens": False})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    # top_logprobs maps text to logprob: two tokens with the same text (partial UTF-8) collide
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2, stream=True,
        extra_body={"skip_special_tokens": False}) if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens


def test_logit_bias_penalties_min_p_min_tokens_reach_the_engine(client, server):
    kwargs = dict(model=MODEL, prompt="The", max_tokens=8, temperature=0)
    plain = client.completions.create(**kwargs)
    forced = client.completions.create(logit_bias={"300": 100}, **kwargs)
    token_300 = httpx.post(server.url + "/detokenize", json={"tokens": [300]}).json()["prompt"]
    assert forced.choices[0].text == token_300 * 8
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 5.0}}):
        assert client.completions.create(**kwargs, **extra).choices[0].text != plain.choices[0].text, extra
    sampled = client.completions.create(**{**kwargs, "temperature": 1.0}, seed=4, extra_body={"min_p": 1.0})
    assert sampled.choices[0].text == plain.choices[0].text
    # token 300 is pushed first; as a stop token it ends the request at once, unless min_tokens holds it back
    stopped = client.completions.create(**kwargs, logit_bias={"300": 100}, extra_body={"stop_token_ids": [300]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = client.completions.create(**kwargs, logit_bias={"300": 100},
                                     extra_body={"stop_token_ids": [300], "min_tokens": 4})
    assert held.usage.completion_tokens == 5 and held.choices[0].finish_reason == "stop"
    assert token_300 not in held.choices[0].text


def test_skip_special_tokens_default_and_include_stop_str(client, server):
    for name in ("<sop>", "</tool_response>"):
        token = httpx.post(server.url + "/tokenize", json={"prompt": name}).json()["tokens"]
        assert len(token) == 1
        bias = {str(token[0]): 100}
        default = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0, logit_bias=bias)
        assert default.choices[0].text == "" and default.usage.completion_tokens == 3
        raw = client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=0, logit_bias=bias,
                                        extra_body={"skip_special_tokens": False})
        assert raw.choices[0].text == name * 3
    text = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, temperature=0).choices[0].text
    stop = text[3:5]
    cut = client.completions.create(model=MODEL, prompt="Hi", max_tokens=12, temperature=0, stop=[stop],
                                    extra_body={"include_stop_str_in_output": True})
    assert cut.choices[0].text == text[:text.index(stop) + 2] and cut.choices[0].finish_reason == "stop"


def test_echo_batched_prompts_and_best_of(client, server):
    kwargs = dict(model=MODEL, max_tokens=5, temperature=0)
    a = client.completions.create(prompt="Alpha", **kwargs).choices[0].text
    b = client.completions.create(prompt="Beta", **kwargs).choices[0].text
    batch = client.completions.create(prompt=["Alpha", "Beta"], **kwargs)
    assert [c.text for c in batch.choices] == [a, b] and [c.index for c in batch.choices] == [0, 1]
    echoed = client.completions.create(prompt="Alpha", echo=True, **kwargs)
    assert echoed.choices[0].text == "Alpha" + a
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Beta"}).json()["tokens"]
    by_ids = client.completions.create(prompt=[ids, ids], **kwargs)
    assert [c.text for c in by_ids.choices] == [b, b]
    streamed = "".join(c.choices[0].text for c in client.completions.create(prompt="Alpha", echo=True, stream=True,
                                                                              **kwargs) if c.choices)
    assert streamed == "Alpha" + a
    assert client.completions.create(prompt="Alpha", n=2, best_of=2, **kwargs).choices[1].text == a
    for bad in (dict(best_of=3), dict(suffix="z")):
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(prompt="Alpha", **kwargs, **bad)
        assert err.value.body["param"] in bad


def test_parallel_tool_calls_false_stops_after_the_first_call(client, server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    end = httpx.post(server.url + "/tokenize", json={"prompt": "</tool_call>"}).json()["tokens"]
    kwargs = dict(model=MODEL, messages=CHAT, tools=tools, max_tokens=6, temperature=0, logit_bias={str(end[0]): 100})
    free = client.chat.completions.create(**kwargs, extra_body=NO_THINK)
    assert free.usage.completion_tokens == 6
    one = client.chat.completions.create(**kwargs, parallel_tool_calls=False, extra_body=NO_THINK)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "stop"


def test_unknown_parameter_is_logged_not_refused(server):
    # vLLM's choice: a field no API knows is logged (once per name) and ignored; --strict-request-fields makes
    # it a 400 (tests/test_api_compat.py)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "top_a": 0.1,
                                                              "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    assert "top_a" in server.output()
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "user": "u1", "metadata": {"k": "v"}}
    assert httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert json.loads(httpx.get(server.url + "/version").text)["version"]
