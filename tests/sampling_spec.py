"""The sampler's specification in plain torch (float64): the filtered, renormalised target distribution.

Tests compare the CPU and CUDA kernels against it, exactly for the kept set and statistically for draws.
"""
from __future__ import annotations

import torch

from hjcg.native import _C


def penalized(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    out = logits.clone().double()
    if penalty > 0 and penalty != 1:
        for t in set(history):
            out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


def target_distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0, penalty: float = 1.0, history: list[int] = ()) -> torch.Tensor:
    """logits [V] -> probabilities [V] (float64) of the sampler's filtered distribution."""
    x = penalized(logits, list(history), penalty)
    w = torch.exp((x - x.max()) / temperature).float().double()  # the kernel's weights are float32
    keep = torch.ones_like(w, dtype=torch.bool)
    if 0 < top_k < w.numel():
        kth = torch.topk(w, top_k).values[-1]
        keep &= w >= kth
    if 0 < top_p < 1:
        kept = torch.where(keep, w, torch.zeros_like(w))
        values = torch.sort(kept, descending=True).values
        cumulative = torch.cumsum(values, 0)
        # the smallest value whose tie group completes a mass >= top_p of the kept mass
        target = top_p * kept.sum()
        idx = int(torch.nonzero(cumulative >= target * (1 - 1e-12))[0])
        t = values[idx]
        keep &= w >= t
    if min_p > 0:
        keep &= w >= min_p
    p = torch.where(keep, w, torch.zeros_like(w))
    return p / p.sum()


class KernelRow:
    """One-row inputs for _C.sample on a device, with the history the kernel appends to."""

    def __init__(self, device="cpu", temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, seed=0,
                 history=(), capacity=64):
        f = dict(device=device, dtype=torch.float32)
        self.temperature = torch.tensor([temperature], **f)
        self.top_k = torch.tensor([top_k], device=device, dtype=torch.int32)
        self.top_p = torch.tensor([top_p], **f)
        self.min_p = torch.tensor([min_p], **f)
        self.penalty = torch.tensor([penalty], **f)
        self.seed = torch.tensor([seed], device=device, dtype=torch.int64)
        self.offset = torch.zeros(1, device=device, dtype=torch.int64)
        self.history = torch.zeros(1, max(capacity, len(history) + 1), device=device, dtype=torch.int64)
        self.history[0, :len(history)] = torch.tensor(list(history), dtype=torch.int64)
        self.history_len = torch.tensor([len(history)], device=device, dtype=torch.int64)
        self.out = torch.full((1,), -1, device=device, dtype=torch.int64)

    def sample(self, logits: torch.Tensor, append: bool = False) -> int:
        _C.sample(logits.reshape(1, -1), self.history, self.history_len, self.temperature, self.top_k, self.top_p,
                  self.min_p, self.penalty, self.seed, self.offset, self.out, append)
        return int(self.out.item())
