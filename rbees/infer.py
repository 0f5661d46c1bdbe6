"""`rbees infer`: one generation, streamed as it is produced, from a worker's `/execute` or the orchestrator's
`/v2/tasks` API (SSE both); Ctrl-C cancels the job on the server before we let go."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx

from rbees.errors import AuthFailed, Interrupted, InvalidArgument, JobFailed, RbeesError, RemoteLost, Unreachable

_RECONNECTS = 5  # orchestrator event streams resume with Last-Event-ID after a cut
_CANCEL_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Request:
    """What to generate; the sampling fields are the worker's `/execute` fields (None: the server's default)."""

    prompt: str
    max_tokens: int
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def body(self) -> dict[str, Any]:
        fields = {"prompt": self.prompt, "max_tokens": self.max_tokens, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed}  # fmt: skip
        body = {key: value for key, value in fields.items() if value is not None}
        return {**body, "stop": list(self.stop)} if self.stop else body


@dataclass
class Result:
    """The finished job, as `--json` prints it."""

    job_id: str
    model: str | None = None
    text: str = ""
    tokens_out: int = 0
    stop_reason: str | None = None
    tokens_per_sec: float | None = None
    time_to_first_token_ms: float | None = None
    elapsed_s: float = 0.0
    _started: float = field(default_factory=time.perf_counter, repr=False)
    _first_token: float | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {key: value for key, value in vars(self).items() if not key.startswith("_")}


OnToken = Callable[[str], None]
OnQueued = Callable[[int | None], None]


class Client:
    """An HTTP client for one server, with its bearer token (from a file or the environment, never argv)."""

    def __init__(self, base_url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(30.0, read=None))

    def close(self) -> None:
        self._http.close()

    def get(self, path: str) -> httpx.Response:
        with _http_errors(self.base_url):
            response = self._http.get(self.base_url + path)
        _raise_for_status(response, self.base_url)
        return response

    def post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> httpx.Response:
        with _http_errors(self.base_url):
            response = self._http.post(self.base_url + path, json=body, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        _raise_for_status(response, self.base_url)
        return response

    @contextlib.contextmanager
    def events(self, method: str, url: str, **kwargs: Any) -> Iterator[Iterator[tuple[str | None, dict[str, Any]]]]:
        """An SSE response's events as (id, payload); the payload's `type` falls back to the `event:` name."""
        with _http_errors(self.base_url), self._http.stream(method, url, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
            _raise_for_status(response, self.base_url)
            yield _sse(response)


def run_worker(url: str, request: Request, token: str | None, on_token: OnToken) -> Result:
    """Stream one job straight from a worker's `POST /execute`; Ctrl-C posts `/cancel` for it."""
    client = Client(url, token)
    try:
        if request.model is not None:
            served = client.get("/health").json().get("model")
            if served != request.model:
                raise InvalidArgument(f"{url} serves {served!r}, not {request.model!r}")
        result = Result(job_id=f"rbees-{uuid.uuid4().hex[:16]}")
        body = {"job_id": result.job_id, **request.body()}
        started = False
        try:
            with _CtrlC() as ctrl_c, client.events("POST", client.base_url + "/execute", json=body) as events:
                for _, event in events:
                    if event.get("type") == "started":  # from now on the worker knows the job: it can be cancelled
                        started = True
                        ctrl_c.arm(lambda: client.post("/cancel", {"job_id": result.job_id}, _CANCEL_TIMEOUT_S))
                    if _apply(event, result, on_token):
                        return ctrl_c.outcome(result)
        except Unreachable as exc:
            if not started:
                raise
            raise _lost(result, exc.message) from None
        raise _lost(result, "the stream ended before its end event")
    finally:
        client.close()


def run_orcd(url: str, request: Request, token: str | None, priority: str, on_token: OnToken,
             on_queued: OnQueued) -> Result:  # fmt: skip
    """Submit to the orchestrator (`POST /v2/tasks`), follow `/v2/tasks/{id}/events` (resuming after a cut
    with Last-Event-ID); Ctrl-C posts `/v2/tasks/{id}/cancel`."""
    client = Client(url, token)
    try:
        with _CtrlC() as ctrl_c:
            task = client.post("/v2/tasks", {**request.body(), "model": request.model, "priority": priority}).json()
            result = Result(job_id=str(task["job_id"]), model=request.model)
            ctrl_c.arm(lambda: client.post(f"/v2/tasks/{result.job_id}/cancel", {}, _CANCEL_TIMEOUT_S))
            on_queued(task.get("queue_position"))
            events_url = urljoin(client.base_url + "/", task.get("events_url") or f"v2/tasks/{result.job_id}/events")
            last_id: str | None = None
            for _attempt in range(_RECONNECTS + 1):
                headers = {"Last-Event-ID": last_id} if last_id is not None else {}
                try:
                    with client.events("GET", events_url, headers=headers) as events:
                        for event_id, event in events:
                            last_id = event_id if event_id is not None else last_id
                            if event.get("type") == "queued":
                                on_queued(event.get("queue_position"))
                            elif _apply(event, result, on_token):
                                return ctrl_c.outcome(result)
                except Unreachable:
                    if last_id is None:
                        raise
                    time.sleep(0.5)
        raise JobFailed(f"{url}: lost the events of task {result.job_id} {_RECONNECTS + 1} times")
    finally:
        client.close()


class _CtrlC:
    """While a job runs, the first Ctrl-C asks the server to cancel it, from a thread: the stream is read on until
    the server ends the job, so the slot is free when we exit. A second Ctrl-C gives up at once."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._cancel: Callable[[], object] | None = None
        self._previous: Any = None

    def __enter__(self) -> _CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *_: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def arm(self, cancel: Callable[[], object]) -> None:
        """The job exists on the server now: a Ctrl-C (even one that came before) cancels it."""
        if self._cancel is None:
            self._cancel = cancel
            if self.requested.is_set():
                self._send()

    def outcome(self, result: Result) -> Result:
        """The finished job, or Interrupted when Ctrl-C cancelled it."""
        if self.requested.is_set():
            raise Interrupted(
                f"job {result.job_id} cancelled on the server after {result.tokens_out} tokens "
                f"(stop reason {result.stop_reason})"
            )
        return result

    def _on_sigint(self, *_: object) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt
        self.requested.set()
        if self._cancel is not None:
            self._send()

    def _send(self) -> None:
        threading.Thread(target=self._cancel_quietly, name="rbees-cancel", daemon=True).start()

    def _cancel_quietly(self) -> None:
        with contextlib.suppress(RbeesError):  # e.g. the job had just ended: its end event tells
            assert self._cancel is not None
            self._cancel()


def _lost(result: Result, why: str) -> RemoteLost:
    return RemoteLost(f"job {result.job_id} lost after {result.tokens_out} tokens (the worker died?): {why}")


def _apply(event: dict[str, Any], result: Result, on_token: OnToken) -> bool:
    """Fold one event into `result`; True once the job has ended."""
    kind = event.get("type")
    now = time.perf_counter()
    if kind == "started":
        result.model = event.get("model", result.model)
    elif kind == "token":
        if result._first_token is None:
            result._first_token = now
            result.time_to_first_token_ms = round((now - result._started) * 1000, 1)
        result.text += event["t"]
        result.tokens_out += 1
        on_token(event["t"])
    elif kind == "metrics":
        result.tokens_per_sec = event.get("tokens_per_sec")
    elif kind == "end":
        result.tokens_out = event.get("tokens_out", result.tokens_out)
        result.stop_reason = event.get("stop_reason")
        result.elapsed_s = round(now - result._started, 3)
        if result.tokens_per_sec is None and result._first_token is not None and result.tokens_out > 1:
            result.tokens_per_sec = round((result.tokens_out - 1) / max(now - result._first_token, 1e-9), 2)
        return True
    elif kind == "error":
        raise JobFailed(f"job {result.job_id}: {event.get('code', 'ERROR')}: {event.get('message', '')}")
    return False


def _sse(response: httpx.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    event_id: str | None = None
    name: str | None = None
    data: list[str] = []
    for line in response.iter_lines():
        if line:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "data":
                data.append(value)
            elif key == "id":
                event_id = value
            elif key == "event":
                name = value
            continue
        if data:
            payload = json.loads("\n".join(data))
            if name and "type" not in payload:
                payload["type"] = name
            yield event_id, payload
        name, data = None, []


@contextlib.contextmanager
def _http_errors(base_url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as exc:
        raise Unreachable(f"{base_url}: {exc or type(exc).__name__}") from None


def _raise_for_status(response: httpx.Response, base_url: str) -> None:
    """The server's error body ({code, message} or {errors: [...]}) as one line, by kind."""
    if response.status_code < 400:
        return
    try:
        body = response.json()
    except ValueError:
        body = {}
    if "errors" in body:
        detail = "; ".join(f"{e.get('field')}: {e.get('message')}" for e in body["errors"])
    else:
        code = body.get("code", f"HTTP_{response.status_code}")
        detail = f"{code}: {body.get('message', response.reason_phrase)}"
    message = f"{base_url} answered {response.status_code}: {detail}"
    if response.status_code in (401, 403):
        raise AuthFailed(message)
    if response.status_code == 400 or response.status_code == 422:
        raise InvalidArgument(message)
    raise JobFailed(message)
