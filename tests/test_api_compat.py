"""What the SDKs send, in process (FastAPI's TestClient on the real tiny model and a real engine thread):
nullable fields, fields that are accepted and ignored, unknown fields (logged, or a 400 with
``--strict-request-fields``), ``reasoning_effort`` and the thinking switch, the ``developer`` role, reasoning
sent back as ``reasoning`` or ``reasoning_content``, ``GET /v1/models/{id}``, ``/tokenizer_info``, echo +
logprobs / ``prompt_logprobs`` / ``max_tokens: 0`` and ``continuous_usage_stats``."""

import json
import logging

import pytest

pytest.importorskip("model")

from fastapi.testclient import TestClient

MODEL = "glm5-compat"


def make_app(tiny, **config):
    from serving.api import ServerConfig, create_app
    from serving.engine import Engine
    from serving.metrics import ServingMetrics

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                    max_model_len=256, eos_token_ids=[])
    return create_app(engine, tokenizer, ServerConfig(MODEL, 256, "cpu", "cpu", **config), ServingMetrics())


@pytest.fixture(scope="module")
def http(tiny):
    with TestClient(make_app(tiny, enable_tokenizer_info_endpoint=True,
                             tokenizer_config={"eos_token": "<|endoftext|>", "vocab_file": "/secret/path"})) as c:
        yield c


CHAT = [{"role": "user", "content": "hi"}]


def chat(http, **body):
    return http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2, **body})


def tokenize_text(http, messages, **body):
    r = http.post("/tokenize", json={"messages": messages, **body})
    assert r.status_code == 200, r.text
    return http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]


def test_nulls_mean_the_default(http):
    nulls = {name: None for name in ("n", "stream", "temperature", "top_p", "stop", "seed", "logprobs", "user",
                                     "prediction", "audio", "modalities", "stream_options", "tools", "tool_choice",
                                     "reasoning_effort", "service_tier", "store", "metadata", "response_format")}
    r = chat(http, **nulls)
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 1 and r.json()["object"] == "chat.completion"  # not a stream
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "echo": None,
                                           "n": None, "stream": None, "logprobs": None, "best_of": None})
    assert r.status_code == 200 and not r.json()["choices"][0]["text"].startswith("hi"), r.text


def test_fields_that_change_nothing_are_accepted(http, caplog):
    ignored = {"store": False, "service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "u",
               "verbosity": "low", "prediction": {"type": "content", "content": "x"}, "modalities": ["text"],
               "metadata": {"a": "b"}, "user": "u", "prompt_cache_retention": "24h"}
    with caplog.at_level(logging.DEBUG, logger="serving.api"):
        r = chat(http, **ignored)
    assert r.status_code == 200, r.text
    assert "ignored request fields" in caplog.text and "service_tier" in caplog.text


def test_unknown_fields_are_logged_once_or_refused_when_strict(tiny, http, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.api"):
        assert chat(http, top_a=0.5).status_code == 200
        assert chat(http, top_a=0.5).status_code == 200
    assert caplog.text.count("top_a") == 1  # once per name
    with TestClient(make_app(tiny, strict_request_fields=True)) as strict:
        r = strict.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "top_a": 0.5})
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_a"
        assert "unknown parameter" in r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
        assert strict.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                         "store": False}).status_code == 200  # known: fine


def test_reasoning_effort_switches_thinking(http):
    def prompt(**body):
        return tokenize_text(http, CHAT, **body)

    assert prompt().endswith("<|assistant|><think>")
    assert prompt(reasoning_effort="none").endswith("<|assistant|></think>")
    assert prompt(reasoning_effort="low").endswith("<|assistant|><think>")
    # the explicit switches win over the effort
    assert prompt(reasoning_effort="high", enable_thinking=False).endswith("</think>")
    assert prompt(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}).endswith("<think>")


def test_developer_role_renders_as_system_and_reasoning_comes_back_under_either_name(http):
    as_system = tokenize_text(http, [{"role": "system", "content": "Be brief."}, *CHAT])
    assert tokenize_text(http, [{"role": "developer", "content": "Be brief."}, *CHAT]) == as_system
    for name in ("reasoning", "reasoning_content"):
        messages = [*CHAT, {"role": "assistant", name: "PRIOR", "content": None,
                            "tool_calls": [{"id": "c", "type": "function",
                                            "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "ok"}]
        assert "<think>PRIOR</think>" in tokenize_text(http, messages), name


def test_models_by_id_and_tokenizer_info(tiny, http):
    r = http.get(f"/v1/models/{MODEL}")
    assert r.status_code == 200 and r.json()["id"] == MODEL and r.json()["object"] == "model"
    r = http.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and "vocab_file" not in info and info["chat_template"]
    assert info["tokenizer_class"]
    with TestClient(make_app(tiny)) as default:  # off by default, as in vLLM
        assert default.get("/tokenizer_info").status_code == 404


def test_echo_logprobs_max_tokens_zero_and_prompt_logprobs(tiny, http):
    model, tokenizer = tiny
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False).ids
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [ids], "echo": True, "logprobs": 2,
                                           "max_tokens": 0, "temperature": 0, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 0
    assert choice["text"] == tokenizer.decode(ids, skip_special_tokens=False)
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and "".join(lp["tokens"]) == choice["text"]
    for token, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert top[token] == value and 2 <= len(top) <= 3 and value <= 0  # the token itself and 2 alternatives
    prompt = choice["prompt_logprobs"]  # vLLM's field: keyed by token id
    assert prompt[0] is None and len(prompt) == len(ids)
    for token_id, value, row in zip(ids[1:], lp["token_logprobs"][1:], prompt[1:], strict=True):
        assert row[str(token_id)]["logprob"] == pytest.approx(value)
        assert any(e["rank"] == 1 for e in row.values())
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # nothing to return
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 1,
                                                "prompt_logprobs": 0})
    assert r.status_code == 200 and len(r.json()["prompt_logprobs"]) == r.json()["usage"]["prompt_tokens"]


def test_continuous_usage_stats(http):
    with http.stream("POST", "/v1/completions", json={
            "model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices and all("usage" in c for c in with_choices)
    assert with_choices[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["usage"]["completion_tokens"] == 3


def test_streamed_echo_logprobs_match_the_whole_body(http):
    body = {"model": MODEL, "prompt": "Once upon a time", "echo": True, "logprobs": 1, "max_tokens": 3,
            "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_obfuscation": False}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == whole["text"]
    for key in ("tokens", "token_logprobs", "text_offset"):
        assert [v for c in choices if c["logprobs"] for v in c["logprobs"][key]] == whole["logprobs"][key]


def test_chat_stream_carries_prompt_logprobs_once(http):
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2,
                                                           "stream": True, "prompt_logprobs": 1}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    carrying = [c for c in chunks if "prompt_logprobs" in c]
    assert len(carrying) == 1 and carrying[0]["prompt_logprobs"][0] is None
    whole = chat(http, prompt_logprobs=1).json()
    assert carrying[0]["prompt_logprobs"] == whole["prompt_logprobs"]


def test_prompt_logprobs_refused_where_the_forward_runs_on_other_ranks(tiny):
    """Data / expert parallelism hand the engine a forward that returns only the last rows: a clear 400."""
    from serving.api import ServerConfig, create_app
    from serving.engine import Engine
    from serving.metrics import ServingMetrics

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=64,
                    max_model_len=256, eos_token_ids=[], forward=lambda batch, cache: model.forward_batch(batch, cache))
    assert not engine.supports_prompt_logprobs
    with TestClient(create_app(engine, tokenizer, ServerConfig(MODEL, 256, "cpu", "cpu"), ServingMetrics())) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "echo": True, "logprobs": 1, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
        assert c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
