"""The engine: admits requests, runs the scheduler's steps, streams each request's tokens to its sink.

One engine owns one model on one device. Any thread may submit() a request (or cancel its Sequence);
one thread at a time drives step(): the server's engine thread, or generate() for in-process use.

A step: arrivals join the waiting queue; waiting streams whose client left are dropped; streams that
fit join the batch, prefilled (those joining together packed into one forward: hjcg.packing) and their
first tokens streamed at once; one decode step is queued for every running stream; the tokens of the step
before it are read back and streamed (on the GPU steps run ahead while the host streams the earlier ones'
tokens: EngineConfig.decode_lookahead); finished streams leave the batch.

Structured output: a step with a constrained stream runs its forward first; while the device runs it,
the host reads the step before's tokens, advances the matchers and fills the masks, then launches the
masked sampler. Steps with no constrained stream run as before and pay nothing for it.
"""
from __future__ import annotations

import gc
import threading
import time
from collections import deque
from typing import Callable, Iterator

import torch

from hjcg import __version__, model_source
from hjcg.block_manager import BlockManager
from hjcg.config import EngineConfig, fit_to_model
from hjcg.llama import FastLlama
from hjcg.model_runner import EagerRunner
from hjcg.requests import (FINISH_CANCELLED, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, MAX_TOP_LOGPROBS,  # noqa: F401
                           Constraint, Finish, GenerationRequest, RequestError, TokenOutput)
from hjcg.scheduler import QueueFull, Scheduler
from hjcg.sequence import Sequence, Sink, Status


def freeze_heap() -> None:
    """Takes every object alive now (libraries, the model, its tokenizer) out of the garbage collector's
    sight, so the collections that requests trigger walk only what requests allocate: call once the model
    is loaded, before serving. Objects stay freed by reference counting as usual."""
    gc.collect()
    gc.freeze()


class Engine:
    def __init__(self, config: EngineConfig, loaded: model_source.LoadedModel | None = None):
        """Loads config.model, or serves `loaded` (an in-memory model, e.g. random weights in benchmarks)."""
        self.config = config
        if loaded is None:
            random = config.model.startswith("random:")
            loaded = model_source.load(config.model, config.torch_dtype if random else torch.float32,
                                       config.cache_dir, random_device=config.device)
        self.model_name, self.model_path = loaded.name, loaded.path
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_model.config
        config = self.config = fit_to_model(config, getattr(self.hf_config, "max_position_embeddings", None))
        self.vocab_size = int(self.hf_config.vocab_size)
        self.eos_ids = self._eos_ids(loaded)
        hf_model = loaded.hf_model
        if hf_model.dtype != config.torch_dtype:
            hf_model = hf_model.to(config.torch_dtype)
        # Room for a prompt chunk padded up to the largest bucket past the end of the context.
        positions = config.max_context + max(config.prefill_buckets)
        self.model = FastLlama(hf_model, config.torch_device, config.torch_dtype, positions)
        del hf_model, loaded
        if config.weights == "fp8":  # before the runner: its graphs and fused kernels read the fp8 matrices
            self.model.quantize_weights()
            if config.torch_device.type == "cuda":
                torch.cuda.empty_cache()  # the replaced matrices' memory, for the KV pool sized from what is free
        self.cache = self.model.new_cache(self._kv_blocks(), config.kv_block_size)
        self.blocks = BlockManager(self.cache.num_blocks, config.kv_block_size)
        self.scheduler = Scheduler(self.blocks, config.max_batch, config.max_waiting)
        self.runner = self._make_runner(positions)
        # decode steps that may run ahead on the GPU while the host streams the earlier ones' tokens
        self._lookahead = config.decode_lookahead if config.torch_device.type == "cuda" else 0
        self._inbox: deque[Sequence] = deque()
        self._queued = 0  # in the inbox or waiting: what the queue bound counts
        self._lock = threading.Lock()
        self._work = threading.Event()
        # decode steps queued, not yet read: (handle, their streams, whether logprobs were shipped)
        self._pending: deque[tuple[int, list[Sequence], bool]] = deque()
        self._constraints = None  # hjcg.constraints.ConstraintCompiler, made by the first constrained request
        self._constraints_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self._token_texts_lock = threading.Lock()
        self.started = time.monotonic()

    @staticmethod
    def _eos_ids(loaded: model_source.LoadedModel) -> set[int]:
        ids: set[int] = set()
        for source in (loaded.hf_model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return ids

    def _kv_blocks(self) -> int:
        """Blocks in the KV pool: what --kv-cache-gib (or the fraction of free GPU memory) buys, no more
        than every row at full context can use, and no fewer than one full-context stream needs."""
        c = self.config
        per_block = self.model.kv_bytes_per_block(c.kv_block_size)
        blocks_per_stream = -(-(c.max_context + 1) // c.kv_block_size)
        useful = c.max_batch * blocks_per_stream + 1
        if c.kv_cache_gib > 0:
            budget = int(c.kv_cache_gib * 2**30)
        elif c.torch_device.type == "cuda":
            budget = int(c.kv_cache_fraction * torch.cuda.mem_get_info(c.torch_device)[0])
        else:
            budget = 1 << 30
        blocks = min(useful, budget // per_block)
        if blocks - 1 < blocks_per_stream:
            raise ValueError(f"the KV cache ({budget / 2**30:.2f} GiB, {per_block} bytes per block of "
                             f"{c.kv_block_size} tokens) cannot hold one stream of max_context "
                             f"{c.max_context} tokens; give it more memory (--kv-cache-gib) or lower --max-context")
        return blocks

    def _make_runner(self, positions: int):
        c = self.config
        chunk = max(c.prefill_buckets)
        if c.mode == "eager":
            return EagerRunner(self.model, self.cache, c.max_batch, positions, chunk)
        if c.mode == "compiled":
            from hjcg.model_runner import CompiledRunner

            return CompiledRunner(self.model, self.cache, c.max_batch, positions, chunk)
        from hjcg.cuda_graphs import GraphRunner  # CUDA only

        return GraphRunner(self.model, self.cache, c, self.scheduler.buckets)

    # --- requests ---------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def token_text(self, token_id: int) -> str:
        """A token decoded alone (logprobs' alternatives), cached; any thread."""
        text = self._token_texts.get(token_id)
        if text is None:
            with self._token_texts_lock:  # fast tokenizers are not safe to call from several threads at once
                text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise RequestError("this model has no chat template; send text or token_ids instead")
        try:
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise RequestError(f"the chat template rejected the messages: {e}") from e
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def validate(self, request: GenerationRequest) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise RequestError("the prompt is empty")
        if n > self.config.max_prompt_tokens:
            raise RequestError(f"the prompt has {n} tokens; this server accepts at most {self.config.max_prompt_tokens}")
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if not 1 <= request.max_new_tokens <= self.config.max_new_tokens:
            raise RequestError(f"max_new_tokens must be in [1, {self.config.max_new_tokens}], got {request.max_new_tokens}")
        bad = [t for t in request.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {request.logprobs}")
        if request.constraint is not None:
            if request.ignore_eos:
                raise RequestError("ignore_eos cannot be combined with structured output: the output ends when "
                                   "it is complete")
            self._compile(request.constraint)

    def _compile(self, constraint: Constraint):
        """The constraint compiled (cached by the compiler); RequestError when it is invalid. Any thread."""
        with self._constraints_lock:
            if self._constraints is None:  # building the tokenizer's index takes a while: only when used
                from hjcg.constraints import ConstraintCompiler

                self._constraints = ConstraintCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._constraints.compile(constraint)

    def submit(self, request: GenerationRequest, sink: Sink) -> Sequence:
        """Queues a request (any thread). Its TokenOutputs and then one Finish go to `sink`, called on the
        engine thread; cancel it with the returned Sequence's cancel(). Raises RequestError for a bad
        request and QueueFull when the queue is full."""
        self.validate(request)
        matcher = None
        if request.constraint is not None:
            compiled = self._compile(request.constraint)
            matcher = self._constraints.matcher(compiled)
        seq = Sequence(request, sink, self.tokenizer, self.eos_ids, self.config.max_context, matcher)
        if not self.blocks.fits_ever(seq.total_tokens):
            raise RequestError(f"the request needs KV room for {seq.total_tokens} tokens; the KV cache holds "
                               f"{self.blocks.capacity_blocks * self.blocks.block_size}")
        with self._lock:
            if self._queued >= self.config.max_waiting:
                raise QueueFull(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
            self._queued += 1
            self._inbox.append(seq)
        self._work.set()
        return seq

    def has_work(self) -> bool:
        return bool(self._inbox or self.scheduler.waiting or self.scheduler.running or self._pending)

    def wait_for_work(self, timeout: float) -> bool:
        """Blocks the engine thread until a request arrives (or `timeout` s pass)."""
        if self.has_work():
            return True
        self._work.clear()
        if self.has_work():  # arrived between the check and the clear
            return True
        return self._work.wait(timeout)

    def wake(self) -> None:
        """Wakes an engine thread blocked in wait_for_work (e.g. to stop it)."""
        self._work.set()

    # --- the step -----------------------------------------------------------------------------------------

    def step(self) -> None:
        """One scheduler iteration (engine thread only); see the module docstring."""
        self._take_arrivals()
        dropped = self.scheduler.drop_cancelled_waiting()
        admitted = self.scheduler.admit()
        self._dequeued(len(dropped) + len(admitted))
        for seq in dropped:
            seq.finish(FINISH_CANCELLED)
        pack_tokens = 0 if self.config.batch_invariant else self.runner.prefill_chunk  # 0: each prompt alone
        for group in self.scheduler.prefill_groups(admitted, pack_tokens):
            self._prefill(group)
        self._retire()
        launched = self._launch()
        while self._pending and (len(self._pending) > self._lookahead or not launched):
            self._collect()
        self._retire()

    def _take_arrivals(self) -> None:
        while self._inbox:
            self.scheduler.waiting.append(self._inbox.popleft())

    def _dequeued(self, n: int) -> None:
        if n:
            with self._lock:
                self._queued -= n

    def _prefill(self, group: list[Sequence]) -> None:
        """Prefills streams that join together (consecutive rows; packed into one forward when several) and
        streams their first tokens."""
        for seq in group:
            self.blocks.grow(seq.table, seq.prompt_len)
        first = group[0]
        if len(group) > 1:
            self.runner.prefill_packed(first.row, [s.request.prompt_ids for s in group], [s.table.blocks for s in group],
                                       [s.request.sampling for s in group])
        else:
            masked = first.matcher is not None
            if masked:
                first.fill_mask(self.runner.host_masks(first.row, first.row + 1)[0])
            self.runner.prefill(first.row, first.request.prompt_ids, first.table.blocks, first.request.sampling, masked)
        for seq, (token, logprobs) in zip(group, self.runner.first_tokens(first.row, [s.request.logprobs for s in group])):
            seq.launched = seq.prompt_len
            seq.push(token, logprobs)

    def _launch(self) -> bool:
        """Queues one decode step for every running stream; returns whether it did."""
        running = self.scheduler.running
        if all(seq.launched >= seq.total_tokens - 1 for seq in running):
            # every stream has the steps its budget needs in flight: another would compute tokens nobody reads,
            # and a stream arriving meanwhile would wait for it on the GPU
            return False
        updates = []
        longest = 0
        for seq in running:
            position = seq.launched  # the position whose K/V this step writes
            grown = self.blocks.grow(seq.table, min(position + 1, seq.total_tokens))
            updates.extend((seq.row, index, block) for index, block in grown)
            seq.launched += 1
            longest = max(longest, position + 1)
        self.runner.set_blocks(updates)
        n, bucket = len(running), self.scheduler.bucket(len(running))
        top = max((seq.request.logprobs for seq in running if seq.request.logprobs is not None), default=None)
        if any(seq.matcher is not None for seq in running):
            self.runner.launch_forward(n, bucket, longest)
            while self._pending:  # the last step's tokens advance the matchers while the device runs the forward
                self._collect()
            masks = self.runner.host_masks(0, n)
            for seq in running:
                seq.fill_mask(masks[seq.row])
            handle = self.runner.launch_sample(n, bucket, top)
        else:
            handle = self.runner.launch_decode(n, bucket, longest, top)
        self._pending.append((handle, list(running), top is not None))
        return True

    def _collect(self) -> None:
        handle, rows, with_logprobs = self._pending.popleft()
        tokens = self.runner.read_tokens(handle, len(rows))
        logprobs = (self.runner.read_logprobs(handle, [seq.request.logprobs for seq in rows]) if with_logprobs
                    else [None] * len(rows))
        for seq, token, token_logprobs in zip(rows, tokens, logprobs):
            seq.push(token, token_logprobs)  # a stream that finished meanwhile ignores its extra token

    def _retire(self) -> None:
        before = len(self.scheduler.running)
        order = self.scheduler.retire_finished()
        if order is not None:
            self.runner.compact(order, before)

    def cancel_all(self) -> None:
        """Cancels every stream, queued or running (any thread); the next steps finish them."""
        with self._lock:
            streams = list(self._inbox) + list(self.scheduler.waiting) + list(self.scheduler.running)
        for seq in streams:
            seq.cancel()
        self._work.set()

    def abort_all(self) -> None:
        """Drops every stream without a Finish (engine thread, after a failed step): the caller tells
        their clients. Frees their blocks and idles every row."""
        with self._lock:
            streams = list(self._inbox) + list(self.scheduler.waiting) + list(self.scheduler.running)
            self._inbox.clear()
            self._queued = 0
        self.scheduler.waiting.clear()
        for seq in streams:
            seq.status = Status.FINISHED
        rows = len(self.scheduler.running)
        self.scheduler.retire_finished()
        self.runner.compact([], rows)
        self._pending.clear()

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False
                 ) -> Iterator[TokenOutput | Finish]:
        """Streams TokenOutputs, then one Finish, driving the engine on the caller's thread (in-process
        use, when no engine thread runs). `cancelled` is polled once per step."""
        events: deque[TokenOutput | Finish] = deque()
        seq = self.submit(request, events.append)
        try:
            while True:
                if cancelled():
                    seq.cancel()
                self.step()
                while events:
                    event = events.popleft()
                    yield event
                    if isinstance(event, Finish):
                        return
        finally:
            if not seq.finished:  # the caller stopped reading: end the stream and let it leave the batch
                seq.cancel()
                while not seq.finished or self.has_work():
                    self.step()

    def stats(self) -> dict:
        """Running streams, the batch bucket they run in, waiting streams and KV-cache use."""
        running = len(self.scheduler.running)
        return {"running": running, "waiting": self._queued,
                "batch_bucket": self.scheduler.bucket(running) if running else 0,
                "kv_blocks_used": self.blocks.used_blocks, "kv_blocks_total": self.blocks.capacity_blocks,
                "kv_block_size": self.blocks.block_size, "kv_bytes_total": self.cache.nbytes}

    # --- status and graphs --------------------------------------------------------------------------------

    def model_info(self) -> dict:
        return {
            "name": self.model_name,
            "architecture": getattr(self.hf_config, "model_type", "llama"),
            "dtype": self.config.dtype,
            "weights": self.model.weight_format,
            "context_length": self.config.max_context,
            "vocab_size": self.vocab_size,
        }

    def device_name(self) -> str:
        if self.model.device.type == "cuda":
            return f"{self.model.device} ({torch.cuda.get_device_name(self.model.device)})"
        return "cpu"

    def graph_stats(self) -> dict:
        return self.runner.graph_stats()

    def warm(self, prompt_lengths: list[int]) -> dict:
        """Captures graphs for the given prompt lengths (empty: the default set); see WarmGraphs."""
        report = self.runner.warm(prompt_lengths)
        if report is None:
            return {"available": False, "graphs": [], "total_ms": 0.0, "graph_bytes": 0,
                    "message": f"CUDA graphs are not available on this device ({self.device_name()}, mode "
                               f"{self.config.mode}); nothing to warm"}
        return report

    version = __version__
