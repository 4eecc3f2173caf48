"""The engine: turns a validated request into a stream of tokens and a finish, through a step runner.

One engine owns one model on one device and is driven by one thread at a time (the server's worker).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from hjcg import __version__, model_source
from hjcg.config import EngineConfig, fit_to_model
from hjcg.llama import FastLlama
from hjcg.runners import CompiledRunner, EagerRunner
from hjcg.sampling import SamplingParams
from hjcg.text import IncrementalDetokenizer, StopStringFilter

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_CANCELLED = "length", "stop", "eos", "cancelled"


def freeze_heap() -> None:
    """Takes every object alive now (libraries, the model, its tokenizer) out of the garbage collector's
    sight, so the collections that requests trigger walk only what requests allocate: call once the model
    is loaded, before serving. Objects stay freed by reference counting as usual."""
    gc.collect()
    gc.freeze()


class RequestError(ValueError):
    """The request itself is wrong; the message says what to fix."""


@dataclass(slots=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenOutput:
    id: int
    text: str
    index: int


@dataclass(slots=True)
class Finish:
    reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    total_ms: float


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
        self.runner = self._make_runner()
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

    def _make_runner(self):
        c = self.config
        chunk = max(c.prefill_buckets)
        if c.mode == "eager":
            return EagerRunner(self.model, c.max_context, chunk)
        if c.mode == "compiled":
            return CompiledRunner(self.model, c.max_context, chunk)
        from hjcg.cuda_graphs import GraphRunner  # CUDA only

        return GraphRunner(self.model, c)

    # --- requests ---------------------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

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

    def generate(self, request: GenerationRequest, cancelled: Callable[[], bool] = lambda: False
                 ) -> Iterator[TokenOutput | Finish]:
        """Streams TokenOutputs, then one Finish. `cancelled` is polled once per token."""
        self.validate(request)
        start = time.perf_counter()
        ttft_ms = 0.0
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids)
        stops = StopStringFilter(request.stop)
        stop_ids = set(request.stop_token_ids)
        eos_ids = set() if request.ignore_eos else self.eos_ids
        prompt = torch.tensor(request.prompt_ids, dtype=torch.int64)
        budget = min(request.max_new_tokens, self.config.max_context - len(request.prompt_ids))
        count, reason, tail = 0, FINISH_LENGTH, ""
        steps = self.runner.generate(prompt, request.sampling)
        try:
            for token in steps:
                if count == 0:
                    ttft_ms = (time.perf_counter() - start) * 1e3
                if cancelled():
                    reason = FINISH_CANCELLED
                    break
                count += 1
                if token in eos_ids or token in stop_ids:
                    reason = FINISH_EOS if token in eos_ids else FINISH_STOP
                    break
                text, stopped = stops.push(detok.push(token))
                yield TokenOutput(id=token, text=text, index=count - 1)
                if stopped:
                    reason = FINISH_STOP
                    break
                if count >= budget:
                    break
        finally:
            steps.close()  # stops the runner's chain of steps
        if reason in (FINISH_LENGTH, FINISH_CANCELLED):
            tail, _ = stops.push(detok.flush())
            tail += stops.flush()
        yield Finish(reason=reason, text=tail, prompt_tokens=len(request.prompt_ids), completion_tokens=count,
                     ttft_ms=ttft_ms, total_ms=(time.perf_counter() - start) * 1e3)

    # --- status and graphs --------------------------------------------------------------------------------

    def model_info(self) -> dict:
        return {
            "name": self.model_name,
            "architecture": getattr(self.hf_config, "model_type", "llama"),
            "dtype": self.config.dtype,
            "context_length": self.config.max_context,
            "vocab_size": self.vocab_size,
        }

    def device_name(self) -> str:
        if self.model.device.type == "cuda":
            return f"{self.model.device} ({torch.cuda.get_device_name(self.model.device)})"
        return "cpu"

    def graph_stats(self) -> dict:
        stats = getattr(self.runner, "graph_stats", None)
        return stats() if stats else {}

    def warm(self, prompt_lengths: list[int]) -> dict:
        """Captures graphs for the given prompt lengths (empty: the default set); see WarmGraphs."""
        warm = getattr(self.runner, "warm", None)
        if warm is None:
            return {"available": False, "graphs": [], "total_ms": 0.0, "graph_bytes": 0,
                    "message": f"CUDA graphs are not available on this device ({self.device_name()}, mode "
                               f"{self.config.mode}); nothing to warm"}
        return warm(prompt_lengths)

    version = __version__
