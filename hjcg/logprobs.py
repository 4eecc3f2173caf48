"""Logprobs, defined once: what a request that asks for them gets with each token.

A token's logprob is log_softmax, in float32, of the logits its step sampled from, taken after the
structured-output mask (a token the constraint forbids has -inf) and before the repetition penalty,
temperature and the top-k / top-p / min-p filters: the model's own distribution, as vLLM reports by default
("raw" logprobs) and as OpenAI's API describes them. They do not depend on the sampling settings, and a
greedy stream's token has the largest. The top-N alternatives are the N largest of the same values, most
likely first.

They are computed on the device, after the step's sampler, only for steps where some running stream asked
(the runners call token_logprobs then); a step where none did runs nothing extra.
"""
from __future__ import annotations

import torch

from hjcg.requests import MAX_TOP_LOGPROBS

TopLogprobs = tuple[tuple[int, float], ...]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, V], tokens [n] (the sampled ones) -> (logprob [n], top ids [n, top], top logprobs [n, top])."""
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.view(-1, 1).long())[:, 0]
    values, ids = lp.topk(top, dim=-1) if top else (lp[:, :0], lp[:, :0].long())
    return chosen, ids, values


def rows(chosen: list[float], ids: list[list[int]], values: list[list[float]], tops: list[int | None]
         ) -> list[tuple[float, TopLogprobs] | None]:
    """Host copies of token_logprobs' results -> per row (logprob, its top pairs), or None where the row's
    stream did not ask (tops[i] is None); row i keeps its own first tops[i] alternatives."""
    out: list[tuple[float, TopLogprobs] | None] = []
    for i, top in enumerate(tops):
        if top is None:
            out.append(None)
        else:
            out.append((chosen[i], tuple(zip(ids[i][:top], values[i][:top]))))
    return out
