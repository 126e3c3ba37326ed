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
from dataclasses import dataclass
from typing import Any, Callable

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .engine import EngineEvent
from .parsers import GLMOutputParser, ToolCall
from .sampling import TokenLogprob

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

# Request fields of the OpenAI API that do not change what this server generates: accepted and ignored (a
# debug log names them). ``modalities`` other than ["text"], and ``audio`` / ``web_search_options`` /
# ``functions`` / ``function_call`` (serving.api.CHAT_REFUSED) ask for what this server cannot do: a 400.
IGNORED_FIELDS = ("store", "service_tier", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
                  "safety_identifier", "verbosity", "prediction", "moderation", "user", "metadata", "modalities")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


class RequestBody(BaseModel):
    """Strict request schema: "5" is not a number and 1 is not a bool. Fields no schema knows are kept in
    ``model_extra``: :func:`serving.api.parse_request` logs them once (vLLM's choice) or, with
    ``--strict-request-fields``, answers 400 naming them. A known field sent as null means "the default"
    (the OpenAI SDK and others send ``"n": null``, ``"stream": null``)."""

    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class SamplingFields(RequestBody):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=64)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = None
    min_tokens: int = Field(default=0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)  # vLLM: the prompt tokens' logprobs
    # accepted and ignored (IGNORED_FIELDS): OpenAI bookkeeping and hints with no effect on the output
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    moderation: Any = None


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # Z.ai API style: {"type": "enabled"|"disabled", "clear_thinking": bool}
    reasoning_effort: str | None = None  # "none": thinking off; any other effort: on (docs/serving.md)
    verbosity: str | None = None
    prediction: dict[str, Any] | None = None
    modalities: list[str] | None = None  # only ["text"]
    audio: dict[str, Any] | None = None  # audio output: 400 unless null
    web_search_options: dict[str, Any] | None = None  # 400 unless null
    functions: list[dict[str, Any]] | None = None  # deprecated: 400 unless null (use tools)
    function_call: str | dict[str, Any] | None = None  # deprecated: 400 unless null (use tool_choice)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0: score the prompt only (echo + logprobs)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: a completion ``prompt`` or chat ``messages`` (rendered with the generation prompt)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    add_special_tokens: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


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
    if errors[0]["type"] == "extra_forbidden":
        return (f"{param}: unknown parameter; this server does not implement it (docs/serving.md lists the "
                "parameters)"), param
    return f"{param}: {' or '.join(reasons)} (got {shown})", param


# ---- response bodies -----------------------------------------------------------------------------
#
# A response has one choice per generated sequence (``n`` per prompt; completions may batch prompts);
# engine events arrive tagged with their choice's index. ``usage`` counts each prompt once.

TokenText = Callable[[int], str]  # one token id's text, for logprobs


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def engine_error(event: EngineEvent) -> dict:
    return {"error": {"message": event.error or "request failed", "type": "server_error", "param": None,
                      "code": "engine_error"}}


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict:
    def one(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries]}


def completion_logprobs(entries: list[TokenLogprob | None], token_text: TokenText, offset: int,
                        first_token: int | None = None) -> dict:
    """OpenAI's legacy logprobs object. ``top_logprobs`` always holds the token itself besides the top
    alternatives (OpenAI and vLLM). An entry None is a prompt's first token (echo): no logprob, its id is
    ``first_token``."""
    tokens, offsets, token_logprobs, tops = [], [], [], []
    for e in entries:
        text = token_text(first_token if e is None else e.token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(None if e is None else e.logprob)
        tops.append(None if e is None else {**{token_text(t): lp for t, lp in e.top}, text: e.logprob})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def vllm_prompt_logprobs(entries: list[TokenLogprob | None], token_text: TokenText) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{token id: {logprob, rank,
    decoded_token}}`` holding the token itself and its top alternatives. ``rank`` (1 = most likely) is known
    for tokens among the alternatives; for a prompt token outside them it is null."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranks = {t: r + 1 for r, (t, _) in enumerate(e.top)}
        row = {str(e.token_id): {"logprob": e.logprob, "rank": ranks.get(e.token_id),
                                 "decoded_token": token_text(e.token_id)}}
        for t, lp in e.top:
            row.setdefault(str(t), {"logprob": lp, "rank": ranks[t], "decoded_token": token_text(t)})
        out.append(row)
    return out


def stream_usage(event: EngineEvent) -> dict:
    """``stream_options.continuous_usage_stats`` (vLLM): the choice's usage so far, on every chunk."""
    return usage_of(event.prompt_tokens, event.completion_tokens)


@dataclass
class ForcedTools:
    """``tool_choice`` "required" or a named function: the output is JSON constrained by a grammar (vLLM's
    design), turned into tool calls here. Named: the arguments object; required: a list of
    ``{"name", "parameters"}``."""

    name: str | None  # None: "required"

    def calls(self, content: str) -> list[ToolCall] | None:
        try:
            value = json.loads(content)
        except json.JSONDecodeError:
            return None  # cut short (length): reported as content
        if self.name is not None:
            return [ToolCall(self.name, json.dumps(value, ensure_ascii=False))]
        return [ToolCall(c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False)) for c in value]


class _ChatChoice:
    def __init__(self, parser: GLMOutputParser) -> None:
        self.parser = parser
        self.num_tool_calls = 0
        self.held = ""  # forced tool calls: the JSON content, converted when the choice ends


class ChatResponse:
    """OpenAI chat.completion / chat.completion.chunk bodies of one request, from engine events:
    reasoning and content separated, tool calls parsed, finish_reason ``tool_calls`` when any."""

    def __init__(self, request_id: str, model: str, parsers: list[GLMOutputParser], include_usage: bool = False,
                 token_text: TokenText | None = None, forced: ForcedTools | None = None,
                 prompt_text: TokenText | None = None) -> None:
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.choices = [_ChatChoice(p) for p in parsers]
        self.token_text, self.forced = token_text, forced  # token_text: logprobs asked for
        self.prompt_text = prompt_text  # prompt_logprobs asked for (vLLM): the top-level ``prompt_logprobs``
        self.created = int(time.time())

    def _chunk(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}

    def _finish_reason(self, choice: _ChatChoice, engine_reason: str | None) -> str | None:
        # a named tool_choice ends with "stop" (OpenAI and vLLM); calls the model chose, or "required": tool_calls
        named = self.forced is not None and self.forced.name is not None
        return "tool_calls" if choice.num_tool_calls and engine_reason == "stop" and not named else engine_reason

    def opening(self) -> list[dict]:
        """What a stream sends before any token: the assistant role, per choice."""
        return [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(len(self.choices))]

    def chunks(self, index: int, event: EngineEvent) -> list[dict]:
        """The stream chunks for one engine event of choice ``index`` (the last one also ends the choice)."""
        choice = self.choices[index]
        parsed = choice.parser.feed(event.text)
        if event.finished:
            parsed.extend(choice.parser.finish())
        logprobs = chat_logprobs(event.logprobs or [], self.token_text) if self.token_text else None
        out = []
        if event.prompt_logprobs is not None and self.prompt_text is not None and index == 0:
            out.append({**self._chunk(index, {}),
                        "prompt_logprobs": vllm_prompt_logprobs(event.prompt_logprobs, self.prompt_text)})
        if parsed.reasoning:  # both names: ``reasoning`` (current vLLM), ``reasoning_content`` (DeepSeek, older)
            out.append(self._chunk(index, {"reasoning": parsed.reasoning, "reasoning_content": parsed.reasoning},
                                   logprobs=logprobs))
            logprobs = None
        if parsed.content and self.forced is not None:
            choice.held += parsed.content
        elif parsed.content:
            out.append(self._chunk(index, {"content": parsed.content}, logprobs=logprobs))
            logprobs = None
        # tool calls the model writes stream as pieces: name first, then arguments (serving/parsers.py)
        out.extend(self._chunk(index, {"tool_calls": [d.to_openai()]}) for d in parsed.tool_calls)
        if self.forced is None:
            choice.num_tool_calls = choice.parser.num_tool_calls
        elif event.finished and choice.held:  # forced calls: the grammar's JSON, whole at the end
            calls = self.forced.calls(choice.held)
            if calls is None:
                out.append(self._chunk(index, {"content": choice.held}))
            else:
                delta = [{"index": choice.num_tool_calls + i, **c.to_openai()} for i, c in enumerate(calls)]
                choice.num_tool_calls += len(delta)
                out.append(self._chunk(index, {"tool_calls": delta}))
            choice.held = ""
        if logprobs and logprobs["content"]:
            out.append(self._chunk(index, {}, logprobs=logprobs))
        if event.finished:
            if event.finish_reason == "error":
                out.append(engine_error(event))
                return out
            out.append(self._chunk(index, {}, self._finish_reason(choice, event.finish_reason)))
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}

    def whole(self, results: list[tuple[str, EngineEvent, list[TokenLogprob]]], usage: dict,
              prompt_logprobs: list[TokenLogprob | None] | None = None) -> dict:
        """The non-streaming body: per choice, the complete text, its last event and its logprobs."""
        choices = []
        for index, (text, last, logprobs) in enumerate(results):
            choice = self.choices[index]
            parsed = choice.parser.feed(text)
            parsed.extend(choice.parser.finish())
            calls = parsed.calls()
            content = parsed.content
            if self.forced is not None and content:
                calls = self.forced.calls(content)
                content = "" if calls else content
            message: dict[str, Any] = {"role": "assistant", "content": content or None,
                                       "reasoning": parsed.reasoning or None,
                                       "reasoning_content": parsed.reasoning or None}
            if calls:
                message["tool_calls"] = [c.to_openai() for c in calls]
                choice.num_tool_calls = len(calls)
            choices.append({"index": index, "message": message,
                            "logprobs": chat_logprobs(logprobs, self.token_text) if self.token_text else None,
                            "finish_reason": self._finish_reason(choice, last.finish_reason)})
        body = {"id": self.request_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}
        if self.prompt_text is not None:
            body["prompt_logprobs"] = vllm_prompt_logprobs(prompt_logprobs or [], self.prompt_text)
        return body


class CompletionResponse:
    """OpenAI text_completion bodies of one request, from engine events. ``echo[i]``: the prompt text
    choice ``i`` starts with (``echo``), else empty. ``prompt_ids[i]``: choice ``i``'s prompt, when its
    prompt logprobs were asked for (echo + logprobs: the prompt's tokens lead the logprobs; vLLM's
    ``prompt_logprobs``: per choice)."""

    def __init__(self, request_id: str, model: str, echo: list[str], include_usage: bool = False,
                 token_text: TokenText | None = None, prompt_ids: list[list[int] | None] | None = None,
                 echo_logprobs: int | None = None, prompt_logprobs: int | None = None,
                 prompt_text: TokenText | None = None) -> None:
        self.request_id, self.model, self.include_usage = request_id, model, include_usage
        self.echo, self.token_text = list(echo), token_text
        self.prompt_ids = prompt_ids or [None] * len(echo)
        # echo_logprobs: echo + logprobs k (the prompt leads the logprobs); prompt_logprobs: vLLM's field's k
        self.echo_logprobs, self.prompt_k, self.prompt_text = echo_logprobs, prompt_logprobs, prompt_text
        self.vllm_prompt = prompt_logprobs is not None
        self.offsets = [0 if echo_logprobs is not None else len(e) for e in echo]  # the next token's text_offset
        self.created = int(time.time())

    def _body(self, index: int, text: str, finish_reason: str | None = None, logprobs: dict | None = None,
              prompt_logprobs: list[dict | None] | None = None) -> dict:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        if self.vllm_prompt:
            choice["prompt_logprobs"] = prompt_logprobs
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def _logprobs(self, index: int, entries: list[TokenLogprob | None]) -> dict | None:
        if self.token_text is None:
            return None
        first = self.prompt_ids[index][0] if self.prompt_ids[index] else None
        out = completion_logprobs(entries, self.token_text, self.offsets[index], first)
        self.offsets[index] += sum(len(t) for t in out["tokens"])
        return out

    def _prompt_parts(self, given: list[TokenLogprob | None] | None) -> tuple[list, list[dict | None] | None]:
        """(the prompt entries leading the logprobs (echo + logprobs), vLLM's prompt_logprobs) from an event's
        prompt logprobs (computed with the larger of the two k)."""
        if given is None:
            return [], None
        def cut(k: int | None) -> list:
            return [None if e is None else TokenLogprob(e.token_id, e.logprob, e.top[:k]) for e in given]
        lead = cut(self.echo_logprobs) if self.echo_logprobs is not None else []
        return lead, vllm_prompt_logprobs(cut(self.prompt_k), self.prompt_text) if self.vllm_prompt else None

    def opening(self) -> list[dict]:
        # with echo + logprobs the prompt's text goes out with its logprobs, on the choice's first event
        if self.echo_logprobs is not None:
            return []
        return [self._body(i, text) for i, text in enumerate(self.echo) if text]

    def chunks(self, index: int, event: EngineEvent) -> list[dict]:
        """The stream chunks for one engine event of choice ``index`` (the last one also ends the choice)."""
        if event.finished and event.finish_reason == "error":
            return [engine_error(event)]
        lead, prompt = self._prompt_parts(event.prompt_logprobs)
        echoed = self.echo_logprobs is not None and event.prompt_logprobs is not None
        text = (self.echo[index] if echoed else "") + event.text
        if text or event.finished or event.logprobs or prompt is not None:
            logprobs = self._logprobs(index, lead + (event.logprobs or []))
            return [self._body(index, text, event.finish_reason if event.finished else None, logprobs, prompt)]
        return []

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.model, "choices": [], "usage": usage}

    def whole(self, results: list[tuple[str, EngineEvent, list[TokenLogprob]]], usage: dict,
              prompt_logprobs: dict[int, list[TokenLogprob | None]] | None = None) -> dict:
        choices = []
        for i, (text, last, logprobs) in enumerate(results):
            lead, prompt = self._prompt_parts((prompt_logprobs or {}).get(i))
            choice = {"index": i, "text": self.echo[i] + text, "logprobs": self._logprobs(i, lead + logprobs),
                      "finish_reason": last.finish_reason}
            if self.vllm_prompt:
                choice["prompt_logprobs"] = prompt
            choices.append(choice)
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}
