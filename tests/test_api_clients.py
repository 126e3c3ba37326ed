"""The clients people use, against a real serve.py process: the official openai SDK (chat with the
request fields it sends today, completions echo + logprobs, responses.create / responses.stream,
models.retrieve) and lm-eval's loglikelihood requests, replicated byte for byte from lm-eval's source
(``lm_eval/models/openai_completions.py`` at EleutherAI/lm-evaluation-harness@4e7e0d47: ``LocalCompletionsAPI.
_create_payload`` / ``parse_logprobs``; the older ``OpenaiCompletionsLM._loglikelihood_tokens``: echo,
max_tokens 0, logprobs 10), checked against the uncached full-context score of the same checkpoint
loaded in this process. lm-eval itself is not installed (``make test-clients`` would run real ones)."""

import json
from operator import itemgetter

import httpx
import openai
import pytest
import torch
from server_process import ServerProcess

pytestmark = pytest.mark.slow  # a real server process

MODEL = "glm5-tiny-clients"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("hwlayer-cache")


@pytest.fixture(scope="module")
def server(cache):
    args = ["--max-model-len", "512", "--kv-block-size", "16", "--num-kv-blocks", "128", "--served-model-name", MODEL,
            "--enable-tokenizer-info-endpoint"]
    with ServerProcess(args, env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(cache, server):
    """The served checkpoint, loaded here: ``(model, tokenizer)`` (server started first: it writes it)."""
    from model import load_model
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer

    path = ensure_default_model(cache_dir=cache)
    return load_model(path, backend="cpu"), load_tokenizer(path)


def continuation_logprob(model, context, continuation):
    from model.generate import score

    logp = score(model, torch.tensor([context + continuation]))[0].log_softmax(-1)
    rows = range(len(context) - 1, len(context) + len(continuation) - 1)
    picked = [logp[r, t].item() for r, t in zip(rows, continuation, strict=True)]
    greedy = all(logp[r].argmax().item() == t for r, t in zip(rows, continuation, strict=True))
    return sum(picked), greedy


def lm_eval_parse_logprobs(outputs, ctxlens):
    """lm-eval's ``LocalCompletionsAPI.parse_logprobs`` (0.4.x), restated."""
    res = []
    for out in outputs if isinstance(outputs, list) else [outputs]:
        for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=False):
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = all(tok == max(top.values()) for tok, top in zip(tokens_logprobs, top_logprobs, strict=False))
            res.append((logprobs, is_greedy))
    return res


def test_lm_eval_loglikelihood_requests(server, reference):
    model, tokenizer = reference
    base = server.url  # lm-eval strips /v1/completions to find /tokenizer_info and /tokenize
    info = httpx.get(base + "/tokenizer_info").json()  # check_remote_tokenizer_support: a dict with eos_token
    assert isinstance(info, dict) and info["eos_token"] == "<|endoftext|>"
    probe = httpx.post(base + "/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert isinstance(probe["tokens"], list)

    def encode(text):
        return httpx.post(base + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]

    pairs = [("The capital of France is", " Paris"), ("1 2 3 4", " 5 6"), ("Hello", ", world")]
    contexts = [encode(c) for c, _ in pairs]
    continuations = [encode(c) for _, c in pairs]
    inputs = [c + k for c, k in zip(contexts, continuations, strict=True)]
    ctxlens = [len(c) for c in contexts]
    expected = [continuation_logprob(model, c, k) for c, k in zip(contexts, continuations, strict=True)]
    # lm-eval 0.4.x LocalCompletionsAPI._create_payload(generate=False), sent as JSON to base_url
    payload = {"model": MODEL, "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    r = httpx.post(base + "/v1/completions", content=json.dumps(payload),
                   headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    got = lm_eval_parse_logprobs(r.json(), ctxlens)
    for (value, greedy), (want, want_greedy) in zip(got, expected, strict=True):
        assert value == pytest.approx(want, abs=2e-3) and greedy == want_greedy
    # the older OpenaiCompletionsLM: echo, max_tokens 0, logprobs 10; get_result sums token_logprobs[ctxlen:]
    r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": inputs, "echo": True, "max_tokens": 0,
                                                   "temperature": 0.0, "logprobs": 10, "seed": 1234}, timeout=120)
    assert r.status_code == 200, r.text
    for choice, ctxlen, (want, _) in zip(r.json()["choices"], ctxlens, expected, strict=True):
        assert sum(choice["logprobs"]["token_logprobs"][ctxlen:]) == pytest.approx(want, abs=2e-3)
        assert choice["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 0


def test_openai_sdk_completions_echo_logprobs(client, reference):
    _, tokenizer = reference
    out = client.completions.create(model=MODEL, prompt="Once upon a time", echo=True, logprobs=2, max_tokens=3,
                                    temperature=0)
    choice = out.choices[0]
    prompt_len = out.usage.prompt_tokens
    assert choice.text.startswith("Once upon a time")
    assert len(choice.logprobs.tokens) == prompt_len + out.usage.completion_tokens
    assert choice.logprobs.token_logprobs[0] is None and all(v <= 0 for v in choice.logprobs.token_logprobs[1:])
    for token, value, top in zip(choice.logprobs.tokens[1:], choice.logprobs.token_logprobs[1:],
                                 choice.logprobs.top_logprobs[1:], strict=True):
        assert top[token] == value  # the token itself is always among top_logprobs


def test_openai_sdk_chat_with_the_fields_it_sends(client):
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=6, temperature=0, reasoning_effort="low", store=False, service_tier="auto",
        verbosity="low", prompt_cache_key="k", safety_identifier="u", n=None, stream=None, audio=None,
        prediction=None, modalities=["text"], metadata={"a": "b"})
    message = out.choices[0].message
    extra = message.model_extra
    assert extra["reasoning"] and extra["reasoning"] == extra["reasoning_content"]  # thinking on: 6 tokens of it
    reasoning, legacy = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning") or ""
            legacy += (c.delta.model_extra or {}).get("reasoning_content") or ""
    assert reasoning and reasoning == legacy
    assert client.models.retrieve(MODEL).id == MODEL


def test_openai_sdk_responses_create_and_stream(client):
    out = client.responses.create(model=MODEL, input="Say hi", max_output_tokens=6, temperature=0,
                                  reasoning={"effort": "none"}, store=False)
    assert out.status == "incomplete" and out.output_text and out.usage.output_tokens == 6
    with client.responses.stream(model=MODEL, input="Say hi", max_output_tokens=6, temperature=0,
                                 reasoning={"effort": "none"}) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == out.output_text
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="x", previous_response_id="resp_1")
    assert err.value.body["param"] == "previous_response_id"
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
