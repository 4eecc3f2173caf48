"""Hands out the KV pool's blocks to streams: a free list, and reservations that make admission safe.

A stream is admitted only when the blocks for its whole budget (prompt + max new tokens) can be
reserved, so a running stream never runs out of blocks mid-generation and nothing is ever preempted;
the blocks themselves are taken from the free list only as its tokens arrive, so the memory in use
grows with the tokens in use. Block 0 is the trash block (kv_cache.TRASH_BLOCK) and is never handed out.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hjcg.kv_cache import TRASH_BLOCK


@dataclass(slots=True)
class BlockTable:
    """One stream's blocks, in position order, and the blocks still reserved for it."""
    blocks: list[int] = field(default_factory=list)
    reserved: int = 0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError("the block manager needs at least two blocks of at least one token")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != TRASH_BLOCK)
        self._reserved = 0

    @property
    def capacity_blocks(self) -> int:
        """Blocks a stream could ever hold (all but the trash block)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.capacity_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def fits_ever(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.capacity_blocks

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= len(self._free) - self._reserved

    def reserve(self, table: BlockTable, tokens: int) -> None:
        """Reserves the blocks for `tokens` tokens (the stream's whole budget); call can_reserve first."""
        need = self.blocks_for(tokens) - len(table.blocks) - table.reserved
        if need > len(self._free) - self._reserved:
            raise RuntimeError("reserve() without room: call can_reserve() first")
        if need > 0:
            table.reserved += need
            self._reserved += need

    def grow(self, table: BlockTable, tokens: int) -> list[tuple[int, int]]:
        """Makes `table` cover `tokens` tokens, drawing on its reservation; returns the new (index, block)."""
        added = []
        while len(table.blocks) * self.block_size < tokens:
            if table.reserved == 0:
                raise RuntimeError("a stream grew past its reservation")
            block = self._free.popleft()
            table.reserved -= 1
            self._reserved -= 1
            added.append((len(table.blocks), block))
            table.blocks.append(block)
        return added

    def release(self, table: BlockTable) -> None:
        """Returns a stream's blocks and what is left of its reservation."""
        self._free.extend(table.blocks)
        self._reserved -= table.reserved
        table.blocks.clear()
        table.reserved = 0
