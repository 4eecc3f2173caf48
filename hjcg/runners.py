"""Step runners: given a prompt, produce token ids one by one. One runner per engine mode.

A runner's `generate(prompt, params)` is a generator: it prefills, then yields token ids until the
caller closes it (the engine decides when to stop) or the KV cache is full. The eager runner is the
reference path and the CPU path; the CUDA graph runners live in hjcg.cuda_graphs.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hjcg.llama import FastLlama, eager_attention, masked_cache_attention
from hjcg.sampling import SamplerState, SamplingParams


def chunks(length: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) pairs covering [0, length) in pieces of at most `size`."""
    for start in range(0, length, size):
        yield start, min(start + size, length)


class EagerRunner:
    """Plain PyTorch forward and the extension's sampling kernel (the CPU path, and the reference)."""

    mode = "eager"

    def __init__(self, model: FastLlama, context_length: int, prefill_chunk: int):
        self.model = model
        self.context_length = context_length
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache(context_length)
        self.sampler = SamplerState(model.device, context_length)

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Runs the prompt through the model in chunks; returns the last row's logits [1, V]."""
        device = self.model.device
        prompt = prompt.to(device)
        logits = None
        for start, end in chunks(prompt.numel(), self.prefill_chunk):
            positions = torch.arange(start, end, device=device)
            attention = eager_attention(self.cache, positions, start, end)
            last = torch.tensor([end - start - 1], device=device)
            logits = self.model.forward(prompt[start:end], positions, self.cache, attention, last)
        return logits

    def decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        positions = torch.tensor([position], device=self.model.device)
        attention = eager_attention(self.cache, positions, position, position + 1)
        return self.model.forward(token, positions, self.cache, attention, None)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, params: SamplingParams) -> Iterator[int]:
        self.sampler.reset(params, prompt)
        token = self.sampler.sample(self.prefill(prompt)).clone()
        position = prompt.numel()
        while True:
            yield int(token.item())
            if position >= self.context_length:
                return
            token = self.sampler.sample(self.decode(token, position)).clone()
            position += 1


class CompiledRunner(EagerRunner):
    """torch.compile on the decode step, no CUDA graphs: one compiled shape for every position.

    The decode attention masks the whole static cache instead of slicing it, so the step's shapes never
    change and it compiles once.
    """

    mode = "compiled"

    def __init__(self, model: FastLlama, context_length: int, prefill_chunk: int):
        super().__init__(model, context_length, prefill_chunk)
        self._step = torch.compile(self._decode_step, dynamic=False, fullgraph=False)

    def _decode_step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model.forward(token, positions, self.cache, masked_cache_attention(self.cache, positions), None)

    def decode(self, token: torch.Tensor, position: int) -> torch.Tensor:
        return self._step(token, torch.tensor([position], device=self.model.device))


__all__ = ["EagerRunner", "CompiledRunner", "chunks"]
