"""Structured output: response_format json_object / json_schema and tool_choice "required" / named.

The default model generates noise, which is the point: whatever it would say, the grammar mask
(llguidance, applied to the logits before sampling) must make the output parse as JSON and validate
against the schema. Checked greedy, sampled with several seeds, streamed, with n > 1, and with thinking
on (the grammar starts after ``</think>``).
"""

import json
import sys

import httpx
import openai
import pytest
from server_process import ServerProcess

pytest.importorskip("llguidance")

MODEL = "glm5-tiny-structured"
NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "days": {"type": "integer"}},
    "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def check_person(value):
    """PERSON's constraints, checked by hand (no jsonschema dependency)."""
    assert isinstance(value, dict) and set(value) <= set(PERSON["properties"]) and {"name", "age", "role"} <= set(value)
    assert isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150
    assert value["role"] in ("admin", "user", "guest")
    tags = value.get("tags", [])
    assert isinstance(tags, list) and len(tags) <= 3 and all(isinstance(t, str) and len(t) <= 6 for t in tags)


def person_format():
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hwlayer-cache")
    args = ["--max-model-len", "1024", "--kv-block-size", "16", "--num-kv-blocks", "256", "--served-model-name", MODEL]
    with ServerProcess(args, env={"HWLAYER_CACHE": str(cache), "GLM_BACKEND": "cpu"}) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


# ---- in process ----------------------------------------------------------------------------------

def test_grammar_compiler_rejects_bad_schemas_and_reports_a_missing_engine(monkeypatch):
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer
    from serving.structured import GrammarCompiler, StructuredOutputError

    tokenizer = load_tokenizer(ensure_default_model())
    compiler = GrammarCompiler(tokenizer, tokenizer.get_vocab_size(), [0])
    assert compiler.json_schema(PERSON).grammar
    with pytest.raises(StructuredOutputError, match="not a usable JSON schema"):
        compiler.json_schema({"type": "no-such-type"})
    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if the optional package were not installed
    with pytest.raises(StructuredOutputError, match="needs the optional 'llguidance' package"):
        GrammarCompiler(tokenizer, tokenizer.get_vocab_size(), [0]).json_schema(None)


def test_a_token_outside_the_grammar_ends_the_request_with_an_error():
    import time

    from model import load_model
    from model.tiny import ensure_default_model
    from model.tokenizer import load_tokenizer
    from serving.engine import Engine, SamplingParams
    from serving.structured import GrammarCompiler

    path = ensure_default_model()
    tokenizer = load_tokenizer(path)
    engine = Engine(load_model(path, backend="cpu"), tokenizer, num_blocks=8, block_size=16, max_num_seqs=2,
                    max_num_batched_tokens=32, max_model_len=128, eos_token_ids=[0])
    spec = GrammarCompiler(tokenizer, 512, [0]).json_schema(None)
    events = []
    seq = engine.submit([5, 6, 7], SamplingParams(max_tokens=8, structured=spec), events.append)
    engine._take_inbox()
    engine._append_token(seq, tokenizer.token_to_id("a"), time.monotonic())  # JSON must open with "{"
    assert events[-1].finished and events[-1].finish_reason == "error"
    assert events[-1].error.startswith("structured output:")


# ---- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_json_object_parses_greedy_and_sampled(client):
    # Plain greedy decoding of this noise model loops inside a JSON string (valid, but cut by max_tokens with
    # finish_reason "length"); a frequency penalty or sampling gets it out, and then the object must close.
    # Whether one sampled walk closes its object within max_tokens is luck (it moved when decode steps moved
    # to graphs, which may break the indexer's score ties differently): of six seeds most must, and every
    # output that stopped must parse as an object.
    stopped = 0
    for kwargs in [dict(temperature=0, frequency_penalty=1.0)] + [dict(temperature=1.0, seed=s) for s in range(1, 7)]:
        out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400,
                                             response_format={"type": "json_object"}, extra_body=NO_THINK, **kwargs)
        choice = out.choices[0]
        assert choice.finish_reason in ("stop", "length"), (kwargs, choice.finish_reason)
        if kwargs["temperature"] == 0:
            assert choice.finish_reason == "stop", (kwargs, choice.message.content)
        if choice.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(choice.message.content), dict), (kwargs, choice.message.content)
    assert stopped >= 4, f"only {stopped} of 7 JSON objects closed within max_tokens"
    # the same request unconstrained is not JSON: the mask is what made it parse
    free = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0, extra_body=NO_THINK)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content or "")


@pytest.mark.slow
def test_json_schema_validates_with_n_streaming_and_completions(client):
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=300, temperature=1.0, seed=7, n=3,
                                         response_format=person_format(), extra_body=NO_THINK)
    for choice in out.choices:
        assert choice.finish_reason == "stop"
        check_person(json.loads(choice.message.content))
    content = ""
    for chunk in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=300, temperature=0,
                                                response_format=person_format(), stream=True, extra_body=NO_THINK):
        for c in chunk.choices:
            content += c.delta.content or ""
    check_person(json.loads(content))
    text = client.completions.create(model=MODEL, prompt="Person:", max_tokens=300, temperature=0,
                                     extra_body={"response_format": person_format()}).choices[0].text
    check_person(json.loads(text))


@pytest.mark.slow
def test_grammar_starts_after_reasoning_when_thinking_is_on(client, server):
    end_think = httpx.post(server.url + "/tokenize", json={"prompt": "</think>"}).json()["tokens"]
    assert len(end_think) == 1
    # the bias makes the model close its reasoning at once; inside the grammar </think> is masked out
    out = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=300, temperature=0,
                                         response_format=person_format(), logit_bias={str(end_think[0]): 100})
    message = out.choices[0].message
    assert (getattr(message, "reasoning_content", None) or "") == ""
    check_person(json.loads(message.content))


@pytest.mark.slow
def test_tool_choice_named_and_required(client):
    named = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER, TIME], max_tokens=200,
        temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}}, extra_body=NO_THINK)
    choice = named.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None  # named: "stop" (OpenAI, vLLM)
    (call,) = choice.message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and set(args) == {"city", "days"} and isinstance(args["days"], int)
    for seed in (1, 2, 3):
        required = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Anything"}], tools=[WEATHER, TIME], max_tokens=300,
            temperature=1.0, seed=seed, tool_choice="required", parallel_tool_calls=False, extra_body=NO_THINK)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls  # parallel_tool_calls false: exactly one
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    calls = []
    for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Time?"}], tools=[WEATHER, TIME], max_tokens=100,
            temperature=0, tool_choice={"type": "function", "function": {"name": "get_time"}}, stream=True,
            extra_body=NO_THINK):
        for c in chunk.choices:
            calls += c.delta.tool_calls or []
    assert [c.function.name for c in calls] == ["get_time"]
    assert json.loads(calls[0].function.arguments)["zone"] in ("UTC", "CET")


@pytest.mark.slow
def test_bad_structured_requests_are_400(server):
    bad = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
         "response_format"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER], "tool_choice": "required"},
         "response_format"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "bogus"}, "tool_choice"),
    ]
    for patch, param in bad:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **patch})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (patch, r.text)


def test_json_schema_objects_without_additional_properties_are_closed(tiny):
    """vLLM's default grammar backend forbids keys a schema does not list unless it says
    ``additionalProperties``; the grammar compiled here must refuse an extra key, and allow it when the
    schema allows it."""
    from serving.structured import GrammarCompiler, closed_objects

    model, tokenizer = tiny
    compiler = GrammarCompiler(tokenizer, model.config.vocab_size, [])
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "pet": {"type": "object", "properties": {"kind": {"type": "string"}}}},
              "required": ["name"]}
    assert closed_objects(schema)["additionalProperties"] is False
    assert closed_objects(schema)["properties"]["pet"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the request's schema is not modified

    def accepts(schema, text):
        matcher = compiler.json_schema(schema).new_matcher()
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        return matcher.validate_tokens(ids) == len(ids)

    assert accepts(schema, '{"name":"a","pet":{"kind":"cat"}}')
    assert not accepts(schema, '{"name":"a","extra":1}')
    assert not accepts(schema, '{"name":"a","pet":{"kind":"cat","age":3}}')
    assert accepts({**schema, "additionalProperties": True}, '{"name":"a","extra":1}')
