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
        f32 = dict(device=device, dtype=torch.float32)
        self.temperature = torch.zeros(1, **f32)
        self.top_p = torch.ones(1, **f32)
        self.min_p = torch.zeros(1, **f32)
        self.repetition_penalty = torch.ones(1, **f32)
        self.top_k = torch.zeros(1, device=device, dtype=torch.int32)
        self.seed = torch.zeros(1, device=device, dtype=torch.int64)
        self.offset = torch.zeros(1, device=device, dtype=torch.int64)
        self.history = torch.zeros(1, history_capacity, device=device, dtype=torch.int64)
        self.history_len = torch.zeros(1, device=device, dtype=torch.int64)
        self.out = torch.zeros(1, device=device, dtype=torch.int64)

    def reset(self, params: SamplingParams, prompt: torch.Tensor) -> None:
        """Loads a request's parameters and its prompt (the history the repetition penalty sees)."""
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.temperature.fill_(params.temperature)
        self.top_k.fill_(params.top_k)
        self.top_p.fill_(params.top_p)
        self.min_p.fill_(params.min_p)
        self.repetition_penalty.fill_(params.repetition_penalty)
        self.seed.fill_(_to_int64(seed))
        self.offset.zero_()
        n = min(prompt.numel(), self.history.shape[1])
        self.history[0, :n].copy_(prompt[:n], non_blocking=True)
        self.history_len.fill_(n)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] -> the token in self.out [1] (int64), with the state advanced."""
        _C.sample(logits, self.history, self.history_len, self.temperature, self.top_k, self.top_p, self.min_p,
                  self.repetition_penalty, self.seed, self.offset, self.out, True)
        return self.out
