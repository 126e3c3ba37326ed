"""Reasoning and tool-call parsing of generated GLM text, including every streaming split point."""

import json
import random

import pytest

from serving.parsers import GLMOutputParser, ParsedDelta, parse_output, parse_tool_call

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "code": {"type": "string"}, "opts": {"type": "object"}}}}}]

CALL = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>code</arg_key><arg_value>007</arg_value>"
        "<arg_key>opts</arg_key><arg_value>{\"unit\": \"C\"}</arg_value></tool_call>")
EXPECTED_ARGS = {"city": "Paris", "days": 3, "code": "007", "opts": {"unit": "C"}}


def summary(d: ParsedDelta) -> tuple:
    return d.reasoning, d.content, [(c.name, json.loads(c.arguments)) for c in d.tool_calls]


def test_reasoning_then_content():
    out = parse_output("Let me think.</think>The answer is 4.", thinking=True)
    assert (out.reasoning, out.content, out.tool_calls) == ("Let me think.", "The answer is 4.", [])


def test_unfinished_reasoning_stays_reasoning():
    out = parse_output("still thinking </thi", thinking=True)
    assert (out.reasoning, out.content) == ("still thinking </thi", "")


def test_thinking_off_is_content_but_a_leading_think_block_is_reasoning():
    assert summary(parse_output("plain", thinking=False)) == ("", "plain", [])
    assert summary(parse_output("\n<think>hmm</think>ok", thinking=False)) == ("hmm", "ok", [])
    assert summary(parse_output("a <think>b</think>", thinking=False)) == ("", "a <think>b</think>", [])


def test_tool_call_typed_by_schema():
    out = parse_output("Need weather.</think>Checking." + CALL, thinking=True, tools=TOOLS)
    assert summary(out) == ("Need weather.", "Checking.", [("get_weather", EXPECTED_ARGS)])
    assert out.tool_calls[0].to_openai(0)["function"]["name"] == "get_weather"


def test_tool_calls_not_parsed_without_tools():
    out = parse_output("</think>" + CALL, thinking=True)
    assert out.content == CALL and not out.tool_calls


def test_two_calls_and_text_between():
    text = "</think>" + CALL + "\n" + CALL.replace("Paris", "Oslo")
    out = parse_output(text, thinking=True, tools=TOOLS)
    assert [json.loads(c.arguments)["city"] for c in out.tool_calls] == ["Paris", "Oslo"]
    assert out.content == "\n"


def test_malformed_and_unclosed_calls_are_kept_as_content():
    assert parse_output("<tool_call><arg_key>x</arg_key></tool_call>", False, TOOLS).content == (
        "<tool_call><arg_key>x</arg_key></tool_call>")
    out = parse_output("before<tool_call>get_weather<arg_key>city", False, TOOLS)
    assert out.content == "before<tool_call>get_weather<arg_key>city" and not out.tool_calls


def test_unknown_tool_arguments_json_decoded_when_possible():
    call = parse_tool_call("other<arg_key>n</arg_key><arg_value>5</arg_value><arg_key>s</arg_key><arg_value>hi"
                           "</arg_value>", TOOLS)
    assert (call.name, json.loads(call.arguments)) == ("other", {"n": 5, "s": "hi"})


STREAM_CASES = [
    ("Need weather.</think>Checking." + CALL + " done", True, TOOLS),
    ("\n<think>r</think>c<tool_call>get_weather</tool_call>", False, TOOLS),
    ("abc</think>x<tool_call>broken", True, TOOLS),
    ("reason </think> text with </ and <tool and <think", True, TOOLS),
]


@pytest.mark.parametrize("text, thinking, tools", STREAM_CASES)
def test_streaming_every_split_point_matches_whole(text, thinking, tools):
    whole = summary(parse_output(text, thinking, tools))
    for i in range(len(text) + 1):
        parser = GLMOutputParser(thinking, tools)
        got = parser.feed(text[:i])
        got.extend(parser.feed(text[i:]))
        got.extend(parser.finish())
        assert summary(got) == whole, f"split at {i}"
    parser = GLMOutputParser(thinking, tools)  # one character at a time
    got = ParsedDelta()
    for ch in text:
        got.extend(parser.feed(ch))
    got.extend(parser.finish())
    assert summary(got) == whole


def test_streaming_reports_text_before_a_tag_is_complete():
    parser = GLMOutputParser(thinking=True, tools=TOOLS)
    assert parser.feed("abc</th").reasoning == "abc"  # "</th" held: it may become </think>
    d = parser.feed("ink>hello <tool_")
    assert (d.reasoning, d.content) == ("", "hello ")
    d = parser.feed("call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value>")
    assert not d  # an open call is reported when it closes
    d = parser.feed("</tool_call>")
    assert [c.name for c in d.tool_calls] == ["get_weather"]


def test_random_noise_never_crashes_and_loses_nothing():
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
              "</arg_value>", "a", " ", "<", "/", ">", "x1", "{", "}", "\n"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        thinking = rng.random() < 0.5
        out = parse_output(text, thinking)
        # Without tools only the consumed think tags disappear; every other character is reported.
        if thinking:
            expected = text.replace("</think>", "", 1)
        elif text.lstrip().startswith("<think>"):
            expected = text.lstrip()[len("<think>"):].replace("</think>", "", 1)
        else:
            expected = text
        assert out.reasoning + out.content == expected
        with_tools = parse_output(text, thinking, TOOLS)
        assert all(c.name for c in with_tools.tool_calls)
