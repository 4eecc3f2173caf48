"""Sampling parameters and the per-request sampler state that feeds the fused sampling kernel.

The state lives in tensors on the model's device (parameters, seed, draw counter, token history), so
the CUDA decode graph reads and advances it without the host: the kernel bumps the draw counter and
appends the token it picks to the history.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

from hjcg.native import _C


@dataclass(slots=True, frozen=True)
class SamplingParams:
    temperature: float = 0.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    min_p: float = 0.0                # 0: off
    repetition_penalty: float = 1.0   # 1: off
    seed: int | None = None           # None: a fresh random seed

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0 and self.temperature == self.temperature, "temperature must be >= 0"),
            (self.temperature <= 100, "temperature must be <= 100"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 <= self.top_p <= 1, "top_p must be in [0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty >= 0 and self.repetition_penalty <= 100,
             "repetition_penalty must be in [0, 100]"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be in [0, 2^64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _to_int64(seed: int) -> int:
    return seed - 2**64 if seed >= 2**63 else seed  # the kernel reads the bits as uint64


class SamplerState:
    """Device tensors for one batch row: the kernel's inputs and the state it advances."""

    def __init__(self, device: torch.device, history_capacity: int):
        # The per-request scalars live in two small device buffers (the kernel sees 1-element views), so
        # that a request's parameters arrive in two copies instead of eight launches.
        self._floats = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device, dtype=torch.float32)
        self.temperature, self.top_p, self.min_p, self.repetition_penalty = (self._floats[i:i + 1] for i in range(4))
        self._ints = torch.zeros(4, device=device, dtype=torch.int64)
        self.seed, self.offset, self.history_len, top_k64 = (self._ints[i:i + 1] for i in range(4))
        self._top_k64 = top_k64
        self.top_k = torch.zeros(1, device=device, dtype=torch.int32)
        self.history = torch.zeros(1, history_capacity, device=device, dtype=torch.int64)
        self.out = torch.zeros(1, device=device, dtype=torch.int64)
        pinned = torch.device(device).type == "cuda"
        self._host_floats = torch.zeros(4, dtype=torch.float32, pin_memory=pinned)
        self._host_ints = torch.zeros(4, dtype=torch.int64, pin_memory=pinned)
        self._copied = torch.cuda.Event() if pinned else None

    def reset(self, params: SamplingParams, prompt: torch.Tensor) -> None:
        """Loads a request's parameters and its prompt (the history the repetition penalty sees)."""
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        n = min(prompt.numel(), self.history.shape[1])
        if self._copied is not None:
            self._copied.synchronize()  # the last request's copies have left the staging buffers
        self._host_floats.numpy()[:] = (params.temperature, params.top_p, params.min_p, params.repetition_penalty)
        self._host_ints.numpy()[:] = (_to_int64(seed), 0, n, params.top_k)
        self._floats.copy_(self._host_floats, non_blocking=True)
        self._ints.copy_(self._host_ints, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self.top_k.copy_(self._top_k64)  # the kernel reads top_k as int32
        self.history[0, :n].copy_(prompt[:n], non_blocking=True)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> the token in self.out [1] (int64), with the state advanced."""
        _C.sample(logits, self.history, self.history_len, self.temperature, self.top_k, self.top_p, self.min_p,
                  self.repetition_penalty, self.seed, self.offset, self.out, True)
        return self.out
