"""Checks a GenerateRequest field by field and turns it into the engine's GenerationRequest.

Every problem raises RequestError with a message that names the field and says what to fix.
"""
from __future__ import annotations

import threading

from hjcg.engine import Engine, GenerationRequest, RequestError
from hjcg.requests import MAX_TOP_LOGPROBS, Constraint
from hjcg.sampling import SamplingParams
from hjcg.v1 import hjcg_pb2 as pb

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_LENGTH = 128
MAX_CHAT_MESSAGES = 256
MAX_TEXT_CHARS = 1_000_000
MAX_CONSTRAINT_CHARS = 100_000  # a JSON schema, regex or grammar
CHAT_ROLES = ("system", "user", "assistant")

# Fast tokenizers are not safe to call from many RPC threads at once.
_tokenizer_lock = threading.Lock()


def check_request_id(request_id: str) -> str:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise RequestError(f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters")
    if request_id and not request_id.isprintable():
        raise RequestError("request_id must be printable characters only")
    return request_id


def sampling_params(s: pb.SamplingParams) -> SamplingParams:
    """Every range, "off" value and the wire's "0 means unset" rule live in hjcg.sampling (one place)."""
    try:
        return SamplingParams.from_wire(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
            repetition_penalty=s.repetition_penalty, seed=s.seed if s.HasField("seed") else None)
    except ValueError as e:
        raise RequestError(f"sampling.{e}") from e


def prompt_ids(request: pb.GenerateRequest, engine: Engine) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise RequestError("one of text, chat or token_ids is required")
    if kind == "token_ids":
        if not request.token_ids.ids:
            raise RequestError("token_ids is empty")
        return list(request.token_ids.ids)
    if kind == "text":
        if not request.text:
            raise RequestError("text is empty")
        if len(request.text) > MAX_TEXT_CHARS:
            raise RequestError(f"text is longer than {MAX_TEXT_CHARS} characters")
        with _tokenizer_lock:
            return engine.encode_text(request.text)
    messages = request.chat.messages
    if not messages:
        raise RequestError("chat.messages is empty")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise RequestError(f"chat has more than {MAX_CHAT_MESSAGES} messages")
    total = sum(len(m.content) for m in messages)
    if total > MAX_TEXT_CHARS:
        raise RequestError(f"chat content is longer than {MAX_TEXT_CHARS} characters")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise RequestError(f"chat.messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
    with _tokenizer_lock:
        return engine.encode_chat([{"role": m.role, "content": m.content} for m in messages])


def top_logprobs(logprobs: bool, top: int) -> int | None:
    """The engine's GenerationRequest.logprobs from the wire's pair (OpenAI's chat API has the same two)."""
    if not logprobs:
        if top:
            raise RequestError("top_logprobs needs logprobs = true")
        return None
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    return top


def checked_constraint(kind: str, value: str) -> Constraint:
    """A structured-output constraint of a known kind, its text within the size limit (the engine compiles
    and checks the rest)."""
    if kind != "json_object" and not value:
        raise RequestError(f"response_format.{kind} is empty")
    if len(value) > MAX_CONSTRAINT_CHARS:
        raise RequestError(f"response_format.{kind} is longer than {MAX_CONSTRAINT_CHARS} characters")
    return Constraint(kind, value)


def response_format(request: pb.GenerateRequest) -> Constraint | None:
    if not request.HasField("response_format"):
        return None
    kind = request.response_format.WhichOneof("format")
    if kind is None:
        raise RequestError("response_format is set but empty: set one of json_object, json_schema, regex, grammar")
    if kind == "json_object":
        if not request.response_format.json_object:
            raise RequestError("response_format.json_object must be true when set")
        return Constraint("json_object")
    return checked_constraint(kind, getattr(request.response_format, kind))


def generation_request(request: pb.GenerateRequest, engine: Engine) -> GenerationRequest:
    limits = engine.config
    if len(request.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are accepted")
    for i, s in enumerate(request.stop):
        if not s or len(s) > MAX_STOP_LENGTH:
            raise RequestError(f"stop[{i}] must be 1 to {MAX_STOP_LENGTH} characters")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids are accepted")
    max_new = request.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise RequestError(f"max_new_tokens must be at most {limits.max_new_tokens}, got {max_new}")
    params = sampling_params(request.sampling)
    generation = GenerationRequest(
        prompt_ids=prompt_ids(request, engine),
        max_new_tokens=max_new,
        sampling=params,
        stop=list(request.stop),
        stop_token_ids=list(request.stop_token_ids),
        ignore_eos=request.ignore_eos,
        logprobs=top_logprobs(request.logprobs, request.top_logprobs),
        constraint=response_format(request),
    )
    engine.validate(generation)
    return generation
