"""What goes into the engine (a validated request) and what comes out of it (tokens, then one finish)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hjcg.sampling import SamplingParams

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"


class RequestError(ValueError):
    """The request itself is wrong; the message says what to fix."""


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenOutput:
    id: int
    text: str
    index: int


@dataclass(slots=True)
class Finish:
    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float
