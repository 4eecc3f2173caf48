"""Who runs this step: arrivals wait in arrival order, join the running batch while there is a row and KV
room for their whole budget, and leave it at the step boundary after they finish.

The running batch is a list whose index is the stream's row in the model runner's batch buffers; when
streams leave, the survivors close up in order (compact), so the batch always fills rows [0, n) and the
decode step runs in the smallest batch bucket that holds n.
"""
from __future__ import annotations

import bisect
import time
from collections import deque

from hjcg.block_manager import BlockManager
from hjcg.sequence import Sequence, Status

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)


class QueueFull(Exception):
    """More streams wait than the queue admits."""


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The decode graphs' batch sizes: the defaults up to max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return tuple(sorted({b for b in DEFAULT_BATCH_BUCKETS if b < max_batch} | {max_batch}))


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch: int, max_waiting: int):
        self.blocks = blocks
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.buckets = batch_buckets(max_batch)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if not self.blocks.fits_ever(seq.total_tokens):
            raise ValueError(  # the caller turns it into a clear error for the client
                f"the request needs KV room for {seq.total_tokens} tokens; the KV pool holds "
                f"{self.blocks.capacity_blocks * self.blocks.block_size}")
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"the request queue is full ({self.max_waiting} waiting); retry later")
        self.waiting.append(seq)

    def bucket(self, n: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, n)]

    def drop_cancelled_waiting(self) -> list[Sequence]:
        """Waiting streams whose client left: out of the queue (the caller finishes them)."""
        gone = [s for s in self.waiting if s.cancelled]
        if gone:
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        return gone

    def admit(self) -> list[Sequence]:
        """Moves waiting streams, in arrival order, into free rows while their budget's blocks can be
        reserved; the head of the queue is never overtaken (arrival order is kept)."""
        admitted = []
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.blocks.can_reserve(seq.total_tokens):
                break
            self.waiting.popleft()
            self.blocks.reserve(seq.table, seq.total_tokens)
            seq.status = Status.RUNNING
            seq.row = len(self.running)
            seq.admitted_at = time.perf_counter()
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    @staticmethod
    def prefill_groups(admitted: list[Sequence], max_tokens: int) -> list[list[Sequence]]:
        """The streams admitted in one step, in arrival order, cut into groups that prefill as one forward
        (prompts packed end to end, at most max_tokens in all); a constrained stream or one whose prompt
        alone exceeds max_tokens prefills by itself. Consecutive streams have consecutive rows, so each
        group's rows are too."""
        groups: list[list[Sequence]] = []
        open_group: list[Sequence] | None = None  # the last group, while packable streams may still join it
        tokens = 0
        for seq in admitted:
            packable = seq.matcher is None and seq.prompt_len <= max_tokens
            if packable and open_group is not None and tokens + seq.prompt_len <= max_tokens:
                open_group.append(seq)
                tokens += seq.prompt_len
                continue
            groups.append([seq])
            open_group, tokens = (groups[-1], seq.prompt_len) if packable else (None, 0)
        return groups

    def retire_finished(self) -> list[int] | None:
        """Frees the finished streams' blocks and closes up the batch. Returns, for each new row, the old
        row it comes from (None when nothing finished)."""
        if not any(s.finished for s in self.running):
            return None
        order = []
        survivors = []
        for seq in self.running:
            if seq.finished:
                self.blocks.release(seq.table)
                seq.row = -1
            else:
                order.append(seq.row)
                seq.row = len(survivors)
                survivors.append(seq)
        self.running = survivors
        return order
