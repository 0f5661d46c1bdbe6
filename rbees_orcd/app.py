"""The orchestrator's HTTP API (FastAPI): workers, tasks and their event streams, /health, /metrics.

The OpenAI-compatible routes live in openai_api.py. Every route but /health and /metrics needs the bearer
token when --api-token-file is set; the token is also taken as the password of HTTP Basic auth, so that a
stock worker can present it through its callback URL (`http://rbees:TOKEN@host:8080/v2/workers/ready`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from rbees_orcd import openai_api
from rbees_orcd.errors import (
    AuthFailed,
    InvalidParams,
    MethodNotAllowed,
    OrcdError,
    RouteNotFound,
    TaskNotFound,
    WorkerNotFound,
)
from rbees_orcd.health import HealthPoller
from rbees_orcd.metrics import OrcdMetrics
from rbees_orcd.registry import Registry, Worker
from rbees_orcd.relay import Relay
from rbees_orcd.scheduler import Scheduler
from rbees_orcd.schemas import (
    SSE_EVENT,
    CancelAccepted,
    Health,
    TaskAccepted,
    TaskRequest,
    TaskView,
    WorkerAdd,
    WorkerList,
    WorkerReady,
    WorkerView,
)
from rbees_orcd.settings import Settings
from rbees_orcd.sse import SseStream
from rbees_orcd.tasks import Task, sse_frames
from rbees_workerd.schemas import ErrorBody, ValidationErrors
from rbees_workerd.server import CorrelationMiddleware, internal_error, openapi_without_422

log = logging.getLogger("rbees_orcd.app")

_SSE_DOC = {"description": "SSE: queued, started, token*, metrics, end | error; each with its `id:`"}


@dataclass
class Orcd:
    """Everything one orchestrator process holds."""

    settings: Settings
    registry: Registry
    relay: Relay
    metrics: OrcdMetrics
    scheduler: Scheduler
    poller: HealthPoller


def build(settings: Settings) -> Orcd:
    registry = Registry(settings.db)
    depths: dict[str, Any] = {}
    metrics = OrcdMetrics(registry, lambda: depths["scheduler"].queue_depths())
    relay = Relay(settings.worker_tokens, metrics)
    scheduler = Scheduler(settings, registry, relay, metrics)
    depths["scheduler"] = scheduler
    return Orcd(settings, registry, relay, metrics, scheduler, HealthPoller(scheduler))


_FIELD = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|[0-9]+)$")
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def field_errors(exc: RequestValidationError) -> list[dict[str, str]]:
    """Pydantic's errors as {field, constraint, message}; the rejected input is left out on purpose, and so
    are the union members' tags in a location (`stop.function-after[...]` is `stop`)."""
    out = []
    for e in exc.errors():
        loc = [] if e["type"] == "json_invalid" else [str(p) for p in e.get("loc", ()) if p != "body"]
        loc = [p for p in loc if _FIELD.match(p) and p not in _TYPE_TAGS]
        ctx = {k: v for k, v in (e.get("ctx") or {}).items() if k != "error"}
        constraint = e["type"] + "".join(f" {k}={v}" for k, v in ctx.items())
        out.append({"field": ".".join(loc) or "body", "constraint": constraint, "message": e["msg"]})
    return out


def _presented_token(authorization: str) -> str:
    """The token of a `Bearer` header, or the password of a `Basic` one ("" when neither)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        with contextlib.suppress(binascii.Error, UnicodeDecodeError):
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
    return ""


def _v2_error(error: OrcdError) -> JSONResponse:
    body = {"errors": error.errors} if isinstance(error, InvalidParams) else error.to_dict()
    return JSONResponse(body, status_code=error.status, headers=error.headers())


def _error_response(request: Request, error: OrcdError) -> JSONResponse:
    if request.url.path.startswith("/v1/"):
        return openai_api.error_response(error)
    return _v2_error(error)


_STATUS_TEXT = {
    400: "INVALID_PARAMS: what is wrong with each field",
    401: "AUTH_FAILED",
    404: "MODEL_NOT_FOUND, TASK_NOT_FOUND or WORKER_NOT_FOUND",
    409: "TASK_ENDED",
    429: "QUEUE_FULL (see Retry-After)",
    503: "POOL_UNAVAILABLE or SHUTTING_DOWN (see Retry-After)",
}


def _errors_doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ValidationErrors if status == 400 else ErrorBody, "description": _STATUS_TEXT[status]}
        for status in statuses
    }


def create_app(settings: Settings) -> FastAPI:
    orcd = build(settings)
    scheduler, registry = orcd.scheduler, orcd.registry

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        polling = asyncio.create_task(orcd.poller.run())
        try:
            yield
        finally:
            polling.cancel()
            await scheduler.shutdown()
            await orcd.relay.close()
            registry.close()

    app = FastAPI(
        title="rbees-orcd",
        version="0.1.0",
        description="Routes requests to rbees workers, queues them and relays their token streams.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.orcd = orcd
    app.add_middleware(CorrelationMiddleware)
    bearer = HTTPBearer(auto_error=False, description="The token of --api-token-file")
    expected = settings.api_token

    async def require_token(request: Request, _: Any = Depends(bearer)) -> None:
        if expected is None:
            return
        given = _presented_token(request.headers.get("authorization", ""))
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise AuthFailed("missing or wrong bearer token")

    secured = [Depends(require_token)] if expected is not None else []
    auth = (401,) if expected is not None else ()

    @app.exception_handler(OrcdError)
    async def _orcd_error(request: Request, exc: OrcdError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, InvalidParams("invalid request", field_errors(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            error: OrcdError = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        else:  # 400: a body that is not even text
            detail = str(exc.detail)
            error = InvalidParams(detail, [{"field": "body", "constraint": "json_invalid", "message": detail}])
        return _error_response(request, error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error(request, log)

    # ---- workers
    def register(worker: Worker) -> WorkerView:
        for other in registry.all():  # one URL is one process: an older worker there is gone
            if other.url == worker.url and other.worker_id != worker.worker_id:
                registry.remove(other.worker_id)
        registry.register(worker)
        log.info(
            f"worker {worker.worker_id} registered for {worker.model} at {worker.url}",
            extra={"fields": {"worker_id": worker.worker_id, "model": worker.model, "url": worker.url}},
        )
        scheduler.dispatch(worker.model)
        return WorkerView(**worker.to_json())

    @app.post("/v2/workers/ready", dependencies=secured, responses=_errors_doc(400, *auth))
    async def worker_ready(body: WorkerReady) -> WorkerView:
        """A worker's ready callback: it serves `model_ref` at `url` from now on."""
        now = time.time()
        return register(
            Worker(
                worker_id=body.worker_id, url=body.url, model=body.model_ref, backend=body.backend,
                device=body.device, vram_bytes=body.vram_bytes, slots_total=body.slots_total,
                registered_at=now, last_seen=now,
            )
        )  # fmt: skip

    @app.post("/v2/workers", status_code=201, dependencies=secured, responses=_errors_doc(400, *auth))
    async def worker_add(body: WorkerAdd) -> WorkerView:
        """Register a running worker by hand; its /health must answer, Ready, for the model given (if any)."""
        probe = Worker(body.worker_id, body.url, body.model_ref or "", "", None, 0, 1)
        health = await orcd.relay.health(probe)
        if health is None or not isinstance(health.get("model"), str) or not isinstance(health.get("slots_total"), int):
            message = f"{body.url}/health does not answer as an rbees worker"
            raise InvalidParams(message, [{"field": "url", "constraint": "worker", "message": message}])
        if body.model_ref is not None and health["model"] != body.model_ref:
            message = f"the worker serves {health['model']!r}, not {body.model_ref!r}"
            raise InvalidParams(message, [{"field": "model_ref", "constraint": "served", "message": message}])
        now = time.time()
        worker = Worker(
            worker_id=body.worker_id, url=body.url, model=health["model"],
            backend=_text_or_none(health.get("backend")) or "",
            device=_text_or_none(health.get("device")), vram_bytes=_int(health.get("vram_bytes")),
            slots_total=max(1, health["slots_total"]), registered_at=now, last_seen=now,
            state="healthy" if health.get("status") == "ok" else "loading",
        )  # fmt: skip
        return register(worker)

    @app.get("/v2/workers", dependencies=secured, responses=_errors_doc(*auth))
    async def workers() -> WorkerList:
        """Every registered worker, its state and the jobs relayed from it now."""
        return WorkerList(workers=[WorkerView(**w.to_json()) for w in registry.all()])

    @app.delete("/v2/workers/{worker_id}", status_code=204, dependencies=secured, responses=_errors_doc(*auth, 404))
    async def worker_delete(worker_id: str) -> Response:
        """Forget a worker (its running streams go on; nothing new is placed on it)."""
        if registry.remove(worker_id) is None:
            raise WorkerNotFound(f"no registered worker {worker_id!r}")
        log.info(f"worker {worker_id} removed by request", extra={"fields": {"worker_id": worker_id}})
        return Response(status_code=204)

    # ---- tasks
    def get_task(job_id: str) -> Task:
        task = scheduler.tasks.get(job_id)
        if task is None:
            raise TaskNotFound(f"no task {job_id!r} (unknown, or ended too long ago)")
        return task

    def abandon_if_unread(task: Task) -> None:
        """A task nobody reads is cancelled once --resume-window has passed without a reader."""
        if task.readers == 0 and not task.ended:
            task.set_timer("orphan", settings.resume_window_s, lambda: _cancel_quietly(task))

    def _cancel_quietly(task: Task) -> None:
        if task.readers == 0 and not task.ended:
            log.info(f"task {task.job_id}: no reader for {settings.resume_window_s:g}s, cancelling",
                     extra={"fields": {"job_id": task.job_id}})  # fmt: skip
            scheduler.cancel(task)

    @app.post("/v2/tasks", status_code=202, dependencies=secured, responses=_errors_doc(400, *auth, 404, 429, 503))
    async def task_create(body: TaskRequest) -> TaskAccepted:
        """Queue a generation; read it from `events_url`."""
        request = body.model_dump(exclude={"model", "priority"}, exclude_none=True)
        task = Task(body.model, request, body.priority)
        scheduler.admit(task)
        abandon_if_unread(task)
        return TaskAccepted(
            job_id=task.job_id,
            status=task.status,
            queue_position=scheduler.queue_position(task),
            events_url=f"/v2/tasks/{task.job_id}/events",
        )

    @app.get("/v2/tasks/{job_id}", dependencies=secured, responses=_errors_doc(*auth, 404))
    async def task_get(job_id: str) -> TaskView:
        """A task's state."""
        task = get_task(job_id)
        return TaskView(**task.summary(), queue_position=scheduler.queue_position(task))

    @app.get(
        "/v2/tasks/{job_id}/events",
        status_code=200,
        dependencies=secured,
        response_class=SseStream,
        responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}, **_SSE_DOC},
                   **_errors_doc(400, *auth, 404)},
    )  # fmt: skip
    async def task_events(
        job_id: str, last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None
    ) -> SseStream:
        """The task's events as SSE, from the first one, or after `Last-Event-ID` when resuming."""
        task = get_task(job_id)
        start = _resume_index(last_event_id)
        task.readers += 1
        task.clear_timer("orphan")

        def leave() -> None:
            task.readers -= 1
            abandon_if_unread(task)

        return SseStream(task, start, sse_frames, leave)

    @app.post(
        "/v2/tasks/{job_id}/cancel", status_code=202, dependencies=secured, responses=_errors_doc(*auth, 404, 409)
    )
    async def task_cancel(job_id: str) -> CancelAccepted:
        """End the task; its stream ends with an `end` event whose stop_reason is CANCELLED."""
        task = get_task(job_id)
        scheduler.cancel(task)
        return CancelAccepted(job_id=job_id, status="cancelled" if task.ended else "cancelling")

    # ---- operations
    @app.get("/health")
    async def health() -> Health:
        """Workers by state and tasks waiting (unauthenticated)."""
        counts = {"total": 0, "healthy": 0, "unhealthy": 0, "loading": 0, "draining": 0}
        for w in registry.all():
            counts["total"] += 1
            counts[w.state] += 1
        return Health(
            status="ok" if counts["healthy"] else "degraded",
            workers=counts,
            queue_depth=sum(scheduler.queue_depths().values()),
        )

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                         "description": "Prometheus text format"}},
    )  # fmt: skip
    async def metrics() -> Response:
        """Prometheus metrics (unauthenticated)."""
        return Response(orcd.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.include_router(openai_api.router(scheduler, registry), dependencies=secured)

    @app.get("/openapi.json", include_in_schema=False, dependencies=secured)
    async def openapi() -> JSONResponse:
        """This API's OpenAPI schema (behind the token like every route but /health and /metrics)."""
        if app.openapi_schema is None:
            app.openapi_schema = openapi_without_422(app)
        return JSONResponse(app.openapi_schema)

    return app


def _text_or_none(value: object) -> str | None:
    return value[:256] if isinstance(value, str) else None


def _int(value: object) -> int:
    return value if isinstance(value, int) and 0 <= value < 2**63 else 0


def _resume_index(last_event_id: str | None) -> int:
    if last_event_id is None or last_event_id.strip() == "":
        return 0
    try:
        value = int(last_event_id.strip())
    except ValueError:
        value = -2
    if value < -1:
        message = "Last-Event-ID must be the id of an event of this task"
        raise InvalidParams(message, [{"field": "Last-Event-ID", "constraint": "event id", "message": message}])
    return value + 1
