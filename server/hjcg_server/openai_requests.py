"""Turns an OpenAI request body into the engine's GenerationRequests (one per choice), or refuses it with a
400 that names the parameter.

The limits are the gRPC front's (hjcg_server.convert) and the engine's; the sampling ranges are
hjcg.sampling's. Tokenizing is blocking work: build() runs it on a worker thread, under convert's tokenizer
lock, never on the event loop.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

from hjcg.engine import Engine, GenerationRequest, RequestError
from hjcg.requests import Constraint
from hjcg.sampling import SamplingParams
from hjcg_server import convert
from hjcg_server.openai_errors import OpenAIError, bad_request
from hjcg_server.openai_schema import ChatBody, CompletionBody

MAX_N = 16          # choices per request; each is a job of its own in the queue
OPENAI_TEMPERATURE = 1.0  # OpenAI's default, not the gRPC API's greedy 0
# role -> the role the chat template gets: OpenAI's "developer" is the newer name of "system"
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# OpenAI parameters hjcg does not implement, with the value that means "off" (accepted)
_OFF = {"presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}),
        "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
        "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,), "reasoning_effort": (None,),
        "verbosity": (None,), "web_search_options": (None,), "echo": (None, False), "suffix": (None, ""),
        "best_of": (None, 1)}


def check_model(body: ChatBody | CompletionBody, engine: Engine) -> None:
    if body.model != engine.model_name:
        raise OpenAIError(404, f"the model {body.model!r} does not exist; this server serves "
                          f"{engine.model_name!r}", param="model", code="model_not_found")


def check_unsupported(body: ChatBody | CompletionBody) -> None:
    for name, off in _OFF.items():
        value = getattr(body, name, None)
        if value not in off:
            raise bad_request(f"{name} is not supported by this server (leave it out, or at "
                              f"{json.dumps(off[-1])})", param=name, code="unsupported_parameter")


def sampling(body: ChatBody | CompletionBody) -> SamplingParams:
    """OpenAI's defaults where a field is left out; any value out of range is hjcg.sampling's ValueError,
    whose message starts with the field's name."""
    def given(value, default):
        return default if value is None else value
    try:
        return SamplingParams(temperature=given(body.temperature, OPENAI_TEMPERATURE), top_k=given(body.top_k, 0),
                              top_p=given(body.top_p, 1.0), min_p=given(body.min_p, 0.0),
                              repetition_penalty=given(body.repetition_penalty, 1.0), seed=body.seed)
    except ValueError as e:
        raise bad_request(str(e), param=str(e).split()[0]) from None


def max_new_tokens(body: ChatBody | CompletionBody, engine: Engine) -> int:
    given = {name: getattr(body, name) for name in ("max_tokens", "max_completion_tokens")
             if getattr(body, name, None) is not None}
    if len(set(given.values())) > 1:
        raise bad_request("max_tokens and max_completion_tokens differ; send one of them", param="max_tokens")
    if not given:
        return engine.config.default_max_new_tokens
    name, value = next(iter(given.items()))
    limit = engine.config.max_new_tokens
    if not 1 <= value <= limit:
        raise bad_request(f"{name} must be in [1, {limit}] on this server, got {value}", param=name)
    return value


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > convert.MAX_STOP_STRINGS:
        raise bad_request(f"at most {convert.MAX_STOP_STRINGS} stop strings are accepted, got {len(stops)}",
                          param="stop")
    for i, s in enumerate(stops):
        if not 1 <= len(s) <= convert.MAX_STOP_LENGTH:
            raise bad_request(f"stop[{i}] must be 1 to {convert.MAX_STOP_LENGTH} characters", param="stop")
    return stops


def top_logprobs(body: ChatBody | CompletionBody) -> int | None:
    """GenerationRequest.logprobs (None: none; N: each token's logprob and its N most likely alternatives):
    chat's logprobs + top_logprobs pair is the gRPC API's; completions' logprobs is the count alone."""
    if isinstance(body, CompletionBody):
        wanted, top, param = body.logprobs is not None, body.logprobs or 0, "logprobs"
    else:
        wanted, top, param = bool(body.logprobs), body.top_logprobs or 0, "top_logprobs"
    try:
        return convert.top_logprobs(wanted, top)
    except RequestError as e:
        raise bad_request(str(e) if param == "top_logprobs" else f"logprobs (the alternatives per token): {e}",
                          param=param) from None


def constraint(response_format: Any) -> Constraint | None:
    """response_format: text, json_object, json_schema (json_schema.schema), and hjcg's regex and grammar."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise bad_request('response_format must be an object with a "type"', param="response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_object")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("response_format json_schema needs json_schema.schema, a JSON Schema object",
                              param="response_format.json_schema.schema")
        value, param = json.dumps(schema), "response_format.json_schema.schema"
    elif kind in ("regex", "grammar"):
        value, param = response_format.get(kind), f"response_format.{kind}"
        if not isinstance(value, str):
            raise bad_request(f'response_format {kind} needs "{kind}", a string', param=param)
    else:
        raise bad_request("response_format.type must be text, json_object, json_schema, regex or grammar, "
                          f"got {kind!r}", param="response_format.type")
    try:
        return convert.checked_constraint(kind, value)
    except RequestError as e:
        raise bad_request(str(e), param=param) from None


def choices(body: ChatBody | CompletionBody) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be in [1, {MAX_N}], got {n}", param="n")
    return n


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI messages as the chat template takes them: content a string, or text parts joined by newlines."""
    if not messages:
        raise bad_request("messages is empty", param="messages")
    if len(messages) > convert.MAX_CHAT_MESSAGES:
        raise bad_request(f"at most {convert.MAX_CHAT_MESSAGES} messages are accepted", param="messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in _ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}"
                              + (" (tools are not supported)" if role in ("tool", "function") else ""),
                              param=f"messages[{i}].role")
        out.append({"role": _ROLES[role], "content": _content(m.get("content"), i)})
    if sum(len(m["content"]) for m in out) > convert.MAX_TEXT_CHARS:
        raise bad_request(f"the messages are longer than {convert.MAX_TEXT_CHARS} characters", param="messages")
    return out


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"messages[{i}].content[{j}] must be a text part "
                                  f'({{"type": "text", "text": "..."}}), got {kind!r}',
                                  param=f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or a list of text parts", param=f"messages[{i}].content")


def completion_prompt(prompt: Any) -> str | list[int]:
    """A string or token ids; a list holding one of either is that one. Several prompts are refused."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        if len(prompt) > convert.MAX_TEXT_CHARS:
            raise bad_request(f"prompt is longer than {convert.MAX_TEXT_CHARS} characters", param="prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return prompt
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("several prompts in one request are not served; send one request per prompt",
                          param="prompt", code="unsupported_parameter")
    raise bad_request("prompt must be a non-empty string or a list of token ids", param="prompt")


def _prompt_ids(body: ChatBody | CompletionBody, engine: Engine) -> list[int]:
    """Blocking: tokenizes (chat template included) under the tokenizer lock the gRPC front uses."""
    if isinstance(body, ChatBody):
        messages = chat_messages(body.messages)
        with convert._tokenizer_lock:
            return engine.encode_chat(messages)
    prompt = completion_prompt(body.prompt)
    if isinstance(prompt, list):
        return prompt
    with convert._tokenizer_lock:
        return engine.encode_text(prompt)


def _build(body: ChatBody | CompletionBody, engine: Engine) -> list[GenerationRequest]:
    check_unsupported(body)
    n = choices(body)
    params = sampling(body)
    request = GenerationRequest(
        prompt_ids=[], max_new_tokens=max_new_tokens(body, engine), sampling=params, stop=stop_strings(body.stop),
        ignore_eos=bool(body.ignore_eos), logprobs=top_logprobs(body), constraint=constraint(body.response_format))
    request.prompt_ids = _prompt_ids(body, engine)
    try:
        engine.validate(request)  # compiles the response_format too (cached), off the event loop
    except RequestError as e:
        raise bad_request(str(e), param=_param_of(str(e), body)) from None
    # n choices: n jobs; a seeded request gives choice i the seed + i, so the choices differ yet repeat
    return [request] + [dataclasses.replace(request, sampling=dataclasses.replace(
        params, seed=None if params.seed is None else (params.seed + i) % 2**64)) for i in range(1, n)]


def _param_of(message: str, body: ChatBody | CompletionBody) -> str:
    """Which parameter an engine's RequestError is about (its messages start with what they check)."""
    if message.startswith("constraint"):
        return "response_format"
    if message.startswith("ignore_eos"):
        return "ignore_eos"
    return "messages" if isinstance(body, ChatBody) else "prompt"


async def build(body: ChatBody | CompletionBody, engine: Engine) -> list[GenerationRequest]:
    """The checked GenerationRequests of a body, one per choice (n), built off the event loop."""
    check_model(body, engine)
    return await asyncio.to_thread(_build, body, engine)
