"""Prompts of streams that join in the same step, laid end to end for one prefill forward.

A prefill's cost at short prompts is one read of every weight, whatever the token count: 32 prompts of 10
tokens cost about what one costs when they run as one 320-token forward, and 32 times as much one by one.
Packed, each prompt keeps its own positions (0..len-1) and attends only to its own earlier tokens (a
block-diagonal causal mask); its K/V go into its own blocks and its last token's logits are its first token's.

Pads fill the forward up to a length bucket. They continue the last prompt (its segment, its next
positions), as a lone prompt's pads do: the real tokens never attend to them (they come later), and their K/V
land in that stream's future positions (rewritten before they are read) or, past its blocks, in the trash.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class PackedPrompts:
    """Host-side layout of K prompts packed into one forward of `tokens` real tokens."""
    ids: list[int]        # the prompts, end to end
    positions: list[int]  # each token's position in its own prompt
    segments: list[int]   # each token's prompt index, 0..K-1
    last: list[int]       # per prompt, the index of its last token in `ids`
    lengths: list[int]    # per prompt, its length

    @classmethod
    def of(cls, prompts: list[list[int]]) -> "PackedPrompts":
        if not prompts or any(not p for p in prompts):
            raise ValueError("packing needs at least one prompt, and no empty one")
        ids, positions, segments, last = [], [], [], []
        for k, prompt in enumerate(prompts):
            ids.extend(prompt)
            positions.extend(range(len(prompt)))
            segments.extend([k] * len(prompt))
            last.append(len(ids) - 1)
        return cls(ids, positions, segments, last, [len(p) for p in prompts])

    @property
    def count(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def padded(self, length: int, rows: int, pad_id: int) -> list[int]:
        """ids, positions, segments ([length] each, pads appended as the module docstring says), then last
        and lengths ([rows] each; rows past the prompts point at the final token with length 1): the static
        inputs of a packed-prefill graph of `length` tokens and `rows` logit rows, as one int64 list."""
        pads = length - self.tokens
        rest = rows - self.count
        if pads < 0 or rest < 0:
            raise ValueError(f"{self.tokens} tokens of {self.count} prompts do not fit {length} tokens, {rows} rows")
        next_position = self.lengths[-1]
        return (self.ids + [pad_id] * pads
                + self.positions + list(range(next_position, next_position + pads))
                + self.segments + [self.count - 1] * pads
                + self.last + [length - 1] * rest
                + self.lengths + [1] * rest)


def attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, S] additive mask (0: attend, -inf: not) of packed prompts: token i sees token j when both belong
    to the same prompt and j <= i. Built once per forward; every layer reads it."""
    index = torch.arange(segments.shape[0], device=segments.device)
    allowed = (segments[:, None] == segments[None, :]) & (index[None, :] <= index[:, None])
    return torch.zeros(allowed.shape, device=segments.device, dtype=dtype).masked_fill_(~allowed, float("-inf"))
