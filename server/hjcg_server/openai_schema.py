"""The request bodies of POST /v1/completions and /v1/chat/completions, as pydantic models.

pydantic checks the types; what the values mean (ranges, limits, fields hjcg does not implement) is checked
in openai_requests, which names the parameter in each refusal. Fields no model declares are refused
("unrecognized request argument"), as OpenAI does: a misspelt parameter never goes silently unused.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI pads chunks against side channels; nothing to pad here


class _GenerationBody(_Body):
    """What both endpoints share."""
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: Any = None
    # hjcg's sampling extensions (the official client sends them through extra_body)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    # OpenAI fields that change what is generated in ways hjcg does not implement: refused unless they are
    # left at their "off" value (openai_requests.check_unsupported)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # accepted and ignored: they only label the request on OpenAI's side
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionBody(_GenerationBody):
    prompt: Any = None   # a string, token ids, or a list of one of either (openai_requests.completion_prompt)
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatBody(_GenerationBody):
    messages: list[dict[str, Any]]  # role and content checked in openai_requests.chat_messages
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # harmless without tools
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
