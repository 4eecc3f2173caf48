"""One request's state while the engine serves it: its tokens, blocks, batch row, stop conditions, its
structured-output matcher (if constrained) and the sink its outputs go to.

The engine thread alone calls the methods; another thread may only call cancel().
"""
from __future__ import annotations

import itertools
import time
from enum import Enum
from typing import TYPE_CHECKING, Callable

from hjcg.block_manager import BlockTable
from hjcg.logprobs import TopLogprobs
from hjcg.requests import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Finish, GenerationRequest,
                           TokenOutput)
from hjcg.text import IncrementalDetokenizer, StopStringFilter

if TYPE_CHECKING:
    from hjcg.constraints import TokenMatcher

Sink = Callable[[TokenOutput | Finish], None]
_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request: GenerationRequest, sink: Sink, tokenizer, eos_ids: set[int], max_context: int,
                 matcher: TokenMatcher | None = None):
        self.id = next(_ids)
        self.request = request
        self.sink = sink
        self.status = Status.WAITING
        self.table = BlockTable()
        self.row = -1                   # its row in the running batch
        self.arrival = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.completion_tokens = 0      # tokens sampled and counted (stop and EOS tokens included)
        self.launched = 0               # positions whose step has been queued on the device
        self.prompt_len = len(request.prompt_ids)
        # never past the context: the last token sampled sits at position max_context - 1
        self.budget = min(request.max_new_tokens, max_context - self.prompt_len)
        self._detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self._stops = StopStringFilter(request.stop)
        self._stop_ids = set(request.stop_token_ids)
        self._eos_ids = set() if request.ignore_eos else eos_ids
        self._cancelled = False
        self.matcher = matcher  # structured output: which tokens may come next

    @property
    def total_tokens(self) -> int:
        """Positions the stream may fill: its prompt and every token it may generate (the last one needs no
        K/V, but is kept so the reservation covers the step that samples it)."""
        return self.prompt_len + self.budget

    @property
    def queue_ms(self) -> float:
        """Time from arrival to joining the batch (to now while it waits)."""
        return ((self.admitted_at or time.perf_counter()) - self.arrival) * 1e3

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def cancel(self) -> None:
        """Thread-safe: the engine ends the stream at its next step boundary."""
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def fill_mask(self, out) -> None:
        """Writes the tokens this stream may sample next into `out` (a bitmask row, int32 words): its
        matcher's, or every token for an unconstrained or finished stream."""
        if self.matcher is None or self.finished or self.matcher.done:
            out.fill(-1)
        else:
            self.matcher.fill_mask(out)

    def push(self, token: int, logprobs: tuple[float, TopLogprobs] | None = None) -> None:
        """Takes the next sampled token (and its logprobs, when asked for): streams it, or ends the stream on
        EOS, a stop, a complete structured output or the budget."""
        if self.finished:
            return
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        if self._cancelled:
            self.finish(FINISH_CANCELLED)
            return
        self.completion_tokens += 1
        if self.matcher is not None:
            self.matcher.accept(token)
        if token in self._eos_ids or token in self._stop_ids:
            self.finish(FINISH_EOS if token in self._eos_ids else FINISH_STOP)
            return
        text, stopped = self._stops.push(self._detok.push(token))
        output = TokenOutput(id=token, text=text, index=self.completion_tokens - 1)
        if logprobs is not None:
            output.logprob, output.top_logprobs = logprobs
        self.sink(output)
        if stopped or (self.matcher is not None and self.matcher.done):  # a stop string, or the output is complete
            self.finish(FINISH_STOP)
        elif self.completion_tokens >= self.budget:
            self.finish(FINISH_LENGTH)

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.status = Status.FINISHED
        tail = ""
        if reason in (FINISH_LENGTH, FINISH_CANCELLED):
            tail, _ = self._stops.push(self._detok.flush())
            tail += self._stops.flush()
        now = time.perf_counter()
        ttft = ((self.first_token_at or now) - self.arrival) * 1e3
        self.sink(Finish(reason=reason, text=tail, prompt_tokens=self.prompt_len,
                         completion_tokens=self.completion_tokens, ttft_ms=ttft, total_ms=(now - self.arrival) * 1e3))
