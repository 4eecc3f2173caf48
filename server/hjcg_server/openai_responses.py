"""OpenAI's response bodies and stream chunks, for chat completions and (legacy) completions.

Finish reasons: hjcg's "length" is "length"; "stop" (a stop string or stop token) and "eos" are "stop". A
stream hjcg reports "cancelled" never gets a finish reason: either its client went away (nobody to tell) or
the server ended it while shutting down, which the client gets as a 503 error (openai_jobs).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from hjcg.engine import Finish, TokenOutput

FINISH_REASONS = {"length": "length", "stop": "stop", "eos": "stop"}


class TokenText:
    """Token ids as OpenAI's logprobs show them: a token's bytes, and those bytes as text (a token that
    holds part of a UTF-8 character shows U+FFFD; its bytes say which)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        # byte-level BPE (GPT-2, Llama 3, SmolLM): each token is its bytes, each spelt as one printable character
        self._byte_of = None
        if type(decoder).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def bytes(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def _bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_of is not None and piece is not None and all(c in self._byte_of for c in piece):
            return bytes(self._byte_of[c] for c in piece)
        if piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])  # SentencePiece's byte fallback
        return self._tokenizer.decode([token_id]).encode()

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode(errors="replace")

    def entry(self, token_id: int, logprob: float | None) -> dict:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": list(self.bytes(token_id))}


@dataclass(eq=False)
class Choice:
    """One choice's output so far."""
    text: list[str] = field(default_factory=list)
    tokens: list[TokenOutput] = field(default_factory=list)
    finish: Finish | None = None
    offset: int = 0   # characters of text before the next token (completions' text_offset)


class Responder:
    """Builds one request's chunks and body; chat and completions differ only in how a choice looks."""
    object_name = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, token_text: TokenText, logprobs: bool):
        self.id, self.model, self.token_text, self.logprobs = request_id, model, token_text, logprobs
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, choices: list[dict], usage: dict | None = None, with_usage: bool = False) -> dict:
        body = self._envelope(self.chunk_object, choices)
        if with_usage:  # OpenAI: usage null on every chunk but the last, which has no choices
            body["usage"] = usage
        return body

    def response(self, choices: list[Choice], usage: dict) -> dict:
        body = self._envelope(self.object_name, [self.choice(i, c) for i, c in enumerate(choices)])
        body["usage"] = usage
        return body

    def start_choices(self, n: int) -> list[dict]:
        """The choices of the stream's first chunk (none for completions)."""
        return []

    def token_choice(self, index: int, token: TokenOutput, choice: Choice) -> dict | None:
        """A stream chunk's choice for one token (None: nothing to send), recording the token in choice."""
        raise NotImplementedError

    def finish_choice(self, index: int, finish: Finish) -> dict:
        raise NotImplementedError

    def choice(self, index: int, choice: Choice) -> dict:
        raise NotImplementedError

    def add(self, choice: Choice, token: TokenOutput) -> None:
        choice.text.append(token.text)
        if self.logprobs:
            choice.tokens.append(token)


class ChatResponder(Responder):
    object_name, chunk_object = "chat.completion", "chat.completion.chunk"

    def start_choices(self, n: int) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for i in range(n)]

    def _logprobs(self, tokens: list[TokenOutput]) -> dict | None:
        if not self.logprobs:
            return None
        return {"content": [{**self.token_text.entry(t.id, t.logprob),
                             "top_logprobs": [self.token_text.entry(i, lp) for i, lp in t.top_logprobs]}
                            for t in tokens]}

    def token_choice(self, index: int, token: TokenOutput, choice: Choice) -> dict | None:
        self.add(choice, token)
        if not token.text and not self.logprobs:
            return None
        return {"index": index, "delta": {"content": token.text}, "logprobs": self._logprobs([token]),
                "finish_reason": None}

    def finish_choice(self, index: int, finish: Finish) -> dict:
        delta = {"content": finish.text} if finish.text else {}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": FINISH_REASONS[finish.reason]}

    def choice(self, index: int, choice: Choice) -> dict:
        text = "".join(choice.text) + choice.finish.text
        return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": self._logprobs(choice.tokens), "finish_reason": FINISH_REASONS[choice.finish.reason]}


class CompletionResponder(Responder):
    object_name = chunk_object = "text_completion"

    def _logprobs(self, tokens: list[TokenOutput], offset: int) -> dict | None:
        if not self.logprobs:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            out["tokens"].append(self.token_text.text(t.id))
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self.token_text.text(i): lp for i, lp in t.top_logprobs})
            out["text_offset"].append(offset)
            offset += len(t.text)
        return out

    def token_choice(self, index: int, token: TokenOutput, choice: Choice) -> dict | None:
        offset = choice.offset
        self.add(choice, token)
        choice.offset += len(token.text)
        if not token.text and not self.logprobs:
            return None
        return {"index": index, "text": token.text, "logprobs": self._logprobs([token], offset), "finish_reason": None}

    def finish_choice(self, index: int, finish: Finish) -> dict:
        return {"index": index, "text": finish.text, "logprobs": None,
                "finish_reason": FINISH_REASONS[finish.reason]}

    def choice(self, index: int, choice: Choice) -> dict:
        return {"index": index, "text": "".join(choice.text) + choice.finish.text,
                "logprobs": self._logprobs(choice.tokens, 0), "finish_reason": FINISH_REASONS[choice.finish.reason]}


def usage(finishes: list[Finish]) -> dict:
    """The prompt counts once however many choices share it (as OpenAI counts n > 1)."""
    prompt = finishes[0].prompt_tokens if finishes else 0
    completion = sum(f.completion_tokens for f in finishes)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
