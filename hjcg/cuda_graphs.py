"""The CUDA path: the model runner's steps captured into CUDA graphs and replayed.

Modes:
  hybrid  graphs + hjcg's fused kernels (padding, RoPE/KV write, norms, SiLU, one-token GEMV, paged decode
          attention, sampling)
  graphs  graphs + plain torch ops everywhere (padding, sampling, attention over gathered blocks)

Decode: one graph per batch bucket (1, 2, 4, ... max_batch), all captured up front while every row is
idle (a capture's warm-up run advances the rows it covers), pinned in the graph cache. A graph reads the
tokens, positions, block tables and sampler state of its rows from device memory and writes the sampled
tokens and advanced positions back, so replays chain with no host round trip and one graph serves every
mix of streams and lengths. Steps with a constrained stream replay two graphs per bucket instead, the
forward and the masked sampler (captured on first use, without a warm-up run, which would advance live
rows), so the host fills the masks while the forward runs.

Prefill: a prompt's first chunk runs through the smallest length-bucket graph that holds it (captured on
a miss, evicted least-recently-used under the cache's budget); the padding kernel writes the chunk into
the bucket's static inputs and the stream's block table is copied into the one prefill table the graphs
read. Later chunks of prompts longer than the largest bucket run eagerly (they attend to earlier
chunks through the block table, a length the host knows).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from hjcg.config import EngineConfig
from hjcg.fused_ops import FusedCudaOps, paged_decode_attention as fused_decode_attention, rope_decode_attention
from hjcg.kv_cache import TRASH_BLOCK, PagedKVCache
from hjcg.llama import Attention, FastLlama, LayerOps, causal_self_attention, packed_self_attention, paged_decode_attention
from hjcg.model_runner import EagerRunner
from hjcg.native import _C
from hjcg.packing import PackedPrompts, attention_mask
from hjcg.torch_sampler import torch_pad
from hjcg.upload import upload

# Split-K slices per (row, head) of the decode attention: fixed for every batch bucket, so a row's result
# does not depend on the batch it runs in.
ATTENTION_SPLITS = 16


@dataclass(slots=True)
class PrefillInputs:
    """A prefill bucket's static inputs, written by the padding kernel before each replay."""
    ids: torch.Tensor         # [S] int64
    positions: torch.Tensor   # [S] int64
    last_index: torch.Tensor  # [1] int64
    seq_len: torch.Tensor     # [1] int64


@dataclass(slots=True)
class PackedInputs:
    """A packed-prefill bucket's static inputs (hjcg.packing): views of one buffer, written by one copy."""
    buffer: torch.Tensor      # [3 S + 2 R] int64: the views below, in PackedPrompts.padded's order
    ids: torch.Tensor         # [S]
    positions: torch.Tensor   # [S]
    segments: torch.Tensor    # [S]
    last_index: torch.Tensor  # [R]
    seq_lens: torch.Tensor    # [R]

    @classmethod
    def zeros(cls, length: int, rows: int, device: torch.device) -> "PackedInputs":
        buffer = torch.zeros(3 * length + 2 * rows, device=device, dtype=torch.int64)
        ids, positions, segments, last, lens = buffer.split([length, length, length, rows, rows])
        return cls(buffer, ids, positions, segments, last, lens)


def decode_key(bucket: int) -> str:
    return f"decode:{bucket}"


def forward_key(bucket: int) -> str:
    return f"decode-forward:{bucket}"


def sample_key(bucket: int) -> str:
    return f"decode-sample:{bucket}"


def prefill_key(bucket: int) -> str:
    return f"prefill:{bucket}"


def packed_key(bucket: int) -> str:
    return f"prefill-packed:{bucket}"


class GraphRunner(EagerRunner):
    def __init__(self, model: FastLlama, cache: PagedKVCache, config: EngineConfig, batch_buckets: tuple[int, ...]):
        if model.device.type != "cuda":
            raise ValueError("the graph runner needs a CUDA model")
        fused = config.mode == "hybrid"
        if fused:
            model.fold_norm_weights()
        ops: LayerOps = (FusedCudaOps(config.gemv_max_rows, mma_gemv_max_rows=config.mma_gemv_max_rows,
                                      pdl=config.pdl) if fused else LayerOps())
        self.pdl = config.pdl
        self.buckets = list(config.prefill_buckets)
        super().__init__(model, cache, max(batch_buckets), config.max_context + self.buckets[-1], self.buckets[-1],
                         ops, kernel_sampler=fused)
        self.mode = config.mode
        self.fused = fused
        self.batch_buckets = tuple(batch_buckets)
        self.graphs = _C.GraphCache(config.graph_cache_max_entries, config.graph_cache_max_bytes)
        self.inputs: dict[int, PrefillInputs] = {}
        self.row_attentions: dict[str, Attention] = {}  # per prefill graph key: see _row_attention
        self.prefill_table = torch.zeros(1, self.table_width, device=self.device, dtype=torch.int32)
        self.prefill_logits = torch.zeros(1, model.shape.vocab_size, device=self.device, dtype=torch.float32)
        # packed prefill: a logit row per stream that may join in one step, and the joining streams' tables
        self.packed_inputs: dict[int, PackedInputs] = {}
        self.packed_tables = torch.zeros(self.max_rows, self.table_width, device=self.device, dtype=torch.int32)
        self.packed_logits = torch.zeros(self.max_rows, model.shape.vocab_size, device=self.device,
                                         dtype=torch.float32)
        self.pad_id = 0
        self.fallbacks = 0  # steps run eagerly because a capture failed
        if fused:
            self._decode_attention = fused_decode_attention(cache, self.tables, self.seq_lens, ATTENTION_SPLITS,
                                                            self.pdl)
            self._qkv_attention = rope_decode_attention(model, cache, self.tables, self.seq_lens, ATTENTION_SPLITS,
                                                        self.pdl)
        else:  # the whole table: shapes that do not depend on the lengths
            self._decode_attention = paged_decode_attention(cache, self.tables, self.seq_lens)
            self._qkv_attention = None
        self.capture_decode_graphs()

    # --- decode -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture_decode_graphs(self) -> list[dict]:
        """Captures a decode graph per batch bucket (largest first, as the memory they need only shrinks).
        Only while no stream runs: each capture's warm-up step advances the rows it covers."""
        reports = []
        for bucket in sorted(self.batch_buckets, reverse=True):
            key = decode_key(bucket)
            if key in self.graphs:
                reports.append({"phase": "decode", "length": bucket, "report": None})
                continue
            report = self.graphs.capture(
                key, lambda b=bucket: self._decode_step(b, self._decode_attention, self._qkv_attention), warmup=1,
                pin=True)
            if not report["captured"]:
                self.fallbacks += 1
            reports.append({"phase": "decode", "length": bucket, "report": report})
        torch.cuda.synchronize()
        return reports

    def _decode(self, n: int, bucket: int, max_len: int) -> None:
        if not self.graphs.replay(decode_key(bucket)):
            self._decode_step(bucket, self._decode_attention, self._qkv_attention)

    def _forward(self, n: int, bucket: int, max_len: int) -> None:
        self._replay_step(forward_key(bucket),
                          lambda: self._forward_step(bucket, self._decode_attention, self._qkv_attention))

    def _sample(self, n: int, bucket: int) -> None:
        self._replay_step(sample_key(bucket), lambda: self._sample_step(bucket))

    def _replay_step(self, key: str, step: Callable[[], object]) -> None:
        """Replays a half step's graph, capturing it (pinned) on first use. No warm-up run: streams are
        live, and the decode graphs' captures have done every first-call allocation already."""
        if self.graphs.replay(key):
            return
        if self.graphs.capture(key, step, warmup=0, pin=True)["captured"]:
            self.graphs.replay(key)
        else:
            self.fallbacks += 1
            step()

    # --- prefill ----------------------------------------------------------------------------------------

    def _prefill_chunk(self, ids: torch.Tensor, start: int, end: int, row: int) -> torch.Tensor:
        if start > 0:
            return super()._prefill_chunk(ids, start, end, row)
        bucket = self.bucket_for(end)
        inp = self._inputs(bucket)
        pad = torch.ops.hjcg.pad_prompt if self.fused else torch_pad
        pad(ids[:end], 0, self.pad_id, inp.ids, inp.positions, inp.last_index, inp.seq_len)
        self.prefill_table.copy_(self.tables[row:row + 1])
        self._run_graph(prefill_key(bucket), lambda: self._prefill_fn(bucket))
        return self.prefill_logits

    def _packed_prefill(self, layout: PackedPrompts, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        bucket = self.bucket_for(layout.tokens)
        inp = self._load_packed(layout, bucket)
        self.packed_tables[:layout.count].copy_(self.tables[first_row:first_row + layout.count])
        self._run_graph(packed_key(bucket), lambda: self._packed_fn(bucket))
        return self.packed_logits[:layout.count], inp.ids

    def _load_packed(self, layout: PackedPrompts, bucket: int) -> PackedInputs:
        """Writes `layout` into the static inputs of the packed-prefill graph of `bucket` tokens (one copy)."""
        inp = self._packed(bucket)
        inp.buffer.copy_(upload(layout.padded(bucket, self.max_rows, self.pad_id), torch.int64, self.device))
        return inp

    def _packed_fn(self, bucket: int) -> Callable[[], None]:
        inp = self._packed(bucket)
        # rows past the packed prompts read one key of a stale table: harmless, their logits are dropped
        row_attention = self._row_attention(packed_key(bucket), self.packed_tables, inp.seq_lens)

        def run() -> None:
            attention = packed_self_attention(attention_mask(inp.segments, self.model.dtype))
            slots = self.cache.slots_at(self.packed_tables.index_select(0, inp.segments), inp.positions)
            logits = self.model.forward(inp.ids, inp.positions, slots, self.cache, attention, inp.last_index, self.ops,
                                        row_attention)
            self.packed_logits.copy_(logits)

        return run

    def _packed(self, bucket: int) -> PackedInputs:
        if bucket not in self.packed_inputs:
            self.packed_inputs[bucket] = PackedInputs.zeros(bucket, self.max_rows, self.device)
        return self.packed_inputs[bucket]

    def _prefill_fn(self, bucket: int) -> Callable[[], None]:
        inp = self._inputs(bucket)
        attention = causal_self_attention()
        row_attention = self._row_attention(prefill_key(bucket), self.prefill_table, inp.seq_len)
        table = self.prefill_table.expand(bucket, -1)

        def run() -> None:
            # pads sit past the prompt: their K/V land in the stream's own future positions (rewritten
            # before they are read) or, past its blocks, in the trash block
            slots = self.cache.slots_at(table, inp.positions)
            logits = self.model.forward(inp.ids, inp.positions, slots, self.cache, attention, inp.last_index, self.ops,
                                        row_attention)
            self.prefill_logits.copy_(logits)

        return run

    def _row_attention(self, key: str, tables: torch.Tensor, seq_lens: torch.Tensor) -> Attention | None:
        """The last layer's sampled rows of the prefill graph `key`: the decode kernel over each stream's
        blocks (tables [R, W]), its key counts (seq_lens [R]) written with the graph's inputs. Kept for the
        runner's life: its workspace, allocated on the warm-up run before a capture, is memory the captured
        graph writes to."""
        if not self.fused:
            return None
        if key not in self.row_attentions:
            self.row_attentions[key] = fused_decode_attention(self.cache, tables, seq_lens, ATTENTION_SPLITS, self.pdl)
        return self.row_attentions[key]

    def _inputs(self, bucket: int) -> PrefillInputs:
        if bucket not in self.inputs:
            d = self.device
            self.inputs[bucket] = PrefillInputs(
                ids=torch.zeros(bucket, device=d, dtype=torch.int64),
                positions=torch.arange(bucket, device=d, dtype=torch.int64),
                last_index=torch.zeros(1, device=d, dtype=torch.int64),
                seq_len=torch.ones(1, device=d, dtype=torch.int64))
        return self.inputs[bucket]

    def bucket_for(self, length: int) -> int:
        return self.buckets[bisect.bisect_left(self.buckets, length)]

    # --- graph cache ------------------------------------------------------------------------------------

    def _run_graph(self, key: str, make_fn: Callable[[], Callable[[], None]]) -> dict | None:
        """Replays `key`, capturing it on a miss; runs eagerly if the capture fails. Returns the capture
        report when it captured."""
        if self.graphs.replay(key):
            return None
        fn = make_fn()
        report = self.graphs.capture(key, fn, warmup=1, pin=False)
        if report["captured"]:
            self.graphs.replay(key)
        else:
            self.fallbacks += 1
            fn()
        return report

    # --- warm-up and figures ----------------------------------------------------------------------------

    @torch.inference_mode()
    def warm(self, prompt_lengths: list[int]) -> dict:
        """Captures the prefill graphs for these prompt lengths (empty: every bucket) and any missing
        decode graph. Prefill captures write only the trash block (their table is all trash)."""
        start = time.perf_counter()
        graphs = [self._graph_entry(r["phase"], r["length"], r["report"]) for r in self.capture_decode_graphs()]
        buckets = sorted({self.bucket_for(min(n, self.buckets[-1])) for n in prompt_lengths} or set(self.buckets))
        for bucket in reversed(buckets):  # largest first, as the memory they need only shrinks
            key = prefill_key(bucket)
            if key in self.graphs:
                graphs.append(self._graph_entry("prefill", bucket, None))
                continue
            inp = self._inputs(bucket)
            torch.ops.hjcg.pad_prompt(torch.zeros(1, dtype=torch.int64), 0, self.pad_id, inp.ids, inp.positions,
                          inp.last_index, inp.seq_len)
            self.prefill_table.zero_()
            report = self.graphs.capture(key, self._prefill_fn(bucket), warmup=1, pin=False)
            graphs.append(self._graph_entry("prefill", bucket, report))
        if self.max_rows > 1:  # streams that join together prefill packed
            for bucket in reversed(buckets):
                graphs.append(self._warm_packed(bucket))
        torch.cuda.synchronize()
        stats = self.graphs.stats()
        failed = [g for g in graphs if g.pop("failed", False)]
        message = f"{len(failed)} captures failed (the eager path serves those)" if failed else ""
        return {"available": True, "graphs": graphs, "total_ms": (time.perf_counter() - start) * 1e3,
                "graph_bytes": stats["bytes"], "message": message}

    def _warm_packed(self, bucket: int) -> dict:
        """Captures the packed-prefill graph of `bucket` tokens (its tables all trash: it writes only the
        trash block)."""
        key = packed_key(bucket)
        if key in self.graphs:
            return self._graph_entry("prefill-packed", bucket, None)
        self._load_packed(PackedPrompts.of([[self.pad_id]]), bucket)
        self.packed_tables.fill_(TRASH_BLOCK)
        report = self.graphs.capture(key, self._packed_fn(bucket), warmup=1, pin=False)
        return self._graph_entry("prefill-packed", bucket, report)

    @staticmethod
    def _graph_entry(phase: str, length: int, report: dict | None) -> dict:
        if report is None:
            return {"phase": phase, "length": length, "capture_ms": 0.0, "bytes": 0, "cached": True}
        return {"phase": phase, "length": length, "capture_ms": report.get("capture_ms", 0.0),
                "bytes": report.get("bytes", 0), "cached": False, "failed": not report["captured"]}

    def graph_stats(self) -> dict:
        return self.graphs.stats()
