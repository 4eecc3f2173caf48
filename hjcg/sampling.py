"""Sampling parameters, specified once.

SamplingParams is the one specification of every parameter: it checks each value against its range and
stores it in canonical form, and everything downstream (the CUDA kernel, its CPU reference
csrc/sampling_ref.h, and the torch sampler hjcg/torch_sampler.py) receives only canonical values and
runs the pipeline of csrc/sampling_ref.h on them. The gRPC layer reads its messages through
SamplingParams.from_wire, so the wire's "0 means unset" rule lives here too.

| parameter          | accepted          | off (default) | canonical form                        | proto3 0 means |
|--------------------|-------------------|---------------|---------------------------------------|----------------|
| temperature        | [0, 100]          | 0: greedy     | below 1e-5 becomes 0 (greedy)         | 0: greedy      |
| top_k              | integer >= 0      | 0             | above 2^31 - 1 becomes 0 (keeps all)  | 0: off         |
| top_p              | (0, 1]            | 1             | as given                              | unset: 1       |
| min_p              | [0, 1]            | 0             | as given                              | 0: off         |
| repetition_penalty | (0, 100]          | 1             | as given                              | unset: 1       |
| seed               | [0, 2^64) or None | None: random  | as given                              | has presence   |

What each does (csrc/sampling_ref.h, step by step): the repetition penalty divides the positive logits
(multiplies the negative ones) of every distinct token seen so far; temperature 0 takes the argmax
(lowest index on ties), else weights w = exp((logit - max) / temperature); top_k keeps the k largest
weights (ties at the edge kept); top_p keeps the largest weights whose mass reaches top_p of the mass
top_k kept (whole tie groups); min_p keeps the weights >= min_p times the largest; the draw is Philox
(seed, draw counter), independent of the request's row in the batch. Floats must be finite.

Non-canonical values never reach the samplers through this class; handed one directly, every sampler
reads a value outside its filter's active range (top_k <= 0 or >= vocab, top_p <= 0 or >= 1,
min_p <= 0, repetition_penalty <= 0 or == 1, temperature <= 0) as off (csrc/sampling_params.h).
The batch's sampler state, which feeds them per-row [B] tensors of these values, is
hjcg.row_sampler.RowSampler (row_tensors builds the same tensors for tests and tools).
"""
from __future__ import annotations

import math
import operator
import secrets
from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5   # below it sampling is greedy in all but float noise; 1/T must stay finite in float32
MAX_TOP_K = 2**31 - 1    # the kernels read top_k as int32; any larger k keeps every token anyway


@dataclass(slots=True, frozen=True)
class FloatSpec:
    """One float parameter: its accepted range, its off value, and whether proto3's 0 means unset."""
    name: str
    low: float
    high: float
    low_open: bool       # (low, high] instead of [low, high]
    off: float
    wire_zero_is_unset: bool
    off_means: str = "off"

    def check(self, value: float) -> float:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        above_low = value > self.low if self.low_open else value >= self.low
        if not (above_low and value <= self.high):
            bracket = "(" if self.low_open else "["
            raise ValueError(f"{self.name} must be in {bracket}{self.low:g}, {self.high:g}] "
                             f"({self.off:g}: {self.off_means}), got {value:g}")
        return value


FLOAT_SPECS = {s.name: s for s in (
    FloatSpec("temperature", 0.0, 100.0, False, 0.0, False, "greedy"),
    FloatSpec("top_p", 0.0, 1.0, True, 1.0, True),
    FloatSpec("min_p", 0.0, 1.0, False, 0.0, False),
    FloatSpec("repetition_penalty", 0.0, 100.0, True, 1.0, True),
)}


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """A request's sampling parameters in canonical form (see the module's table)."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, spec in FLOAT_SPECS.items():
            object.__setattr__(self, name, spec.check(getattr(self, name)))
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        object.__setattr__(self, "top_k", _check_top_k(self.top_k))
        if self.seed is not None:
            seed = _as_int(self.seed, "seed")
            if not 0 <= seed < 2**64:
                raise ValueError(f"seed must be in [0, 2^64), got {seed}")
            object.__setattr__(self, "seed", seed)

    @classmethod
    def from_wire(cls, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0, min_p: float = 0.0,
                  repetition_penalty: float = 0.0, seed: int | None = None) -> SamplingParams:
        """From proto3 fields, which have no presence: 0 stands for "unset" (the off value) where 0 is
        outside a parameter's range (top_p, repetition_penalty); elsewhere 0 is the off value itself."""
        values = dict(temperature=temperature, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        for name, spec in FLOAT_SPECS.items():
            if spec.wire_zero_is_unset and values[name] == 0:
                values[name] = spec.off
        return cls(top_k=top_k, seed=seed, **values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def kernel_seed(self) -> int:
        """The seed as the samplers' int64 tensors hold it (the bits of the uint64; they read it back as
        uint64); a fresh random one when unset."""
        seed = self.seed if self.seed is not None else secrets.randbits(64)
        return seed - 2**64 if seed >= 2**63 else seed


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_top_k(value: object) -> int:
    k = _as_int(value, "top_k")
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0: off), got {k}")
    return 0 if k > MAX_TOP_K else k


def row_tensors(params: list[SamplingParams], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The samplers' per-row [B] parameter tensors for B requests, keyed by torch.ops.hjcg.sample's argument names
    (a row whose seed is None gets a fresh random one)."""
    floats = dict(device=device, dtype=torch.float32)
    return dict(
        temperature=torch.tensor([p.temperature for p in params], **floats),
        top_k=torch.tensor([p.top_k for p in params], device=device, dtype=torch.int32),
        top_p=torch.tensor([p.top_p for p in params], **floats),
        min_p=torch.tensor([p.min_p for p in params], **floats),
        repetition_penalty=torch.tensor([p.repetition_penalty for p in params], **floats),
        seed=torch.tensor([p.kernel_seed() for p in params], device=device, dtype=torch.int64),
    )

