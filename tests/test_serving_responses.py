"""Response bodies built from engine events, validated against the openai package's own types.

The default model's output is noise, so tool calls and reasoning boundaries are exercised here with
given generated text (the engine events a generation produces), not with the model.
"""

import json

from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serving.engine import EngineEvent
from serving.parsers import GLMOutputParser
from serving.protocol import ChatResponse, CompletionResponse, usage_of

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]
GENERATED = ("I should look it up.</think>Let me check."
             "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
             "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>")


def events(text: str, pieces: int, finish_reason: str = "stop") -> list[EngineEvent]:
    size = -(-len(text) // pieces)
    parts = [text[i:i + size] for i in range(0, len(text), size)]
    return [EngineEvent(text=p, finished=i == len(parts) - 1, finish_reason=finish_reason if i == len(parts) - 1
                        else None, prompt_tokens=10, completion_tokens=i + 1) for i, p in enumerate(parts)]


def test_streamed_chunks_are_openai_chunks_with_reasoning_content_and_tool_calls():
    for pieces in (1, 3, 7, len(GENERATED)):
        response = ChatResponse("chatcmpl-x", "glm5-tiny-random", [GLMOutputParser(True, TOOLS)], include_usage=True)
        chunks = response.opening() + [c for e in events(GENERATED, pieces) for c in response.chunks(0, e)]
        chunks.append(response.usage_chunk(usage_of(10, pieces)))  # serving.api.respond adds it at the end
        parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
        reasoning = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in parsed if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
        calls = [tc for c in parsed if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert reasoning == "I should look it up." and content == "Let me check."
        # name first (with id and type), then argument pieces that concatenate to the arguments JSON
        assert (calls[0].index, calls[0].function.name, calls[0].function.arguments) == (0, "get_weather", "")
        assert calls[0].id.startswith("call_") and calls[0].type == "function"
        assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in calls[1:])
        assert json.loads("".join(tc.function.arguments for tc in calls[1:])) == {"city": "Paris", "days": 2}
        if pieces == len(GENERATED):
            assert len(calls) > 3  # one character per event: the arguments arrive in several pieces
        finishes = [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason]
        assert finishes == ["tool_calls"]
        assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == pieces


def test_whole_response_is_an_openai_chat_completion():
    response = ChatResponse("chatcmpl-y", "glm5-tiny-random", [GLMOutputParser(True, TOOLS, stream=False)])
    last = EngineEvent(finished=True, finish_reason="stop", prompt_tokens=10, completion_tokens=30)
    body = ChatCompletion.model_validate(response.whole([(GENERATED, last, [])], usage_of(10, 30)))
    choice = body.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "I should look it up."
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"city": "Paris", "days": 2}
    assert body.usage.total_tokens == 40


def test_length_stop_keeps_length_and_unclosed_call_is_content():
    response = ChatResponse("chatcmpl-z", "m", [GLMOutputParser(False, TOOLS, stream=False)])
    last = EngineEvent(finished=True, finish_reason="length", prompt_tokens=3, completion_tokens=5)
    body = ChatCompletion.model_validate(response.whole([("ok <tool_call>get_weather<arg_key>ci", last, [])],
                                                        usage_of(3, 5)))
    assert body.choices[0].finish_reason == "length"
    assert body.choices[0].message.content == "ok <tool_call>get_weather<arg_key>ci"
    assert not body.choices[0].message.tool_calls


def test_engine_error_ends_the_stream_with_an_error_object():
    response = ChatResponse("chatcmpl-e", "m", [GLMOutputParser(True)])
    out = response.chunks(0, EngineEvent(text="", finished=True, finish_reason="error", error="model step failed: X"))
    assert out[-1]["error"]["message"] == "model step failed: X" and out[-1]["error"]["type"] == "server_error"


def test_completion_stream_and_whole_body_are_openai_completions():
    text = "Once upon a time"
    for pieces in (1, 4, len(text)):
        response = CompletionResponse("cmpl-x", "m", [""], include_usage=True)
        chunks = response.opening() + [c for e in events(text, pieces, "length") for c in response.chunks(0, e)]
        chunks.append(response.usage_chunk(usage_of(4, pieces)))
        # openai's Completion type has no null finish_reason (the client does not validate stream chunks)
        parsed = [Completion.model_validate(c) if not c["choices"] or c["choices"][0]["finish_reason"]
                  else Completion.model_construct(**c) for c in chunks]
        assert all(c.id == "cmpl-x" and c.object == "text_completion" for c in parsed)
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]] == [None] * (pieces - 1) + ["length"]
        assert parsed[-1].choices == [] and parsed[-1].usage.completion_tokens == pieces
    last = EngineEvent(finished=True, finish_reason="stop", prompt_tokens=4, completion_tokens=6)
    body = Completion.model_validate(CompletionResponse("cmpl-y", "m", [""]).whole([(text, last, [])], usage_of(4, 6)))
    assert body.choices[0].text == text and body.choices[0].finish_reason == "stop"
    assert body.usage.total_tokens == 10


def test_completion_engine_error_is_the_only_chunk_of_the_last_event():
    response = CompletionResponse("cmpl-e", "m", [""], include_usage=True)
    out = response.chunks(0, EngineEvent(text="x", finished=True, finish_reason="error", error="model step failed: X"))
    assert out == [{"error": {"message": "model step failed: X", "type": "server_error", "param": None,
                              "code": "engine_error"}}]


def test_the_openai_sdk_assembles_the_streamed_tool_calls():
    """openai's own stream accumulator (what ``client.chat.completions.stream`` uses) rebuilds both calls
    from the name-then-argument-pieces deltas, one character per engine event."""
    from openai.lib.streaming.chat import ChatCompletionStreamState

    text = GENERATED + "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value></tool_call>"
    response = ChatResponse("chatcmpl-s", "m", [GLMOutputParser(True, TOOLS)])
    state = ChatCompletionStreamState()
    for chunk in response.opening() + [c for e in events(text, len(text)) for c in response.chunks(0, e)]:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_weather", {"city": "Oslo"})]
    assert len({c.id for c in choice.message.tool_calls}) == 2
