"""Golden renderings of the GLM chat template (serving/chat.py)."""

import json

import pytest

from serving.chat import GLM_CHAT_TEMPLATE, TOOLS_FOOTER, TOOLS_HEADER, ChatTemplateError, render_chat

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                       "required": ["city"]},
    },
}


def test_system_user_thinking_on_and_off():
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"}]
    assert render_chat(messages) == "[gMASK]<sop><|system|>You are helpful.<|user|>Hi<|assistant|><think>"
    assert render_chat(messages, enable_thinking=False) == (
        "[gMASK]<sop><|system|>You are helpful.<|user|>Hi<|assistant|></think>")
    assert render_chat(messages, add_generation_prompt=False) == "[gMASK]<sop><|system|>You are helpful.<|user|>Hi"


def test_text_parts_and_null_content():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None}, {"role": "user", "content": "c"}]
    assert render_chat(messages) == "[gMASK]<sop><|user|>ab<|assistant|></think><|user|>c<|assistant|><think>"


def test_history_reasoning_cleared_by_default_preserved_with_clear_thinking_false():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"},
    ]
    assert render_chat(messages) == (
        "[gMASK]<sop><|user|>Q1<|assistant|></think>A1<|user|>Q2<|assistant|><think>")
    assert render_chat(messages, clear_thinking=False) == (
        "[gMASK]<sop><|user|>Q1<|assistant|><think>R1</think>A1<|user|>Q2<|assistant|><think>")


def test_inline_think_in_assistant_content_is_split():
    messages = [{"role": "user", "content": "Q1"},
                {"role": "assistant", "content": "<think>R1</think>\nA1"},
                {"role": "user", "content": "Q2"}]
    assert render_chat(messages, clear_thinking=False) == (
        "[gMASK]<sop><|user|>Q1<|assistant|><think>R1</think>A1<|user|>Q2<|assistant|><think>")
    assert "R1" not in render_chat(messages)


def test_tools_block_and_interleaved_thinking_tool_round_trip():
    tools = [WEATHER_TOOL, {"type": "function", "function": {"name": "now", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 2})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"},
    ]
    tools_block = ("<|system|>" + TOOLS_HEADER + json.dumps(tools[0], ensure_ascii=False) + "\n"
                   + json.dumps(tools[1], ensure_ascii=False) + "\n" + TOOLS_FOOTER)
    assert render_chat(messages, tools) == (
        "[gMASK]<sop>" + tools_block + "<|user|>Weather in Paris?"
        "<|assistant|><think>Need the tool.</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>"
        "<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>"
        "<|observation|><tool_response>{\"temp\": 21}</tool_response><|assistant|><think>")
    assert tools_block.startswith("<|system|>\n# Tools\n\n") and "<tools>\n{" in tools_block
    assert "}\n</tools>\n\nFor each function call" in tools_block


def test_consecutive_tool_results_share_one_observation_and_values_are_json_encoded():
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Calling.",
         "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, 2], "b": "x", "c": True, "d": None}}},
                        {"function": {"name": "g", "arguments": "{}"}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    assert render_chat(messages, enable_thinking=False) == (
        "[gMASK]<sop><|user|>go<|assistant|></think>Calling."
        "<tool_call>f<arg_key>a</arg_key><arg_value>[1, 2]</arg_value><arg_key>b</arg_key><arg_value>x</arg_value>"
        "<arg_key>c</arg_key><arg_value>true</arg_value><arg_key>d</arg_key><arg_value>null</arg_value></tool_call>"
        "<tool_call>g</tool_call>"
        "<|observation|><tool_response>r1</tool_response><tool_response>r2</tool_response><|assistant|></think>")


@pytest.mark.parametrize("messages, param, words", [
    ([], "messages", "non-empty"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role", "not one of"),
    (["hello"], "messages[0]", "must be an object"),
    ([{"role": "user", "content": 5}], "messages[0].content", "must be a string"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content", "text parts"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
     "messages[0].tool_calls[0].function.arguments", "not valid JSON"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": "{}"}}]}],
     "messages[0].tool_calls[0].function.name", "non-empty string"),
])
def test_bad_messages_name_the_field(messages, param, words):
    with pytest.raises(ChatTemplateError) as info:
        render_chat(messages)
    assert info.value.param == param
    assert words in str(info.value) and "\n" not in str(info.value)


CONVERSATIONS = [
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], None),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": None}, {"role": "user", "content": "c\n"}], None),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
      {"role": "user", "content": "Q2"}], None),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\n A1 "},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "no reasoning"}], None),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
      {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
       "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                        "arguments": {"city": "Paris", "days": 2, "o": {"u": "C"}}}}]},
      {"role": "tool", "content": "21 C"}, {"role": "tool", "content": "sunny"},
      {"role": "assistant", "content": "Sunny, 21 C.", "reasoning_content": "Done."}], [WEATHER_TOOL]),
]


def _jinja(template, messages, tools, **kwargs):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered = chat_template_utils.render_jinja_template([messages], tools=tools, chat_template=template,
                                                         add_generation_prompt=True, **kwargs)
    while isinstance(rendered, (list, tuple)):
        rendered = rendered[0]
    return rendered


@pytest.mark.parametrize("messages, tools", CONVERSATIONS)
@pytest.mark.parametrize("enable_thinking", [True, False])
@pytest.mark.parametrize("clear_thinking", [True, False])
def test_jinja_template_renders_like_python(messages, tools, enable_thinking, clear_thinking):
    """GLM_CHAT_TEMPLATE (what a checkpoint can ship), rendered as transformers does, equals render_chat."""
    kwargs = dict(enable_thinking=enable_thinking, clear_thinking=clear_thinking)
    assert _jinja(GLM_CHAT_TEMPLATE, messages, tools, **kwargs) == render_chat(messages, tools, **kwargs)


def test_jinja_template_defaults_thinking_on_and_history_cleared():
    messages = CONVERSATIONS[2][0]
    assert _jinja(GLM_CHAT_TEMPLATE, messages, None) == render_chat(messages)


@pytest.mark.parametrize("messages, tools", CONVERSATIONS)
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_agrees_with_the_tiny_checkpoints_chat_template(tmp_path_factory, messages, tools, enable_thinking):
    """The chat_template the default checkpoint ships renders every conversation as the server does."""
    tiny = pytest.importorskip("model.tiny")
    path = tiny.ensure_default_model(cache_dir=tmp_path_factory.getbasetemp() / "chat-template-model")
    template = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    assert _jinja(template, messages, tools, enable_thinking=enable_thinking) == render_chat(
        messages, tools, enable_thinking=enable_thinking)
