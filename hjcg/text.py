"""Turning generated token ids into text as they arrive: UTF-8-safe deltas and stop strings."""
from __future__ import annotations


class IncrementalDetokenizer:
    """Yields the text each new token adds, never splitting a multi-byte character.

    Decodes a short window of recent tokens (context for tokenizers that merge across tokens, such as
    leading-space handling) and emits only what is new once it no longer ends in U+FFFD, the mark of an
    incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, prompt_ids: list[int] | None = None, context: int = 4):
        self._tokenizer = tokenizer
        # A fast tokenizer's Rust backend decodes as tokenizer.decode(..., clean_up_tokenization_spaces=False)
        # does, without transformers' Python layers: ~10x less time on the engine thread, twice per token.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = backend.decode if backend is not None else None
        self._ids: list[int] = list(prompt_ids[-context:]) if prompt_ids else []
        self._prefix = 0                  # start of the decoding window
        self._read = len(self._ids)       # tokens up to here are already emitted

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=False)
        return self._tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        full_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text):]


class StopStringFilter:
    """Holds back text that may be the start of a stop string; reports when one is complete.

    push() returns (text safe to emit, stopped). On a stop, the stop string and what follows are dropped.
    """

    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._pending += text
        first = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            out, self._pending = self._pending[:first], ""
            return out, True
        keep = self._longest_partial_match()
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def _longest_partial_match(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out
