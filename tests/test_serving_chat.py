"""Golden renderings of the built-in GLM chat renderer, and the Jinja path for checkpoint templates
(serving/chat.py). The byte-for-byte comparison with the real GLM-4.7 template is in
tests/test_serving_chat_reference.py."""

import json

import pytest

from serving.chat import (
    BUILTIN_SOURCE,
    GLM_CHAT_TEMPLATE,
    TOOLS_FOOTER,
    TOOLS_HEADER,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    prompt_opens_thinking,
    render_chat,
    template_kwargs,
)

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
    # edge cases where the GLM-4.7 template differs from a naive renderer
    ([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "  \n "},
      {"role": "tool", "content": [{"type": "text", "text": "t1"}, {"output": "t2"}, "t3"]},
      {"role": "tool", "content": "t4"}], None),
    ([{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>R</think>mid</think>\n\nA1"},
      {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "\n</think>only answer"}], None),
]


def _jinja(template, messages, tools, add_generation_prompt=True, **kwargs):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered = chat_template_utils.render_jinja_template([messages], tools=tools, chat_template=template,
                                                         add_generation_prompt=add_generation_prompt, **kwargs)
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


# ---- edge cases (as the GLM-4.7 template renders them) -------------------------------------------------

def test_whitespace_only_reasoning_renders_an_empty_think_block():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": " \n"}]
    assert render_chat(messages, add_generation_prompt=False) == "[gMASK]<sop><|user|>Q<|assistant|><think></think>A"
    messages[1]["reasoning_content"] = ""
    assert render_chat(messages, add_generation_prompt=False) == "[gMASK]<sop><|user|>Q<|assistant|></think>A"


def test_two_think_closes_keep_the_text_after_the_last():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>R</think>x</think>\nA"}]
    assert render_chat(messages, add_generation_prompt=False) == "[gMASK]<sop><|user|>Q<|assistant|><think>R</think>A"


def test_tool_result_given_as_a_list_renders_each_item():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": [{"type": "text", "text": "a"}, {"output": "b"}]}, {"role": "tool", "content": "c"}]
    assert render_chat(messages, enable_thinking=False) == (
        "[gMASK]<sop><|user|>Q<|assistant|></think><tool_call>f</tool_call>"
        "<|observation|><tool_response>{'type': 'text', 'text': 'a'}</tool_response><tool_response>b</tool_response>"
        "<tool_response>c</tool_response><|assistant|></think>")


# ---- template variables and the Jinja path -------------------------------------------------------------

def test_template_kwargs_merge_the_thinking_switches_most_specific_first():
    assert template_kwargs() == {}
    assert template_kwargs(None, None, {"type": "disabled", "clear_thinking": False}) == {
        "enable_thinking": False, "clear_thinking": False}
    assert template_kwargs(True, {"enable_thinking": False, "reasoning_effort": "low"}, {"type": "disabled"}) == {
        "enable_thinking": True, "reasoning_effort": "low"}
    assert template_kwargs(None, {"enable_thinking": False}, {"type": "enabled"})["enable_thinking"] is False


@pytest.mark.parametrize("args, param", [
    ((None, {"enable_thinking": "no"}, None), "enable_thinking"),
    ((None, {"clear_thinking": 1}, None), "clear_thinking"),
    ((None, None, {"type": "sometimes"}), "thinking"),
    ((None, {"messages": []}, None), "chat_template_kwargs"),
    ((None, {"add_generation_prompt": False}, None), "chat_template_kwargs"),
])
def test_template_kwargs_reject_bad_values_naming_the_field(args, param):
    with pytest.raises(ChatTemplateError) as info:
        template_kwargs(*args)
    assert info.value.param == param and "\n" not in str(info.value)


def test_prompt_opens_thinking():
    assert prompt_opens_thinking(render_chat(CONVERSATIONS[0][0]))
    assert not prompt_opens_thinking(render_chat(CONVERSATIONS[0][0], enable_thinking=False))


@pytest.mark.parametrize("messages, tools", CONVERSATIONS)
@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"clear_thinking": False}])
def test_jinja_path_renders_the_glm_template_as_transformers_and_as_the_builtin(messages, tools, kwargs):
    """ChatTemplate's sandbox renders GLM_CHAT_TEMPLATE exactly as transformers does, and as render_chat."""
    jinja = ChatTemplate(source="test", source_text=GLM_CHAT_TEMPLATE)
    prompt = jinja.render(messages, tools, kwargs)
    assert prompt == ChatTemplate().render(messages, tools, kwargs) == render_chat(messages, tools, **kwargs)
    from serving.chat import prepare_messages

    assert prompt == _jinja(GLM_CHAT_TEMPLATE, prepare_messages(messages), tools, **kwargs)


def test_jinja_sandbox_helpers_as_transformers_sets_them():
    source = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role: ' + m.content) }}"
              "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}[{{ m.content | tojson }}]"
              "{%- if true %}\n  kept{% endif %}{% generation %}g{% endgeneration %}{% endfor %}"
              "{{ strftime_now('%Y') | length }}{{ eos_token }}")
    tpl = ChatTemplate(source="test", source_text=source, special_tokens={"eos_token": "<eos>"})
    messages = [{"role": "user", "content": "<é>"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]
    out = tpl.render(messages)
    # tojson: no HTML escaping, no ASCII escaping; trim_blocks (the newline after a block tag goes); loopcontrols;
    # the generation tag renders its body
    assert out == '["<é>"]  keptg["b"]  keptg4<eos>'
    assert out == _jinja(source, messages, None, eos_token="<eos>", add_generation_prompt=False)
    with pytest.raises(ChatTemplateError) as info:
        tpl.render([{"role": "system", "content": "S"}])
    assert "no system role: S" in str(info.value) and "test" in str(info.value) and info.value.param == "messages"


def test_jinja_template_errors_are_one_line_request_errors():
    unsafe = ChatTemplate(source="test", source_text="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="SecurityError|UndefinedError"):
        unsafe.render([{"role": "user", "content": "x"}])
    needs_mapping = ChatTemplate(source="test", source_text="{{ messages[0].content.items() | list }}")
    with pytest.raises(ChatTemplateError) as info:
        needs_mapping.render([{"role": "user", "content": "x"}])
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        ChatTemplate(source="bad.jinja", source_text="{% for %}")


def test_jinja_path_decodes_tool_call_arguments_and_null_content_without_touching_the_request():
    messages = [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}]
    before = json.dumps(messages)
    tpl = ChatTemplate(source="t", source_text="{% for m in messages %}[{{ m.content }}]"
                       "{% for c in m.tool_calls or [] %}{{ c.function.arguments.a }}{% endfor %}{% endfor %}")
    assert tpl.render(messages) == "[go][]1"
    assert json.dumps(messages) == before
    with pytest.raises(ChatTemplateError) as info:
        tpl.render([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])
    assert info.value.param == "messages[0].tool_calls[0].function.arguments"


# ---- which template ------------------------------------------------------------------------------------

def _checkpoint(tmp_path, config=None, jinja=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return tmp_path


def test_template_choice_override_then_jinja_file_then_config_then_builtin(tmp_path):
    both = _checkpoint(tmp_path / "both", {"chat_template": "config {{ messages | length }}", "eos_token": "<e>"},
                       "file {{ messages | length }}{{ eos_token }}")
    only_config = _checkpoint(tmp_path / "config", {"chat_template": "config {{ messages | length }}"})
    named = _checkpoint(tmp_path / "named", {"chat_template": [{"name": "tool_use", "template": "t"},
                                                               {"name": "default", "template": "d"}]})
    none = _checkpoint(tmp_path / "none", {"eos_token": "<e>"})
    override = tmp_path / "override.jinja"
    override.write_text("override {{ add_generation_prompt }}")
    msgs = [{"role": "user", "content": "x"}]

    t = load_chat_template(both, override)
    assert t.source == f"--chat-template {override}" and t.render(msgs) == "override True"
    t = load_chat_template(both)
    assert t.source == "checkpoint chat_template.jinja" and t.render(msgs) == "file 1<e>"
    t = load_chat_template(only_config)
    assert t.source == "checkpoint tokenizer_config.json" and t.render(msgs) == "config 1"
    assert load_chat_template(named).render(msgs) == "d"
    for path in (none, tmp_path / "empty-dir", None):
        t = load_chat_template(path)
        assert t.source == BUILTIN_SOURCE and t.is_builtin and t.render(msgs) == render_chat(msgs)


def test_unusable_templates_fail_with_one_line_naming_the_file(tmp_path):
    bad_json = tmp_path / "bad"
    bad_json.mkdir()
    (bad_json / "tokenizer_config.json").write_text("{oops")
    bad_syntax = _checkpoint(tmp_path / "syntax", jinja="{% if %}")
    no_default = _checkpoint(tmp_path / "nodefault", {"chat_template": [{"name": "tool_use", "template": "t"}]})
    empty = tmp_path / "empty.jinja"
    empty.write_text("  ")
    for args, words in [((bad_json,), "tokenizer_config.json: cannot read"),
                        ((bad_syntax,), "chat_template.jinja: not a valid Jinja template"),
                        ((no_default,), "without a 'default' template"),
                        ((None, empty), "empty.jinja: the chat template file is empty"),
                        ((None, tmp_path / "missing.jinja"), "missing.jinja: cannot read")]:
        with pytest.raises(ValueError) as info:
            load_chat_template(*args)
        assert words in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "messages[0].content"),
    ([{"role": "tool", "content": [7]}], "messages[0].content"),
    ([{"role": "wizard", "content": "x"}], "messages[0].role"),
])
def test_jinja_path_checks_messages_as_the_builtin_does(messages, param):
    with pytest.raises(ChatTemplateError) as info:
        ChatTemplate(source="t", source_text=GLM_CHAT_TEMPLATE).render(messages)
    assert info.value.param == param
