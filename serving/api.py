"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streaming and not.

The model runs on the engine thread; handlers only render prompts, submit requests and relay the
engine's events (per-request asyncio queues, fed by :class:`EventRelay` with one loop wake-up per
engine step), so the event loop never waits on a model step. A client that disconnects cancels its
request (the engine drops it and frees its KV blocks at its next step).

Layout, top to bottom:

* :class:`ServerConfig` and :class:`ServerState`: what every handler shares, kept on
  ``app.state.server`` and handed to a handler by the ``State`` dependency.
* Dependencies: :func:`require_api_key` (every ``/v1`` route) and :func:`require_live_engine`.
* Request helpers: body reading and parsing (size limit, bad Unicode, deep JSON), prompt rendering and
  tokenizing (refused by a character bound before tokenizing, long texts on a worker thread), sampling
  parameters, structured output (``response_format``, ``tool_choice``).
* Engine plumbing: submit a response's sequences (``n`` per prompt, batched prompts), relay their
  ``(choice, event)`` pairs, answer streamed (SSE) or whole (:func:`respond`).
* Routes: ``router`` (open: ``/health``, ``/metrics``, ``/version``), ``tokens`` (``/tokenize``,
  ``/detokenize``, ``/tokenizer_info``) and ``v1`` (``/v1``), the last two behind the API key. The
  Responses API (``/v1/responses``) lives in :mod:`serving.responses`, built on these helpers.
* :func:`create_app`: one FastAPI app wiring the state, the routers, the error handlers (a catch-all
  turns any bug into a JSON 500), CORS and the engine's lifespan, wrapped in the request counter.

A new endpoint is one handler on ``router`` or ``v1`` (taking ``request: Request, state: State``);
it is counted in ``hwlayer_requests_total`` under its own path. A new request parameter is a field on
the schemas in :mod:`serving.protocol` plus its mapping in :func:`sampling_params`. Wire-format code
(schemas, error and response bodies) lives in :mod:`serving.protocol`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import GLM_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError, prompt_opens_thinking, template_kwargs
from .engine import Engine, EngineEvent, SamplingParams
from .metrics import ServingMetrics
from .parsers import GLMOutputParser
from .protocol import (
    IGNORED_FIELDS,
    REASONING_EFFORTS,
    APIError,
    ChatCompletionRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    ForcedTools,
    SamplingFields,
    TokenizeRequest,
    engine_error,
    error_response,
    stream_usage,
    usage_of,
    validation_message,
)
from .sampling import TokenLogprob
from .structured import GrammarCompiler, GrammarSpec, StructuredOutputError

log = logging.getLogger("serving.api")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_CHOICES = 128  # prompts x n in one request
_TOKENIZE_INLINE_CHARS = 20_000  # longer texts are tokenized on a worker thread
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")

# ---- server state ----------------------------------------------------------------------------


@dataclass
class ServerConfig:
    model_name: str
    max_model_len: int
    backend: str
    device: str
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: ChatTemplate = field(default_factory=ChatTemplate)  # serving/chat.py: which one renders
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no cross-origin browser access
    strict_request_fields: bool = False  # --strict-request-fields: a field no schema knows is a 400, not a log line
    enable_tokenizer_info_endpoint: bool = False  # --enable-tokenizer-info-endpoint (vLLM's flag): GET /tokenizer_info
    tokenizer_config: dict = field(default_factory=dict)  # the checkpoint's tokenizer_config.json, for /tokenizer_info
    created: int = field(default_factory=lambda: int(time.time()))


class EventRelay:
    """Hands engine events (engine thread) to request queues (event loop) with at most one loop wake-up
    per batch of events, instead of one ``call_soon_threadsafe`` per token per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, Any]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def push(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, item in items:
            queue.put_nowait(item)


@dataclass
class ServerState:
    """Everything the handlers share; one per app, at ``app.state.server``."""

    engine: Engine
    tokenizer: Any
    config: ServerConfig
    metrics: ServingMetrics
    relay: EventRelay | None = None  # made by the lifespan, on the loop that serves the requests
    vocab_size: int = 0  # the logits' width: token ids are checked against it
    max_token_chars: int = 1  # the longest token's text: a prompt longer than max_model_len x this cannot fit
    grammars: GrammarCompiler | None = None
    tokenize_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(2))
    logged_fields: set[str] = field(default_factory=set)  # unknown request fields already logged (once each)

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


async def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]

# ---- dependencies ----------------------------------------------------------------------------


async def require_api_key(request: Request, state: State) -> None:
    """``Authorization: Bearer KEY`` when the server has an API key (every ``/v1`` route)."""
    key = state.config.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'" if header else
                       "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                       "authentication_error")


async def require_live_engine(state: State) -> None:
    """503 up front once the engine cannot run (e.g. an expert-parallel rank died)."""
    if state.engine.fatal_error:
        raise APIError(503, f"engine stopped: {state.engine.fatal_error}", None, "engine_dead", "server_error")

# ---- request helpers -------------------------------------------------------------------------


def lone_surrogate_at(value: Any, path: str = "") -> str | None:
    """The path of the first string holding a lone UTF-16 surrogate (``"\ud800"`` escapes), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if isinstance(key, str) and lone_surrogate_at(key):
            return path or "body"  # the key itself cannot be named in a UTF-8 message
        where = lone_surrogate_at(item, f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path
                                  else str(key))
        if where:
            return where
    return None


_INLINE_BODY_BYTES = 256 * 1024  # larger bodies are decoded and validated on a worker thread


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, read up to ``max_bytes`` (413 beyond)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {length} bytes; the limit is {max_bytes}", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the {max_bytes}-byte limit", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_json(raw: bytes) -> dict:
    """The body as a JSON object; 400 naming what is wrong with it (encoding, syntax, depth, surrogates)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body nests JSON too deeply; expected an OpenAI request object", None,
                       "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    if _SURROGATE_ESCAPE.search(text) and (where := lone_surrogate_at(data)):
        raise APIError(400, f"{where}: contains a lone UTF-16 surrogate escape (e.g. \\ud800); expected valid "
                       "Unicode text", where, "invalid_encoding")
    return data


def decode_request(raw: bytes, schema: type[BaseModel]) -> Any:
    data = decode_json(raw)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param, "invalid_value") from None
    except RecursionError:
        raise APIError(400, "request body nests JSON too deeply", None, "invalid_json") from None


async def parse_request(request: Request, state: ServerState, schema: type[BaseModel]) -> Any:
    """The body validated against ``schema``. A large body is decoded and validated on a worker thread: the
    event loop keeps answering (e.g. /health). Fields no schema knows are logged once per name and
    ignored (vLLM's choice), or a 400 naming the first with ``--strict-request-fields``; known fields that
    change nothing here (``store``, ``service_tier``, ...) get a debug line."""
    raw = await read_body(request, state.config.max_body_bytes)
    if len(raw) < _INLINE_BODY_BYTES:
        req = decode_request(raw, schema)
    else:
        req = await asyncio.to_thread(decode_request, raw, schema)
    del raw
    check_model(state, getattr(req, "model", None))
    unknown = sorted(req.model_extra or {})
    if unknown and state.config.strict_request_fields:
        raise APIError(400, f"{unknown[0]}: unknown parameter; this server does not implement it (docs/serving.md "
                       "lists the parameters; the server runs with --strict-request-fields)", unknown[0],
                       "invalid_value")
    new = [name for name in unknown if name not in state.logged_fields]
    if new:
        state.logged_fields.update(new)
        log.warning("request fields no API here knows were ignored (logged once per name): %s", ", ".join(new))
    ignored = [name for name in IGNORED_FIELDS if name in req.model_fields_set]
    if ignored:
        log.debug("%s: ignored request fields (no effect on this server): %s", request.url.path, ", ".join(ignored))
    return req


def check_model(state: ServerState, model: str | None) -> None:
    served = state.config.model_name
    if model is not None and model != served:
        raise APIError(404, f"the model {model!r} does not exist here; this server serves {served!r}", "model",
                       "model_not_found")


def check_messages(messages: list[dict]) -> None:
    """Content is required (non-null) on system, developer, user and tool messages, and on assistant messages
    without tool calls, as OpenAI requires."""
    for i, message in enumerate(messages):
        role = message.get("role")
        if message.get("content") is not None:
            continue
        if role == "assistant" and (message.get("tool_calls") or message.get("reasoning_content")
                                    or message.get("reasoning")):
            continue
        if role in ("system", "developer", "user", "tool", "assistant"):
            got = "null" if "content" in message else "missing"
            raise APIError(400, f"messages[{i}].content: a {role} message needs content"
                           f"{' or tool_calls' if role == 'assistant' else ''}, got {got}",
                           f"messages[{i}].content", "invalid_value")


def render_prompt(state: ServerState, req: Any, add_generation_prompt: bool = True) -> str:
    """The chat prompt text from the server's template (serving/chat.py) and the request's template
    variables (thinking switches); a request the template cannot render is a 400 naming it."""
    try:
        kwargs = template_kwargs(req.enable_thinking, req.chat_template_kwargs, getattr(req, "thinking", None),
                                 getattr(req, "reasoning_effort", None))
        return state.config.chat_template.render(req.messages, req.tools, kwargs, add_generation_prompt)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from None


def check_chars(state: ServerState, chars: int, param: str) -> None:
    """400 when ``chars`` characters are more than any ``max_model_len``-token text can hold."""
    max_len = state.config.max_model_len
    if chars > max_len * state.max_token_chars:
        raise APIError(400, f"the prompt is {chars} characters: more than {max_len} tokens (this model's maximum "
                       f"context length) at any tokenization; shorten it", param, "context_length_exceeded")


async def encode(state: ServerState, text: str, param: str = "prompt") -> list[int]:
    """Token ids of ``text``. A text longer than any ``max_model_len``-token text can be is refused before
    tokenizing (the cheap bound: characters / the longest token); long texts are tokenized on a worker
    thread, two at a time, so the event loop keeps serving and memory stays bounded."""
    check_chars(state, len(text), param)
    tokenize = lambda: state.tokenizer.encode(text, add_special_tokens=False).ids
    try:
        if len(text) < _TOKENIZE_INLINE_CHARS:
            return tokenize()
        async with state.tokenize_slots:
            return await asyncio.to_thread(tokenize)
    except (TypeError, ValueError, UnicodeError) as exc:
        raise APIError(400, f"{param}: cannot be tokenized ({type(exc).__name__}); expected valid Unicode text",
                       param, "invalid_value") from None


def check_token_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    if any(not 0 <= t < state.vocab_size for t in ids):
        bad = next(t for t in ids if not 0 <= t < state.vocab_size)
        raise APIError(400, f"{param}: token id {bad} is out of range; expected ids in [0, {state.vocab_size})",
                       param, "invalid_value")
    return list(ids)


async def completion_prompts(state: ServerState, prompt: Any) -> list[tuple[list[int], str | None]]:
    """A completion ``prompt`` (text, token ids, or a batch of either) as ``[(token ids, text or None)]``."""
    batch = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
    if not batch or batch == [[]]:
        raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
    out = []
    for i, item in enumerate(batch):
        param = "prompt" if len(batch) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            if not item:
                raise APIError(400, f"{param} must not be empty", param, "invalid_value")
            out.append((await encode(state, item, param), item))
        else:
            if not item:
                raise APIError(400, f"{param} must not be empty", param, "invalid_value")
            out.append((check_token_ids(state, item, param), None))
    return out


def sampling_params(state: ServerState, req: SamplingFields, prompt_len: int, max_tokens: int | None,
                    param: str = "messages", logprobs: int | None = None,
                    structured: GrammarSpec | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
    """The engine's parameters for ``req``: the place a new request parameter reaches the engine.
    ``max_tokens`` None: up to the context limit."""
    max_model_len = state.config.max_model_len
    if prompt_len >= max_model_len:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's maximum context length is "
                       f"{max_model_len} (including at least one generated token)", param,
                       "context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    if prompt_logprobs is not None and not state.engine.supports_prompt_logprobs:
        raise APIError(400, "prompt logprobs (echo + logprobs, prompt_logprobs) are not available with data or "
                       "expert parallelism in this server: every prefill row would have to come back from the ranks",
                       "prompt_logprobs", "unsupported")
    why = state.engine.check_fits(prompt_len, max_tokens)
    if why:
        raise APIError(400, why, "max_tokens", "context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", "stop", "invalid_value")
    if req.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens",
                       "invalid_value")
    bias = None
    if req.logit_bias:
        bias = {}
        for key, value in req.logit_bias.items():
            if not key.isdigit() or not 0 <= int(key) < state.vocab_size:
                raise APIError(400, f"logit_bias: key {key[:20]!r} is not a token id in [0, {state.vocab_size})",
                               "logit_bias", "invalid_value")
            if not -100 <= value <= 100:
                raise APIError(400, f"logit_bias[{key}]: {value} is outside [-100, 100]", "logit_bias",
                               "invalid_value")
            bias[int(key)] = float(value)
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if req.top_k is None else req.top_k,
        min_p=req.min_p or 0.0, seed=req.seed, stop=stop,
        stop_token_ids=check_token_ids(state, req.stop_token_ids or [], "stop_token_ids"), ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty, logit_bias=bias,
        min_tokens=req.min_tokens, logprobs=logprobs, skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output, structured=structured,
        prompt_logprobs=prompt_logprobs)


def response_format_schema(response_format: dict | None) -> tuple[bool, dict | None]:
    """``(constrained, JSON schema or None for any object)`` from ``response_format``."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise APIError(400, "response_format.json_schema.schema: expected a JSON schema object",
                           "response_format", "invalid_value")
        return True, spec["schema"]
    raise APIError(400, f"response_format.type {kind!r} is not one of 'text', 'json_object', 'json_schema'",
                   "response_format", "invalid_value")


def forced_tool_choice(req: ChatCompletionRequest) -> tuple[list[dict] | None, ForcedTools | None, dict | None]:
    """``(tools for the prompt, forced tool calls or None, their JSON schema)`` from tools / tool_choice."""
    choice, tools = req.tool_choice, req.tools
    if choice is None or choice == "auto":
        return tools, None, None
    if choice == "none":
        return None, None, None
    functions = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"tools[{i}]: expected {{'type': 'function', 'function': {{'name': ...}}}}",
                           f"tools[{i}]", "invalid_value")
        params = fn.get("parameters") or {"type": "object"}
        functions[fn["name"]] = params if isinstance(params, dict) else {"type": "object"}
    if choice == "required":
        if not functions:
            raise APIError(400, "tool_choice 'required' needs at least one tool in tools", "tool_choice",
                           "invalid_value")
        item = {"anyOf": [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                           "required": ["name", "parameters"], "additionalProperties": False}
                          for name, params in functions.items()]}
        schema = {"type": "array", "items": item, "minItems": 1}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return tools, ForcedTools(None), schema
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in functions:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools "
                           f"(available: {sorted(functions)})", "tool_choice", "invalid_value")
        return tools, ForcedTools(name), functions[name]
    raise APIError(400, f"tool_choice {json.dumps(choice)[:60]}: expected 'none', 'auto', 'required' or "
                   "{'type': 'function', 'function': {'name': ...}}", "tool_choice", "invalid_value")


async def compile_grammar(state: ServerState, schema: dict | None, param: str,
                          start_after: int | None) -> GrammarSpec:
    try:
        return await asyncio.to_thread(state.grammars.json_schema, schema, start_after)
    except StructuredOutputError as exc:
        raise APIError(400, f"{param}: {exc}", param, "invalid_value") from None


STREAM_OPTIONS = ("include_usage", "continuous_usage_stats", "include_obfuscation")  # the last: accepted, ignored


def stream_options(req: SamplingFields) -> tuple[bool, bool]:
    """``(include_usage, continuous_usage_stats)`` from ``stream_options`` (OpenAI's and vLLM's options;
    ``include_obfuscation`` pads chunks against side channels: nothing to pad here, ignored)."""
    options = req.stream_options or {}
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise APIError(400, f"stream_options.{unknown[0]}: unknown option; expected one of {', '.join(STREAM_OPTIONS)}",
                       "stream_options", "invalid_value")
    for name in STREAM_OPTIONS:
        if not isinstance(options.get(name, False), (bool, type(None))):
            raise APIError(400, f"stream_options.{name} must be a boolean", "stream_options", "invalid_value")
    return bool(options.get("include_usage")), bool(options.get("continuous_usage_stats"))


def include_usage(req: SamplingFields) -> bool:
    return stream_options(req)[0]


def per_choice(params: SamplingParams, i: int) -> SamplingParams:
    """Choice ``i``'s parameters: a seeded request seeds its choices ``seed + i`` (reproducible, not identical)."""
    if i == 0 or params.seed is None:
        return params if i == 0 else replace(params)
    return replace(params, seed=(params.seed + i) % 2**63)

# ---- engine plumbing -------------------------------------------------------------------------


@dataclass
class Job:
    """One sequence of a response: choice ``len(jobs so far)``, generated from prompt ``prompt_index``."""

    prompt_ids: list[int]
    params: SamplingParams
    prompt_index: int = 0


def submit(state: ServerState, jobs: list[Job], request_id: str) -> tuple[asyncio.Queue, list[str]]:
    """Queue the jobs in the engine; their ``(choice index, event)`` pairs arrive on the returned queue."""
    queue: asyncio.Queue[tuple[int, EngineEvent]] = asyncio.Queue()
    push = state.relay.push
    ids = [request_id if len(jobs) == 1 else f"{request_id}-{i}" for i in range(len(jobs))]
    try:
        for i, job in enumerate(jobs):
            state.engine.submit(job.prompt_ids, job.params, lambda event, i=i: push(queue, (i, event)), ids[i])
    except RuntimeError as exc:
        for request in ids:
            state.engine.abort(request)
        raise APIError(503, f"engine stopped: {exc}", None, "engine_dead", "server_error") from None
    return queue, ids


async def watch_disconnect(request: Request, engine: Engine, request_ids: list[str]) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    for request_id in request_ids:
        engine.abort(request_id)


async def collect(request: Request, engine: Engine, queue: asyncio.Queue, request_ids: list[str],
                  watch: bool = False) -> AsyncIterator[tuple[int, EngineEvent]]:
    """``(choice, event)`` pairs until every choice finished; a choice's events that queued up while the
    consumer was busy are merged into one.

    A streaming response is cancelled by Starlette when its client leaves; ``watch`` polls for
    that otherwise (non-streaming). Either way the unfinished requests are aborted in the engine."""
    watcher = asyncio.create_task(watch_disconnect(request, engine, request_ids)) if watch else None
    pending = set(range(len(request_ids)))
    try:
        while pending:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            merged: dict[int, EngineEvent] = {}
            for index, event in items:
                if index in merged:
                    earlier = merged.pop(index)
                    event.text = earlier.text + event.text
                    if earlier.logprobs is not None:
                        event.logprobs = earlier.logprobs + (event.logprobs or [])
                    if earlier.prompt_logprobs is not None:
                        event.prompt_logprobs = earlier.prompt_logprobs
                merged[index] = event
            for index, event in merged.items():
                if event.finished:
                    pending.discard(index)
                yield index, event
    finally:
        if watcher is not None:
            watcher.cancel()
        for index in pending:
            engine.abort(request_ids[index])


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def total_usage(jobs: list[Job], last: dict[int, EngineEvent]) -> dict:
    prompts = {job.prompt_index: len(job.prompt_ids) for job in jobs}  # a prompt counts once, whatever n is
    return usage_of(sum(prompts.values()), sum(event.completion_tokens for event in last.values()))


async def respond(request: Request, state: ServerState, jobs: list[Job], body: ChatResponse | CompletionResponse,
                  stream: bool, continuous_usage: bool = False) -> Response:
    """Run the jobs in the engine and answer with ``body``'s chunks as server-sent events, or with its
    whole body once every choice ended. ``continuous_usage``: every chunk carries its choice's usage so
    far (vLLM's ``stream_options.continuous_usage_stats``)."""
    engine = state.engine
    queue, request_ids = submit(state, jobs, body.request_id)
    last: dict[int, EngineEvent] = {}
    if stream:
        async def events() -> AsyncIterator[str]:
            for item in body.opening():
                yield sse(item)
            async for index, event in collect(request, engine, queue, request_ids):
                if event.finished:
                    last[index] = event
                for item in body.chunks(index, event):
                    if continuous_usage and "choices" in item:
                        item["usage"] = stream_usage(event)
                    yield sse(item)
            if body.include_usage:
                yield sse(body.usage_chunk(total_usage(jobs, last)))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    texts: dict[int, list[str]] = {i: [] for i in range(len(jobs))}
    logprobs: dict[int, list[TokenLogprob]] = {i: [] for i in range(len(jobs))}
    prompt_logprobs: dict[int, list[TokenLogprob | None]] = {}
    async for index, event in collect(request, engine, queue, request_ids, watch=True):
        texts[index].append(event.text)
        logprobs[index] += event.logprobs or []
        if event.prompt_logprobs is not None:
            prompt_logprobs[index] = event.prompt_logprobs
        last[index] = event
    if len(last) < len(jobs) or any(e.finish_reason == "abort" and not e.error for e in last.values()):
        return Response(status_code=499)  # the client left; nobody reads this
    ended = [e for e in last.values() if e.finish_reason == "abort"]  # by the server: shutdown drain timed out
    if ended:
        return JSONResponse(engine_error(ended[0]), status_code=503)
    failed = [e for e in last.values() if e.finish_reason == "error"]
    if failed:
        return JSONResponse(engine_error(failed[0]), status_code=503 if engine.fatal_error else 500)
    results = [("".join(texts[i]), last[i], logprobs[i]) for i in range(len(jobs))]
    if isinstance(body, ChatResponse):
        return JSONResponse(body.whole(results, total_usage(jobs, last), prompt_logprobs.get(0)))
    return JSONResponse(body.whole(results, total_usage(jobs, last), prompt_logprobs))

# ---- routes ----------------------------------------------------------------------------------


router = APIRouter()  # open: probes and scrapers carry no API key
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
tokens = APIRouter(dependencies=[Depends(require_api_key)])  # vLLM's /tokenize and /detokenize (no /v1)


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(state: State) -> Response:
    if state.engine.fatal_error:
        return error_response(503, f"engine stopped: {state.engine.fatal_error}", None, "engine_dead",
                              "server_error")
    return JSONResponse({"status": "ok", "backend": state.config.backend, "model": state.config.model_name})


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/version")
async def version() -> JSONResponse:
    try:
        from importlib.metadata import version as dist_version

        number = dist_version("hwlayer")
    except Exception:  # a source checkout that was never installed
        number = "unknown"
    return JSONResponse({"version": number})


@tokens.post("/tokenize")
async def tokenize(request: Request, state: State) -> JSONResponse:
    req: TokenizeRequest = await parse_request(request, state, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "send exactly one of 'prompt' (text) and 'messages' (a chat)", "prompt", "invalid_value")
    if req.messages is not None:
        check_messages(req.messages)
        text = render_prompt(state, req, req.add_generation_prompt)
        param = "messages"
    else:
        text, param = req.prompt, "prompt"
    ids = await encode(state, text, param)
    return JSONResponse({"count": len(ids), "max_model_len": state.config.max_model_len, "tokens": ids})


@tokens.post("/detokenize")
async def detokenize(request: Request, state: State) -> JSONResponse:
    req: DetokenizeRequest = await parse_request(request, state, DetokenizeRequest)
    ids = check_token_ids(state, req.tokens, "tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(ids, skip_special_tokens=False)})


def read_tokenizer_config(checkpoint: Any) -> dict:
    """A checkpoint directory's tokenizer_config.json ({} when absent or unreadable), for /tokenizer_info."""
    from pathlib import Path

    try:
        data = json.loads((Path(checkpoint) / "tokenizer_config.json").read_text())
    except (OSError, TypeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def model_card(config: ServerConfig) -> dict:
    return {"id": config.model_name, "object": "model", "created": config.created, "owned_by": "hwlayer",
            "max_model_len": config.max_model_len, "backend": config.backend,
            "chat_template": config.chat_template.source}


@v1.get("/models")
async def models(state: State) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [model_card(state.config)]})


@v1.get("/models/{model_id:path}")
async def model_by_id(model_id: str, state: State) -> JSONResponse:
    """OpenAI's ``models.retrieve`` (the id may hold slashes, as Hugging Face names do)."""
    check_model(state, model_id)
    return JSONResponse(model_card(state.config))


@tokens.get("/tokenizer_info")
async def tokenizer_info(state: State) -> JSONResponse:
    """vLLM's ``GET /tokenizer_info`` (behind ``--enable-tokenizer-info-endpoint``, off by default as in vLLM:
    it exposes the chat template): the checkpoint's tokenizer_config.json without file paths, plus
    ``tokenizer_class`` and ``chat_template``. lm-eval reads ``eos_token`` (and ``chat_template``) from it,
    then tokenizes through /tokenize and /detokenize instead of downloading the tokenizer."""
    config = state.config
    if not config.enable_tokenizer_info_endpoint:
        raise APIError(404, "GET /tokenizer_info: not enabled; start the server with --enable-tokenizer-info-endpoint",
                       None, "not_found")
    info = {k: v for k, v in config.tokenizer_config.items()
            if k not in ("vocab_file", "merges_file", "tokenizer_file", "added_tokens_decoder")}
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    info.setdefault("model_max_length", config.max_model_len)
    eos = sorted(state.engine.eos_token_ids)
    if "eos_token" not in info and eos:
        info["eos_token"] = state.token_text(eos[0])
    template = config.chat_template
    info["chat_template"] = template.source_text if not template.is_builtin else GLM_CHAT_TEMPLATE
    return JSONResponse(info)


@v1.post("/chat/completions", dependencies=[Depends(require_live_engine)])
async def chat_completions(request: Request, state: State) -> Response:
    req: ChatCompletionRequest = await parse_request(request, state, ChatCompletionRequest)
    check_unsupported_chat_fields(req)
    check_messages(req.messages)
    # the text of the messages alone may already be too long: refused before rendering it
    check_chars(state, sum(len(m["content"]) for m in req.messages if isinstance(m.get("content"), str)), "messages")
    _, forced, schema = forced_tool_choice(req)
    constrained, format_schema = response_format_schema(req.response_format)
    if constrained and forced is not None:
        raise APIError(400, "response_format cannot be combined with tool_choice 'required' or a named function "
                       "(both constrain the output)", "response_format", "invalid_value")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
    prompt = render_prompt(state, req)  # tools stay in the prompt with tool_choice "none" (vLLM)
    thinking = prompt_opens_thinking(prompt)
    prompt_ids = await encode(state, prompt, "messages")
    structured = None
    if constrained or forced is not None:
        # with thinking on the reasoning is free text: the grammar starts after </think>
        structured = await compile_grammar(state, format_schema if constrained else schema,
                                           "response_format" if constrained else "tool_choice",
                                           state.token_id("</think>") if thinking else None)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(state, req, len(prompt_ids), max_tokens, "messages",
                             (req.top_logprobs or 0) if req.logprobs else None, structured, req.prompt_logprobs)
    tools = req.tools if req.tool_choice != "none" else None  # what the parser looks for
    call_end = state.token_id("</tool_call>")
    if tools and forced is None and req.parallel_tool_calls is False and call_end is not None:
        params.stop_after_token_ids = [call_end]  # one call at most: stop when the first one closes
    # the prompt is scored once, by the first choice (the top-level prompt_logprobs, as vLLM)
    jobs = [Job(prompt_ids, replace(per_choice(params, i), prompt_logprobs=None) if i else params)
            for i in range(req.n)]
    parsers = [GLMOutputParser(thinking, None if forced else tools, stream=req.stream) for _ in jobs]
    usage, continuous = stream_options(req)
    body = ChatResponse("chatcmpl-" + uuid.uuid4().hex, state.config.model_name, parsers, usage,
                        state.token_text if req.logprobs else None, forced,
                        state.token_text if req.prompt_logprobs is not None else None)
    return await respond(request, state, jobs, body, req.stream, continuous)


# Documented chat fields that ask for what this server cannot do: a 400 naming them unless null.
CHAT_REFUSED = {
    "audio": "audio output is not supported: GLM-5 generates text only",
    "web_search_options": "web search is not supported: this server has no search tool",
    "functions": "the deprecated 'functions' parameter is not supported; send 'tools' instead",
    "function_call": "the deprecated 'function_call' parameter is not supported; send 'tool_choice' instead",
}


def check_unsupported_chat_fields(req: ChatCompletionRequest) -> None:
    """400 for documented chat fields that ask for what this server cannot do (null is always accepted)."""
    for name, why in CHAT_REFUSED.items():
        if getattr(req, name) is not None:
            raise APIError(400, f"{name}: {why}", name, "unsupported")
    if req.modalities is not None and set(req.modalities) - {"text"}:
        raise APIError(400, f"modalities: {req.modalities} asks for output other than text; this server generates "
                       "text only (expected [\"text\"])", "modalities", "unsupported")
    if req.reasoning_effort is not None and req.reasoning_effort not in REASONING_EFFORTS:
        raise APIError(400, f"reasoning_effort: {req.reasoning_effort!r} is not one of {', '.join(REASONING_EFFORTS)}",
                       "reasoning_effort", "invalid_value")


@v1.post("/completions", dependencies=[Depends(require_live_engine)])
async def completions(request: Request, state: State) -> Response:
    req: CompletionRequest = await parse_request(request, state, CompletionRequest)
    if req.suffix is not None:
        raise APIError(400, "suffix is not supported: GLM-5 has no fill-in-the-middle prompt format", "suffix",
                       "unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of}: only best_of equal to n is supported (no server-side ranking "
                       "of candidates)", "best_of", "unsupported")
    usage, continuous = stream_options(req)
    constrained, schema = response_format_schema(req.response_format)
    prompts = await completion_prompts(state, req.prompt)
    if len(prompts) * req.n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts x n={req.n} choices exceeds {MAX_CHOICES}", "prompt",
                       "invalid_value")
    structured = await compile_grammar(state, schema, "response_format", None) if constrained else None
    max_tokens = req.max_tokens if req.max_tokens is not None else 16
    if max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise APIError(400, "max_tokens: 0 generates nothing; it is for scoring a prompt (echo with logprobs, or "
                       "prompt_logprobs); expected max_tokens >= 1", "max_tokens", "invalid_value")
    if max_tokens == 0 and req.stream:
        raise APIError(400, "max_tokens: 0 cannot be streamed; send stream: false", "max_tokens", "invalid_value")
    # echo + logprobs: the prompt's own logprobs lead the choice's (lm-eval's loglikelihood requests)
    echo_k = req.logprobs if req.echo and req.logprobs is not None else None
    ks = [k for k in (echo_k, req.prompt_logprobs) if k is not None]
    score_k = max(ks) if ks else None  # one scoring of the prompt serves both
    jobs, echo, echo_ids = [], [], []
    for index, (ids, text) in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        params = sampling_params(state, req, len(ids), max_tokens, param, req.logprobs, structured, score_k)
        for i in range(req.n):
            jobs.append(Job(ids, per_choice(params, i), index))
            echo.append((text if text is not None else state.tokenizer.decode(ids, skip_special_tokens=False))
                        if req.echo else "")
            echo_ids.append(ids)
    body = CompletionResponse("cmpl-" + uuid.uuid4().hex, state.config.model_name, echo, usage,
                              state.token_text if req.logprobs is not None else None, echo_ids, echo_k,
                              req.prompt_logprobs, state.token_text)
    return await respond(request, state, jobs, body, req.stream, continuous)

# ---- the app ---------------------------------------------------------------------------------


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """The catch-all: a bug answers a JSON 500 in the OpenAI shape (and is logged), never a plain-text one."""
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, f"internal server error ({type(exc).__name__}); see the server log", None,
                          "internal_error", "server_error")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The engine thread runs while the app serves; events are relayed onto the serving loop."""
    state: ServerState = app.state.server
    state.relay = EventRelay(asyncio.get_running_loop())
    if not state.engine.started:
        state.engine.start()
    yield
    state.engine.stop()


class _CountRequests:
    """ASGI wrapper counting answered requests by route and status (no BaseHTTPMiddleware: it
    would get in the way of streaming disconnects). Paths outside ``routes`` count as ``other``."""

    def __init__(self, app: Any, metrics: ServingMetrics, routes: set[str]) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 499}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.requests.labels(endpoint=route, status=str(status["code"])).inc()


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token stands for (byte-level vocabularies: bytes, at least the characters)."""
    try:
        return max(1, max(len(t) for t in tokenizer.get_vocab(with_added_tokens=True)))
    except (AttributeError, TypeError, ValueError):
        return 64


def create_app(engine: Engine, tokenizer: Any, config: ServerConfig, metrics: ServingMetrics) -> Any:
    """The ASGI app serving ``engine``. The engine thread is started/stopped with the app's lifespan.

    No /docs or /redoc page: FastAPI's pull their scripts from a CDN (blank offline); /openapi.json stays."""
    app = FastAPI(title="hwlayer GLM-5 server", lifespan=lifespan, docs_url=None, redoc_url=None)
    vocab_size = int(getattr(getattr(engine.model, "config", None), "vocab_size", 0) or
                     tokenizer.get_vocab_size(with_added_tokens=True))
    app.state.server = ServerState(engine, tokenizer, config, metrics, vocab_size=vocab_size,
                                   max_token_chars=longest_token_chars(tokenizer),
                                   grammars=GrammarCompiler(tokenizer, vocab_size, sorted(engine.eos_token_ids)))
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    # Always answer preflights: an allowed origin gets the CORS headers, any other a 400 (not a 405).
    app.add_middleware(CORSMiddleware, allow_origins=config.allowed_origins, allow_methods=["*"],
                       allow_headers=["*"], allow_credentials=False)
    from .responses import router as responses  # the Responses API (serving/responses.py) uses this module

    app.include_router(router)
    app.include_router(tokens)
    app.include_router(v1)
    app.include_router(responses)
    counted = {route.path for routes in (router.routes, tokens.routes, v1.routes, responses.routes)
               for route in routes}
    return _CountRequests(app, metrics, counted)
