"""The sampler in plain torch ops, graph-capturable (the 'graphs' ablation mode; no host sync).

The same function as the fused kernel and its CPU reference (csrc/sampling_ref.h), step by step, on the
same per-row [B] inputs as torch.ops.hjcg.sample and with the same side effects. The draw is the kernel's own
Philox4x32-10 uniform (csrc/philox.h, sampler_uniform) for (seed, draw counter), computed with int64
tensor ops on the device, so a seeded request draws the same tokens in every mode, in any row. Parameters are those of
hjcg.sampling.SamplingParams; values outside a filter's active range are "off", as in
csrc/sampling_params.h.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_ROUNDS = 10
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)  # of counter words 0 and 2
_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)    # added to key words 0 and 1 after each round


def _column(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A [len(values), 1] int64 constant on like's device, made by fills (capturable, unlike a copy)."""
    out = torch.empty(len(values), 1, dtype=torch.int64, device=like.device)
    for i, v in enumerate(values):
        out[i].fill_(v)
    return out


def _mulhilo32(a: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) 32-bit words of a * m for 32-bit a and m = m_hi * 2^16 + m_lo, in int64 without
    overflow: each partial product stays below 2^48."""
    p0, p1 = a * m_lo, a * m_hi
    low = (p0 + ((p1 & 0xFFFF) << 16)) & _MASK32
    high = ((p0 >> 16) + p1) >> 16
    return low, high


def philox_uniform(seed: torch.Tensor, offset: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """seed, offset, row [B] int64 -> [B] float32 in [0, 1): csrc/philox.h's philox_uniform, elementwise."""
    seed, offset, row = (t.long() for t in torch.broadcast_tensors(seed, offset, row))
    multipliers = _column(_MULTIPLIERS, seed)
    m_lo, m_hi = multipliers & 0xFFFF, multipliers >> 16
    # state as pairs: even = counter words (0, 2), odd = (1, 3); key words (0, 1) for every round at once
    even = torch.stack((offset & _MASK32, row & _MASK32))
    odd = torch.stack(((offset >> 32) & _MASK32, torch.zeros_like(row)))
    key = torch.stack((seed & _MASK32, (seed >> 32) & _MASK32))                           # [2, B]
    rounds = torch.arange(_ROUNDS, device=seed.device, dtype=torch.int64)[:, None, None]
    keys = (key + rounds * _column(_KEY_STEPS, seed)) & _MASK32                         # [10, 2, B]
    for r in range(_ROUNDS):
        low, high = _mulhilo32(even, m_lo, m_hi)
        # word 0 <- hi(2) ^ word 1 ^ key 0, word 2 <- hi(0) ^ word 3 ^ key 1; words 1, 3 <- lo(2), lo(0)
        even, odd = high.flip(0) ^ odd ^ keys[r], low.flip(0)
    return (even[0] >> 8).float() * (1.0 / 16777216.0)


def _penalized(x: torch.Tensor, history: torch.Tensor, length: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """Step 1: x [B, V] with each distinct seen token's logit penalised (from the original logit)."""
    vocab, capacity = x.shape[1], history.shape[1]
    valid = (torch.arange(capacity, device=x.device) < length[:, None]) & (history >= 0) & (history < vocab)
    index = torch.where(valid, history, vocab)               # invalid entries go to a dummy column
    padded = F.pad(x, (0, 1))
    seen = padded.gather(1, index)
    active = (penalty > 0) & (penalty != 1)                  # sampling_params.h: penalty_active
    p = torch.where(active, penalty, torch.ones_like(penalty))[:, None]
    return padded.scatter(1, index, torch.where(seen > 0, seen / p, seen * p))[:, :vocab]


def _weights(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Step 3: w = exp((x - max) / T) in float32 (the largest is exactly 1); rows with T <= 0 use T = 1."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    inv_t = 1.0 / t
    return torch.exp((x - x.amax(1, keepdim=True)) * inv_t[:, None])


def _top_p_threshold(descending: torch.Tensor, floor: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Step 5: the smallest kept weight whose tie group completes top_p of the mass above `floor`."""
    kept = descending >= floor[:, None]
    mass = torch.where(kept, descending, torch.zeros_like(descending)).double()
    running = mass.cumsum(1)
    target = top_p.double() * mass.sum(1)
    first = torch.searchsorted(running, target[:, None])                 # first i with running[i] >= target
    t = descending.gather(1, first.clamp_max(descending.shape[1] - 1))[:, 0]
    # rounding left the target past the kept mass: keep them all (the reference's kept.back())
    return torch.where(first[:, 0] < kept.sum(1), torch.maximum(floor, t), floor)


def _keep_threshold(w: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Steps 4-6: [B] the smallest weight every active filter keeps (each keeps {w >= threshold})."""
    vocab = w.shape[1]
    descending = w.sort(dim=1, descending=True).values
    k = top_k.long()
    kth = descending.gather(1, (k.clamp(1, vocab) - 1)[:, None])[:, 0]
    threshold = torch.where((k > 0) & (k < vocab), kth, torch.zeros_like(kth))   # top_k_active
    threshold = torch.where((top_p > 0) & (top_p < 1),                          # top_p_active
                            _top_p_threshold(descending, threshold, top_p), threshold)
    return torch.where(min_p > 0, torch.maximum(threshold, min_p), threshold)  # min_p_active


def _draw(w: torch.Tensor, threshold: torch.Tensor, u: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """Step 7: the first token, in index order, whose running kept mass (float64) exceeds u of the total."""
    vocab = w.shape[1]
    keep = w >= threshold[:, None]
    cdf = torch.where(keep, w, torch.zeros_like(w)).double().cumsum(1)
    target = u.double() * cdf[:, -1]
    picked = torch.searchsorted(cdf, target[:, None], right=True)[:, 0]
    index = torch.arange(vocab, device=w.device)
    last_kept = torch.where(keep, index, -1).amax(1)
    # rounding left the target past the total: the last kept token; nothing kept: the fallback (argmax)
    picked = torch.where(picked < vocab, picked, last_kept)
    return torch.where(last_kept >= 0, picked, fallback)


def _advance(token: torch.Tensor, out: torch.Tensor, offset: torch.Tensor, history: torch.Tensor,
             history_len: torch.Tensor, length: torch.Tensor, append: bool) -> None:
    """The kernel's side effects: out = token; offset += 1; append to the history where it has room."""
    out.copy_(token)
    offset.add_(1)
    capacity = history.shape[1]
    if not append or capacity == 0:
        return
    room = length < capacity
    slot = length.clamp_max(capacity - 1)[:, None]
    history.scatter_(1, slot, torch.where(room[:, None], token[:, None], history.gather(1, slot)))
    history_len.copy_(torch.where(room, length + 1, history_len))


def sample_rows(logits: torch.Tensor, history: torch.Tensor, history_len: torch.Tensor, temperature: torch.Tensor,
                top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, repetition_penalty: torch.Tensor,
                seed: torch.Tensor, offset: torch.Tensor, out: torch.Tensor, append_to_history: bool) -> torch.Tensor:
    """torch.ops.hjcg.sample in torch ops: logits [B, V] -> out [B] (int64), the state advanced alike."""
    x = logits.float()
    length = history_len.clamp(0, history.shape[1])
    x = _penalized(x, history, length, repetition_penalty)
    greedy = torch.argmax(x, dim=1)                          # the lowest index on ties
    w = _weights(x, temperature)
    threshold = _keep_threshold(w, top_k, top_p, min_p)
    # sampler_uniform: Philox(seed, offset) with stream word 0, whatever the row (batch invariance)
    sampled = _draw(w, threshold, philox_uniform(seed, offset, torch.zeros_like(offset)), greedy)
    _advance(torch.where(temperature > 0, sampled, greedy), out, offset, history, history_len, length,
             append_to_history)
    return out


def torch_pad(prompt: torch.Tensor, start: int, pad_id: int, ids: torch.Tensor, positions: torch.Tensor,
              last_index: torch.Tensor, seq_len: torch.Tensor) -> None:
    """The padding kernel's job in separate torch ops (several launches)."""
    n = prompt.numel()
    ids[:n].copy_(prompt, non_blocking=True)
    ids[n:].fill_(pad_id)
    torch.arange(start, start + ids.numel(), out=positions)
    last_index.fill_(n - 1)
    seq_len.fill_(start + n)
