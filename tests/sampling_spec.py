"""The sampler's specification in plain torch (float64): the filtered, renormalised target distribution.

Tests compare the samplers (the CPU and CUDA kernels, the torch sampler) against it, exactly for the
kept set and statistically for draws, and against each other on random batches whose parameters take
their edge and "off" values (random_batch).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)
from hjcg.sampling import SamplingParams, row_tensors
from hjcg.torch_sampler import sample_rows

# Every sampler takes torch.ops.hjcg.sample's arguments and has its side effects.
SAMPLERS = {"kernel": torch.ops.hjcg.sample, "torch": sample_rows}


def penalized(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    out = logits.clone().float()  # the samplers penalise in float32 (IEEE division)
    if penalty > 0 and penalty != 1:
        for t in set(history):
            if 0 <= t < out.numel():
                out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out.double()


def target_distribution(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                        min_p: float = 0.0, penalty: float = 1.0, history: list[int] = ()) -> torch.Tensor:
    """logits [V] -> probabilities [V] (float64) of the sampler's filtered distribution."""
    x = penalized(logits, list(history), penalty).float()
    # the samplers' weights: subtraction and scaling by 1/T in float32, a float32 result
    z = (x - x.max()) * (1.0 / torch.tensor(temperature, dtype=torch.float32))
    w = torch.exp(z.double()).float().double()
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
    """One-row inputs for torch.ops.hjcg.sample on a device, with the history the kernel appends to."""

    def __init__(self, device="cpu", temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, seed=0,
                 history=(), capacity=64, sampler=torch.ops.hjcg.sample):
        self.sampler = sampler
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
        self.sampler(logits.reshape(1, -1), self.history, self.history_len, self.temperature, self.top_k, self.top_p,
                     self.min_p, self.penalty, self.seed, self.offset, self.out, append)
        return int(self.out.item())


# Values at and around each parameter's edges and its "off" value (hjcg.sampling's table).
EDGE_VALUES = dict(
    temperature=(0.0, 1e-6, 0.05, 0.7, 1.0, 3.0),
    top_p=(1e-7, 0.3, 0.9, 0.999, 1.0),
    min_p=(0.0, 1e-3, 0.2, 1.0),
    repetition_penalty=(1e-3, 0.5, 1.0, 1.3, 100.0),
)
# Outside the accepted ranges: never canonical, but every sampler must still read them as "off".
RAW_OFF_VALUES = dict(top_k=(-3,), top_p=(0.0, -0.5, 1.5), min_p=(-1.0,), repetition_penalty=(0.0, -2.0))


def top_k_edges(vocab: int) -> tuple[int, ...]:
    return (0, 1, 2, vocab - 1, vocab, vocab + 1, 2**40)


@dataclass
class Batch:
    """B rows of logits, per-row parameters and histories: the samplers' whole input."""
    logits: torch.Tensor                # [B, V] float32
    params: dict[str, torch.Tensor]     # row_tensors' keys, [B] each
    history: torch.Tensor               # [B, H] int64
    history_len: torch.Tensor           # [B] int64
    offset: torch.Tensor                # [B] int64

    def run(self, sampler, device="cpu", dtype=torch.float32, append=True) -> dict[str, torch.Tensor]:
        """Runs `sampler` on copies of the inputs on `device`; returns the outputs and state, on the CPU."""
        state = dict(history=self.history.clone(), history_len=self.history_len.clone(), offset=self.offset.clone(),
                     out=torch.full_like(self.history_len, -1))
        state = {k: v.to(device) for k, v in state.items()}
        p = {k: v.to(device) for k, v in self.params.items()}
        sampler(self.logits.to(device, dtype), state["history"], state["history_len"], p["temperature"], p["top_k"],
                p["top_p"], p["min_p"], p["repetition_penalty"], p["seed"], state["offset"], state["out"], append)
        return {k: v.cpu() for k, v in state.items()}

    def with_filters_off(self) -> "Batch":
        """The same rows with top_k, top_p, min_p and repetition_penalty at their off values: what every
        sampler must make of a batch whose filter values are outside their active range."""
        rows = self.logits.shape[0]
        off = dict(top_k=torch.zeros(rows, dtype=torch.int32), top_p=torch.ones(rows), min_p=torch.zeros(rows),
                   repetition_penalty=torch.ones(rows))
        return Batch(self.logits, dict(self.params, **off), self.history, self.history_len, self.offset)

    def row_spec(self, i: int) -> torch.Tensor:
        """Row i's target distribution (greedy rows: all mass on the penalised argmax)."""
        p = {k: v[i].item() for k, v in self.params.items()}
        history = self.history[i, :int(self.history_len[i])].tolist()
        if p["temperature"] <= 0:
            x = penalized(self.logits[i], history, p["repetition_penalty"])
            return torch.nn.functional.one_hot(x.argmax(), x.numel()).double()
        return target_distribution(self.logits[i], p["temperature"], p["top_k"], p["top_p"], p["min_p"],
                                   p["repetition_penalty"], history)


def random_logits(rng: random.Random, rows: int, vocab: int) -> torch.Tensor:
    """Normal logits at a random scale, with exact ties and a few masked (-inf) entries in some rows."""
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    logits = torch.randn(rows, vocab, generator=g) * rng.choice((0.5, 2.0, 8.0))
    for row in logits:
        if vocab >= 4 and rng.random() < 0.3:
            n = vocab // 4
            row[n:2 * n] = row[:n]                                # tie groups
        if vocab >= 4 and rng.random() < 0.2:
            row[torch.randperm(vocab, generator=g)[:vocab // 4]] = float("-inf")
    return logits


def random_batch(rng: random.Random, rows: int, vocab: int, raw_off: bool = False, capacity: int = 8) -> Batch:
    """A batch whose rows take random edge values (canonical, through SamplingParams), or, with raw_off,
    the raw out-of-range values that mean "off" in every sampler."""
    params = []
    for _ in range(rows):
        values = {name: rng.choice(options) for name, options in EDGE_VALUES.items()}
        params.append(SamplingParams(top_k=rng.choice(top_k_edges(vocab)), seed=rng.getrandbits(64), **values))
    tensors = row_tensors(params, "cpu")
    if raw_off:
        for name, options in RAW_OFF_VALUES.items():
            tensors[name] = torch.tensor([rng.choice(options) for _ in range(rows)], dtype=tensors[name].dtype)
    g = torch.Generator().manual_seed(rng.getrandbits(32))
    history = torch.randint(-1, vocab + 1, (rows, capacity), generator=g)   # out-of-vocabulary entries too
    history_len = torch.randint(0, capacity + 1, (rows,), generator=g)
    offset = torch.randint(0, 2**40, (rows,), generator=g)
    return Batch(random_logits(rng, rows, vocab), tensors, history, history_len, offset)


def assert_batches_agree(batch: Batch, results: dict[str, dict]) -> dict[str, int]:
    """Asserts that the samplers' results (name -> Batch.run's output) agree where they must: the state
    and every greedy row identical, every token inside the specification's support. Returns, per
    sampler, how many rows drew the same token as the first sampler's."""
    names = list(results)
    first = results[names[0]]
    greedy = batch.params["temperature"] <= 0
    for name in names[1:]:
        for key in ("offset", "history_len"):
            assert torch.equal(results[name][key], first[key]), (name, key)
        assert torch.equal(results[name]["out"][greedy], first["out"][greedy]), name
    for i in range(batch.logits.shape[0]):
        support = batch.row_spec(i) > 0
        for name in names:
            assert support[results[name]["out"][i]], (name, i, {k: v[i].item() for k, v in batch.params.items()})
    return {name: int((results[name]["out"] == first["out"]).sum()) for name in names}
