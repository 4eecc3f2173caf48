"""A paged KV cache: one pool of fixed-size blocks shared by every stream, allocated once (graph-safe).

A token's K/V live in a *slot*: slot = block * block_size + offset. Each layer's pool is a flat
[num_blocks * block_size, Hkv, D] tensor, so a write is an index_copy at the step's slots and a stream's
keys are read through its block table. Block 0 is never handed out: padded prompt rows and the idle rows
of a batch write there (TRASH_BLOCK), so they never touch a live stream's memory.
"""
from __future__ import annotations

import torch

TRASH_BLOCK = 0


class PagedKVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least two blocks (block 0 is the trash block)")
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)   # [L, slots, Hkv, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [S, Hkv, D] at slots [S] (int64, may live on the device: no host sync)."""
        self.k[layer].index_copy_(0, slots, k)
        self.v[layer].index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v at slots (any shape [...]) -> [..., Hkv, D]."""
        flat = slots.reshape(-1)
        k = self.k[layer].index_select(0, flat).view(*slots.shape, *self.k.shape[2:])
        v = self.v[layer].index_select(0, flat).view(*slots.shape, *self.v.shape[2:])
        return k, v

    def table_slots(self, tables: torch.Tensor, length: int) -> torch.Tensor:
        """Block tables [B, W] -> the slots of positions [0, length) of each row, [B, length] int64."""
        positions = torch.arange(length, device=tables.device)
        blocks = tables.index_select(1, positions // self.block_size).long()
        return blocks * self.block_size + positions % self.block_size

    def slots_at(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each row's position: tables [B, W], positions [B] -> [B] int64 (graph-safe)."""
        blocks = tables.gather(1, (positions // self.block_size)[:, None]).squeeze(1).long()
        return blocks * self.block_size + positions % self.block_size

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
