"""Request and response bodies of the orchestrator's API; `/openapi.json` is generated from them.

A task's generation fields are the worker's own (`rbees_workerd.schemas.Generation`): the limits a worker
checks are checked here already, so a bad request is refused before it waits in a queue.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from rbees_orcd.registry import State
from rbees_orcd.tasks import Status
from rbees_workerd.schemas import MAX_PROMPT_CHARS, MAX_STOP_STRINGS, MAX_TOKENS, Generation, StopString, json_number

WorkerId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
ModelRef = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")]


_PORT = r"([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
_WORKER_URL = rf"^https?://[A-Za-z0-9.-]+(:{_PORT})?(/[A-Za-z0-9._~%+/-]*)?$"  # a name or IPv4 address


def _worker_url(value: str) -> str:
    """The base URL, without a trailing slash (the pattern has already refused query, fragment, user info)."""
    if not urlsplit(value).hostname:
        raise PydanticCustomError("url", "an http(s) URL of a worker")
    return value.rstrip("/")


def _utf8(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("utf8", "text that UTF-8 can encode (no lone surrogates)") from None
    return value


# One SSE event as a client parses it; `data` holds one JSON document (or `[DONE]` on /v1 streams).
SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {"id": {"type": "string"}, "event": {"type": "string"}, "data": {"type": "string"}},
}
WorkerUrl = Annotated[str, Field(min_length=1, max_length=512, pattern=_WORKER_URL), AfterValidator(_worker_url)]


# ---- workers
class WorkerReady(BaseModel):
    """A worker's ready callback (what `rbees-workerd --callback-url` posts)."""

    worker_id: WorkerId
    url: WorkerUrl
    model_ref: ModelRef
    backend: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")]
    device: Annotated[str, Field(max_length=256), AfterValidator(_utf8)] | None = None
    vram_bytes: json_number(int, ge=0, le=2**53) = 0  # exact as a JSON number (a double) too
    slots_total: json_number(int, ge=1, le=4096)


class WorkerAdd(BaseModel):
    """Manual registration: the worker's /health is asked for what is left out."""

    worker_id: WorkerId
    url: WorkerUrl
    model_ref: ModelRef | None = None


class WorkerView(BaseModel):
    worker_id: str
    url: str
    model: str
    backend: str
    device: str | None
    vram_bytes: int
    slots_total: int
    state: State
    registered_at: float
    last_seen: float | None
    failing_since: float | None
    active_jobs: int


class WorkerList(BaseModel):
    workers: list[WorkerView]


# ---- tasks
class TaskRequest(Generation):
    """A generation for any worker serving `model`; interactive tasks are placed ahead of batch ones."""

    model: ModelRef
    priority: Literal["interactive", "batch"] = "interactive"


class TaskAccepted(BaseModel):
    job_id: str
    status: Status
    queue_position: int
    events_url: str


class TaskView(BaseModel):
    job_id: str
    model: str
    status: Status
    priority: Literal["interactive", "batch"]
    worker_id: str | None
    tokens_out: int
    events: int
    created_at: float
    queue_position: int


class CancelAccepted(BaseModel):
    job_id: str
    status: Literal["cancelling", "cancelled"]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    workers: dict[str, int]
    queue_depth: int


# ---- OpenAI-compatible
class TextPart(BaseModel):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


class OpenAIMessage(BaseModel):
    """A chat message; `developer` is read as `system`, and text parts are joined."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)]
    name: str | None = None


# JSON's true and false only (pydantic would take "yes" and 1)
Bool = Annotated[bool, Field(strict=True)]


class StreamOptions(BaseModel):
    include_usage: Bool = False


Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None


class OpenAIRequest(BaseModel):
    """Fields both OpenAI endpoints take. Others that OpenAI defines are accepted and ignored, except the
    ones whose meaning this server cannot give (n > 1, logprobs, echo, tools), which are refused."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: ModelRef
    max_tokens: json_number(int, ge=1, le=MAX_TOKENS) | None = None
    temperature: json_number(float, ge=0, le=2) | None = None
    top_p: json_number(float, ge=0, le=1) | None = None
    stop: Stop = None
    seed: json_number(int, ge=0, le=2**53) | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    n: json_number(int, ge=1, le=1) = 1
    user: Annotated[str, Field(max_length=256)] | None = None


class ChatCompletionRequest(OpenAIRequest):
    messages: Annotated[list[OpenAIMessage], Field(min_length=1, max_length=64)]
    max_completion_tokens: json_number(int, ge=1, le=MAX_TOKENS) | None = None
    logprobs: Literal[False] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None


class CompletionRequest(OpenAIRequest):
    prompt: (
        Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=1)
        ]
    )
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """A whole chat completion (`stream` false); with `stream` the answer is SSE of chat.completion.chunk."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class TextCompletion(BaseModel):
    """A whole text completion (`stream` false); with `stream` the answer is SSE of text_completion chunks."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: None
    choices: list[TextChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "rbees"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail
