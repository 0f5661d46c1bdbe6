"""Request and response bodies of the worker's HTTP API; `/openapi.json` is generated from them."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from rbees_workerd.engine.types import LoadPhase

MAX_PROMPT_CHARS = 32768
MAX_TOKENS = 2048
MAX_STOP_STRINGS = 4
MAX_STOP_BYTES = 100
MAX_MESSAGES = 64

JobId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]


def _json_number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("number_type", "Input should be a number")
    return value


def json_number(kind: type, **limits: float) -> Any:
    """A JSON number field: "0.5" or true is a wrong type (pydantic would coerce them); 3.0 is a valid
    integer (JSON Schema says so), 2.5 is not. The limits come first so that the schema shows them."""
    return Annotated[kind, Field(**limits), BeforeValidator(_json_number)]


def _stop_bytes(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_STOP_BYTES:
        raise PydanticCustomError(
            "bytes_too_long",
            "A stop string is at most {max_bytes} bytes of UTF-8",
            {"max_bytes": MAX_STOP_BYTES},
        )
    return value


StopString = Annotated[str, Field(min_length=1), AfterValidator(_stop_bytes)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


Prompt = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
Messages = Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class Generation(BaseModel):
    """What to generate, of a raw `prompt` or of chat `messages` that the worker renders with the model's
    chat template (exactly one of the two), and how. The orchestrator's task body is one too. Unknown
    fields are ignored, so a newer orchestrator can talk to this worker."""

    model_config = ConfigDict(
        allow_inf_nan=False,
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
    )

    # None only when left out (an explicit null is a wrong type): the schema's oneOf asks for one of them
    prompt: Prompt = None  # type: ignore[assignment]
    messages: Messages = None  # type: ignore[assignment]
    max_tokens: json_number(int, ge=1, le=MAX_TOKENS)
    temperature: json_number(float, ge=0, le=2) = 1.0
    top_p: json_number(float, ge=0, le=1) = 1.0
    top_k: json_number(int, ge=0, le=1_000_000) = 0
    min_p: json_number(float, ge=0, le=1) = 0.0
    repetition_penalty: json_number(float, gt=0, le=10) = 1.0
    # 2**53: the largest bound that a JSON number (a double to many clients) states exactly
    seed: json_number(int, ge=0, le=2**53) | None = None
    stop: Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] = []

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Generation:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("prompt_or_messages", "Give exactly one of prompt and messages")
        return self


class ExecuteRequest(Generation):
    """One generation on this worker, under the caller's job id."""

    job_id: JobId


class CancelRequest(BaseModel):
    job_id: JobId


class CancelAccepted(BaseModel):
    job_id: str
    status: Literal["cancelling"] = "cancelling"


class ErrorBody(BaseModel):
    """Every non-validation error: a stable code, a message, and whether retrying may help."""

    code: str
    message: str
    retriable: bool
    retry_after_ms: int | None = None


class FieldError(BaseModel):
    field: str
    constraint: str
    message: str


class ValidationErrors(BaseModel):
    """HTTP 400: what is wrong with each field (the offending value is never echoed)."""

    errors: list[FieldError]


class WorkerState(StrEnum):
    """The worker's lifecycle state: the runtime's, /health's and /ready's `state`, and the `state` label of
    the rbees_worker_state metric. Starting -> Loading -> Ready (Executing while jobs run) -> Draining -> Stopped.
    """

    STARTING = "Starting"
    LOADING = "Loading"
    READY = "Ready"
    EXECUTING = "Executing"
    DRAINING = "Draining"
    STOPPED = "Stopped"

    @property
    def accepts_jobs(self) -> bool:
        return self in (WorkerState.READY, WorkerState.EXECUTING)

    @property
    def health_status(self) -> Literal["ok", "loading", "draining", "stopped"]:
        """/health's coarse `status` for this state."""
        if self in (WorkerState.STARTING, WorkerState.LOADING):
            return "loading"
        if self is WorkerState.DRAINING:
            return "draining"
        if self is WorkerState.STOPPED:
            return "stopped"
        return "ok"


class Health(BaseModel):
    status: Literal["ok", "loading", "draining", "stopped"]
    state: WorkerState
    model: str
    backend: str
    device: str | None
    vram_bytes: int
    slots_total: int
    slots_free: int


class Readiness(BaseModel):
    """GET /ready: 200 once jobs are accepted, 503 (same body) while starting, loading or draining."""

    ready: bool
    state: WorkerState
    load_progress: float = Field(
        ge=0.0,
        le=1.0,
        description="0 to 1, never decreasing; 1 only once Ready. The weights prepared (by bytes) reach 0.9, the "
        "kernels compiled 0.95, the warm-up 0.99.",
    )
    phase: LoadPhase | None = Field(
        description="What loading is doing now: `loading` (the weights onto the backend), `compiling kernels` (the "
        "first pass compiles each kernel or loads it from Numba's cache), `warming up` (a sampled pass); null "
        "outside the Loading state.",
    )
    model: str


# ---- the SSE frames of /execute (documented in the OpenAPI schema, built in output.py)
class StartedFrame(BaseModel):
    type: Literal["started"]
    job_id: str
    model: str
    started_at: str
    prompt_tokens: int


class TokenFrame(BaseModel):
    type: Literal["token"]
    t: str
    i: int


class MetricsFrame(BaseModel):
    type: Literal["metrics"]
    tokens_per_sec: float
    time_to_first_token_ms: float
    prefill_time_ms: float
    prompt_tokens: int
    tokens_out: int


class EndFrame(BaseModel):
    type: Literal["end"]
    tokens_out: int
    decode_time_ms: float
    stop_reason: Literal["MAX_TOKENS", "EOS", "STOP_SEQUENCE", "CANCELLED", "ERROR"]
    stop_sequence_matched: str | None = None


class ErrorFrame(BaseModel):
    type: Literal["error"]
    code: str
    message: str
    retriable: bool


Frame = StartedFrame | TokenFrame | MetricsFrame | EndFrame | ErrorFrame
