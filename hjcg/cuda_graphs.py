"""The CUDA path: prefill through length-bucket graphs, decode through one graph per step.

Modes:
  hybrid  graphs + hjcg's fused kernels (padding, RoPE/KV write, norms, SiLU, decode attention, sampling)
  graphs  graphs + plain torch ops everywhere (padding, sampling, attention over the masked cache)

Decode chains on the GPU: the graph reads the token and position from device memory, samples inside,
writes the next token and position back, so replays follow one another with no host round trip. The
host copies each token to pinned memory behind the GPU and streams it, one step behind; closing the
generator stops the chain (at most one extra step has run).
"""
from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from hjcg.config import EngineConfig
from hjcg.fused_ops import FusedCudaOps, decode_attention
from hjcg.llama import Attention, FastLlama, LayerOps, causal_self_attention, masked_cache_attention
from hjcg.native import _C
from hjcg.runners import chunks
from hjcg.sampling import SamplerState, SamplingParams
from hjcg.torch_sampler import torch_pad, torch_sample

DECODE_KEY = "decode:1:1"
ATTENTION_SPLITS = 16
HOST_RING = 8


@dataclass(slots=True)
class PrefillInputs:
    """A prefill bucket's static inputs, written by the padding kernel before each replay."""
    ids: torch.Tensor         # [S] int64
    positions: torch.Tensor   # [S] int64
    last_index: torch.Tensor  # [1] int64
    seq_len: torch.Tensor     # [1] int64


class GraphRunner:
    def __init__(self, model: FastLlama, config: EngineConfig):
        if model.device.type != "cuda":
            raise ValueError("the graph runner needs a CUDA model")
        self.mode = config.mode
        self.model = model
        self.fused = config.mode == "hybrid"
        if self.fused:
            model.fold_norm_weights()
        self.ops: LayerOps = FusedCudaOps() if self.fused else LayerOps()
        self.buckets = list(config.prefill_buckets)
        self.context_length = config.max_context
        device = model.device
        self.cache = model.new_cache(config.max_context + self.buckets[-1])
        self.sampler = SamplerState(device, config.max_context + self.buckets[-1])
        self.graphs = _C.GraphCache(config.graph_cache_max_entries, config.graph_cache_max_bytes)
        self.inputs: dict[int, PrefillInputs] = {}
        self.row_attentions: dict[int, Attention] = {}
        self.logits = torch.zeros(1, model.shape.vocab_size, device=device, dtype=torch.float32)
        self.decode_logits = torch.zeros_like(self.logits)  # the last decode step's logits (tests, logprobs)
        self.token = torch.zeros(1, device=device, dtype=torch.int64)
        self.position = torch.zeros(1, device=device, dtype=torch.int64)
        self.seq_len = torch.ones(1, device=device, dtype=torch.int64)
        self.host_tokens = torch.zeros(HOST_RING, dtype=torch.int64, pin_memory=True)
        self.events = [torch.cuda.Event() for _ in range(HOST_RING)]
        self.pad_id = 0
        self.fallbacks = 0  # steps run eagerly because a capture failed
        if self.fused:
            self._decode_attention = decode_attention(self.cache, self.seq_len, ATTENTION_SPLITS)
        else:
            self._decode_attention = masked_cache_attention(self.cache, self.position)

    # --- the captured functions -------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        return self.sampler.sample(logits) if self.fused else torch_sample(logits, self.sampler)

    def _decode_step(self) -> None:
        torch.add(self.position, 1, out=self.seq_len)
        logits = self.model.forward(self.token, self.position, self.cache, self._decode_attention, None, self.ops)
        self.decode_logits.copy_(logits)
        self.token.copy_(self._sample(logits))
        self.position.add_(1)

    def _prefill_fn(self, bucket: int, first_chunk: bool) -> Callable[[], None]:
        inp = self._inputs(bucket)
        attention = (causal_self_attention(self.cache) if first_chunk
                     else masked_cache_attention(self.cache, inp.positions))

        row_attention = self._row_attention(bucket)

        def run() -> None:
            logits = self.model.forward(inp.ids, inp.positions, self.cache, attention, inp.last_index, self.ops,
                                        row_attention)
            self.logits.copy_(logits)

        return run

    def _row_attention(self, bucket: int) -> Attention | None:
        """The last layer's one sampled row: the decode kernel, its key count written by the padding step.
        Kept for the runner's life: its workspace, allocated on the warm-up run before a capture, is
        memory the captured graph writes to."""
        if not self.fused:
            return None
        if bucket not in self.row_attentions:
            self.row_attentions[bucket] = decode_attention(self.cache, self._inputs(bucket).seq_len, ATTENTION_SPLITS)
        return self.row_attentions[bucket]

    def _inputs(self, bucket: int) -> PrefillInputs:
        if bucket not in self.inputs:
            d = self.model.device
            self.inputs[bucket] = PrefillInputs(
                ids=torch.zeros(bucket, device=d, dtype=torch.int64),
                positions=torch.arange(bucket, device=d, dtype=torch.int64),
                last_index=torch.zeros(1, device=d, dtype=torch.int64),
                seq_len=torch.zeros(1, device=d, dtype=torch.int64))
        return self.inputs[bucket]

    # --- graph cache ------------------------------------------------------------------------------------

    def _run_graph(self, key: str, make_fn: Callable[[], Callable[[], None]], pin: bool = False) -> dict | None:
        """Replays `key`, capturing it on a miss; runs eagerly if the capture fails. Returns the capture
        report when it captured."""
        if self.graphs.replay(key):
            return None
        fn = make_fn()
        report = self.graphs.capture(key, fn, warmup=1, pin=pin)
        if report["captured"]:
            self.graphs.replay(key)
        else:
            self.fallbacks += 1
            fn()
        return report

    @staticmethod
    def prefill_key(bucket: int, first_chunk: bool) -> str:
        return f"{'prefill' if first_chunk else 'prefill_chunk'}:{bucket}:1"

    def bucket_for(self, length: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, length)]

    # --- prefill and decode -----------------------------------------------------------------------------

    def prefill(self, prompt: torch.Tensor, params: SamplingParams) -> None:
        """Runs the prompt (on the device) through the bucket graphs; leaves the first token in self.token."""
        for start, end in chunks(prompt.numel(), self.buckets[-1]):
            bucket = self.bucket_for(end - start)
            inp = self._inputs(bucket)
            pad = _C.pad_prompt if self.fused else torch_pad
            pad(prompt[start:end], start, self.pad_id, inp.ids, inp.positions, inp.last_index, inp.seq_len)
            self._run_graph(self.prefill_key(bucket, start == 0), lambda: self._prefill_fn(bucket, start == 0))
        # queued behind the replays, so its host-side launches overlap the prefill instead of preceding it
        self.sampler.reset(params, prompt)
        self.token.copy_(self._sample(self.logits))
        self.position.fill_(prompt.numel())

    def _ensure_decode_graph(self) -> dict | None:
        if DECODE_KEY in self.graphs:
            return None
        # Captured between requests: its warm-up step runs on whatever state is there, and every request
        # resets that state before its first replay.
        report = self.graphs.capture(DECODE_KEY, self._decode_step, warmup=1, pin=True)
        if not report["captured"]:
            self.fallbacks += 1
        return report

    def _decode(self) -> None:
        if not self.graphs.replay(DECODE_KEY):
            self._decode_step()

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, params: SamplingParams) -> Iterator[int]:
        self._ensure_decode_graph()
        # one host-to-device copy serves both the sampler's history and the padding kernel; a plain copy
        # (the GPU is idle between requests): pinning a few hundred bytes first costs more than it saves
        prompt = prompt.to(self.model.device)
        self.prefill(prompt, params)
        position = prompt.numel()
        pending: deque[int] = deque()
        step = 0

        def push() -> None:
            nonlocal step
            slot = step % HOST_RING
            self.host_tokens[slot].copy_(self.token[0], non_blocking=True)
            self.events[slot].record()
            pending.append(slot)
            step += 1

        def take() -> int:
            slot = pending.popleft()
            self.events[slot].synchronize()
            return int(self.host_tokens[slot])

        push()  # the first token, from prefill: streamed before any decode step is queued behind it
        yield take()
        # then one step of lookahead: step k+1 is queued on the GPU while the host hands out token k
        while True:
            if position < self.context_length:
                self._decode()
                position += 1
                push()
            if not pending:
                return
            if len(pending) > 1 or position >= self.context_length:
                yield take()

    # --- warm-up and figures ----------------------------------------------------------------------------

    @torch.inference_mode()
    def warm(self, prompt_lengths: list[int]) -> dict:
        start = time.perf_counter()
        buckets = sorted({self.bucket_for(min(n, self.buckets[-1])) for n in prompt_lengths} or set(self.buckets))
        graphs = []
        report = self._ensure_decode_graph()
        graphs.append(self._graph_entry("decode", 1, report))
        for bucket in reversed(buckets):  # largest first, as the memory they need only shrinks
            key = self.prefill_key(bucket, True)
            if key in self.graphs:
                graphs.append(self._graph_entry("prefill", bucket, None))
                continue
            inp = self._inputs(bucket)
            _C.pad_prompt(torch.zeros(1, dtype=torch.int64), 0, self.pad_id, inp.ids, inp.positions,
                          inp.last_index, inp.seq_len)
            report = self.graphs.capture(key, self._prefill_fn(bucket, True), warmup=1, pin=False)
            graphs.append(self._graph_entry("prefill", bucket, report))
        torch.cuda.synchronize()
        stats = self.graphs.stats()
        failed = [g for g in graphs if g.pop("failed", False)]
        message = f"{len(failed)} captures failed (the eager path serves those)" if failed else ""
        return {"available": True, "graphs": graphs, "total_ms": (time.perf_counter() - start) * 1e3,
                "graph_bytes": stats["bytes"], "message": message}

    @staticmethod
    def _graph_entry(phase: str, length: int, report: dict | None) -> dict:
        if report is None:
            return {"phase": phase, "length": length, "capture_ms": 0.0, "bytes": 0, "cached": True}
        return {"phase": phase, "length": length, "capture_ms": report.get("capture_ms", 0.0),
                "bytes": report.get("bytes", 0), "cached": False, "failed": not report["captured"]}

    def graph_stats(self) -> dict:
        return self.graphs.stats()
