"""Chat messages -> prompt text: the checkpoint's own chat template, or the built-in GLM-5 renderer.

Which template renders a request (:func:`load_chat_template`, decided once at start-up):

1. ``--chat-template FILE`` when given;
2. the checkpoint's ``chat_template.jinja``, else the ``chat_template`` of its ``tokenizer_config.json``
   (transformers' order: the separate file wins);
3. only when the checkpoint ships none, the built-in GLM-5 renderer (:func:`render_chat`).

Jinja templates run in a sandbox configured as transformers configures it (``ImmutableSandboxedEnvironment``,
``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now`` and a ``tojson``
that does not HTML-escape; transformers ``utils/chat_template_utils.py``, ``_cached_compile_jinja_template``,
v5.24.0), with messages prepared as vLLM prepares them: tool-call ``arguments`` JSON strings decoded to
objects, a null ``content`` passed as an empty string.

The built-in renderer writes the GLM-4.7 / GLM-5 layout (no end-of-message token; a turn ends where the next
role tag starts)::

    [gMASK]<sop>
    <|system|>\\n# Tools ... <tools>\\n{tool JSON}\\n...</tools> ...      (only when tools are given)
    <|system|>SYSTEM  <|user|>USER
    <|assistant|><think>REASONING</think>CONTENT<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value></tool_call>
    <|observation|><tool_response>RESULT</tool_response><tool_response>...</tool_response>
    <|assistant|><think>            (generation prompt, thinking on)   or   <|assistant|></think>   (off)

GLM-4.5 and GLM-4.6 use a different layout (a newline after each role tag, ``/nothink``, no ``<think>`` in
the generation prompt, one tool argument per line: llama.cpp ``models/templates/GLM-4.6.jinja``); they are
served right by their own checkpoint template, not by the built-in renderer.

Thinking rules (as the GLM-4.7 template): an assistant turn keeps its reasoning (``<think>R</think>``) only
when it comes after the last user message (the current tool-calling cycle: interleaved thinking), unless
``clear_thinking=False`` (preserved thinking) keeps it everywhere; otherwise the turn starts with a bare
``</think>``. Reasoning that is only whitespace renders ``<think></think>``; inline ``...</think>...``
content keeps the text after the last ``</think>``; a tool result given as a list renders one
``<tool_response>`` per item. Tests compare this renderer byte for byte with the GLM-4.7 template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from model.chat_template import GLM_CHAT_TEMPLATE, TOOLS_FOOTER, TOOLS_HEADER

__all__ = ["GLM_CHAT_TEMPLATE", "TOOLS_FOOTER", "TOOLS_HEADER", "BUILTIN_SOURCE", "ChatTemplate",
           "ChatTemplateError", "load_chat_template", "prompt_opens_thinking", "render_chat", "template_kwargs"]

ROLES = ("system", "developer", "user", "assistant", "tool", "observation")
BUILTIN_SOURCE = "built-in GLM-5 renderer"
# Variables a request may not set through chat_template_kwargs: the server sets them itself.
RESERVED_KWARGS = ("messages", "tools", "documents", "add_generation_prompt", "chat_template", "tokenize")


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
    """``(reasoning, content)`` of an assistant text that carries its thinking inline (``...</think>...``):
    the reasoning before the first ``</think>`` (after its ``<think>``), the content after the last one."""
    if "</think>" not in content:
        return "", content
    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
    return reasoning, content.split("</think>")[-1].lstrip("\n")


def _arguments_object(function: dict, where: str) -> dict:
    """A tool call's ``arguments`` as a dict (OpenAI sends a JSON object string; vLLM decodes it likewise)."""
    arguments = function.get("arguments", {})
    if arguments is None:
        arguments = {}
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
    return arguments


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
    out = [f"<tool_call>{name}"]
    for key, value in _arguments_object(function, where).items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        out.append(f"<arg_key>{key}</arg_key><arg_value>{text}</arg_value>")
    out.append("</tool_call>")
    return "".join(out)


def render_tools(tools: list[dict]) -> str:
    """The ``<|system|>`` "# Tools" block: one JSON schema per line inside ``<tools></tools>``."""
    lines = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    return "<|system|>" + TOOLS_HEADER + lines + TOOLS_FOOTER


def _tool_result_items(content: list) -> str:
    """A tool result given as a list: one ``<tool_response>`` per item, its ``output`` or the item itself,
    written as Jinja writes a value (``str()``), which is what the GLM-4.7 template renders."""
    out = []
    for item in content:
        value = item["output"] if isinstance(item, dict) and "output" in item else item
        out.append(f"<tool_response>{value if isinstance(value, str) else str(value)}</tool_response>")
    return "".join(out)


def sent_reasoning(message: dict) -> tuple[str, Any]:
    """``(field name, value)`` of an assistant message's reasoning sent back: ``reasoning_content`` (DeepSeek,
    older vLLM) or ``reasoning`` (current vLLM, llama-index, dify); the first that is not null."""
    for name in ("reasoning_content", "reasoning"):
        if message.get(name) is not None:
            return name, message[name]
    return "reasoning_content", None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"messages[{i}] must be an object, got {type(m).__name__}", f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise ChatTemplateError(
                f"messages[{i}].role {m.get('role')!r} is not one of {', '.join(ROLES)}", f"messages[{i}].role"
            )


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
    _check_messages(messages)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)

    out = ["[gMASK]<sop>"]
    if tools:
        out.append(render_tools(tools))
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m["role"]
        if role in ("tool", "observation") and isinstance(m.get("content"), list):
            out.append("<|observation|>" + _tool_result_items(m["content"]))
            continue
        content = visible_text(m.get("content"), where)
        if role in ("system", "developer"):  # OpenAI's newer name for the system message
            out.append("<|system|>" + content)
        elif role == "user":
            out.append("<|user|>" + content)
        elif role == "assistant":
            name, reasoning = sent_reasoning(m)
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatTemplateError(f"{where}.{name} must be a string", f"{where}.{name}")
            if reasoning is None:
                reasoning, content = split_reasoning(content)
            out.append("<|assistant|>")
            # any non-empty reasoning is kept, even whitespace (then as <think></think>), as the template does
            keep_reasoning = (not clear_thinking or i > last_user) and reasoning
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


# ---- which template, and the request's template variables ----------------------------------------------

def template_kwargs(enable_thinking: Any = None, chat_template_kwargs: dict | None = None,
                    thinking: dict | None = None, reasoning_effort: str | None = None) -> dict[str, Any]:
    """The template variables of a request: ``chat_template_kwargs`` (vLLM / SGLang), with the thinking
    switches merged in, most specific first: top-level ``enable_thinking`` (vLLM), then
    ``chat_template_kwargs``, then the Z.ai ``thinking`` object, then OpenAI's ``reasoning_effort`` (GLM-5
    thinks or not, no levels: ``"none"`` turns thinking off, any other effort on). Only what the client set
    is passed, so a checkpoint template's own defaults hold otherwise. Raises :class:`ChatTemplateError`
    naming the field."""
    kwargs = dict(chat_template_kwargs or {})
    for name in RESERVED_KWARGS:
        if name in kwargs:
            raise ChatTemplateError(f"chat_template_kwargs.{name} is set by the server and cannot be overridden",
                                    "chat_template_kwargs")
    zai = thinking or {}
    if zai.get("type") not in (None, "enabled", "disabled"):
        raise ChatTemplateError(f"thinking.type must be 'enabled' or 'disabled', got {zai.get('type')!r}", "thinking")
    if zai.get("type") is not None:
        kwargs.setdefault("enable_thinking", zai["type"] == "enabled")
    if "clear_thinking" in zai:
        kwargs.setdefault("clear_thinking", zai["clear_thinking"])
    if reasoning_effort is not None:
        kwargs.setdefault("enable_thinking", reasoning_effort != "none")
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    for name in ("enable_thinking", "clear_thinking"):
        if name in kwargs and not isinstance(kwargs[name], bool):
            raise ChatTemplateError(f"{name} must be a boolean, got {json.dumps(kwargs[name])[:40]}", name)
    return kwargs


def prompt_opens_thinking(prompt: str) -> bool:
    """Whether generation starts inside a reasoning block: the rendered prompt ends in ``<think>``."""
    return prompt.rstrip().endswith("<think>")


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: plain json.dumps (Jinja's own filter HTML-escapes and takes no ensure_ascii)
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_jinja_template(source: str) -> Any:
    """A sandboxed ``jinja2.Template``, configured as transformers configures chat templates. The
    ``{% generation %}`` tag (assistant-mask marking for training) renders its body unchanged."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def prepare_messages(messages: list[dict]) -> list[dict]:
    """Messages as a Jinja chat template expects them (vLLM's preparation): a null ``content`` becomes "",
    tool-call ``arguments`` JSON strings become objects. The request's own objects are not modified."""
    _check_messages(messages)
    prepared = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m["role"] == "developer":  # rendered as the template renders system (not every template knows it)
            m["role"] = "system"
        if m["role"] == "assistant" and m.get("reasoning_content") is None and m.get("reasoning") is not None:
            m["reasoning_content"] = m["reasoning"]  # templates read reasoning_content
        content = m.get("content")
        if content is None:
            m["content"] = ""
        elif isinstance(content, list) and m["role"] in ("tool", "observation"):
            for j, item in enumerate(content):  # tool results: items are rendered by the template as they are
                if not isinstance(item, (str, dict)):
                    raise ChatTemplateError(f"messages[{i}].content[{j}] must be a string or an object, got "
                                            f"{type(item).__name__}", f"messages[{i}].content")
        else:
            visible_text(content, f"messages[{i}]")  # the same checks as the built-in renderer: text only
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, list):
                raise ChatTemplateError(f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
            new_calls = []
            for j, call in enumerate(calls):
                where = f"messages[{i}].tool_calls[{j}]"
                if not isinstance(call, dict):
                    raise ChatTemplateError(f"{where} must be an object, got {type(call).__name__}", where)
                call = dict(call)
                if isinstance(call.get("function"), dict):
                    call["function"] = {**call["function"], "arguments": _arguments_object(call["function"], where)}
                elif "arguments" in call:
                    call["arguments"] = _arguments_object(call, where)
                new_calls.append(call)
            m["tool_calls"] = new_calls
        prepared.append(m)
    return prepared


@dataclass
class ChatTemplate:
    """The prompt renderer a server uses: a Jinja ``source_text`` (checkpoint or file), or the built-in one.

    ``source`` says where it came from, for the start-up line and ``/v1/models``.
    ``special_tokens``: ``bos_token``/``eos_token``/... from tokenizer_config.json, passed to Jinja templates
    as transformers passes them.
    """

    source: str = BUILTIN_SOURCE
    source_text: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    _compiled: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.source_text is not None and self._compiled is None:
            import jinja2

            try:
                self._compiled = compile_jinja_template(self.source_text)
            except jinja2.TemplateSyntaxError as exc:
                raise ValueError(f"{self.source}: not a valid Jinja template (line {exc.lineno}: "
                                 f"{_one_line(exc.message or '')})") from None

    @property
    def is_builtin(self) -> bool:
        return self.source_text is None

    def render(self, messages: list[dict], tools: list[dict] | None = None,
               kwargs: dict[str, Any] | None = None, add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages``. ``kwargs``: template variables (:func:`template_kwargs`).
        Raises :class:`ChatTemplateError` (one line) for messages this template cannot render."""
        kwargs = dict(kwargs or {})
        if self.is_builtin:
            return render_chat(messages, tools, enable_thinking=kwargs.get("enable_thinking", True),
                               clear_thinking=kwargs.get("clear_thinking", True),
                               add_generation_prompt=add_generation_prompt)
        prepared = prepare_messages(messages)
        variables = {**self.special_tokens, **kwargs, "messages": prepared, "tools": tools or None,
                     "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except Exception as exc:  # the template is data: any failure is this request's problem, not a crash
            raise ChatTemplateError(f"the chat template ({self.source}) cannot render these messages: "
                                    f"{type(exc).__name__}: {_one_line(exc)}") from None


def _special_tokens(config: dict) -> dict[str, str]:
    tokens = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(name)
        if isinstance(value, dict):  # {"content": "<s>", ...} as older tokenizer configs write it
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _template_from_config(value: Any, where: str) -> str:
    """``chat_template`` of tokenizer_config.json: a string, or a list of ``{"name", "template"}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ValueError(f"{where}: chat_template is a list without a 'default' template "
                         f"(names: {', '.join(map(str, named)) or 'none'})")
    raise ValueError(f"{where}: chat_template must be a string or a list of named templates, "
                     f"got {type(value).__name__}")


def load_chat_template(checkpoint: str | Path | None, override: str | Path | None = None) -> ChatTemplate:
    """The template a server renders with (order in the module docstring). Raises ``ValueError`` with one
    line naming the file for an unreadable or invalid template."""
    config: dict = {}
    config_file = Path(checkpoint) / "tokenizer_config.json" if checkpoint is not None else None
    if config_file is not None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_file}: cannot read it ({_one_line(exc)})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file}: expected a JSON object")
    tokens = _special_tokens(config)

    def from_file(path: Path, source: str) -> ChatTemplate:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: cannot read the chat template ({_one_line(exc)})") from None
        if not text.strip():
            raise ValueError(f"{path}: the chat template file is empty")
        return ChatTemplate(source=source, source_text=text, special_tokens=tokens)

    if override is not None:
        path = Path(override).expanduser()
        return from_file(path, f"--chat-template {path}")
    if checkpoint is not None:
        jinja_file = Path(checkpoint) / "chat_template.jinja"
        if jinja_file.is_file():
            return from_file(jinja_file, f"checkpoint {jinja_file.name}")
        if config.get("chat_template") is not None:
            text = _template_from_config(config["chat_template"], str(config_file))
            return ChatTemplate(source=f"checkpoint {config_file.name}", source_text=text, special_tokens=tokens)
    return ChatTemplate()
