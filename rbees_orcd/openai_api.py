"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Each request becomes a task like a /v2 one; these routes only translate. A request waits (queue included)
until its task has started before answering, so anything that fails before the first token is an HTTP
error of OpenAI's shape; a failure later in a stream is an `{"error": ...}` chunk, as OpenAI sends it.
A client that hangs up cancels its task.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rbees_orcd.errors import (
    InvalidParams,
    OrcdError,
    QueueTimeout,
    ShuttingDown,
    WorkerError,
    WorkerFailed,
    WorkerLost,
)
from rbees_orcd.registry import Registry
from rbees_orcd.scheduler import Scheduler
from rbees_orcd.schemas import (
    SSE_EVENT,
    ChatCompletion,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIRequest,
    TextCompletion,
)
from rbees_orcd.sse import Render, SseStream, past_queued, unless_disconnected
from rbees_orcd.tasks import Task

CHAT_MAX_TOKENS = 256
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          405: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error"}  # fmt: skip
_EVENT_ERRORS: dict[str, type[OrcdError]] = {c.code: c for c in (QueueTimeout, ShuttingDown, WorkerFailed, WorkerLost)}
ERROR_DOC = {"model": OpenAIError}
_MARK = "\x00"  # stands for a token's text in the encoded chunk it is cut out of


def error_response(error: OrcdError) -> JSONResponse:
    """`{"error": {message, type, param, code}}` with the error's status (and Retry-After)."""
    param = None
    message = error.message
    if isinstance(error, InvalidParams):
        first = error.errors[0]
        param, message = first["field"], f"{first['field']}: {first['message']}"
    detail = {"message": message, "type": _TYPES.get(error.status, "server_error"), "param": param, "code": error.code}
    return JSONResponse({"error": detail}, status_code=error.status, headers=error.headers())


def event_error(data: dict[str, Any] | None) -> OrcdError:
    """The error a task's `error` event (its document) stands for."""
    data = data or {}
    code, message = str(data.get("code")), str(data.get("message", ""))
    if code == "INVALID_PARAMS":
        return InvalidParams(message, data.get("errors") or None)
    known = _EVENT_ERRORS.get(code)
    return known(message) if known is not None else WorkerError(code, message, bool(data.get("retriable")))


@dataclass(frozen=True)
class _Shape:
    """What differs between chat and text completions."""

    chat: bool
    id: str
    model: str
    created: int

    def choice(self, text: str | None, finish: str | None, *, chunk: bool, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if not chunk:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish}  # fmt: skip
        delta: dict[str, str] = {"role": "assistant", "content": ""} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def token_chunk(self, usage: Any) -> tuple[bytes, bytes]:
        """A token's stream chunk (`data: ...`) as the bytes before and after its text's JSON string. The chunks
        of a stream's tokens differ only in their text, the last string in them: they are encoded once."""
        doc = orjson.dumps(self.document([self.choice(_MARK, None, chunk=True)], chunk=True, usage=usage))
        head, _, tail = doc.rpartition(orjson.dumps(_MARK))
        return b"data: " + head, tail + b"\n\n"

    def document(self, choices: list[dict[str, Any]], *, chunk: bool, usage: Any = None) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        doc = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "system_fingerprint": None, "choices": choices}  # fmt: skip
        if usage is not False:
            doc["usage"] = usage
        return doc


def _usage(task: Task) -> dict[str, int]:
    tokens = int((task.end.data or {}).get("tokens_out", task.tokens_out)) if task.end else task.tokens_out
    return {"prompt_tokens": task.prompt_tokens, "completion_tokens": tokens,
            "total_tokens": task.prompt_tokens + tokens}  # fmt: skip


def _finish_reason(task: Task) -> str:
    return "length" if task.end is not None and (task.end.data or {}).get("stop_reason") == "MAX_TOKENS" else "stop"


def _sampling(body: OpenAIRequest, max_tokens: int) -> dict[str, Any]:
    request: dict[str, Any] = {"max_tokens": max_tokens}
    if body.temperature is not None:
        request["temperature"] = body.temperature
    if body.top_p is not None:
        request["top_p"] = body.top_p
    if body.seed is not None:
        request["seed"] = body.seed
    if body.stop is not None:
        request["stop"] = [body.stop] if isinstance(body.stop, str) else body.stop
    return request


def _chat_request(body: ChatCompletionRequest) -> dict[str, Any]:
    messages = [
        {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content),
        }
        for m in body.messages
    ]
    max_tokens = body.max_completion_tokens or body.max_tokens or CHAT_MAX_TOKENS
    return {"messages": messages, **_sampling(body, max_tokens)}


def _completion_request(body: CompletionRequest) -> dict[str, Any]:
    prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    return {"prompt": prompt, **_sampling(body, body.max_tokens or COMPLETION_MAX_TOKENS)}


def _answer_doc(model: type) -> dict[int | str, dict[str, Any]]:
    """200: the whole completion as JSON, or with `stream` its chunks as SSE."""
    sse = {"schema": SSE_EVENT}
    return {200: {"model": model, "content": {"text/event-stream": sse}, "description": "JSON, or SSE if `stream`"}}


def router(scheduler: Scheduler, registry: Registry) -> APIRouter:
    api = APIRouter(prefix="/v1", responses={status: ERROR_DOC for status in (400, 404, 429, 502, 503)})

    def cancel(task: Task) -> None:
        if not task.ended:
            scheduler.cancel(task)

    async def answer(request: Request, body: OpenAIRequest, shape: _Shape, worker_request: dict[str, Any]) -> Response:
        task = Task(body.model, worker_request)
        scheduler.admit(task)
        waiting = past_queued(task) if body.stream else task.wait_ended()
        if not await unless_disconnected(request.receive, waiting):
            cancel(task)
            return Response(status_code=499)  # nobody reads it
        if task.error is not None and (not body.stream or len(task.events) <= 2):
            raise event_error(task.error.data)  # before the first token: a plain HTTP error
        if not body.stream:
            text = "".join(text for kind, _, _, text in task.events if kind == "token")
            choice = shape.choice(text, _finish_reason(task), chunk=False)
            return JSONResponse(shape.document([choice], chunk=False, usage=_usage(task)))
        usage = body.stream_options is not None and body.stream_options.include_usage
        return SseStream(task, 1, _stream_render(shape, usage), lambda: cancel(task))  # 1: past `queued`

    @api.post("/chat/completions", responses=_answer_doc(ChatCompletion))
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        """OpenAI chat completion; the worker renders the messages with the model's chat template."""
        shape = _Shape(True, f"chatcmpl-{time.time_ns():x}", body.model, int(time.time()))
        return await answer(request, body, shape, _chat_request(body))

    @api.post("/completions", responses=_answer_doc(TextCompletion))
    async def completions(request: Request, body: CompletionRequest) -> Any:
        """OpenAI (legacy) text completion of a raw prompt."""
        shape = _Shape(False, f"cmpl-{time.time_ns():x}", body.model, int(time.time()))
        return await answer(request, body, shape, _completion_request(body))

    @api.get("/models")
    async def models() -> ModelList:
        """The models that at least one healthy worker serves."""
        first_seen: dict[str, float] = {}
        for w in registry.all():
            if w.state == "healthy":
                first_seen[w.model] = min(first_seen.get(w.model, w.registered_at), w.registered_at)
        return ModelList(data=[ModelCard(id=m, created=int(t)) for m, t in sorted(first_seen.items())])

    return api


def _stream_render(shape: _Shape, include_usage: bool) -> Render:
    """The task's events from an index on as OpenAI stream chunks, then `[DONE]` after its end."""
    usage: Any = None if include_usage else False  # with include_usage every chunk carries "usage": null
    token_head, token_tail = shape.token_chunk(usage)

    def data(doc: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(doc) + b"\n\n"

    def render(task: Task, start: int) -> bytes:
        out: list[bytes] = []
        for kind, _, document, text in task.events[start:]:
            if kind == "token":
                out.append(token_head + orjson.dumps(text) + token_tail)
            elif kind == "started" and shape.chat:  # the assistant's role comes first
                out.append(data(shape.document([shape.choice(None, None, chunk=True, first=True)], chunk=True,
                                               usage=usage)))  # fmt: skip
            elif kind == "end":
                finish = shape.choice(None, _finish_reason(task), chunk=True)
                out.append(data(shape.document([finish], chunk=True, usage=usage)))
                if include_usage:
                    out.append(data(shape.document([], chunk=True, usage=_usage(task))))
                out.append(b"data: [DONE]\n\n")
            elif kind == "error":
                error = event_error(document)
                detail = {"message": error.message, "type": "server_error", "param": None, "code": error.code}
                out.append(data({"error": detail}))
        return b"".join(out)

    return render
