"""The built-in GLM renderer against the real GLM-4.7 chat template, byte for byte.

The recorded prompts (tests/data/glm47_reference_prompts.json) are checked always. The template is
zai-org's GLM-4.7-Flash ``chat_template`` as llama.cpp ships it (provenance and how to get it:
tests/data/PROVENANCE.md; it is not committed). When present it is rendered two ways, both of which must give
exactly the built-in renderer's prompt: by this server's Jinja path (what ``serve.py`` does with a checkpoint
template) and by transformers' ``render_jinja_template`` with vLLM's message preparation.
"""

import hashlib
import json
from pathlib import Path

import pytest

from serving.chat import ChatTemplate, prepare_messages, render_chat

REFERENCE = Path(__file__).parent / "data" / "GLM-4.7-Flash.jinja"
# What that template rendered for every case below (tests/data/PROVENANCE.md): checked even without the file.
REFERENCE_PROMPTS = Path(__file__).parent / "data" / "glm47_reference_prompts.json"
REFERENCE_SHA256 = "d63ad536c3c81880043e22ec7fd08db42b4d8fb7c89c7138bc562bfa25281375"


@pytest.fixture(scope="module")
def reference_template() -> str:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is absent (not committed); tests/data/PROVENANCE.md says how to get it")
    data = REFERENCE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == REFERENCE_SHA256, f"{REFERENCE} is not the file PROVENANCE.md names"
    return data.decode("utf-8")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
NOW = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def weather_call(city, days=None, as_string=True):
    args = {"city": city} | ({"days": days} if days is not None else {})
    return {"id": f"call_{city}", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps(args) if as_string else args}}


CONVERSATIONS = {
    "plain": ([{"role": "user", "content": "Hello"}], None),
    "system": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}], None),
    "text_parts": ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], None),
    "reasoning_history": ([
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2", "reasoning_content": "R2"},
        {"role": "user", "content": "Q3"}], None),
    "inline_think": ([
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>\nR1\n</think>\n\n A1 "},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "no reasoning"}], None),
    "tools_calls_results": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
         "tool_calls": [weather_call("Paris", 2), weather_call("Oslo", as_string=False)]},
        {"role": "tool", "tool_call_id": "call_Paris", "content": "21 C"},
        {"role": "tool", "tool_call_id": "call_Oslo", "content": "{\"temp\": 9}"},
        {"role": "assistant", "content": "Paris 21 C, Oslo 9 C.", "reasoning_content": "Done."}], [WEATHER, NOW]),
    "tool_cycle_open": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "call it",
         "tool_calls": [{"function": {"name": "get_weather",
                                      "arguments": {"city": "Zürich", "opts": {"u": ["C", 1, True, None]}}}}]},
        {"role": "tool", "content": "sunny"}], [WEATHER]),
    "null_content_tool_call": ([
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [weather_call("Rome")]},
        {"role": "tool", "content": "ok"}], [WEATHER]),
    "whitespace_reasoning": ([
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": " \n "}], None),
    "two_think_closes": ([
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "<think>R</think>draft</think>\nFinal"}], None),
    "tool_result_list": ([
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "", "tool_calls": [weather_call("Lima")]},
        {"role": "tool", "content": [{"type": "text", "text": "part"}, {"output": "out"}, "plain"]},
        {"role": "tool", "content": "after"}], [WEATHER]),
}
SWITCHES = {"default": {}, "thinking_off": {"enable_thinking": False}, "thinking_on": {"enable_thinking": True},
            "preserved": {"clear_thinking": False},
            "off_preserved": {"enable_thinking": False, "clear_thinking": False}}


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_builtin_renderer_matches_the_recorded_glm47_prompts(name, switch):
    recorded = json.loads(REFERENCE_PROMPTS.read_text(encoding="utf-8"))
    assert set(recorded) == {f"{n}/{s}" for n in CONVERSATIONS for s in SWITCHES}
    messages, tools = CONVERSATIONS[name]
    assert render_chat(messages, tools, **SWITCHES[switch]) == recorded[f"{name}/{switch}"]


@pytest.mark.parametrize("switch", SWITCHES)
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_builtin_renderer_is_byte_identical_to_the_glm47_template(reference_template, name, switch):
    messages, tools = CONVERSATIONS[name]
    kwargs = SWITCHES[switch]
    builtin = render_chat(messages, tools, **kwargs)
    served = ChatTemplate(source="GLM-4.7-Flash.jinja", source_text=reference_template).render(messages, tools, kwargs)
    assert served == builtin
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    rendered = chat_template_utils.render_jinja_template([prepare_messages(messages)], tools=tools,
                                                         chat_template=reference_template,
                                                         add_generation_prompt=True, **kwargs)
    while isinstance(rendered, (list, tuple)):
        rendered = rendered[0]
    assert rendered == builtin


def test_the_conversations_exercise_the_edge_cases():
    """The conversations above reach the template's distinctive branches (so the comparison means something)."""
    def render(name, **kw):
        return render_chat(*CONVERSATIONS[name], **kw)

    assert "<|assistant|><think></think>A" in render("whitespace_reasoning")
    assert render("two_think_closes").endswith("<|assistant|><think>R</think>Final<|assistant|><think>")
    assert ("<tool_response>{'type': 'text', 'text': 'part'}</tool_response><tool_response>out</tool_response>"
            in render("tool_result_list"))
    assert "R1" not in render("reasoning_history") and "R1" in render("reasoning_history", clear_thinking=False)
    assert render("plain", enable_thinking=False).endswith("<|assistant|></think>")
