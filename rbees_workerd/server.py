"""The worker's HTTP API (FastAPI): /execute, /cancel, /health, /ready, /metrics. HTTP only, no math.

`run` runs it: the socket is bound first, uvicorn starts serving, and the model loads in the
background so /health answers during loading; then the ready callback goes out. SIGTERM drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rbees_workerd import logs
from rbees_workerd.callback import CallbackFailed, send_ready
from rbees_workerd.errors import AuthFailed, FieldInvalid, InvalidParams, NotReady, PortUnavailable, RbeesError, lookup
from rbees_workerd.listener import Server, bind_socket
from rbees_workerd.runtime import WorkerRuntime, start_loading
from rbees_workerd.schemas import (
    CancelAccepted,
    CancelRequest,
    ErrorBody,
    ExecuteRequest,
    FieldError,
    Frame,
    Health,
    Readiness,
    ValidationErrors,
)
from rbees_workerd.settings import Settings
from rbees_workerd.stream import JobStream, with_server_send

log = logging.getLogger("rbees_workerd.server")

# One SSE event of /execute: its `data` is one JSON Frame (started, token, metrics, end or error).
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "event": {"type": "string"},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/Frame"},
        },
    },
}
_HTTP_CODES = {404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}
_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SCOPE_KEY = "rbees.correlation_id"


def _error_response(error: RbeesError) -> JSONResponse:
    if isinstance(error, FieldInvalid):
        return _validation_response([FieldError(field=error.field, constraint=error.constraint, message=error.message)])
    retry = lookup(error, "retry_after_s")
    headers = {"Retry-After": str(retry)} if retry is not None else {}
    return JSONResponse(error.to_dict(), status_code=lookup(error, "status", 500), headers=headers)


def _validation_response(errors: list[FieldError]) -> JSONResponse:
    return JSONResponse(ValidationErrors(errors=errors).model_dump(), status_code=400)


def _field_errors(exc: RequestValidationError) -> list[FieldError]:
    """Pydantic's errors as {field, constraint, message}; the rejected input is left out on purpose."""
    out = []
    for e in exc.errors():
        loc = [] if e["type"] == "json_invalid" else [str(p) for p in e.get("loc", ()) if p != "body"]
        ctx = {k: v for k, v in (e.get("ctx") or {}).items() if k != "error"}
        constraint = e["type"] + "".join(f" {k}={v}" for k, v in ctx.items())
        out.append(FieldError(field=".".join(loc) or "body", constraint=constraint, message=e["msg"]))
    return out


class CorrelationMiddleware:
    """Read X-Correlation-Id (or make one), expose it to the logs, and echo it on the response.

    The id is also left in the ASGI scope: the 500 handler runs in Starlette's
    ServerErrorMiddleware, outside this one, after the context variable is reset.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-correlation-id", b"").decode("latin-1")
        cid = given if _CORRELATION_ID.match(given) else uuid.uuid4().hex
        scope[_SCOPE_KEY] = cid
        token = logs.correlation_id.set(cid)

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-correlation-id", cid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            logs.correlation_id.reset(token)


class ExecuteFastPath:
    """POST /execute's common case served without FastAPI's routing, dependencies and validation layers, which
    took about as much of the event loop as the job's own admission: with 256 requests arriving at once the loop
    was busy some 50 ms before the first step's tokens went out.

    The common case is a JSON body that ExecuteRequest validates, with a raw prompt, and the token where one is
    set. Anything else goes, with its body, to the FastAPI route, which answers it as it always did (its 400s,
    401s, chat prompts). Both paths run the same start_job and JobStream, and their errors take the same
    `_error_response`. It sits inside CorrelationMiddleware (the id in the logs and on the response) and
    ServerErrorMiddleware (an unexpected error's 500)."""

    def __init__(self, app: ASGIApp, runtime: WorkerRuntime) -> None:
        self.app = app
        self._runtime = runtime
        token = runtime.settings.api_token
        self._authorization = None if token is None else f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/execute" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if body is None:
            return  # the client went away before its request was complete
        req = self._request(scope, body)
        if req is None:
            await self.app(scope, _replayed(body, receive), send)
            return
        try:
            job = await self._runtime.start_job(req)
        except RbeesError as e:
            await _error_response(e)(scope, receive, send)
            return
        await JobStream(self._runtime, job)(scope, receive, send)

    def _request(self, scope: Scope, body: bytes) -> ExecuteRequest | None:
        """The request, where this path may serve it; None where FastAPI's route must answer."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of a repeated header, as Starlette reads it
        if headers.get(b"content-type", b"").partition(b";")[0].strip().lower() != b"application/json":
            return None
        expected = self._authorization
        if expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), expected):
            return None
        try:
            req = ExecuteRequest.model_validate(json.loads(body))
        except ValueError:  # not JSON, or not valid (pydantic's ValidationError is a ValueError too)
            return None
        return req if req.messages is None else None


async def _read_body(receive: Receive) -> bytes | None:
    """The request's body, or None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replayed(body: bytes, receive: Receive) -> Receive:
    """`receive` as the app would have had it: the body already read, then whatever the server says next."""
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def _errors_doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    doc: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        if status == 400:
            doc[400] = {"model": ValidationErrors, "description": "Invalid request"}
        else:
            doc[status] = {
                "model": ErrorBody,
                "description": {
                    401: "AUTH_FAILED",
                    404: "JOB_NOT_FOUND",
                    503: "ALL_SLOTS_BUSY, WORKER_NOT_READY or WORKER_DRAINING",
                }[status],
            }
    return doc


def create_app(runtime: WorkerRuntime) -> FastAPI:
    """The FastAPI app of one worker; routes other than /health and /metrics need the token if one is set."""
    settings = runtime.settings
    app = FastAPI(
        title="rbees-workerd",
        version="0.1.0",
        description="One model, served over HTTP.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(ExecuteFastPath, runtime=runtime)
    app.add_middleware(CorrelationMiddleware)  # added last: it runs outside the fast path
    bearer = HTTPBearer(auto_error=False, description="The token of --api-token-file")

    async def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        expected = settings.api_token
        if expected is None:
            return
        given = creds.credentials if creds is not None else ""
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthFailed("missing or wrong bearer token")

    secured = [Depends(require_token)] if settings.api_token is not None else []
    auth_doc = (401,) if settings.api_token is not None else ()

    @app.exception_handler(RbeesError)
    async def _rbees_error(_: Request, exc: RbeesError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(_field_errors(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body that is not even text (FastAPI's "error parsing the body")
            return _validation_response([FieldError(field="body", constraint="json_invalid", message=exc.detail)])
        code = _HTTP_CODES.get(exc.status_code, "INVALID_PARAMS")
        body = {"code": code, "message": str(exc.detail), "retriable": False}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, log)

    @app.post(
        "/execute",
        dependencies=secured,
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "SSE stream: started, token*, metrics, end | error",
                "content": {
                    "text/event-stream": {"schema": _SSE_EVENT},
                },
            },
            **_errors_doc(400, *auth_doc, 503),
        },
    )
    async def execute(body: ExecuteRequest) -> StreamingResponse:
        """Generate; the response streams each token as it is sampled."""
        if body.messages is not None:
            body = await _with_chat_prompt(runtime, body)
        return JobStream(runtime, await runtime.start_job(body))

    @app.post("/cancel", status_code=202, dependencies=secured, responses=_errors_doc(400, *auth_doc, 404))
    async def cancel(body: CancelRequest) -> CancelAccepted:
        """End a running job; its stream ends with stop_reason CANCELLED."""
        runtime.cancel_job(body.job_id)
        return CancelAccepted(job_id=body.job_id)

    @app.get("/health")
    async def health() -> Health:
        """Liveness and capacity; always answers while the process runs (unauthenticated)."""
        info = runtime.info
        state = runtime.state
        return Health(
            status=state.health_status,
            state=state,
            model=settings.model_ref,
            backend=settings.backend,
            device=info.device if info is not None else None,
            vram_bytes=info.vram_bytes if info is not None else 0,
            slots_total=settings.slots,
            slots_free=runtime.slots_free,
        )

    @app.get(
        "/ready",
        dependencies=secured,
        responses={503: {"model": Readiness, "description": "Not ready yet (or draining)"}, **_errors_doc(*auth_doc)},
    )
    async def ready() -> Response:
        """200 once the model is loaded and jobs are accepted; 503 while loading or draining."""
        state = runtime.state
        body = Readiness(
            ready=state.accepts_jobs,
            state=state,
            load_progress=runtime.load_progress,
            phase=runtime.load_phase,
            model=settings.model_ref,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                "description": "Prometheus text format",
            }
        },
    )
    async def metrics() -> Response:
        """Prometheus metrics (unauthenticated)."""
        return Response(runtime.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False, dependencies=secured)
    async def openapi() -> JSONResponse:
        """This API's OpenAPI schema (behind the token like every route but /health and /metrics)."""
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app)
        return JSONResponse(app.openapi_schema)

    return app


async def _with_chat_prompt(runtime: WorkerRuntime, body: ExecuteRequest) -> ExecuteRequest:
    """The request with its chat messages rendered into the prompt by the model's own chat template."""
    if runtime.info is None or runtime.tokenizer is None:
        raise NotReady(runtime.loading_status())
    messages = [m.model_dump() for m in body.messages]
    try:
        prompt = await asyncio.to_thread(runtime.tokenizer.apply_chat_template, messages)
    except InvalidParams as e:
        raise FieldInvalid("messages", "chat_template", e.message) from e
    return body.model_copy(update={"prompt": prompt, "messages": None})


def openapi_without_422(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema with its 422 answers removed: the daemons answer a bad request with 400."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema["paths"].values():
        for operation in path.values():
            operation["responses"].pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    return schema


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The worker's schema: 400 for bad requests, and the SSE frames and /ready's body described."""
    schema = openapi_without_422(app)
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    frame = TypeAdapter(Frame).json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(frame.pop("$defs"))
    schemas["Frame"] = frame
    ready_ok = schema["paths"]["/ready"]["get"]["responses"]["200"]
    ready_ok["content"]["application/json"]["schema"] = {"$ref": "#/components/schemas/Readiness"}
    return schema


# ---- running the daemon --------------------------------------------------------------------------
class _Server(Server):
    """uvicorn without its signal handling: the daemon drains on SIGTERM itself, then exits 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def internal_error(request: Request, log: logging.Logger) -> JSONResponse:
    """The 500 of an exception no handler expected, logged with its traceback and the request's id."""
    cid = request.scope.get(_SCOPE_KEY) or uuid.uuid4().hex
    token = logs.correlation_id.set(cid)
    try:
        log.exception("unexpected error in a request")
    finally:
        logs.correlation_id.reset(token)
    body = {"code": "INTERNAL", "message": "internal error", "retriable": True}
    # Starlette re-raises after this response and uvicorn then closes the connection: say so,
    # or a keep-alive client sends its next request into the closing socket
    return JSONResponse(body, status_code=500, headers={"X-Correlation-Id": cid, "Connection": "close"})


async def _bring_up(runtime: WorkerRuntime, outcome: asyncio.Future[int]) -> None:
    """Load the model, then send the ready callback; any failure ends the daemon non-zero."""
    loop = asyncio.get_running_loop()

    def engine_failed(error: BaseException) -> None:
        loop.call_soon_threadsafe(_settle, outcome, 1)

    try:
        await start_loading(runtime, engine_failed)
    except RbeesError as e:
        log.error(f"loading the model failed: {e}", extra={"fields": {"code": e.code}})
        _settle(outcome, 1)
        return
    except Exception as e:  # noqa: BLE001 - any load failure is reported the same way
        log.error(
            f"loading the model failed: {type(e).__name__}: {e}",
            exc_info=True,  # unexpected: its traceback goes to the log (`exc`)
            extra={"fields": {"code": "MODEL_LOAD_FAILED"}},
        )
        _settle(outcome, 1)
        return
    url = runtime.settings.callback_url
    if url is None:
        return
    try:
        await send_ready(url, runtime.ready_payload())
    except CallbackFailed as e:
        log.error(str(e), extra={"fields": {"callback_url": url}})
        _settle(outcome, 1)


def _settle(outcome: asyncio.Future[int], code: int) -> None:
    if not outcome.done():
        outcome.set_result(code)


async def _serve(settings: Settings, sock: socket.socket) -> int:
    runtime = WorkerRuntime(settings)
    config = uvicorn.Config(
        with_server_send(create_app(runtime)),
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = _Server(config)
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[int] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _settle, outcome, 0)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            return 1
        await asyncio.sleep(0.01)
    log.info(f"listening on {settings.url}", extra={"fields": {"url": settings.url}})
    bring_up = asyncio.create_task(_bring_up(runtime, outcome))
    try:
        code = await outcome
        bring_up.cancel()
        if code == 0:
            await runtime.drain(settings.drain_timeout_s)
        server.should_exit = True
        await serving
    finally:
        runtime.stop()  # the engine process too: multiprocessing's exit handler would wait for it
    log.info(f"stopped (exit {code})", extra={"fields": {"exit_code": code}})
    return code


def run(settings: Settings) -> int:
    """Run the daemon until SIGTERM (exit 0) or a failure to load or to call back (exit 1).

    Raises PortUnavailable before logging starts when the address cannot be bound."""
    try:
        sock = bind_socket(settings.host, settings.port)
        sock.set_inheritable(True)
    except OSError as e:
        raise PortUnavailable(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}") from None
    logs.configure(settings.worker_id, settings.log_level)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(settings, sock))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (uvicorn[standard]): cheaper wake-ups and socket writes."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
