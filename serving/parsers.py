"""Split generated GLM text into reasoning, content and tool calls, incrementally.

One parser serves streaming and non-streaming responses: text is fed in whatever pieces the detokenizer
produces, and every call returns only what became certain. A piece that could be the start of a tag
(``</thi``) is held back until the next piece settles it, so tags split at any character boundary parse
the same as whole ones. Each behaviour follows a public reference parser:

* Reasoning (vLLM ``glm45`` / ``glm47`` reasoning parsers, SGLang ``Glm45Detector``): when the prompt ends in
  ``<think>`` the output is reasoning until ``</think>``; a ``<think>`` the model emits itself at the start is
  dropped, not reported as reasoning (vLLM glm47 cases ``reasoning_with_think``, ``think_no_end``...). When the
  prompt does not open a block, the output is content, but a ``<think>...</think>`` block the model opens at
  the very start is reasoning. With tools offered, a ``<tool_call>`` before any ``</think>`` also ends the
  reasoning (SGLang's ``tool_start_token``), so the call is parsed rather than swallowed.
* Tool calls (vLLM ``glm4_moe`` / ``glm47`` tool parsers, SGLang ``Glm47MoeDetector``), parsed only when the
  request offered tools: ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``,
  newlines between the parts allowed (GLM-4.5 style). The content is the text before the first call, trimmed
  (SGLang strips; vLLM keeps it as is), null when blank (both); text after the first call is dropped (vLLM's
  and SGLang's non-streaming results). Argument values are typed by the tool's JSON schema (:func:`decode_argument`).
* Streaming (vLLM / SGLang streaming, OpenAI delta shape): a call's name is sent as soon as it is complete
  (``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}``), then its ``arguments`` JSON
  in pieces (``{"index", "function": {"arguments": piece}}``): string values character by character as they
  arrive, other values when their ``</arg_value>`` arrives. The pieces concatenate to exactly the arguments a
  non-streaming response reports. A call still open when generation ends is closed (``stream=True``: its
  pieces were already sent) or returned as plain content (``stream=False``, vLLM's non-streaming rule).
"""

from __future__ import annotations

import ast
import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
KEY_OPEN, KEY_CLOSE = "<arg_key>", "</arg_key>"
VALUE_OPEN, VALUE_CLOSE = "<arg_value>", "</arg_value>"
MAX_NAME_CHARS = 256  # a "name" longer than this without a terminator is not a tool call
MAX_LITERAL_CHARS = 100_000  # ast.literal_eval is not for arbitrarily large inputs


@dataclass
class ToolCallDelta:
    """A piece of one tool call: its opening (``name`` and ``id`` set, no arguments yet) or an arguments piece."""

    index: int
    arguments: str = ""
    name: str | None = None
    id: str | None = None

    def to_openai(self) -> dict:
        """The OpenAI ``choices[].delta.tool_calls[]`` entry."""
        if self.name is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def merge_tool_calls(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Whole tool calls from their streamed pieces."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        if d.name is not None:
            calls[d.index] = ToolCall(d.name, d.arguments, d.id or "call_" + uuid.uuid4().hex[:24])
        else:
            calls[d.index].arguments += d.arguments
    return [calls[i] for i in sorted(calls)]


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def add_arguments(self, index: int, piece: str) -> None:
        if not piece:
            return
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == index and last.name is None:
            last.arguments += piece  # one delta per call per feed, not one per character
        else:
            self.tool_calls.append(ToolCallDelta(index, piece))

    def extend(self, other: ParsedDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        for d in other.tool_calls:
            if d.name is None:
                self.add_arguments(d.index, d.arguments)
            else:
                self.tool_calls.append(d)

    def calls(self) -> list[ToolCall]:
        return merge_tool_calls(self.tool_calls)


def _held_suffix(text: str, *tags: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``tags`` (may become it)."""
    for n in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(t.startswith(text[-n:]) and len(t) > n for t in tags):
            return n
    return 0


def _find_first(text: str, *tags: str) -> tuple[int, str | None]:
    """Position and tag of the earliest of ``tags`` in ``text``; ``(-1, None)`` when none occurs."""
    best, found = -1, None
    for tag in tags:
        at = text.find(tag)
        if at >= 0 and (best < 0 or at < best):
            best, found = at, tag
    return best, found


def _escape(text: str) -> str:
    """``text`` as the inside of a JSON string (JSON escaping is per character, so pieces concatenate)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# ---- argument values ------------------------------------------------------------------------------------

def _declared_types(tools: list[dict] | None) -> dict[str, dict[str, set[str]]]:
    """``{tool name: {argument: set of JSON schema types}}`` from OpenAI tool definitions."""
    out: dict[str, dict[str, set[str]]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        params = fn.get("parameters") if isinstance(fn.get("parameters"), dict) else {}
        props = params.get("properties") if isinstance(params.get("properties"), dict) else {}
        types: dict[str, set[str]] = {}
        for key, schema in props.items():
            declared = schema.get("type") if isinstance(schema, dict) else None
            if isinstance(declared, str):
                types[key] = {declared}
            elif isinstance(declared, list):
                types[key] = {t for t in declared if isinstance(t, str)}
        out[fn["name"]] = types
    return out


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    return {str: "string", list: "array", dict: "object", type(None): "null"}.get(type(value), "unknown")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN / Infinity, json.dumps would write them


def _parse_value(text: str) -> tuple[Any, bool]:
    """``(value, parsed)``: JSON, then JSON after one level of unescaping (``[\\"a\\"]``), then a Python
    literal (``True``, ``'a'``, ``(1, 2)``); otherwise the text itself (SGLang ``parse_arguments`` order)."""
    try:
        return json.loads(text, parse_constant=_reject_constant), True
    except ValueError:
        pass
    try:
        unescaped = json.loads('"' + text + '"')
        if unescaped != text:
            return json.loads(unescaped, parse_constant=_reject_constant), True
    except ValueError:
        pass
    if len(text) <= MAX_LITERAL_CHARS:
        try:
            value = ast.literal_eval(text)
            if isinstance(value, (set, frozenset)):
                value = sorted(value, key=repr)
            return json.loads(json.dumps(value, allow_nan=False)), True  # tuples -> lists; fails for non-JSON
        except Exception:  # literal_eval raises ValueError, SyntaxError, TypeError, MemoryError, RecursionError
            pass
    return text, False


def _coerce_number(value: Any, types: set[str]) -> Any:
    """A quoted number for an integer/number argument becomes the number (SGLang ``_coerce_numeric_string``)."""
    if not isinstance(value, str) or "string" in types:
        return value
    try:
        if "integer" in types:
            return int(value)
        if "number" in types:
            number = float(value) if any(c in value for c in ".eE") else int(value)
            return number if not isinstance(number, float) or math.isfinite(number) else value
    except ValueError:
        pass
    return value


def decode_argument(raw: str, types: set[str] | None = None) -> Any:
    """One ``<arg_value>`` as a JSON value, the tool schema's declared ``types`` deciding.

    Declared ``string``: the raw text, whitespace kept (vLLM), unless it is a JSON string literal, which is
    decoded (SGLang: ``"Paris"`` -> ``Paris``). Otherwise (vLLM ``_deserialize``, SGLang ``parse_arguments``):
    JSON, unescaped JSON, a Python literal, else the stripped text; a quoted number is coerced for an
    integer/number argument; a value whose type the schema does not allow stays the raw text when the schema
    allows a string.
    """
    types = types or set()
    if types == {"string"}:
        try:
            value = json.loads(raw)
        except ValueError:
            return raw
        return value if isinstance(value, str) else raw
    text = raw.strip()
    value, _ = _parse_value(text)
    value = _coerce_number(value, types)
    if types and "string" in types and _json_type(value) not in types | ({"integer"} if "number" in types else set()):
        return raw
    return value


# ---- the parser -----------------------------------------------------------------------------------------

class GLMOutputParser:
    """Incremental reasoning / content / tool-call splitter for one generated sequence.

    ``thinking``: the prompt ended in ``<think>`` (output starts as reasoning).
    ``tools``: the request's tool definitions; None or empty disables tool-call parsing.
    ``stream``: tool-call pieces are reported as they arrive (True) or only once their call closes (False).
    """

    def __init__(self, thinking: bool, tools: list[dict] | None = None, stream: bool = True) -> None:
        self.state = "think_start" if thinking else "content_start"
        self.tools = tools
        self.parse_tools = bool(tools)
        self.types = _declared_types(tools)
        self.stream = stream
        self.buffer = ""  # text not yet settled (a possible partial tag, a name, a held value)
        self.num_tool_calls = 0
        self.content_started = False  # some non-blank content has been reported
        self.held_space = ""  # trailing content whitespace: dropped if a call follows
        # the call being parsed
        self.call_raw = ""  # its text so far, to give back as content when it never becomes a call
        self.call_name = ""
        self.call_args_open = False  # "{" already written
        self.key = ""
        self.value = ""
        self.value_mode = ""  # "pending" (string, first character not seen), "stream", "hold"
        self.pending = ParsedDelta()  # this call's pieces, while stream=False

    # -- public ------------------------------------------------------------------------------------------
    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        out = ParsedDelta()
        while self.buffer and self._step(out):
            pass
        return out

    def finish(self) -> ParsedDelta:
        """End of generation: report everything still held."""
        out = self.feed("")
        buf, self.buffer = self.buffer, ""
        if self.state in ("think_start", "reasoning"):
            out.reasoning += buf
        elif self.state in ("content_start", "content"):
            out.content += self.held_space + buf
            self.held_space = ""
        elif self.state in ("call_name", "malformed"):
            self._give_back_call(out, buf)
        elif self.state != "after_call":  # a named call still open
            self.call_raw += buf
            if self.stream:
                self._close_value_early(out, buf)
                self._emit_args(out, "}" if self.call_args_open else "{}")
                self.num_tool_calls += 1  # its name was sent: finish_reason "tool_calls" when it stopped there
            else:
                self._give_back_call(out, "")
        self.state = "done"
        return out

    # -- states --------------------------------------------------------------------------------------------
    def _step(self, out: ParsedDelta) -> bool:
        """Consume what the current state can settle; False when it must wait for more text."""
        return getattr(self, "_state_" + self.state)(out)

    def _state_done(self, out: ParsedDelta) -> bool:
        raise RuntimeError("feed() after finish()")

    def _state_think_start(self, out: ParsedDelta) -> bool:
        # The prompt opened <think>; a model that writes it again starts with a redundant one.
        if self.buffer.startswith(THINK_OPEN):
            self.buffer = self.buffer[len(THINK_OPEN):]
        elif THINK_OPEN.startswith(self.buffer):
            return False
        self.state = "reasoning"
        return True

    def _state_reasoning(self, out: ParsedDelta) -> bool:
        tags = (THINK_CLOSE, CALL_OPEN) if self.parse_tools else (THINK_CLOSE,)
        at, tag = _find_first(self.buffer, *tags)
        if at < 0:
            keep = _held_suffix(self.buffer, *tags)
            out.reasoning += self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        out.reasoning += self.buffer[:at]
        if tag == THINK_CLOSE:
            self.buffer = self.buffer[at + len(THINK_CLOSE):]
            self.state = "content"
        else:  # a call before </think> ends the reasoning (SGLang): parse it
            self.buffer = self.buffer[at:]
            self.state = "content"
        return True

    def _state_content_start(self, out: ParsedDelta) -> bool:
        # Only whitespace so far: the model may still open its own <think> block.
        stripped = self.buffer.lstrip()
        if stripped.startswith(THINK_OPEN):
            self.buffer = stripped[len(THINK_OPEN):]
            self.state = "reasoning"
            return True
        if THINK_OPEN.startswith(stripped):
            return False  # empty, or a prefix of <think>
        self.state = "content"
        return True

    def _state_content(self, out: ParsedDelta) -> bool:
        if not self.parse_tools:
            out.content += self.buffer
            self.buffer = ""
            return False
        if not self.content_started:  # leading whitespace never reaches the content
            self.buffer = self.buffer.lstrip()
            if not self.buffer:
                return False
        at = self.buffer.find(CALL_OPEN)
        if at >= 0:
            text = self.buffer[:at]
            self._emit_content(out, text.rstrip())
            self.held_space += text[len(text.rstrip()):]
            self._open_call(self.buffer[at + len(CALL_OPEN):])
            return True
        keep = _held_suffix(self.buffer, CALL_OPEN)
        text = self.buffer[: len(self.buffer) - keep]
        settled = text.rstrip()
        self._emit_content(out, settled)
        self.held_space += text[len(settled):]
        self.buffer = self.buffer[len(text):]
        return False

    def _emit_content(self, out: ParsedDelta, text: str) -> None:
        if text:
            out.content += self.held_space + text
            self.held_space = ""
            self.content_started = True

    def _open_call(self, rest: str) -> None:
        self.call_raw = self.held_space + CALL_OPEN
        self.held_space = ""
        self.buffer = rest
        self.state = "call_name"
        self.call_name, self.call_args_open, self.pending = "", False, ParsedDelta()

    def _state_call_name(self, out: ParsedDelta) -> bool:
        at, tag = _find_first(self.buffer, "\n", KEY_OPEN, CALL_CLOSE)
        if at < 0:
            if len(self.buffer) > MAX_NAME_CHARS:
                self.state = "malformed"
                return True
            return False
        name = self.buffer[:at].strip()
        if not name or any(c in name for c in "<> \t"):
            self.state = "malformed"
            return True
        self.call_raw += self.buffer[: at + len(tag)]
        self.buffer = self.buffer[at + len(tag):]
        self.call_name = name
        call_id = "call_" + uuid.uuid4().hex[:24]
        self._target(out).tool_calls.append(ToolCallDelta(self.num_tool_calls, "", name, call_id))
        if tag == CALL_CLOSE:
            self._close_call(out)
        else:
            self.state = "arg_key" if tag == KEY_OPEN else "call_body"
        return True

    def _state_malformed(self, out: ParsedDelta) -> bool:
        # Not a well-formed call: keep its text (as content before any call, like the rest of that text).
        at = self.buffer.find(CALL_CLOSE)
        if at < 0:
            return False
        self._give_back_call(out, self.buffer[: at + len(CALL_CLOSE)])
        self.buffer = self.buffer[at + len(CALL_CLOSE):]
        self.state = "content" if self.num_tool_calls == 0 else "after_call"
        return True

    def _take_call_text_through(self, *tags: str) -> str | None:
        """Move the call's text up to and including the first of ``tags`` from the buffer into ``call_raw``
        and return that tag; with none of them yet, move all but a possible tag prefix and return None."""
        at, tag = _find_first(self.buffer, *tags)
        if at < 0:
            keep = _held_suffix(self.buffer, *tags)
            self.call_raw += self.buffer[: len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return None
        self.call_raw += self.buffer[: at + len(tag)]
        self.buffer = self.buffer[at + len(tag):]
        return tag

    def _state_call_body(self, out: ParsedDelta) -> bool:
        tag = self._take_call_text_through(KEY_OPEN, CALL_CLOSE)
        if tag is None:
            return False
        if tag == CALL_CLOSE:
            self._close_call(out)
        else:
            self.state = "arg_key"
        return True

    def _state_arg_key(self, out: ParsedDelta) -> bool:
        at, tag = _find_first(self.buffer, KEY_CLOSE, CALL_CLOSE)
        if at < 0:
            return False
        self.call_raw += self.buffer[: at + len(tag)]
        key, self.buffer = self.buffer[:at], self.buffer[at + len(tag):]
        if tag == CALL_CLOSE:  # a key without a value: dropped
            self._close_call(out)
            return True
        self.key = key.strip()
        self.state = "arg_wait"
        return True

    def _state_arg_wait(self, out: ParsedDelta) -> bool:
        tag = self._take_call_text_through(VALUE_OPEN, CALL_CLOSE)
        if tag is None:
            return False
        if tag == CALL_CLOSE:
            self._close_call(out)
            return True
        types = self.types.get(self.call_name, {}).get(self.key)
        self.value_mode = "pending" if types == {"string"} else "hold"
        self.value = ""
        self.state = "arg_value"
        return True

    def _state_arg_value(self, out: ParsedDelta) -> bool:
        at = self.buffer.find(VALUE_CLOSE)
        end = at if at >= 0 else len(self.buffer) - _held_suffix(self.buffer, VALUE_CLOSE)
        piece = self.buffer[:end]
        self.call_raw += self.buffer[: at + len(VALUE_CLOSE)] if at >= 0 else piece
        self.buffer = self.buffer[at + len(VALUE_CLOSE):] if at >= 0 else self.buffer[end:]
        self.value += piece
        if self.value_mode == "pending" and self.value.strip():
            if self.value.lstrip().startswith('"'):
                self.value_mode = "hold"  # may be a JSON string literal: decided at the close
            else:
                self.value_mode = "stream"
                self._emit_args(out, self._key_prefix() + '"' + _escape(self.value))
                piece = ""
        if self.value_mode == "stream" and piece:
            self._emit_args(out, _escape(piece))
        if at < 0:
            return False
        self._end_value(out)
        self.state = "call_body"
        return True

    def _state_after_call(self, out: ParsedDelta) -> bool:
        # Text after the first call is not content (vLLM / SGLang non-streaming); further calls are parsed.
        at = self.buffer.find(CALL_OPEN)
        if at < 0:
            self.buffer = self.buffer[len(self.buffer) - _held_suffix(self.buffer, CALL_OPEN):]
            return False
        self._open_call(self.buffer[at + len(CALL_OPEN):])
        self.call_raw = CALL_OPEN
        return True

    # -- helpers -----------------------------------------------------------------------------------------
    def _target(self, out: ParsedDelta) -> ParsedDelta:
        return out if self.stream else self.pending

    def _emit_args(self, out: ParsedDelta, piece: str) -> None:
        self._target(out).add_arguments(self.num_tool_calls, piece)

    def _key_prefix(self) -> str:
        prefix = (", " if self.call_args_open else "{") + json.dumps(self.key, ensure_ascii=False) + ": "
        self.call_args_open = True
        return prefix

    def _end_value(self, out: ParsedDelta) -> None:
        if self.value_mode == "stream":
            self._emit_args(out, '"')
        elif self.value_mode == "pending":  # blank string value
            self._emit_args(out, self._key_prefix() + json.dumps(self.value, ensure_ascii=False))
        else:
            types = self.types.get(self.call_name, {}).get(self.key)
            value = decode_argument(self.value, types)
            self._emit_args(out, self._key_prefix() + json.dumps(value, ensure_ascii=False))
        self.value_mode, self.value = "", ""

    def _close_value_early(self, out: ParsedDelta, tail: str) -> None:
        """Generation ended inside a value: end it with what arrived (a partial closing tag dropped)."""
        if self.state == "arg_value":
            self.value += tail[: len(tail) - _held_suffix(tail, VALUE_CLOSE)]
            if self.value_mode == "stream":
                self._emit_args(out, _escape(tail[: len(tail) - _held_suffix(tail, VALUE_CLOSE)]))
            self._end_value(out)

    def _close_call(self, out: ParsedDelta) -> None:
        self._emit_args(out, "}" if self.call_args_open else "{}")
        if not self.stream:
            out.extend(self.pending)
            self.pending = ParsedDelta()
        self.num_tool_calls += 1
        self.held_space = ""
        self.state = "after_call"

    def _give_back_call(self, out: ParsedDelta, tail: str) -> None:
        """A call that never completed, as text: content when no call came before it, else dropped."""
        if self.num_tool_calls == 0:
            out.content += self.call_raw + tail
            self.content_started = True
        self.pending = ParsedDelta()


def parse_output(text: str, thinking: bool, tools: list[dict] | None = None) -> ParsedDelta:
    """Non-streaming convenience: the whole generated text at once (``calls()`` gives the tool calls)."""
    parser = GLMOutputParser(thinking, tools, stream=False)
    out = parser.feed(text)
    out.extend(parser.finish())
    return out
