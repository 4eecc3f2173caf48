"""The model runner: runs prefill and batched decode steps over the paged KV cache, and owns every buffer
the steps read, in one place.

Batch state, one row per running stream (rows [0, n) live, the rest idle):
  tokens [R]      the token each row feeds next (the decode step writes the sampled one back: steps
                  chain on the device with no host round trip)
  positions [R]   its position; the step adds `live` to it (idle rows stay at 0)
  tables [R, W]   its block table (int32; idle rows and unused entries point at the trash block)
  seq_lens [R]    positions + 1, written by the step, read by the attention kernel
  sampler         per-row sampling parameters, seeds, draw counters and histories (RowSampler)
  bitmask [R, W]  structured output: each row's allowed next tokens (int32 words, a bit per token), read
                  only by the masked sampler (steps where some stream is constrained)
A decode step over n live rows runs in the smallest batch bucket b >= n: rows [n, b) are idle and write
only the trash block. Prefill runs one stream's prompt in chunks (length buckets on CUDA).

A decode step is launch_decode (forward and sampler in one go), or, when some stream is constrained,
launch_forward then launch_sample: the host fills the masks of host_masks() between the two, while the
device runs the forward. Logprobs (hjcg.logprobs) are computed after the sampler only when asked.

Two runners: EagerRunner (plain PyTorch forward; the CPU path and the reference) and, in
hjcg.cuda_graphs, GraphRunner (the same steps captured into CUDA graphs).
"""
from __future__ import annotations

from typing import Iterator

import torch

from hjcg.config import MAX_DECODE_LOOKAHEAD
from hjcg.kv_cache import TRASH_BLOCK, PagedKVCache
from hjcg.logprobs import TopLogprobs, rows as logprob_rows, token_logprobs
from hjcg.llama import (Attention, FastLlama, LayerOps, QkvAttention, causal_self_attention, context_attention,
                        packed_self_attention, paged_decode_attention)
from hjcg.packing import PackedPrompts, attention_mask
from hjcg.requests import MAX_TOP_LOGPROBS
from hjcg.row_sampler import RowSampler
from hjcg.sampling import SamplingParams
from hjcg.upload import upload

HOST_RING = MAX_DECODE_LOOKAHEAD + 1  # decode steps whose tokens may be on their way to the host at once
FIRST_SLOT = HOST_RING  # the host slot of a prefill's first token's logprobs
ALL_ALLOWED = -1  # a bitmask word with every bit set


def chunks(length: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) pairs covering [0, length) in pieces of at most `size`."""
    for start in range(0, length, size):
        yield start, min(start + size, length)


class EagerRunner:
    """Plain PyTorch steps with hjcg's sampling kernel (the CPU path, and the reference for the GPU's)."""

    mode = "eager"

    def __init__(self, model: FastLlama, cache: PagedKVCache, max_batch: int, max_positions: int,
                 prefill_chunk: int, ops: LayerOps | None = None, kernel_sampler: bool = True):
        self.model, self.cache = model, cache
        self.ops = ops
        self.max_rows = max_batch
        self.prefill_chunk = prefill_chunk
        self.block_size = cache.block_size
        device = model.device
        self.device = device
        width = -(-max_positions // cache.block_size)  # table entries: every position a step may touch
        self.tokens = torch.zeros(max_batch, device=device, dtype=torch.int64)
        self.positions = torch.zeros(max_batch, device=device, dtype=torch.int64)
        self.live = torch.zeros(max_batch, device=device, dtype=torch.int64)
        self.seq_lens = torch.ones(max_batch, device=device, dtype=torch.int64)
        self.tables = torch.full((max_batch, width), TRASH_BLOCK, device=device, dtype=torch.int32)
        self.logits = torch.zeros(max_batch, model.shape.vocab_size, device=device, dtype=torch.float32)
        self.sampler = RowSampler(device, max_batch, max_positions, kernel=kernel_sampler)
        self.mask_words = -(-model.shape.vocab_size // 32)
        self.bitmask = torch.full((max_batch, self.mask_words), ALL_ALLOWED, device=device, dtype=torch.int32)
        pinned = device.type == "cuda"
        self._host_masks = torch.full((max_batch, self.mask_words), ALL_ALLOWED, dtype=torch.int32, pin_memory=pinned)
        self._masks_copied = torch.cuda.Event() if pinned else None
        self._host_tokens = torch.zeros(HOST_RING, max_batch, dtype=torch.int64, pin_memory=pinned)
        # logprobs of the ring's steps and (slot FIRST_SLOT) of a prefill's first token
        self._host_logprob = torch.zeros(HOST_RING + 1, max_batch, dtype=torch.float32, pin_memory=pinned)
        self._host_top_ids = torch.zeros(HOST_RING + 1, max_batch, MAX_TOP_LOGPROBS, dtype=torch.int64,
                                         pin_memory=pinned)
        self._host_top_values = torch.zeros(HOST_RING + 1, max_batch, MAX_TOP_LOGPROBS, dtype=torch.float32,
                                            pin_memory=pinned)
        self._host_first = torch.zeros(max_batch, dtype=torch.int64, pin_memory=pinned)
        self._events = [torch.cuda.Event() for _ in range(HOST_RING)] if pinned else None
        self._first_copied = torch.cuda.Event() if pinned else None
        self._launches = 0
        self._prompt_logits: torch.Tensor | None = None

    @property
    def table_width(self) -> int:
        return self.tables.shape[1]

    # --- rows -------------------------------------------------------------------------------------------

    def _load_table(self, row: int, blocks: list[int]) -> None:
        """tables[row] = the stream's blocks; the rest of the row is the trash block already (rows start
        idle and go idle again in compact)."""
        self.tables[row, :len(blocks)].copy_(upload(blocks, torch.int32, self.device))

    def set_blocks(self, updates: list[tuple[int, int, int]]) -> None:
        """(row, index, block) entries of the block tables, for streams that grew into new blocks."""
        if not updates:
            return
        packed = upload([v for update in updates for v in update], torch.int64, self.device).view(-1, 3)
        self.tables.index_put_((packed[:, 0], packed[:, 1]), packed[:, 2].to(torch.int32))

    def compact(self, order: list[int], old_n: int) -> None:
        """Row i takes what row order[i] held; rows from len(order) up to old_n go idle."""
        m = len(order)
        if order != list(range(m)):
            idx = upload(order, torch.int64, self.device)
            for t in (self.tokens, self.positions, self.tables):
                t[:m].copy_(t.index_select(0, idx))
            self.sampler.compact(idx)
        self.live[m:old_n].zero_()
        self.positions[m:old_n].zero_()
        self.tables[m:old_n].fill_(TRASH_BLOCK)

    # --- prefill ----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, row: int, prompt: list[int], blocks: list[int], params: SamplingParams,
                masked: bool = False) -> None:
        """Runs a joining stream's prompt (its blocks already cover it), loads its row and samples its first
        token into tokens[row]; read it with first_tokens(). masked: sample only tokens that host_masks()'s
        row `row` allows (filled by the caller first)."""
        ids = upload(prompt, torch.int64, self.device)
        self._load_table(row, blocks)
        logits = self._prefill(ids, row)
        if masked:
            self._upload_masks(row, row + 1)
            torch.ops.hjcg.apply_token_bitmask(logits, self.bitmask[row:row + 1])
        self._prompt_logits = logits
        self.sampler.load(row, params, ids)
        self.sampler.sample(logits, row, self.tokens[row:row + 1])
        self.positions[row:row + 1].fill_(len(prompt))  # fills take the value as a kernel argument: no copy
        self.live[row:row + 1].fill_(1)

    def _prefill(self, ids: torch.Tensor, row: int) -> torch.Tensor:
        """The prompt's last logits [1, V], its K/V written into the stream's blocks (tables[row])."""
        logits = None
        for start, end in chunks(ids.numel(), self.prefill_chunk):
            logits = self._prefill_chunk(ids, start, end, row)
        return logits

    def _prefill_chunk(self, ids: torch.Tensor, start: int, end: int, row: int) -> torch.Tensor:
        table = self.tables[row]
        positions = torch.arange(start, end, device=self.device)
        slots = self.cache.slots_at(table.expand(end - start, -1), positions)
        if start == 0:
            attention = causal_self_attention()
        else:  # a later chunk of a long prompt also attends to the stream's earlier positions
            attention = context_attention(self.cache, self.cache.table_slots(table[None], end)[0], positions)
        last = upload([end - start - 1], torch.int64, self.device)
        return self.model.forward(ids[start:end], positions, slots, self.cache, attention, last, self.ops)

    @torch.inference_mode()
    def prefill_packed(self, first_row: int, prompts: list[list[int]], blocks: list[list[int]],
                       params: list[SamplingParams]) -> None:
        """prefill() for K streams joining together, rows [first_row, first_row + K), in one forward over their
        prompts packed end to end (hjcg.packing); read their first tokens with first_tokens(). Each prompt
        fits one chunk, and all of them together the largest prefill chunk."""
        layout = PackedPrompts.of(prompts)
        if layout.tokens > self.prefill_chunk:
            raise ValueError(f"{layout.tokens} packed prompt tokens exceed the prefill chunk ({self.prefill_chunk})")
        k = layout.count
        self._load_tables(first_row, blocks)
        logits, ids = self._packed_prefill(layout, first_row)
        self._prompt_logits = logits
        self.sampler.load_rows(first_row, params, [ids[end - n + 1:end + 1] for end, n in zip(layout.last, layout.lengths)])
        self.sampler.sample(logits, first_row, self.tokens[first_row:first_row + k])
        self.positions[first_row:first_row + k].copy_(upload(layout.lengths, torch.int64, self.device))
        self.live[first_row:first_row + k].fill_(1)

    def _load_tables(self, first_row: int, blocks: list[list[int]]) -> None:
        """_load_table for rows first_row.., in one copy."""
        width = max(len(b) for b in blocks)
        rows = [b + [TRASH_BLOCK] * (width - len(b)) for b in blocks]
        self.tables[first_row:first_row + len(blocks), :width].copy_(upload(rows, torch.int32, self.device))

    def _packed_prefill(self, layout: PackedPrompts, first_row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed prompts' last logits [K, V], each prompt's K/V written into its stream's blocks; and
        the packed ids on the device (layout.ids first: the prompts' histories for the sampler)."""
        n = layout.tokens
        values = upload(layout.ids + layout.positions + layout.segments + layout.last, torch.int64, self.device)
        ids, positions, segments, last = values[:n], values[n:2 * n], values[2 * n:3 * n], values[3 * n:]
        slots = self.cache.slots_at(self.tables.index_select(0, segments + first_row), positions)
        attention = packed_self_attention(attention_mask(segments, self.model.dtype))
        return self.model.forward(ids, positions, slots, self.cache, attention, last, self.ops), ids

    def first_tokens(self, first_row: int, tops: list[int | None]) -> list[tuple[int, tuple[float, TopLogprobs] | None]]:
        """The tokens the last prefill (or packed prefill) sampled into rows [first_row, first_row + K), K =
        len(tops) (waits for them, releasing the GIL meanwhile) and, where tops[i] is not None, row i's
        logprob and top tops[i] alternatives."""
        k = len(tops)
        tokens = self.tokens[first_row:first_row + k]
        self._host_first[:k].copy_(tokens, non_blocking=True)
        top = max((t for t in tops if t is not None), default=None)
        if top is not None:
            self._copy_logprobs(FIRST_SLOT, self._prompt_logits, tokens, top)
        if self._first_copied is not None:
            self._first_copied.record()
            self._first_copied.synchronize()
        logprobs = self.read_logprobs(FIRST_SLOT, tops) if top is not None else [None] * k
        return list(zip(self._host_first[:k].tolist(), logprobs))

    # --- structured output --------------------------------------------------------------------------------

    def host_masks(self, start: int, end: int):
        """Rows [start, end) of the host's bitmask staging (numpy int32 [end - start, mask_words]) for the
        caller to fill before prefill(masked=True) or launch_sample; waits until the last upload of them
        has left."""
        if self._masks_copied is not None:
            self._masks_copied.synchronize()
        return self._host_masks[start:end].numpy()

    def _upload_masks(self, start: int, end: int) -> None:
        self.bitmask[start:end].copy_(self._host_masks[start:end], non_blocking=True)
        if self._masks_copied is not None:
            self._masks_copied.record()

    # --- decode -----------------------------------------------------------------------------------------

    @torch.inference_mode()
    def launch_decode(self, n: int, bucket: int, max_len: int, top: int | None = None) -> int:
        """Queues one decode step for rows [0, n) (in batch bucket `bucket`; `max_len` bounds the positions
        any live row attends to) and the copy of its tokens (and, when top is not None, their logprobs with
        `top` alternatives) to the host. Returns a handle for read_tokens and read_logprobs."""
        self._decode(n, bucket, max_len)
        return self._ship(n, top)

    @torch.inference_mode()
    def launch_forward(self, n: int, bucket: int, max_len: int) -> None:
        """The first half of a constrained step: the forward only (logits kept for launch_sample)."""
        self._forward(n, bucket, max_len)

    @torch.inference_mode()
    def launch_sample(self, n: int, bucket: int, top: int | None = None) -> int:
        """The second half: uploads host_masks() rows [0, n), samples the masked logits, ships the tokens (as
        launch_decode)."""
        self._upload_masks(0, n)
        self._sample(n, bucket)
        return self._ship(n, top)

    def _ship(self, n: int, top: int | None) -> int:
        slot = self._launches % HOST_RING
        self._launches += 1
        if self._events is not None:
            self._events[slot].synchronize()  # that ring slot's last tokens have been read
        self._host_tokens[slot, :n].copy_(self.tokens[:n], non_blocking=True)
        if top is not None:
            self._copy_logprobs(slot, self.logits[:n], self.tokens[:n], top)
        if self._events is not None:
            self._events[slot].record()
        return slot

    def _copy_logprobs(self, slot: int, logits: torch.Tensor, tokens: torch.Tensor, top: int) -> None:
        n = tokens.numel()
        chosen, ids, values = token_logprobs(logits, tokens, top)
        self._host_logprob[slot, :n].copy_(chosen, non_blocking=True)
        self._host_top_ids[slot, :n, :top].copy_(ids, non_blocking=True)
        self._host_top_values[slot, :n, :top].copy_(values, non_blocking=True)

    def read_logprobs(self, handle: int, tops: list[int | None]) -> list[tuple[float, TopLogprobs] | None]:
        """Per row of a step read with read_tokens (or a first token): its logprob and top tops[i]
        alternatives, or None where tops[i] is None. The step must have shipped logprobs with top >= each."""
        n, top = len(tops), max((t for t in tops if t is not None), default=0)
        return logprob_rows(self._host_logprob[handle, :n].tolist(), self._host_top_ids[handle, :n, :top].tolist(),
                            self._host_top_values[handle, :n, :top].tolist(), tops)

    def read_tokens(self, handle: int, n: int) -> list[int]:
        """The tokens of a launched step (waits for it)."""
        if self._events is not None:
            self._events[handle].synchronize()
        return self._host_tokens[handle, :n].tolist()

    def _decode(self, n: int, bucket: int, max_len: int) -> None:
        # eager: exactly the live rows, attention over the longest live row's positions only
        self._decode_step(n, paged_decode_attention(self.cache, self.tables, self.seq_lens, max_len))

    def _forward(self, n: int, bucket: int, max_len: int) -> None:
        self._forward_step(n, paged_decode_attention(self.cache, self.tables, self.seq_lens, max_len))

    def _sample(self, n: int, bucket: int) -> None:
        self._sample_step(n)

    def _decode_step(self, b: int, attention: Attention, qkv_attention: QkvAttention | None = None) -> None:
        """One token for rows [0, b): the step every runner runs (and the graph runner captures)."""
        logits = self._forward_step(b, attention, qkv_attention)
        self.sampler.sample(logits, 0, self.tokens[:b])

    def _forward_step(self, b: int, attention: Attention, qkv_attention: QkvAttention | None = None) -> torch.Tensor:
        """Rows [0, b)'s logits (also kept in self.logits), their positions advanced. qkv_attention: see
        FastLlama.forward."""
        positions = self.positions[:b]
        slots = self.cache.slots_at(self.tables[:b], positions)
        torch.add(positions, 1, out=self.seq_lens[:b])
        logits = self.model.forward(self.tokens[:b], positions, slots, self.cache, attention, None, self.ops,
                                    qkv_attention=qkv_attention)
        self.logits[:b].copy_(logits)
        positions.add_(self.live[:b])
        return logits

    def _sample_step(self, b: int) -> None:
        """Samples rows [0, b) from the kept logits, masked by their bitmask rows (in place: the logprobs
        read the masked logits)."""
        logits = self.logits[:b]
        torch.ops.hjcg.apply_token_bitmask(logits, self.bitmask[:b])
        self.sampler.sample(logits, 0, self.tokens[:b])

    # --- tests and figures ------------------------------------------------------------------------------

    def last_logits(self, n: int) -> torch.Tensor:
        """The logits the last decode step sampled rows [0, n) from (teacher-forced checks)."""
        return self.logits[:n]

    def prompt_logits(self) -> torch.Tensor:
        """The logits [1, V] the last prefill sampled its first token from (teacher-forced checks)."""
        return self._prompt_logits

    def force_tokens(self, tokens: list[int]) -> None:
        """Overrides the tokens rows [0, len(tokens)) feed next (teacher forcing in tests)."""
        self.tokens[:len(tokens)].copy_(torch.tensor(tokens, dtype=torch.int64))

    def warm(self, prompt_lengths: list[int]) -> dict | None:
        return None  # nothing to capture

    def graph_stats(self) -> dict:
        return {}


class CompiledRunner(EagerRunner):
    """torch.compile on the decode step, no CUDA graphs: each batch bucket compiles once (rows padded up to
    the bucket, attention over the whole block table, so the shapes never depend on the lengths)."""

    mode = "compiled"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._attention = paged_decode_attention(self.cache, self.tables, self.seq_lens)
        self._step = torch.compile(self._decode_step, dynamic=False, fullgraph=False)

    def _decode(self, n: int, bucket: int, max_len: int) -> None:
        self._step(bucket, self._attention)
