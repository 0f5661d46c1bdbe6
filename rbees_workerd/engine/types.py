"""The values that cross between the engine and its callers (the worker daemon, the CLI)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from rbees_workerd.errors import RbeesError

StopReason = Literal["MAX_TOKENS", "EOS", "STOP_SEQUENCE", "CANCELLED", "ERROR"]
# What Engine.load is doing: preparing the weights, then its warm-up's two passes (see Engine.warm_up).
LoadPhase = Literal["loading", "compiling kernels", "warming up"]


@dataclass(frozen=True)
class GenerationParams:
    """One request's generation settings; every field is applied."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class TokenEvent(NamedTuple):
    """A sampled token. `text` is the newly completed UTF-8 text (may be empty mid-character). A named tuple:
    one is made for every sequence at every step, on the thread that owns the GPU (a frozen dataclass took
    0.38 us to make, this 0.16)."""

    seq_id: Hashable  # the engine's number for the sequence, or the id its caller gave (the worker's job_id)
    token_id: int
    text: str
    index: int


@dataclass(frozen=True)
class FinishEvent:
    """A sequence ended; its slot is free again."""

    seq_id: Hashable
    stop_reason: StopReason
    tokens_out: int
    prompt_tokens: int
    prefill_time_ms: float
    decode_time_ms: float
    stop_sequence: str | None = None
    error: RbeesError | None = None  # why a sequence ended with ERROR: its code and message reach the client


Event = TokenEvent | FinishEvent


@dataclass
class GenerationResult:
    """A whole generation, as `Engine.generate_all` returns it."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    stop_reason: StopReason = "MAX_TOKENS"
    stop_sequence: str | None = None
    prefill_tokens_per_sec: float = 0.0
    decode_tokens_per_sec: float = 0.0
