"""The sampler in plain torch ops, graph-capturable (the 'graphs' ablation mode; no host sync).

Same inputs and state as the fused kernel (SamplerState), same pipeline; the draw uses torch's
generator (graph-safe Philox offsets) instead of hjcg's counter, so seeded draws differ from hybrid's.
"""
from __future__ import annotations

import torch

from hjcg.sampling import SamplerState


def torch_sample(logits: torch.Tensor, st: SamplerState) -> torch.Tensor:
    x = logits[0].float()
    vocab, capacity = x.numel(), st.history.shape[1]
    # 1. repetition penalty (entries past the history's length go to a dummy slot)
    valid = torch.arange(capacity, device=x.device) < st.history_len
    index = torch.where(valid, st.history[0], torch.full_like(st.history[0], vocab))
    padded = torch.cat([x, x.new_zeros(1)])
    seen = padded.gather(0, index)
    p = st.repetition_penalty
    penalized = torch.where(seen > 0, seen / p, seen * p)
    padded = padded.scatter(0, index, penalized)
    x = padded[:vocab]
    # 2. greedy
    greedy = torch.argmax(x)
    # 3-6. weights, sorted once; top-k by rank, top-p by cumulative mass, min-p by ratio
    w = torch.exp((x - x.max()) / st.temperature.clamp_min(1e-6))
    sorted_w, order = torch.sort(w, descending=True)
    rank = torch.arange(vocab, device=x.device)
    keep = (st.top_k <= 0) | (rank < st.top_k)
    kept = torch.where(keep, sorted_w, torch.zeros_like(sorted_w))
    before = torch.cumsum(kept, 0) - kept
    keep &= before < st.top_p * kept.sum()
    keep &= sorted_w >= st.min_p
    kept = torch.where(keep, sorted_w, torch.zeros_like(sorted_w))
    # 7. inverse CDF
    cdf = torch.cumsum(kept, 0)
    u = torch.rand(1, device=x.device) * cdf[-1]
    sampled = order[torch.searchsorted(cdf, u, right=True).clamp_max(vocab - 1)][0]
    token = torch.where(st.temperature[0] > 0, sampled, greedy)
    # state: the same side effects as the fused kernel
    st.out.copy_(token.view(1))
    st.offset.add_(1)
    slot = st.history_len.clamp_max(capacity - 1)
    st.history[0].index_copy_(0, slot, token.view(1))
    st.history_len.add_((st.history_len < capacity).long())
    return st.out


def torch_pad(prompt: torch.Tensor, start: int, pad_id: int, ids: torch.Tensor, positions: torch.Tensor,
              last_index: torch.Tensor, seq_len: torch.Tensor) -> None:
    """The padding kernel's job in separate torch ops (several launches)."""
    n = prompt.numel()
    ids[:n].copy_(prompt, non_blocking=True)
    ids[n:].fill_(pad_id)
    torch.arange(start, start + ids.numel(), out=positions)
    last_index.fill_(n - 1)
    seq_len.fill_(start + n)
