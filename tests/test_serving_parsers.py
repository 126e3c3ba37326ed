"""Reasoning and tool-call parsing of generated GLM text, including every streaming split point.

Test vectors are taken from the public reference parsers' tests (inputs and expected outputs, rewritten
against this parser's API; differences from a reference are named where they are deliberate):

* vLLM ``tests/reasoning/test_glm47_reasoning_parser.py`` @ fd125f499b4a368ccb3f6ca9e7b1b2d03267a028
  (parser ``glm47``: the prompt ends in ``<think>``)
* vLLM ``tests/reasoning/test_glm4_moe_reasoning_parser.py`` @ 158912e58151c65ee0ff1bc00e1ac54c503c5d0f
  (parser ``glm45``: the model opens ``<think>`` itself)
* vLLM ``tests/tool_parsers/test_glm47_moe_tool_parser.py`` @ 0ce879769db6d7503db0ecdfb5b503b080720347
* vLLM ``tests/tool_parsers/test_glm4_moe_tool_parser.py`` @ 024364d6695352f41c029121af6b8ecf2ae60184
* SGLang ``test/registered/function_call/test_glm47_moe_detector.py`` @ 143dd88794a729b254341dfd124f0513e6864a71
* SGLang ``python/sglang/srt/parser/reasoning_parser.py`` @ 002e9bfc90a037dc912d3e8525dee06d5d789aa8
  (``Glm45Detector``: ``tool_start_token="<tool_call>"`` ends reasoning)
"""

import json
import random

import pytest

from serving.parsers import GLMOutputParser, ParsedDelta, decode_argument, parse_output


def summary(d: ParsedDelta) -> tuple:
    return d.reasoning or None, d.content or None, [(c.name, json.loads(c.arguments)) for c in d.calls()]


def fed(text: str, thinking: bool, tools=None, pieces=None, stream=True) -> ParsedDelta:
    """Feed ``text`` in ``pieces`` (default: one character at a time) and finish."""
    parser = GLMOutputParser(thinking, tools, stream=stream)
    out = ParsedDelta()
    for piece in pieces if pieces is not None else list(text):
        out.extend(parser.feed(piece))
    out.extend(parser.finish())
    return out


# ---- reasoning -----------------------------------------------------------------------------------------

# vLLM glm47 (prompt ends in <think>): (model output, reasoning, content). vLLM reports "" or None for an
# empty reasoning depending on streaming; the API reports both as null, as summary() does here.
VLLM_GLM47_REASONING = [
    ("This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is a reasoning section</think>", "This is a reasoning section", None),
    ("This is content", "This is content", None),
    ("This\nThat</think>This is the rest\nThat", "This\nThat", "This is the rest\nThat"),
    ("</think>This is the rest", None, "This is the rest"),
    # the model writes <think> itself: not part of the reasoning
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This\nThat</think>This is the rest\nThat", "This\nThat", "This is the rest\nThat"),
    ("<think>This is a reasoning section", "This is a reasoning section", None),
    ("", None, None),
]

# vLLM glm45 (no <think> in the prompt; the model opens it). ONLY_OPEN_TAG follows vLLM's streaming
# expectation (reasoning); vLLM's non-streaming path returns it as content.
VLLM_GLM45_REASONING = [
    ("<think>This is a reasoning section</think>This is the rest", "This is a reasoning section", "This is the rest"),
    ("This is the rest", None, "This is the rest"),
    ("<think>This is a reasoning section</think>", "This is a reasoning section", None),
    ("<think>This is a reasoning\nsection</think>This is the rest\nThat", "This is a reasoning\nsection",
     "This is the rest\nThat"),
    ("<think></think>This is the rest", None, "This is the rest"),
    ("<think></think>", None, None),
    ("<think>This is a reasoning section", "This is a reasoning section", None),
]


@pytest.mark.parametrize("thinking, case", [(True, c) for c in VLLM_GLM47_REASONING]
                         + [(False, c) for c in VLLM_GLM45_REASONING])
def test_reasoning_vectors_whole_and_streamed(thinking, case):
    output, reasoning, content = case
    assert summary(parse_output(output, thinking)) == (reasoning, content, [])
    assert summary(fed(output, thinking)) == (reasoning, content, [])


def test_tool_call_before_think_close_ends_reasoning():
    """SGLang Glm45Detector: <tool_call> interrupts reasoning; before this fix it was swallowed."""
    text = "I need the weather<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
    for out in (parse_output(text, True, TOOLS), fed(text, True, TOOLS)):
        assert summary(out) == ("I need the weather", None, [("get_weather", {"city": "Paris"})])
    # without tools offered, nothing is parsed as a call: it stays reasoning
    assert summary(parse_output(text, True)) == (text, None, [])


# ---- tool calls ----------------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_current_date", "parameters": {}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "date": {"type": "string"}, "days": {"type": "integer"},
        "opts": {"type": "object"}}}}},
]


def call(name, **args):
    return name, args


# (model output, content, calls), from vLLM glm47 / glm4_moe and SGLang glm47 detector cases
TOOL_VECTORS = [
    # vLLM glm47 TestGlm47ExtractToolCalls
    ("This is a plain response.", "This is a plain response.", []),
    ("<tool_call>get_current_date</tool_call>", None, [call("get_current_date")]),
    ("<tool_call>get_current_date\n</tool_call>", None, [call("get_current_date")]),
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>", None,
     [call("get_weather", city="Beijing")]),
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n</tool_call>", None,
     [call("get_weather", city="Beijing")]),
    ("Checking.<tool_call>get_current_date</tool_call>", "Checking.", [call("get_current_date")]),
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value></tool_call>"
     "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Shanghai</arg_value></tool_call>", None,
     [call("get_weather", city="Beijing"), call("get_weather", city="Shanghai")]),
    ("  \n  <tool_call>get_current_date</tool_call>", None, [call("get_current_date")]),
    # vLLM glm4_moe: content is the text before the first call (vLLM keeps its trailing space; SGLang and
    # this parser trim it)
    ("I'll help you check the weather. <tool_call>get_weather\n    <arg_key>city</arg_key>\n    "
     "<arg_value>Seattle</arg_value>\n    </tool_call>", "I'll help you check the weather.",
     [call("get_weather", city="Seattle")]),
    ("I will help you get the weather info.\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
     "<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>\n</tool_call>\n\n"
     "meaningwhile, I will also check the weather in Shanghai.\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
     "<arg_value>Shanghai</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>\n</tool_call>",
     "I will help you get the weather info.",
     [call("get_weather", city="Beijing", date="2025-08-01"), call("get_weather", city="Shanghai", date="2025-08-01")]),
    ("<tool_call>get_current_time\n</tool_call>", None, [call("get_current_time")]),
    # an unclosed call (vLLM: not extracted, the whole output is content)
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n"
     "<arg_value>2025-08-01</arg_value>", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing"
     "</arg_value>\n<arg_key>date</arg_key>\n<arg_value>2025-08-01</arg_value>", []),
    ("<tool_call>   ", "<tool_call>   ", []),
    # SGLang glm47 detector
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>date</arg_key>"
     "<arg_value>2024-06-27</arg_value></tool_call>", None, [call("get_weather", city="Beijing", date="2024-06-27")]),
    ("<tool_call>list_filenames</tool_call>", None, [call("list_filenames")]),
]


@pytest.mark.parametrize("output, content, calls", TOOL_VECTORS)
def test_tool_call_vectors(output, content, calls):
    assert summary(parse_output(output, False, TOOLS)) == (None, content, calls)


def test_think_then_text_then_call_vllm_glm4_moe():
    """vLLM test_extract_tool_calls_with_thinking_tags: with the reasoning parser in front (as the server runs
    it) the <think> block is reasoning and the text before the call is the content."""
    output = ("<think>I want to get the weather.</think>\n\nI will help you get the weather.\n<tool_call>get_weather\n"
              "<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n<arg_key>date</arg_key>\n"
              "<arg_value>2025-08-01</arg_value>\n</tool_call>")
    assert summary(parse_output(output, False, TOOLS)) == (
        "I want to get the weather.", "I will help you get the weather.",
        [call("get_weather", city="Beijing", date="2025-08-01")])


def test_arguments_are_typed_by_the_schema():
    out = parse_output("<tool_call>get_weather<arg_key>city</arg_key><arg_value>007</arg_value>"
                       "<arg_key>days</arg_key><arg_value>3</arg_value>"
                       "<arg_key>opts</arg_key><arg_value>{\"unit\": \"C\"}</arg_value></tool_call>", False, TOOLS)
    assert summary(out)[2] == [call("get_weather", city="007", days=3, opts={"unit": "C"})]


ESCAPED_TODOS = r'[{\"id\": \"1\", \"task\": \"Check\", \"status\": \"pending\"}]'


@pytest.mark.parametrize("raw, types, expected", [
    # SGLang test_array_argument_with_escaped_json: an escaped JSON array is a list, not a string
    (ESCAPED_TODOS, {"array"}, [{"id": "1", "task": "Check", "status": "pending"}]),
    ('[{"id": "1", "task": "Check file at C:\\\\Users\\\\test.txt"}]', {"array"},
     [{"id": "1", "task": "Check file at C:\\Users\\test.txt"}]),
    # vLLM _deserialize: JSON, then a Python literal
    ("42", None, 42), ("3.14", None, 3.14), ("true", None, True),
    ("True", {"boolean"}, True), ("None", None, None), ("['a', 'b']", {"array"}, ["a", "b"]),
    ("{'k': (1, 2)}", {"object"}, {"k": [1, 2]}),
    ("add", None, "add"), (" spaced ", None, "spaced"),
    # declared string: raw text, whitespace kept (vLLM test_whitespace_preserved_in_arg_values) ...
    ("    indented code    ", {"string"}, "    indented code    "), ("123", {"string"}, "123"),
    ("echo 'Hello World'", {"string"}, "echo 'Hello World'"), ("", {"string"}, ""),
    # ... but a JSON string literal is decoded (SGLang), not kept with its quotes
    ('"Paris"', {"string"}, "Paris"), ('"a\\nb"', {"string"}, "a\nb"),
    # a quoted number for a numeric argument becomes the number (SGLang _coerce_numeric_string)
    ('"5"', {"integer"}, 5), ('"2.5"', {"number"}, 2.5),
    # NaN / Infinity are not JSON; a value the schema's types forbid stays the raw text when strings are allowed
    ("NaN", {"number"}, "NaN"), ("7", {"string", "null"}, "7"), ("null", {"string", "null"}, None),
])
def test_decode_argument(raw, types, expected):
    value = decode_argument(raw, types)
    assert value == expected and type(value) is type(expected)


def test_escaped_json_array_end_to_end_sglang():
    tools = [{"type": "function", "function": {"name": "todo_write", "parameters": {
        "type": "object", "properties": {"todos": {"type": "array"}}}}}]
    text = f"<tool_call>todo_write<arg_key>todos</arg_key><arg_value>{ESCAPED_TODOS}</arg_value>\n</tool_call>"
    args = json.loads(parse_output(text, False, tools).calls()[0].arguments)
    assert args == {"todos": [{"id": "1", "task": "Check", "status": "pending"}]}


def test_malformed_calls_are_kept_as_content_before_the_first_call():
    assert summary(parse_output("<tool_call><arg_key>x</arg_key></tool_call>", False, TOOLS)) == (
        None, "<tool_call><arg_key>x</arg_key></tool_call>", [])
    out = parse_output("ok <tool_call>get_weather<arg_key>ci", False, TOOLS)
    assert summary(out) == (None, "ok <tool_call>get_weather<arg_key>ci", [])


def test_tool_calls_not_parsed_without_tools():
    text = "</think><tool_call>get_current_date</tool_call>"
    out = parse_output(text, True)
    assert out.content == "<tool_call>get_current_date</tool_call>" and not out.tool_calls


# ---- streaming -----------------------------------------------------------------------------------------

CALL = ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>date</arg_key><arg_value>\"007\"</arg_value>"
        "<arg_key>opts</arg_key><arg_value>{\"unit\": \"C\"}</arg_value></tool_call>")
STREAM_CASES = [
    ("Need weather.</think>Checking. " + CALL + " done" + CALL.replace("Paris", "Oslo"), True, TOOLS),
    ("\n<think>r</think>c<tool_call>get_current_date</tool_call>", False, TOOLS),
    ("abc</think>x<tool_call>broken<arg_key", True, TOOLS),
    ("reason </think> text with </ and <tool and <think", True, TOOLS),
    ("<think>r<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value> Rome </arg_value>\n</tool_call>", True,
     TOOLS),
    ("<tool_call><arg_key>x</arg_key></tool_call> then text", False, TOOLS),
]


@pytest.mark.parametrize("text, thinking, tools", STREAM_CASES)
def test_streaming_every_split_point_matches_whole(text, thinking, tools):
    whole = summary(parse_output(text, thinking, tools))
    for stream in (True, False):
        for i in range(len(text) + 1):
            assert summary(fed(text, thinking, tools, [text[:i], text[i:]], stream)) == whole, f"split at {i}"
        assert summary(fed(text, thinking, tools, stream=stream)) == whole  # one character at a time


def test_streamed_tool_call_is_name_first_then_argument_pieces():
    """The OpenAI delta shape: the first delta of a call has index, id, type and the name (arguments ""),
    the rest only arguments; string values arrive before their </arg_value>, pieces concatenate to the
    arguments of the non-streaming result (SGLang test_mtp_func_and_string_split chunks)."""
    tools = [{"type": "function", "function": {"name": "create_task", "parameters": {"type": "object", "properties": {
        "title": {"type": "string"}, "location": {"type": "string"}}}}}]
    chunks = ["I'll create a task.", "<tool_call>create_ta", "sk<arg_key>title</arg_key><arg_value>Go to Bei",
              "jing</arg_value>", "<arg_key>location</arg_key><arg_value>San Fran", "cisco</arg_value></tool_call>"]
    parser = GLMOutputParser(False, tools)
    deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
    assert "".join(d.content for d in deltas) == "I'll create a task."
    assert not deltas[1].tool_calls  # "create_ta": the name is not complete yet
    first = deltas[2].tool_calls[0].to_openai()
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "create_task", "arguments": ""}
    pieces = [d.to_openai() for delta in deltas for d in delta.tool_calls][1:]
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces)
    assert pieces[0]["function"]["arguments"] == '{"title": "Go to Bei'  # before </arg_value> arrived
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert json.loads(arguments) == {"title": "Go to Beijing", "location": "San Francisco"}
    assert arguments == parse_output("".join(chunks), False, tools).calls()[0].arguments


def test_streamed_numbers_and_json_arrive_whole_sglang_mtp_number_and_complex_json():
    tools = [{"type": "function", "function": {"name": "create_todos", "parameters": {"type": "object", "properties": {
        "priority": {"type": "number"}, "count": {"type": "integer"}, "items": {"type": "array"}}}}}]
    chunks = ["<tool_call>create_todos", "<arg_key>priority</arg_key><arg_value>5.5</arg_value>",
              "<arg_key>count</arg_key><arg_value>10</arg_value>", '<arg_key>items</arg_key><arg_value>[{"description',
              '": "Test', 'Todo 1"}, {"description": "TestTodo 2"}]</arg_value></tool_call>']
    parser = GLMOutputParser(False, tools)
    pieces = [d.arguments for c in chunks for d in parser.feed(c).tool_calls if d.name is None]
    assert pieces[:2] == ['{"priority": 5.5', ', "count": 10']
    assert json.loads("".join(pieces)) == {"priority": 5.5, "count": 10, "items": [
        {"description": "TestTodo 1"}, {"description": "TestTodo 2"}]}


def test_a_call_cut_off_by_the_length_limit():
    """Streaming has already sent the name and pieces: the arguments are closed into valid JSON. Not streaming,
    the unfinished call is content (vLLM test_extract_tool_calls_incomplete_tool_call)."""
    text = "ok <tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    parser = GLMOutputParser(False, TOOLS)
    streamed = parser.feed(text)
    streamed.extend(parser.finish())
    assert summary(streamed) == (None, "ok", [call("get_weather", city="Par")])
    assert parser.num_tool_calls == 1
    assert summary(parse_output(text, False, TOOLS)) == (None, text, [])


def test_random_noise_never_crashes_and_loses_nothing_without_tools():
    pieces = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
              "</arg_value>", "a", " ", "<", "/", ">", "x1", "{", "}", "\n", '"']
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        thinking = rng.random() < 0.5
        out = parse_output(text, thinking)
        # Without tools only the consumed think tags disappear; every other character is reported.
        if thinking:
            body = text[len("<think>"):] if text.startswith("<think>") else text
            expected = body.replace("</think>", "", 1)
        elif text.lstrip().startswith("<think>"):
            expected = text.lstrip()[len("<think>"):].replace("</think>", "", 1)
        else:
            expected = text
        assert out.reasoning + out.content == expected
        for stream in (True, False):  # with tools: every call has a name and valid JSON arguments
            with_tools = fed(text, thinking, TOOLS, stream=stream)
            assert all(c.name and isinstance(json.loads(c.arguments), dict) for c in with_tools.calls())
            if stream is False:
                assert summary(with_tools) == summary(parse_output(text, thinking, TOOLS))
