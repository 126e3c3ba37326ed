"""The GLM-4.5/4.7/5 chat template, rendered in Python.

Layout (no end-of-message token; a turn ends where the next role tag starts)::

    [gMASK]<sop>
    <|system|>\\n# Tools ... <tools>\\n{tool JSON}\\n...</tools> ...      (only when tools are given)
    <|system|>SYSTEM  <|user|>USER
    <|assistant|><think>REASONING</think>CONTENT<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
    <|observation|><tool_response>RESULT</tool_response><tool_response>...</tool_response>
    <|assistant|><think>            (generation prompt, thinking on)   or   <|assistant|></think>   (off)

Thinking rules: an assistant turn keeps its reasoning (``<think>R</think>``) only when it comes after
the last user message (the current tool-calling cycle: interleaved thinking), unless
``clear_thinking=False`` (preserved thinking) keeps it everywhere; otherwise the turn starts with a
bare ``</think>``. This mirrors the Jinja ``chat_template`` shipped with GLM checkpoints, except
that a ``None`` content renders as an empty string (Jinja would print ``None``).
"""

from __future__ import annotations

import json
from typing import Any

from model.chat_template import GLM_CHAT_TEMPLATE, TOOLS_FOOTER, TOOLS_HEADER

__all__ = ["GLM_CHAT_TEMPLATE", "TOOLS_FOOTER", "TOOLS_HEADER"]

ROLES = ("system", "user", "assistant", "tool", "observation")




class ChatTemplateError(ValueError):
    """A message list that cannot be rendered. ``param`` names the offending request field."""

    def __init__(self, message: str, param: str = "messages") -> None:
        super().__init__(message)
        self.param = param


def visible_text(content: Any, where: str = "messages") -> str:
    """The text of a message ``content``: a string, ``None`` (empty), or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ChatTemplateError(
                    f"{where}.content[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported, "
                    f"got {json.dumps(part)[:80]}",
                    f"{where}.content",
                )
        return "".join(parts)
    raise ChatTemplateError(
        f"{where}.content must be a string, a list of text parts or null, got {type(content).__name__}",
        f"{where}.content",
    )


def split_reasoning(content: str) -> tuple[str, str]:
    """``(reasoning, content)`` of an assistant text that carries its thinking inline (``...</think>...``)."""
    if "</think>" not in content:
        return "", content
    before, after = content.split("</think>", 1)
    reasoning = before.split("<think>")[-1] if "<think>" in before else before
    return reasoning.strip("\n"), after.lstrip("\n")


def render_tool_call(call: dict, where: str) -> str:
    """``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``; string values raw,
    everything else JSON-encoded. Accepts OpenAI ``{"function": {"name", "arguments"}}`` (arguments a JSON
    object string) or a bare ``{"name", "arguments"}``."""
    if not isinstance(call, dict):
        raise ChatTemplateError(f"{where} must be an object, got {type(call).__name__}", where)
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ChatTemplateError(f"{where}.function.name must be a non-empty string", f"{where}.function.name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(
                f"{where}.function.arguments is not valid JSON ({exc.msg} at char {exc.pos}); "
                "expected a JSON object string",
                f"{where}.function.arguments",
            ) from None
    if not isinstance(arguments, dict):
        raise ChatTemplateError(
            f"{where}.function.arguments must encode a JSON object, got {type(arguments).__name__}",
            f"{where}.function.arguments",
        )
    out = [f"<tool_call>{name}"]
    for key, value in arguments.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out.append(f"<arg_key>{key}</arg_key><arg_value>{text}</arg_value>")
    out.append("</tool_call>")
    return "".join(out)


def render_tools(tools: list[dict]) -> str:
    """The ``<|system|>`` "# Tools" block: one JSON schema per line inside ``<tools></tools>``."""
    lines = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    return "<|system|>" + TOOLS_HEADER + lines + TOOLS_FOOTER


def render_chat(
    messages: list[dict],
    tools: list[dict] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """Render an OpenAI-style message list to the GLM prompt text (special tokens as text).

    ``enable_thinking``: the generation prompt opens a ``<think>`` block (True) or closes it at once.
    ``clear_thinking``: False keeps every earlier assistant turn's reasoning (preserved thinking).
    Raises :class:`ChatTemplateError` (one line, naming the field) for messages it cannot render.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object, got {type(m).__name__}", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role"
            )
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)

    out = ["[gMASK]<sop>"]
    if tools:
        out.append(render_tools(tools))
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m["role"]
        content = visible_text(m.get("content"), where)
        if role == "system":
            out.append("<|system|>" + content)
        elif role == "user":
            out.append("<|user|>" + content)
        elif role == "assistant":
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatTemplateError(f"{where}.reasoning_content must be a string", f"{where}.reasoning_content")
            if reasoning is None:
                reasoning, content = split_reasoning(content)
            out.append("<|assistant|>")
            keep_reasoning = (not clear_thinking or i > last_user) and reasoning.strip()
            out.append(f"<think>{reasoning.strip()}</think>" if keep_reasoning else "</think>")
            if content.strip():
                out.append(content.strip())
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatTemplateError(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
            out.extend(render_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls))
        else:  # tool results: consecutive results share one <|observation|>
            if i == 0 or messages[i - 1]["role"] not in ("tool", "observation"):
                out.append("<|observation|>")
            out.append(f"<tool_response>{content}</tool_response>")
    if add_generation_prompt:
        out.append("<|assistant|>" + ("<think>" if enable_thinking else "</think>"))
    return "".join(out)
