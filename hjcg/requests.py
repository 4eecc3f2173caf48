"""What goes into the engine (a validated request) and what comes out of it (tokens, then one finish)."""
from __future__ import annotations

from dataclasses import dataclass, field

from hjcg.sampling import SamplingParams

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's limit)
CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "grammar")


class RequestError(ValueError):
    """The request itself is wrong; the message says what to fix."""


@dataclass(slots=True, frozen=True)
class Constraint:
    """Structured output: what the generated text must match (hjcg.constraints compiles it to a matcher).

    kind: "json_object" (any JSON object; value ""), "json_schema" (value: the schema as JSON text),
    "regex" (value: a regular expression the whole output matches) or "grammar" (value: a Lark grammar)."""
    kind: str
    value: str = ""


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # None: no logprobs. N in [0, MAX_TOP_LOGPROBS]: every token comes with its logprob and the N most
    # likely tokens' (hjcg.logprobs says from which distribution).
    logprobs: int | None = None
    constraint: Constraint | None = None


@dataclass(slots=True)
class TokenOutput:
    id: int
    text: str
    index: int
    logprob: float | None = None                          # set when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()      # (token id, logprob), most likely first


@dataclass(slots=True)
class Finish:
    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float
