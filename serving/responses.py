"""OpenAI's Responses API (``POST /v1/responses``) on the same engine as chat completions, stateless.

A request is turned into a chat request (:func:`chat_request`: ``instructions`` + ``input`` items ->
messages, flat function tools -> chat tools, ``text.format`` -> ``response_format``, ``reasoning.effort`` ->
the thinking switch), rendered, constrained and sampled exactly as ``/v1/chat/completions`` would, and
the generated text is parsed by the same :class:`serving.parsers.GLMOutputParser`. :class:`ResponseBuilder`
turns the parsed pieces into output items (``reasoning``, ``message``, ``function_call``, in the order
the model writes them) and, when streaming, into the typed events the openai SDK reads
(``response.created``, ``response.output_item.added``, ``response.output_text.delta``, ...,
``response.completed``), each with its ``sequence_number``; shapes checked against the openai package's
types and vLLM's ``vllm/entrypoints/openai/responses/simple_streaming_events.py``.

Nothing is stored (every response is ``store: false``, as vLLM without its response store): what needs
stored state (``previous_response_id``, ``conversation``, ``background``, ``item_reference`` inputs,
``GET /v1/responses/{id}``) is a 400 / 404 naming it. A reasoning item sent back in ``input`` is rendered
into the prompt from its ``content`` (or ``summary``) text, so interleaved thinking survives tool calls
without stored state. Other unsupported features (hosted tools, image / file inputs, ``top_logprobs``,
``include`` values other than ``reasoning.encrypted_content``) are a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from .api import (
    Job,
    State,
    check_messages,
    collect,
    compile_grammar,
    encode,
    forced_tool_choice,
    parse_request,
    render_prompt,
    require_api_key,
    require_live_engine,
    response_format_schema,
    sampling_params,
    submit,
)
from .chat import prompt_opens_thinking
from .engine import EngineEvent
from .parsers import GLMOutputParser, ParsedDelta
from .protocol import REASONING_EFFORTS, APIError, ChatCompletionRequest, ForcedTools, RequestBody, validation_message

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


class ResponsesRequest(RequestBody):
    """``responses.create`` as the openai SDK sends it (fields of ``ResponseCreateParamsBase``; vLLM's extra
    sampling fields ``seed``, ``top_k``, ``min_p``, ``repetition_penalty``)."""

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)  # limits hosted (built-in) tool calls: none here
    reasoning: dict[str, Any] | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: str | None = None
    top_logprobs: int | None = None
    # need stored state or hosted features: a 400 unless null / false (check_unsupported)
    store: bool | None = None  # accepted; nothing is ever stored (the response says store: false)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None
    prompt: dict[str, Any] | None = None
    context_management: Any = None
    # accepted and ignored, as on chat
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    safety_identifier: str | None = None
    moderation: Any = None
    access_programs: Any = None
    background_options: Any = None  # only with background: true, which is refused
    image: Any = None  # image generation options: no images are generated


RESPONSES_IGNORED = ("store", "metadata", "user", "service_tier", "prompt_cache_key", "prompt_cache_options",
                     "prompt_cache_retention", "safety_identifier", "moderation", "max_tool_calls", "access_programs",
                     "background_options", "image")
INCLUDABLE = ("reasoning.encrypted_content",)  # accepted: reasoning comes back as plain content instead


_STORED = "this server stores no responses (every response is store: false); send the whole conversation in input"
RESPONSES_REFUSED = {  # a 400 naming the field unless null (background: unless false; top_logprobs: unless 0)
    "previous_response_id": _STORED,
    "conversation": _STORED,
    "prompt": "reusable prompts are stored on OpenAI's platform, not here; send instructions and input",
    "context_management": "server-side context compaction needs stored state, which this server does not keep",
    "background": "",
    "top_logprobs": "",
}


def check_unsupported(req: ResponsesRequest) -> None:
    for name, why in RESPONSES_REFUSED.items():
        if why and getattr(req, name) is not None:
            raise APIError(400, f"{name}: {why}", name, "unsupported")
    if req.background:
        raise APIError(400, "background: background responses are polled from stored state, which this server does "
                       "not keep; send background: false", "background", "unsupported")
    if req.top_logprobs:
        raise APIError(400, "top_logprobs: not supported on /v1/responses; use /v1/chat/completions with logprobs",
                       "top_logprobs", "unsupported")
    for i, item in enumerate(req.include or []):
        if item not in INCLUDABLE:
            raise APIError(400, f"include[{i}]: {item!r} is not supported; expected one of {', '.join(INCLUDABLE)}",
                           f"include[{i}]", "unsupported")
    if req.truncation not in (None, "disabled", "auto"):
        raise APIError(400, f"truncation: {req.truncation!r} is not one of 'disabled', 'auto'", "truncation",
                       "invalid_value")
    unknown = sorted(set(req.stream_options or {}) - {"include_obfuscation"})
    if unknown:
        raise APIError(400, f"stream_options.{unknown[0]}: unknown option; expected include_obfuscation",
                       "stream_options", "invalid_value")


# ---- request -> chat request -----------------------------------------------------------------------


def _text_of(content: Any, where: str) -> str:
    """The text of an input message's content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content: expected a string or a list of content parts, got "
                       f"{type(content).__name__}", f"{where}.content", "invalid_value")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal", "summary_text", "reasoning_text"):
            text = part.get("text", part.get("refusal"))
            if not isinstance(text, str):
                raise APIError(400, f"{where}.content[{j}].text: expected a string", f"{where}.content[{j}]",
                               "invalid_value")
            parts.append(text)
        else:
            raise APIError(400, f"{where}.content[{j}]: content part type {kind!r} is not supported; GLM-5 reads "
                           "text only (input_text, output_text)", f"{where}.content[{j}]", "unsupported")
    return "".join(parts)


def input_messages(req: ResponsesRequest) -> list[dict]:
    """Chat messages from ``instructions`` and ``input``: consecutive reasoning / function_call items join the
    assistant turn they belong to; function_call_output items become tool messages."""
    messages: list[dict] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]

    def assistant() -> dict:  # the open assistant turn (made when the last message is not one)
        if not messages or messages[-1]["role"] != "assistant":
            messages.append({"role": "assistant", "content": None})
        return messages[-1]

    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where}: expected an input item object", where, "invalid_value")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise APIError(400, f"{where}.role: {role!r} is not one of user, system, developer, assistant",
                               f"{where}.role", "invalid_value")
            text = _text_of(item.get("content"), where)
            if role == "assistant":
                turn = assistant()
                if turn.get("tool_calls"):  # text after calls: a new turn
                    messages.append({"role": "assistant", "content": text})
                else:
                    turn["content"] = (turn["content"] or "") + text
            else:
                messages.append({"role": role, "content": text})
        elif kind == "reasoning":
            texts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
            texts = texts or [p.get("text", "") for p in item.get("summary") or [] if isinstance(p, dict)]
            if not texts and item.get("encrypted_content"):
                raise APIError(400, f"{where}: this reasoning item carries only encrypted_content, which this server "
                               "cannot read (it never issues any); send the item's content", where, "unsupported")
            turn = assistant()
            turn["reasoning_content"] = (turn.get("reasoning_content") or "") + "".join(texts)
        elif kind == "function_call":
            if not isinstance(item.get("name"), str):
                raise APIError(400, f"{where}.name: expected the function's name", f"{where}.name", "invalid_value")
            turn = assistant()
            turn.setdefault("tool_calls", []).append({
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text_of(output, where)})
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item_reference needs stored items, which this server does not keep; send "
                           "the item itself", where, "unsupported")
        else:
            raise APIError(400, f"{where}.type: input item type {kind!r} is not supported (expected message, "
                           "reasoning, function_call, function_call_output)", f"{where}.type", "unsupported")
    return messages


def chat_tools(req: ResponsesRequest) -> list[dict] | None:
    tools = []
    for i, tool in enumerate(req.tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise APIError(400, f"tools[{i}].type: {kind!r} tools are not supported; this server runs function tools "
                           "only (hosted tools such as web_search need OpenAI's platform)", f"tools[{i}]",
                           "unsupported")
        if not isinstance(tool.get("name"), str):
            raise APIError(400, f"tools[{i}].name: expected the function's name", f"tools[{i}].name", "invalid_value")
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object"}}
        if tool.get("description"):
            function["description"] = tool["description"]
        tools.append({"type": "function", "function": function})
    return tools or None


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(400, f"tool_choice {json.dumps(choice)[:60]}: expected 'none', 'auto', 'required' or "
                   "{'type': 'function', 'name': ...} (hosted tools and allowed_tools are not supported)",
                   "tool_choice", "unsupported")


def chat_response_format(text: dict | None) -> dict | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": fmt.get("schema"),
                                                        "strict": fmt.get("strict")}}
    raise APIError(400, f"text.format.type {fmt.get('type')!r} is not one of 'text', 'json_object', 'json_schema'",
                   "text", "invalid_value")


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    effort = (req.reasoning or {}).get("effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise APIError(400, f"reasoning.effort: {effort!r} is not one of {', '.join(REASONING_EFFORTS)}",
                       "reasoning", "invalid_value")
    body = {"model": req.model, "messages": input_messages(req), "max_completion_tokens": req.max_output_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "top_k": req.top_k, "min_p": req.min_p,
            "repetition_penalty": req.repetition_penalty, "seed": req.seed, "tools": chat_tools(req),
            "tool_choice": chat_tool_choice(req.tool_choice), "parallel_tool_calls": req.parallel_tool_calls,
            "reasoning_effort": effort, "response_format": chat_response_format(req.text)}
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except Exception as exc:  # a ValidationError: our own mapping of a field that passed ResponsesRequest
        message, param = validation_message(exc) if hasattr(exc, "errors") else (str(exc), None)
        raise APIError(400, message, param, "invalid_value") from None

# ---- output items and events -----------------------------------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponseBuilder:
    """Output items from parsed model output, in the order the model writes them (reasoning, message text,
    function calls), and the stream events that build them. ``feed`` returns the events of one parsed
    piece; ``close`` ends the open item. ``forced``: tool_choice required / named (the JSON content becomes
    function calls at the end, as on chat)."""

    def __init__(self, forced: ForcedTools | None) -> None:
        self.forced = forced
        self.output: list[dict] = []  # finished items
        self.open: dict | None = None  # the item being written: {"kind", "item", ...}
        self.held = ""  # forced tool calls: the JSON content
        self.seq = 0

    def event(self, kind: str, **fields: Any) -> dict:
        out = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return out

    def _index(self) -> int:
        return len(self.output)

    def _start(self, kind: str, item: dict, part: dict | None) -> list[dict]:
        self.open = {"kind": kind, "item": item, "text": ""}
        events = [self.event("response.output_item.added", output_index=self._index(), item=dict(item))]
        if part is not None:
            events.append(self.event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                                     content_index=0, part=part))
        return events

    def close(self) -> list[dict]:
        if self.open is None:
            return []
        kind, item, text = self.open["kind"], self.open["item"], self.open["text"]
        index, events = self._index(), []
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            events.append(self.event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=text))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
            item = {**item, "status": "completed", "content": [part]}
        elif kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=text, logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
            item = {**item, "status": "completed", "content": [part]}
        else:  # function_call
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=text))
            item = {**item, "status": "completed", "arguments": text}
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        self.open = None
        return events

    def _switch(self, kind: str) -> list[dict]:
        return self.close() if self.open is not None and self.open["kind"] != kind else []

    def feed(self, parsed: ParsedDelta) -> list[dict]:
        events: list[dict] = []
        if parsed.reasoning:
            events += self._switch("reasoning")
            if self.open is None:
                events += self._start("reasoning", {"id": _id("rs"), "type": "reasoning", "summary": [],
                                                    "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            self.open["text"] += parsed.reasoning
            events.append(self.event("response.reasoning_text.delta", item_id=self.open["item"]["id"],
                                     output_index=self._index(), content_index=0, delta=parsed.reasoning))
        if parsed.content and self.forced is not None:
            self.held += parsed.content
        elif parsed.content:
            events += self._switch("message")
            if self.open is None:
                events += self._start("message", {"id": _id("msg"), "type": "message", "role": "assistant",
                                                  "status": "in_progress", "content": []},
                                      {"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            self.open["text"] += parsed.content
            events.append(self.event("response.output_text.delta", item_id=self.open["item"]["id"],
                                     output_index=self._index(), content_index=0, delta=parsed.content,
                                     logprobs=[]))
        for delta in parsed.tool_calls:
            if delta.name is not None:  # a new call opens
                events += self.close()
                item = {"id": _id("fc"), "type": "function_call", "call_id": delta.id or _id("call"),
                        "name": delta.name, "arguments": "", "status": "in_progress"}
                events += self._start("function_call", item, None)
            if delta.arguments and self.open is not None and self.open["kind"] == "function_call":
                self.open["text"] += delta.arguments
                events.append(self.event("response.function_call_arguments.delta", item_id=self.open["item"]["id"],
                                         output_index=self._index(), delta=delta.arguments))
        return events

    def finish(self) -> list[dict]:
        """Close the open item; forced tool calls become function_call items now (or text, when cut short)."""
        events = self.close()
        if self.forced is not None and self.held:
            calls = self.forced.calls(self.held)
            if calls is None:  # cut short (length): the JSON so far, as text
                events += self._text_item(self.held)
            else:
                for call in calls:
                    item = {"id": _id("fc"), "type": "function_call", "call_id": call.id, "name": call.name,
                            "arguments": "", "status": "in_progress"}
                    events += self._start("function_call", item, None)
                    self.open["text"] = call.arguments
                    events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                             output_index=self._index(), delta=call.arguments))
                    events += self.close()
        return events

    def _text_item(self, text: str) -> list[dict]:
        forced, self.forced = self.forced, None
        events = self.feed(ParsedDelta(content=text)) + self.close()
        self.forced = forced
        return events


class ResponseBody:
    """The ``response`` object of one request, in any state."""

    def __init__(self, req: ResponsesRequest, model: str, tools: list[dict] | None) -> None:
        self.id, self.created = _id("resp"), int(time.time())
        self.req, self.model, self.tools = req, model, tools

    def body(self, status: str, output: list[dict], usage: dict | None = None, incomplete: str | None = None,
             error: dict | None = None) -> dict:
        req = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": self.model, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": {"effort": (req.reasoning or {}).get("effort"), "summary": None},
            "store": False, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "truncation": req.truncation or "disabled", "usage": usage, "user": req.user,
            "metadata": req.metadata or {},
        }


def response_usage(prompt_tokens: int, completion_tokens: int, reasoning_tokens: int) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + completion_tokens}


def sse_event(event: dict) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


@router.get("/responses/{response_id}")
@router.delete("/responses/{response_id}")
@router.post("/responses/{response_id}/cancel")
@router.get("/responses/{response_id}/input_items")
async def stored_response(response_id: str) -> None:
    raise APIError(404, f"response {response_id[:80]!r} not found: this server stores no responses (every response is "
                   "store: false)", None, "not_found")


@router.post("/responses", dependencies=[Depends(require_live_engine)])
async def create_response(request: Request, state: State) -> Response:
    req: ResponsesRequest = await parse_request(request, state, ResponsesRequest)
    check_unsupported(req)
    chat = chat_request(req)
    check_messages(chat.messages)
    _, forced, schema = forced_tool_choice(chat)
    constrained, format_schema = response_format_schema(chat.response_format)
    if constrained and forced is not None:
        raise APIError(400, "text.format cannot be combined with tool_choice 'required' or a named function (both "
                       "constrain the output)", "text", "invalid_value")
    prompt = render_prompt(state, chat)
    thinking = prompt_opens_thinking(prompt)
    prompt_ids = await encode(state, prompt, "input")
    structured = None
    if constrained or forced is not None:
        structured = await compile_grammar(state, format_schema if constrained else schema,
                                           "text" if constrained else "tool_choice",
                                           state.token_id("</think>") if thinking else None)
    params = sampling_params(state, chat, len(prompt_ids), chat.max_completion_tokens, "input", None, structured)
    call_end = state.token_id("</tool_call>")
    tools = chat.tools if chat.tool_choice != "none" else None
    if tools and forced is None and req.parallel_tool_calls is False and call_end is not None:
        params.stop_after_token_ids = [call_end]
    parser = GLMOutputParser(thinking, None if forced else tools, stream=req.stream)
    builder, body = ResponseBuilder(forced), ResponseBody(req, state.config.model_name, tools)
    queue, request_ids = submit(state, [Job(prompt_ids, params)], body.id)

    def reasoning_tokens() -> int:
        text = "".join(p["text"] for item in builder.output if item["type"] == "reasoning" for p in item["content"])
        return len(state.tokenizer.encode(text, add_special_tokens=False).ids) if text else 0

    def final(event: EngineEvent) -> tuple[str, dict]:
        usage = response_usage(event.prompt_tokens, event.completion_tokens, reasoning_tokens())
        # the stream ends with response.completed even when max_output_tokens cut it (status "incomplete" in the
        # body), as vLLM and SGLang do: the openai SDK's responses.stream() finalizes only on response.completed
        if event.finish_reason == "length":
            return "response.completed", body.body("incomplete", builder.output, usage, "max_output_tokens")
        return "response.completed", body.body("completed", builder.output, usage)

    def failed(event: EngineEvent) -> dict:
        return body.body("failed", builder.output, None, None,
                         {"code": "server_error", "message": event.error or "request failed"})

    if req.stream:
        async def events() -> AsyncIterator[str]:
            yield sse_event(builder.event("response.created", response=body.body("in_progress", [])))
            yield sse_event(builder.event("response.in_progress", response=body.body("in_progress", [])))
            async for _, event in collect(request, state.engine, queue, request_ids):
                parsed = parser.feed(event.text)
                if event.finished:
                    parsed.extend(parser.finish())
                for item in builder.feed(parsed):
                    yield sse_event(item)
                if event.finished:
                    if event.finish_reason in ("error", "abort"):
                        yield sse_event(builder.event("response.failed", response=failed(event)))
                        return
                    for item in builder.finish():
                        yield sse_event(item)
                    kind, whole = final(event)
                    yield sse_event(builder.event(kind, response=whole))

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    last = None
    async for _, event in collect(request, state.engine, queue, request_ids, watch=True):
        parsed = parser.feed(event.text)
        if event.finished:
            parsed.extend(parser.finish())
            last = event
        builder.feed(parsed)
    if last is None or (last.finish_reason == "abort" and not last.error):
        return Response(status_code=499)  # the client left
    if last.finish_reason in ("error", "abort"):
        return JSONResponse({"error": {"message": last.error or "request failed", "type": "server_error",
                                       "param": None, "code": "engine_error"}},
                            status_code=503 if state.engine.fatal_error or last.finish_reason == "abort" else 500)
    builder.finish()
    return JSONResponse(final(last)[1])
