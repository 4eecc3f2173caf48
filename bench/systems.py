"""The systems compared, each behind one interface: ttft(ids) -> s, decode(ids, n) -> intervals (s).

TTFT: prompt token ids on the host to the first sampled token id on the host. Decode: the intervals
between consecutive tokens arriving on the host. Greedy; EOS ignored.
"""
from __future__ import annotations

import gc

import torch

from bench.common import now
from hjcg.config import EngineConfig
from hjcg.engine import Engine, freeze_heap
from hjcg.requests import GenerationRequest, TokenOutput


class HjcgSystem:
    """hjcg's engine (eager / compiled / graphs / hybrid) over the shared transformers model, driven through
    its public API: Engine.generate of a greedy request with EOS ignored."""

    def __init__(self, loaded, mode: str, max_context: int = 4096, buckets=None, device: str = "cuda",
                 dtype: str = "float16", **config):
        self.name = f"hjcg-{mode}"
        start = now()
        settings = dict(model=loaded.name, device=device, dtype=dtype, mode=mode, max_context=max_context,
                        max_prompt_tokens=max_context - 1, max_new_tokens=max_context)
        if buckets:
            settings["prefill_buckets"] = tuple(buckets)
        settings.update(config)
        self.engine = Engine(EngineConfig(**settings), loaded)
        self.warm_report = self.engine.warm([]) if mode in ("graphs", "hybrid") else None
        freeze_heap()  # as the server does once loaded
        self.setup_s = now() - start

    @staticmethod
    def request(ids: list[int], new_tokens: int) -> GenerationRequest:
        return GenerationRequest(prompt_ids=list(ids), max_new_tokens=new_tokens, ignore_eos=True)

    def ttft(self, ids: list[int]) -> float:
        """Prompt ids on the host to the first token id on the host (a one-token request)."""
        start = now()
        events = self.engine.generate(self.request(ids, 1))
        for event in events:
            if isinstance(event, TokenOutput):
                elapsed = now() - start
                break
        else:
            raise RuntimeError("the engine finished without a token")
        for _ in events:  # to the Finish: the stream leaves the batch
            pass
        return elapsed

    def decode(self, ids: list[int], n: int) -> list[float]:
        """The n intervals between n + 1 consecutive tokens of one stream, as they reach the host."""
        stamps = []
        for event in self.engine.generate(self.request(ids, n + 1)):
            if isinstance(event, TokenOutput):
                stamps.append(now())
        return [b - a for a, b in zip(stamps, stamps[1:])]

    def graph_stats(self) -> dict:
        return self.engine.graph_stats()

    def close(self) -> None:
        del self.engine
        gc.unfreeze()  # freeze_heap hid the engine from the collector: its cycles would keep the KV pool
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class HFEager:
    """transformers' eager forward with its DynamicCache (SDPA attention)."""

    name = "hf-eager"

    def __init__(self, model):
        self.model = model
        self.device = model.device
        self.setup_s = 0.0

    @torch.inference_mode()
    def ttft(self, ids: list[int]) -> float:
        from transformers import DynamicCache

        start = now()
        x = torch.tensor([ids], device=self.device)
        out = self.model(x, past_key_values=DynamicCache(config=self.model.config), use_cache=True)
        int(out.logits[0, -1].argmax())
        return now() - start

    @torch.inference_mode()
    def decode(self, ids: list[int], n: int) -> list[float]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        out = self.model(torch.tensor([ids], device=self.device), past_key_values=cache, use_cache=True)
        token = int(out.logits[0, -1].argmax())
        last, intervals = now(), []
        for _ in range(n):
            out = self.model(torch.tensor([[token]], device=self.device), past_key_values=cache, use_cache=True)
            token = int(out.logits[0, -1].argmax())
            t = now()
            intervals.append(t - last)
            last = t
        return intervals

    def close(self) -> None:
        pass


class HFStaticCompiled:
    """transformers with StaticCache and torch.compile(mode="reduce-overhead") on the decode step
    (the gpt-fast recipe); prefill runs eagerly into the static cache."""

    name = "hf-static-compile"

    def __init__(self, model, max_cache_len: int = 512):
        from transformers import StaticCache

        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
        self.step = torch.compile(self._step, mode="reduce-overhead", fullgraph=True)
        start = now()
        with torch.inference_mode():
            for _ in range(3):  # compile and record the graphs
                self.decode([1, 2, 3], 2)
        self.setup_s = now() - start

    def _step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(token, past_key_values=self.cache, cache_position=position, position_ids=position[None],
                         use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def _prefill(self, ids: list[int]) -> int:
        self.cache.reset()
        n = len(ids)
        position = torch.arange(n, device=self.model.device)
        out = self.model(torch.tensor([ids], device=self.model.device), past_key_values=self.cache, cache_position=position,
                         position_ids=position[None], use_cache=True)
        return int(out.logits[0, -1].argmax())

    @torch.inference_mode()
    def ttft(self, ids: list[int]) -> float:
        start = now()
        self._prefill(ids)
        return now() - start

    @torch.inference_mode()
    def decode(self, ids: list[int], n: int) -> list[float]:
        token = torch.tensor([[self._prefill(ids)]], device=self.model.device)
        last, intervals = now(), []
        for i in range(n):
            position = torch.tensor([len(ids) + i], device=self.model.device)
            token = self.step(token, position).clone()
            int(token)
            t = now()
            intervals.append(t - last)
            last = t
        return intervals

    def close(self) -> None:
        del self.cache, self.step
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()


class SeedPaper:
    """The seed paper's method: one CUDA graph per sequence length of a full forward with no KV cache;
    each decode step re-runs the whole context through the graph of its length."""

    name = "seed-paper"

    def __init__(self, model, lengths):
        self.model = model
        self.graphs: dict[int, tuple] = {}
        self.capture_s: dict[int, float] = {}
        self.graph_bytes = 0
        start = now()
        for n in lengths:
            self._capture(n)
        self.setup_s = now() - start

    @torch.inference_mode()
    def _capture(self, n: int) -> None:
        torch.cuda.synchronize()
        before = torch.cuda.memory_reserved()
        t0 = now()
        ids = torch.zeros(1, n, dtype=torch.int64, device=self.model.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.model(ids, use_cache=False).logits[:, -1].argmax(-1)
        torch.cuda.synchronize()
        self.capture_s[n] = now() - t0
        self.graph_bytes += torch.cuda.memory_reserved() - before
        self.graphs[n] = (graph, ids, out)

    @torch.inference_mode()
    def step_time(self, ids: list[int]) -> float:
        graph, static_ids, out = self.graphs[len(ids)]
        start = now()
        static_ids.copy_(torch.tensor([ids]), non_blocking=True)
        graph.replay()
        int(out)
        return now() - start

    def ttft(self, ids: list[int]) -> float:
        return self.step_time(ids)

    def close(self) -> None:
        self.graphs.clear()
        gc.collect()
        torch.cuda.empty_cache()


def measure(system, prompts: dict[int, list[int]], ttft_runs: int, decode_prompt: list[int], decode_tokens: int,
            decode_runs: int = 1) -> dict:
    """TTFT per prompt length and one or more decode runs; returns raw samples (seconds)."""
    result = {"name": system.name, "setup_s": getattr(system, "setup_s", 0.0), "ttft": {}, "decode": []}
    for n, ids in prompts.items():
        system.ttft(ids)  # warm-up
        result["ttft"][n] = [system.ttft(ids) for _ in range(ttft_runs)]
    if decode_tokens:
        system.decode(decode_prompt, 5)
        for _ in range(decode_runs):
            result["decode"].extend(system.decode(decode_prompt, decode_tokens))
    return result

