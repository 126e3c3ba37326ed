"""Split generated GLM text into reasoning, content and tool calls, incrementally.

The same parser serves streaming and non-streaming responses: text is fed in whatever pieces the
detokenizer produces, and every call returns only what became certain. A piece that could be the
start of a tag (``</thi``) is held back until the next piece settles it, so tags split at any
character boundary parse the same as whole ones.

* Reasoning (glm45-style): with thinking on, the prompt ends in ``<think>``, so output is reasoning
  until ``</think>``. With thinking off, output is content; a ``<think>...</think>`` block the model
  opens at the very start is still reported as reasoning.
* Tool calls (glm45/glm47-style), parsed in content only when the request offered tools:
  ``<tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>...</tool_call>``. Argument values are
  typed by the tool's JSON schema (``"type": "string"`` keeps the raw text, anything else is
  JSON-decoded when it parses). Each call is reported once it closes, as one OpenAI tool call with
  its full ``arguments`` JSON. A call still open when generation ends, or one without a name, is
  returned as plain content, never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_ARG_PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass
class ParsedDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)

    def extend(self, other: ParsedDelta) -> None:
        self.reasoning += other.reasoning
        self.content += other.content
        self.tool_calls += other.tool_calls


def _held_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag`` (could still become it)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _param_types(tools: list[dict] | None) -> dict[str, dict[str, str]]:
    """``{tool name: {argument: JSON schema type}}`` from OpenAI tool definitions."""
    types: dict[str, dict[str, str]] = {}
    for tool in tools or []:
        fn = tool.get("function", tool) if isinstance(tool, dict) else {}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            continue
        props = (fn.get("parameters") or {}).get("properties") or {}
        types[fn["name"]] = {k: v.get("type") for k, v in props.items() if isinstance(v, dict)}
    return types


def parse_tool_call(body: str, tools: list[dict] | None = None) -> ToolCall | None:
    """Parse the text between ``<tool_call>`` and ``</tool_call>``; None when it names no function."""
    name, _, rest = body.partition("<arg_key>")
    name = name.strip()
    if not name or "<" in name:
        return None
    types = _param_types(tools).get(name, {})
    arguments = {}
    for key, raw in _ARG_PAIR.findall("<arg_key>" + rest if rest else ""):
        key = key.strip()
        if types.get(key) == "string":
            arguments[key] = raw
            continue
        try:
            arguments[key] = json.loads(raw)
        except json.JSONDecodeError:
            arguments[key] = raw
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


class GLMOutputParser:
    """Incremental reasoning / content / tool-call splitter for one generated sequence.

    ``thinking``: the prompt ended in ``<think>`` (output starts as reasoning).
    ``tools``: the request's tool definitions; None or empty disables tool-call parsing.
    """

    def __init__(self, thinking: bool, tools: list[dict] | None = None) -> None:
        self.state = "reasoning" if thinking else "content_start"
        self.tools = tools
        self.parse_tools = bool(tools)
        self.buffer = ""  # text not yet reported (a possible partial tag, or an open tool call)
        self.num_tool_calls = 0

    def feed(self, text: str) -> ParsedDelta:
        self.buffer += text
        out = ParsedDelta()
        while self.buffer:
            if not self._step(out):
                break
        return out

    def finish(self) -> ParsedDelta:
        """End of generation: report everything still held (an unclosed tool call as content)."""
        out = self.feed("")
        if self.buffer:
            if self.state == "reasoning":
                out.reasoning += self.buffer
            elif self.state == "tool_call":
                out.content += CALL_OPEN + self.buffer
            else:
                out.content += self.buffer
            self.buffer = ""
        return out

    def _step(self, out: ParsedDelta) -> bool:
        """Consume what the current state can settle; False when it must wait for more text."""
        buf = self.buffer
        if self.state == "reasoning":
            return self._until(THINK_CLOSE, out, "reasoning", next_state="content")
        if self.state == "content_start":
            # Only whitespace so far: the model may still open its own <think> block.
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.buffer = stripped[len(THINK_OPEN):]
                self.state = "reasoning"
                return True
            if THINK_OPEN.startswith(stripped):
                return False  # empty, or a prefix of <think>
            self.state = "content"
            return True
        if self.state == "content":
            if not self.parse_tools:
                out.content += buf
                self.buffer = ""
                return False
            return self._until(CALL_OPEN, out, "content", next_state="tool_call")
        # inside a tool call: wait for its end, then parse it whole
        end = buf.find(CALL_CLOSE)
        if end < 0:
            return False
        call = parse_tool_call(buf[:end], self.tools)
        if call is None:  # not a well-formed call: keep the text, do not drop it
            out.content += CALL_OPEN + buf[: end + len(CALL_CLOSE)]
        else:
            out.tool_calls.append(call)
            self.num_tool_calls += 1
        self.buffer = buf[end + len(CALL_CLOSE):]
        self.state = "content"
        return True

    def _until(self, tag: str, out: ParsedDelta, kind: str, next_state: str) -> bool:
        buf = self.buffer
        at = buf.find(tag)
        if at >= 0:
            setattr(out, kind, getattr(out, kind) + buf[:at])
            self.buffer = buf[at + len(tag):]
            self.state = next_state
            return True
        keep = _held_suffix(buf, tag)
        setattr(out, kind, getattr(out, kind) + buf[: len(buf) - keep])
        self.buffer = buf[len(buf) - keep:]
        return False


def parse_output(text: str, thinking: bool, tools: list[dict] | None = None) -> ParsedDelta:
    """Non-streaming convenience: the whole generated text at once."""
    parser = GLMOutputParser(thinking, tools)
    out = parser.feed(text)
    out.extend(parser.finish())
    return out
