"""``POST /v1/responses`` in process (TestClient, the real tiny model on a real engine thread), every body and
stream event validated against the openai package's own types; the request mapping (input items -> chat
messages, the reasoning item sent back) checked through the rendered prompt; what needs stored state or
hosted features is a 400 naming the field. End to end with the openai SDK: tests/test_api_clients.py."""

import json

import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

pytest.importorskip("model")

MODEL = "glm5-responses"
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def http(tiny):
    from serving.api import ServerConfig, create_app
    from serving.engine import Engine
    from serving.metrics import ServingMetrics

    model, tokenizer = tiny
    engine = Engine(model, tokenizer, num_blocks=64, block_size=16, max_num_seqs=4, max_num_batched_tokens=256,
                    max_model_len=1024, eos_token_ids=[])
    with TestClient(create_app(engine, tokenizer, ServerConfig(MODEL, 1024, "cpu", "cpu"), ServingMetrics())) as c:
        c.engine = engine
        yield c


def create(http, **body):
    return http.post("/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 6, **body})


def stream(http, **body):
    with http.stream("POST", "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 6,
                                                    "stream": True, **body}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    kinds = [line[7:] for line in lines if line.startswith("event: ")]
    assert kinds == [e["type"] for e in events]
    return [EVENTS.validate_python(e) for e in events]


def test_create_is_an_openai_response(http):
    r = create(http, reasoning={"effort": "high"}, store=True, metadata={"k": "v"})
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.store is False and response.usage.output_tokens == 6 and response.usage.input_tokens > 0
    assert [item.type for item in response.output] == ["reasoning"]  # thinking on: 6 tokens of reasoning
    assert response.output[0].content[0].text and response.usage.output_tokens_details.reasoning_tokens > 0
    off = Response.model_validate(create(http, reasoning={"effort": "none"}).json())
    assert [item.type for item in off.output] == ["message"] and off.output_text == off.output[0].content[0].text


def test_stream_events_build_the_same_response(http):
    events = stream(http, reasoning={"effort": "none"}, temperature=0)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert events[-1].response.status == "incomplete"  # max_output_tokens; the event is still .completed (vLLM)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[2:5] == ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert done.text == text == final.output[0].content[0].text
    whole = Response.model_validate(create(http, reasoning={"effort": "none"}, temperature=0).json())
    assert whole.output_text == text


def test_input_items_render_as_the_chat_conversation(http, tiny):
    from serving.chat import render_chat

    _, tokenizer = tiny
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "PRIOR"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
    ]
    tool = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}}}
    expected = render_chat([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "PRIOR", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "content": "sunny"}], [{"type": "function", "function": {
            "name": "get_weather", "parameters": tool["parameters"]}}])
    assert "<think>PRIOR</think>" in expected
    r = create(http, input=items, tools=[tool], max_output_tokens=1)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == len(tokenizer.encode(expected, add_special_tokens=False).ids)


def test_forced_function_call_is_a_function_call_item(http):
    tool = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}
    r = create(http, tools=[tool], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60,
               reasoning={"effort": "none"}, temperature=0)
    assert r.status_code == 200, r.text
    response = Response.model_validate(r.json())
    (call,) = response.output
    assert call.type == "function_call" and call.name == "get_weather" and "city" in json.loads(call.arguments)
    events = stream(http, tools=[tool], tool_choice={"type": "function", "name": "get_weather"},
                    max_output_tokens=60, reasoning={"effort": "none"}, temperature=0)
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments and events[-1].response.output[0].arguments == call.arguments


@pytest.mark.parametrize("patch, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"tools": [{"type": "web_search"}]}, "tools[0]"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
    ({"include": ["message.output_text.logprobs"]}, "include[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"reasoning": {"effort": "extreme"}}, "reasoning"),
    ({"text": {"format": {"type": "yaml"}}}, "text"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"input": 5}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
])
def test_unsupported_and_bad_requests_are_400_naming_the_field(http, patch, param):
    r = create(http, **patch)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and "\n" not in error["message"], error
    assert http.engine.num_running == 0 and http.engine.num_waiting == 0


def test_stored_responses_do_not_exist(http):
    r = http.get("/v1/responses/resp_123")
    assert r.status_code == 404 and "stores no responses" in r.json()["error"]["message"]
