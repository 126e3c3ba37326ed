"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streaming and not.

The model runs on the engine thread; handlers only render prompts, submit requests and relay the
engine's events (per-request asyncio queues, fed by :class:`EventRelay` with one loop wake-up per
engine step), so the event loop never waits on a model step. A client that disconnects cancels its
request (the engine drops it and frees its KV blocks at its next step).

Errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}`` with one-line messages.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplate, ChatTemplateError, prompt_opens_thinking, template_kwargs
from .engine import Engine, EngineEvent, SamplingParams
from .metrics import ServingMetrics
from .parsers import GLMOutputParser

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error") -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---- request schemas -------------------------------------------------------------------------

class _SamplingFields(BaseModel):
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


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None  # Z.ai API style: {"type": "enabled"|"disabled", "clear_thinking": bool}


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str]
    echo: Literal[False] = False


def _validation_message(exc: ValidationError) -> tuple[str, str]:
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
    created: int = field(default_factory=lambda: int(time.time()))


class EventRelay:
    """Hands engine events (engine thread) to request queues (event loop) with at most one loop wake-up
    per batch of events, instead of one ``call_soon_threadsafe`` per token per request."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[tuple[asyncio.Queue, EngineEvent]] = []
        self.lock = threading.Lock()
        self.scheduled = False

    def push(self, queue: asyncio.Queue, event: EngineEvent) -> None:
        with self.lock:
            self.pending.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, event in items:
            queue.put_nowait(event)


class _CountRequests:
    """ASGI wrapper counting answered requests by route and status (no BaseHTTPMiddleware: it
    would get in the way of streaming disconnects)."""

    ROUTES = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}

    def __init__(self, app: Any, metrics: ServingMetrics) -> None:
        self.app, self.metrics = app, metrics

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
            route = scope["path"] if scope["path"] in self.ROUTES else "other"
            self.metrics.requests.labels(endpoint=route, status=str(status["code"])).inc()


def create_app(engine: Engine, tokenizer: Any, config: ServerConfig, metrics: ServingMetrics) -> Any:
    """The ASGI app serving ``engine``. The engine thread is started/stopped with the app's lifespan."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.started:
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="hwlayer GLM-5 server", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'" if header else
                           "missing API key: send 'Authorization: Bearer <key>'", None, "invalid_api_key",
                           "authentication_error")

    def check_alive() -> None:
        if engine.fatal_error:
            raise APIError(503, f"engine stopped: {engine.fatal_error}", None, "engine_dead", "server_error")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            raise APIError(413, f"request body is {length} bytes; the limit is {config.max_body_bytes}", None,
                           "request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise APIError(413, f"request body exceeds the {config.max_body_bytes}-byte limit", None,
                               "request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
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
        if not isinstance(data, dict):
            raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", None,
                           "invalid_json")
        return data

    def parse(model_cls: type[BaseModel], data: dict) -> Any:
        try:
            req = model_cls.model_validate(data)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, param, "invalid_value") from None
        if req.model is not None and req.model != config.model_name:
            raise APIError(400, f"model {req.model!r} is not served here; available: {config.model_name!r}",
                           "model", "model_not_found")
        if req.n != 1:
            raise APIError(400, f"n={req.n} is not supported; only n=1", "n", "invalid_value")
        if req.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported")
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {req.response_format.get('type')!r} is not supported; only "
                           "'text' (no constrained decoding here)", "response_format", "unsupported")
        return req

    def sampling_params(req: Any, prompt_len: int, max_tokens: int | None) -> SamplingParams:
        if prompt_len >= config.max_model_len:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's maximum context length is "
                           f"{config.max_model_len} (including at least one generated token)", "messages",
                           "context_length_exceeded")
        if max_tokens is None:
            max_tokens = config.max_model_len - prompt_len
        why = engine.check_fits(prompt_len, max_tokens)
        if why:
            raise APIError(400, why, "max_tokens", "context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must be non-empty", "stop", "invalid_value")
        temperature = 1.0 if req.temperature is None else req.temperature
        return SamplingParams(max_tokens=max_tokens, temperature=temperature,
                              top_p=1.0 if req.top_p is None else req.top_p,
                              top_k=0 if req.top_k is None else req.top_k, seed=req.seed, stop=stop,
                              stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos)

    async def encode(text: str) -> list[int]:
        if len(text) < 20_000:
            return tokenizer.encode(text, add_special_tokens=False).ids
        # a long prompt takes a while to tokenize: not on the event loop
        return (await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)).ids

    relay: dict[str, EventRelay] = {}

    def submit(prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
        if "relay" not in relay:
            relay["relay"] = EventRelay(asyncio.get_running_loop())
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        push = relay["relay"].push
        try:
            engine.submit(prompt_ids, params, lambda event: push(queue, event), request_id)
        except RuntimeError as exc:
            raise APIError(503, f"engine stopped: {exc}", None, "engine_dead", "server_error") from None
        return queue

    async def watch_disconnect(request: Request, request_id: str) -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.5)
        engine.abort(request_id)

    async def collect(request: Request, queue: asyncio.Queue, request_id: str,
                      watch: bool = False) -> AsyncIterator[EngineEvent]:
        """Events of one request, those that queued up while the consumer was busy merged into one.

        A streaming response is cancelled by Starlette when its client leaves; ``watch`` polls for
        that otherwise (non-streaming). Either way the request is aborted in the engine."""
        watcher = asyncio.create_task(watch_disconnect(request, request_id)) if watch else None
        finished = False
        try:
            while not finished:
                event = await queue.get()
                while not event.finished and not queue.empty():
                    later = queue.get_nowait()
                    later.text = event.text + later.text
                    event = later
                finished = event.finished
                yield event
        finally:
            if watcher is not None:
                watcher.cancel()
            if not finished:
                engine.abort(request_id)

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect_whole(request: Request, queue: asyncio.Queue, request_id: str) -> Response | tuple:
        """A non-streaming request's whole text and last event, or the Response that ends it early."""
        text, last = [], None
        async for event in collect(request, queue, request_id, watch=True):
            text.append(event.text)
            last = event
        if last is None or last.finish_reason == "abort":
            return Response(status_code=499)  # the client left; nobody reads this
        if last.finish_reason == "error":
            return JSONResponse(engine_error(last), status_code=503 if engine.fatal_error else 500)
        return "".join(text), last

    # ---- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.fatal_error:
            return error_response(503, f"engine stopped: {engine.fatal_error}", None, "engine_dead", "server_error")
        return JSONResponse({"status": "ok", "backend": config.backend, "model": config.model_name})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        return JSONResponse({"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": config.created, "owned_by": "hwlayer",
            "max_model_len": config.max_model_len, "backend": config.backend,
            "chat_template": config.chat_template.source}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        check_alive()
        req: ChatCompletionRequest = parse(ChatCompletionRequest, await read_json(request))
        # serving/chat.py: the request's template variables (thinking switches) and the server's template
        try:
            kwargs = template_kwargs(req.enable_thinking, req.chat_template_kwargs, req.thinking)
            prompt = config.chat_template.render(req.messages, req.tools, kwargs)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), exc.param, "invalid_value") from None
        tools = req.tools if req.tool_choice != "none" else None  # "none": tools stay in the prompt (vLLM)
        prompt_ids = await encode(prompt)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling_params(req, len(prompt_ids), max_tokens)
        request_id = "chatcmpl-" + uuid.uuid4().hex
        queue = submit(prompt_ids, params, request_id)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        parser = GLMOutputParser(prompt_opens_thinking(prompt), tools, stream=req.stream)
        response = ChatResponse(request_id, config.model_name, parser, include_usage)

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                yield sse(response.first_chunk())
                async for event in collect(request, queue, request_id):
                    for item in response.chunks(event):
                        yield sse(item)
                yield "data: [DONE]\n\n"

            return sse_response(stream())

        whole = await collect_whole(request, queue, request_id)
        if isinstance(whole, Response):
            return whole
        return JSONResponse(response.whole(*whole))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        check_auth(request)
        check_alive()
        req: CompletionRequest = parse(CompletionRequest, await read_json(request))
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one",
                               "prompt", "invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
            prompt_ids = await encode(prompt)
        else:
            vocab = tokenizer.get_vocab_size(with_added_tokens=True)
            if not prompt or any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})", "prompt",
                               "invalid_value")
            prompt_ids = list(prompt)
        params = sampling_params(req, len(prompt_ids), req.max_tokens if req.max_tokens is not None else 16)
        request_id = "cmpl-" + uuid.uuid4().hex
        created = int(time.time())
        queue = submit(prompt_ids, params, request_id)
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(text: str, finish_reason: str | None = None) -> dict:
            return {"id": request_id, "object": "text_completion", "created": created, "model": config.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        if req.stream:
            async def stream() -> AsyncIterator[str]:
                async for event in collect(request, queue, request_id):
                    if event.finished and event.finish_reason == "error":
                        yield sse(engine_error(event))
                    elif event.text or event.finished:
                        yield sse(chunk(event.text, event.finish_reason if event.finished else None))
                    if event.finished and include_usage and event.finish_reason != "error":
                        yield sse({"id": request_id, "object": "text_completion", "created": created,
                                   "model": config.model_name, "choices": [], "usage": usage(event)})
                yield "data: [DONE]\n\n"

            return sse_response(stream())

        whole = await collect_whole(request, queue, request_id)
        if isinstance(whole, Response):
            return whole
        text, last = whole
        body = chunk(text, last.finish_reason)
        body["usage"] = usage(last)
        return JSONResponse(body)

    return _CountRequests(app, metrics)
