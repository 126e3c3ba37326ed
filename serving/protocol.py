"""The OpenAI wire format of the server: request schemas, error bodies and response bodies.

Nothing here touches the app or the engine thread: :mod:`serving.api` parses requests with these
schemas and turns engine events into these bodies.

* Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with one-line
  messages; handlers raise :class:`APIError` and the app renders it with :func:`error_response`.
* A new request parameter is a field on :class:`SamplingFields` (both endpoints) or on one
  request class; strict pydantic types give the 400 naming the field for free
  (:func:`validation_message`). ``serving.api.sampling_params`` maps it to the engine.
* :class:`ChatResponse` and :class:`CompletionResponse` build one request's bodies from engine
  events, streamed (``opening`` + ``chunks``) or whole.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import EngineEvent
from .parsers import GLMOutputParser

# ---- errors --------------------------------------------------------------------------------------

class APIError(Exception):
    """A request the server answers with an OpenAI error body: raise it anywhere in a handler."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---- request schemas -------------------------------------------------------------------------

class SamplingFields(BaseModel):
    # strict: "5" is not a number and 1 is not a bool; unknown OpenAI fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    # Accepted so that asking for them is a clear 400, not a silently ignored field.
    logprobs: bool | int | None = None
    response_format: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # Z.ai API style: {"type": "enabled"|"disabled", "clear_thinking": bool}


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False


def validation_message(exc: ValidationError) -> tuple[str, str]:
    """One line naming the first bad field, e.g. ``max_tokens: Input should be greater than or equal to 1``."""
    errors = exc.errors()
    loc = errors[0]["loc"]
    param = str(loc[0]) + "".join(f"[{p}]" for p in loc[1:] if isinstance(p, int))
    same_field = [e for e in errors if e["loc"][:1] == loc[:1]]
    reasons = list(dict.fromkeys(e["msg"] for e in same_field))  # a union field fails once per member
    got = errors[0].get("input")
    shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, type(None))) else type(got).__name__
    if errors[0]["type"] == "missing":
        return f"{param}: field required", param
    return f"{param}: {' or '.join(reasons)} (got {shown})", param


# ---- response bodies -----------------------------------------------------------------------------

def usage(event: EngineEvent) -> dict:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def engine_error(event: EngineEvent) -> dict:
    return {"error": {"message": event.error or "request failed", "type": "server_error", "param": None,
                      "code": "engine_error"}}


class ChatResponse:
    """OpenAI chat.completion / chat.completion.chunk bodies of one request, from engine events:
    reasoning and content separated, tool calls parsed, finish_reason ``tool_calls`` when any."""

    def __init__(self, request_id: str, model: str, parser: GLMOutputParser, include_usage: bool = False) -> None:
        self.request_id, self.model, self.parser, self.include_usage = request_id, model, parser, include_usage
        self.created = int(time.time())
        self.num_tool_calls = 0

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> dict:
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def _finish_reason(self, engine_reason: str | None) -> str | None:
        return "tool_calls" if self.num_tool_calls and engine_reason == "stop" else engine_reason

    def first_chunk(self) -> dict:
        return self._chunk({"role": "assistant", "content": ""})

    def opening(self) -> list[dict]:
        """What a stream sends before any token: the assistant role."""
        return [self.first_chunk()]

    def chunks(self, event: EngineEvent) -> list[dict]:
        """The stream chunks for one engine event (the last one also ends the choice)."""
        parsed = self.parser.feed(event.text)
        if event.finished:
            parsed.extend(self.parser.finish())
        out = []
        if parsed.reasoning:
            out.append(self._chunk({"reasoning_content": parsed.reasoning}))
        if parsed.content:
            out.append(self._chunk({"content": parsed.content}))
        # tool calls stream as pieces: name first, then arguments (serving/parsers.py)
        out.extend(self._chunk({"tool_calls": [d.to_openai()]}) for d in parsed.tool_calls)
        self.num_tool_calls = self.parser.num_tool_calls
        if event.finished:
            if event.finish_reason == "error":
                out.append(engine_error(event))
                return out
            out.append(self._chunk({}, self._finish_reason(event.finish_reason)))
            if self.include_usage:
                out.append({"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                            "model": self.model, "choices": [], "usage": usage(event)})
        return out

    def whole(self, text: str, last: EngineEvent) -> dict:
        """The non-streaming body for the complete generated ``text``."""
        parsed = self.parser.feed(text)
        parsed.extend(self.parser.finish())
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content or None,
                                   "reasoning_content": parsed.reasoning or None}
        calls = parsed.calls()
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
            self.num_tool_calls = len(calls)
        return {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": self._finish_reason(last.finish_reason)}],
                "usage": usage(last)}


class CompletionResponse:
    """OpenAI text_completion bodies of one request, from engine events."""

    def __init__(self, request_id: str, model: str, include_usage: bool = False) -> None:
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.created = int(time.time())

    def _body(self, text: str, finish_reason: str | None = None) -> dict:
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, event: EngineEvent) -> list[dict]:
        """The stream chunks for one engine event (the last one also ends the choice)."""
        if event.finished and event.finish_reason == "error":
            return [engine_error(event)]
        out = []
        if event.text or event.finished:
            out.append(self._body(event.text, event.finish_reason if event.finished else None))
        if event.finished and self.include_usage:
            out.append({"id": self.request_id, "object": "text_completion", "created": self.created,
                        "model": self.model, "choices": [], "usage": usage(event)})
        return out

    def whole(self, text: str, last: EngineEvent) -> dict:
        """The non-streaming body for the complete generated ``text``."""
        body = self._body(text, last.finish_reason)
        body["usage"] = usage(last)
        return body
