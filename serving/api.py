"""The OpenAI-compatible HTTP API (FastAPI): chat and text completions, streaming and not.

The model runs on the engine thread; handlers only render prompts, submit requests and relay the
engine's events (per-request asyncio queues, fed by :class:`EventRelay` with one loop wake-up per
engine step), so the event loop never waits on a model step. A client that disconnects cancels its
request (the engine drops it and frees its KV blocks at its next step).

Layout, top to bottom:

* :class:`ServerConfig` and :class:`ServerState`: what every handler shares, kept on
  ``app.state.server`` and handed to a handler by the ``State`` dependency.
* Dependencies: :func:`require_api_key` (every ``/v1`` route) and :func:`require_live_engine`.
* Request helpers: body reading and parsing, prompt rendering and tokenizing, sampling parameters.
* Engine plumbing: submit a request, relay its events, answer streamed (SSE) or whole (:func:`respond`).
* Routes: ``router`` (open: ``/health``, ``/metrics``) and ``v1`` (``/v1``, behind the API key).
* :func:`create_app`: one FastAPI app wiring the state, the routers, the error handlers and the
  engine's lifespan, wrapped in the request counter.

A new endpoint is one handler on ``router`` or ``v1`` (taking ``request: Request, state: State``);
it is counted in ``hwlayer_requests_total`` under its own path. A new request parameter is a field on
the schemas in :mod:`serving.protocol` plus its mapping in :func:`sampling_params`. Wire-format code
(schemas, error and response bodies) lives in :mod:`serving.protocol`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import ChatTemplate, ChatTemplateError, prompt_opens_thinking, template_kwargs
from .engine import Engine, EngineEvent, SamplingParams
from .metrics import ServingMetrics
from .parsers import GLMOutputParser
from .protocol import (
    APIError,
    ChatCompletionRequest,
    ChatResponse,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    engine_error,
    error_response,
    validation_message,
)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

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


@dataclass
class ServerState:
    """Everything the handlers share; one per app, at ``app.state.server``."""

    engine: Engine
    tokenizer: Any
    config: ServerConfig
    metrics: ServingMetrics
    relay: EventRelay | None = None  # made by the lifespan, on the loop that serves the requests


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


async def read_json(request: Request, max_bytes: int) -> dict:
    """The body as a JSON object, read up to ``max_bytes`` (413 beyond), 400 naming what is wrong with it."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise APIError(413, f"request body is {length} bytes; the limit is {max_bytes}", None, "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body exceeds the {max_bytes}-byte limit", None, "request_too_large")
        chunks.append(chunk)
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"request body is not valid UTF-8 (byte {exc.start})", None, "invalid_encoding") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                       None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    return data


async def parse_request(request: Request, state: ServerState, schema: type[BaseModel]) -> Any:
    """The body validated against ``schema``; fields this server does not support are a 400 here."""
    data = await read_json(request, state.config.max_body_bytes)
    try:
        req = schema.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param, "invalid_value") from None
    served = state.config.model_name
    if req.model is not None and req.model != served:
        raise APIError(400, f"model {req.model!r} is not served here; available: {served!r}", "model",
                       "model_not_found")
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported; only n=1", "n", "invalid_value")
    if req.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported by this server", "logprobs", "unsupported")
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise APIError(400, f"response_format {req.response_format.get('type')!r} is not supported; only "
                       "'text' (no constrained decoding here)", "response_format", "unsupported")
    return req


def render_prompt(state: ServerState, req: ChatCompletionRequest) -> str:
    """The chat prompt text from the server's template (serving/chat.py) and the request's template
    variables (thinking switches); a request the template cannot render is a 400 naming it."""
    try:
        kwargs = template_kwargs(req.enable_thinking, req.chat_template_kwargs, req.thinking)
        return state.config.chat_template.render(req.messages, req.tools, kwargs)
    except ChatTemplateError as exc:
        raise APIError(400, str(exc), exc.param, "invalid_value") from None


async def encode(tokenizer: Any, text: str) -> list[int]:
    if len(text) < 20_000:
        return tokenizer.encode(text, add_special_tokens=False).ids
    # a long prompt takes a while to tokenize: not on the event loop
    return (await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)).ids


async def completion_prompt_ids(tokenizer: Any, prompt: str | list[int] | list[str]) -> list[int]:
    """A completion prompt (text, one-element list of text, or token ids) as checked token ids."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: a batch of {len(prompt)} prompts is not supported; send one", "prompt",
                           "invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt", "invalid_value")
        return await encode(tokenizer, prompt)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if not prompt or any(not 0 <= t < vocab for t in prompt):
        raise APIError(400, f"prompt token ids must be a non-empty list of ids in [0, {vocab})", "prompt",
                       "invalid_value")
    return list(prompt)


def sampling_params(state: ServerState, req: SamplingFields, prompt_len: int, max_tokens: int | None) -> SamplingParams:
    """The engine's parameters for ``req``: the place a new request parameter reaches the engine.
    ``max_tokens`` None: up to the context limit."""
    max_model_len = state.config.max_model_len
    if prompt_len >= max_model_len:
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's maximum context length is "
                       f"{max_model_len} (including at least one generated token)", "messages",
                       "context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    why = state.engine.check_fits(prompt_len, max_tokens)
    if why:
        raise APIError(400, why, "max_tokens", "context_length_exceeded")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise APIError(400, "stop strings must be non-empty", "stop", "invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                          top_p=1.0 if req.top_p is None else req.top_p,
                          top_k=0 if req.top_k is None else req.top_k, seed=req.seed, stop=stop,
                          stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos)


def include_usage(req: SamplingFields) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))

# ---- engine plumbing -------------------------------------------------------------------------


def submit(state: ServerState, prompt_ids: list[int], params: SamplingParams, request_id: str) -> asyncio.Queue:
    """Queue the request in the engine; its events arrive on the returned asyncio queue."""
    queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
    push = state.relay.push
    try:
        state.engine.submit(prompt_ids, params, lambda event: push(queue, event), request_id)
    except RuntimeError as exc:
        raise APIError(503, f"engine stopped: {exc}", None, "engine_dead", "server_error") from None
    return queue


async def watch_disconnect(request: Request, engine: Engine, request_id: str) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.5)
    engine.abort(request_id)


async def collect(request: Request, engine: Engine, queue: asyncio.Queue, request_id: str,
                  watch: bool = False) -> AsyncIterator[EngineEvent]:
    """Events of one request, those that queued up while the consumer was busy merged into one.

    A streaming response is cancelled by Starlette when its client leaves; ``watch`` polls for
    that otherwise (non-streaming). Either way the request is aborted in the engine."""
    watcher = asyncio.create_task(watch_disconnect(request, engine, request_id)) if watch else None
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


async def respond(request: Request, state: ServerState, prompt_ids: list[int], params: SamplingParams,
                  body: ChatResponse | CompletionResponse, stream: bool) -> Response:
    """Run the request in the engine and answer with ``body``'s chunks as server-sent events, or
    with its whole body once generation ends."""
    engine, request_id = state.engine, body.request_id
    queue = submit(state, prompt_ids, params, request_id)
    if stream:
        async def events() -> AsyncIterator[str]:
            for item in body.opening():
                yield sse(item)
            async for event in collect(request, engine, queue, request_id):
                for item in body.chunks(event):
                    yield sse(item)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    text, last = [], None
    async for event in collect(request, engine, queue, request_id, watch=True):
        text.append(event.text)
        last = event
    if last is None or last.finish_reason == "abort":
        return Response(status_code=499)  # the client left; nobody reads this
    if last.finish_reason == "error":
        return JSONResponse(engine_error(last), status_code=503 if engine.fatal_error else 500)
    return JSONResponse(body.whole("".join(text), last))

# ---- routes ----------------------------------------------------------------------------------


router = APIRouter()  # open: probes and scrapers carry no API key
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.get("/health")
async def health(state: State) -> Response:
    if state.engine.fatal_error:
        return error_response(503, f"engine stopped: {state.engine.fatal_error}", None, "engine_dead",
                              "server_error")
    return JSONResponse({"status": "ok", "backend": state.config.backend, "model": state.config.model_name})


@router.get("/metrics")
async def prometheus_metrics(state: State) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@v1.get("/models")
async def models(state: State) -> JSONResponse:
    config = state.config
    return JSONResponse({"object": "list", "data": [{
        "id": config.model_name, "object": "model", "created": config.created, "owned_by": "hwlayer",
        "max_model_len": config.max_model_len, "backend": config.backend,
        "chat_template": config.chat_template.source}]})


@v1.post("/chat/completions", dependencies=[Depends(require_live_engine)])
async def chat_completions(request: Request, state: State) -> Response:
    req: ChatCompletionRequest = await parse_request(request, state, ChatCompletionRequest)
    prompt = render_prompt(state, req)
    tools = req.tools if req.tool_choice != "none" else None  # "none": tools stay in the prompt (vLLM)
    prompt_ids = await encode(state.tokenizer, prompt)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(state, req, len(prompt_ids), max_tokens)
    parser = GLMOutputParser(prompt_opens_thinking(prompt), tools, stream=req.stream)
    body = ChatResponse("chatcmpl-" + uuid.uuid4().hex, state.config.model_name, parser, include_usage(req))
    return await respond(request, state, prompt_ids, params, body, req.stream)


@v1.post("/completions", dependencies=[Depends(require_live_engine)])
async def completions(request: Request, state: State) -> Response:
    req: CompletionRequest = await parse_request(request, state, CompletionRequest)
    prompt_ids = await completion_prompt_ids(state.tokenizer, req.prompt)
    params = sampling_params(state, req, len(prompt_ids), req.max_tokens if req.max_tokens is not None else 16)
    body = CompletionResponse("cmpl-" + uuid.uuid4().hex, state.config.model_name, include_usage(req))
    return await respond(request, state, prompt_ids, params, body, req.stream)

# ---- the app ---------------------------------------------------------------------------------


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.type)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, code)


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


def create_app(engine: Engine, tokenizer: Any, config: ServerConfig, metrics: ServingMetrics) -> Any:
    """The ASGI app serving ``engine``. The engine thread is started/stopped with the app's lifespan."""
    app = FastAPI(title="hwlayer GLM-5 server", lifespan=lifespan)
    app.state.server = ServerState(engine, tokenizer, config, metrics)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.include_router(router)
    app.include_router(v1)
    counted = {route.path for routes in (router.routes, v1.routes) for route in routes}
    return _CountRequests(app, metrics, counted)
