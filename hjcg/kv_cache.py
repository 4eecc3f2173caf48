"""A static KV cache: allocated once at its full length so that shapes never change (graph-safe)."""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, length: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_layers, length, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)   # [L, T, Hkv, D]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = length

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores k, v [S, Hkv, D] at positions [S]; positions may live on the device (no host sync)."""
        self.k[layer].index_copy_(0, positions, k)
        self.v[layer].index_copy_(0, positions, v)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
