"""In-process batching lab: N streams of the Llama-2-7B shape decoded together through the engine's public
API (submit, step), no gRPC. Per N: aggregate tokens/s, inter-token median/p99, TTFT median; plus the
batch-1 TTFT at 10 tokens. Writes OUT/batch_decode.json.

    python -m bench.lab.batch_decode OUT_DIR [--streams 1,2,4,8,16,32] [--tokens 256]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, GenerationRequest, TokenOutput, freeze_heap
from hjcg.random_models import random_llama


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_streams(engine: Engine, n: int, tokens: int, rng: random.Random) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(n)]
    done = [False] * n

    def sink_for(i: int):
        def sink(event) -> None:
            if isinstance(event, TokenOutput):
                arrivals[i].append(time.perf_counter())
            else:
                done[i] = True
        return sink

    start = time.perf_counter()
    for i in range(n):
        prompt = [rng.randrange(3, 32000) for _ in range(10)]
        engine.submit(GenerationRequest(prompt, tokens, ignore_eos=True), sink_for(i))
    while not all(done) or engine.has_work():
        engine.step()
    end = max(a[-1] for a in arrivals)
    itl = [(b - a) * 1e3 for times in arrivals for a, b in zip(times, times[1:])]
    ttft = [(times[0] - start) * 1e3 for times in arrivals]
    return {"tokens_per_s": n * tokens / (end - start), "itl_median_ms": statistics.median(itl),
            "itl_p99_ms": percentile(itl, 0.99), "ttft_median_ms": statistics.median(ttft),
            "ttft_p99_ms": percentile(ttft, 0.99)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--streams", default="1,2,4,8,16,32")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--gemv-max-rows", type=int, default=8)
    args = parser.parse_args()
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    engine = Engine(EngineConfig(model=loaded.name, device="cuda", dtype="float16", max_context=4096,
                                 max_prompt_tokens=4000, max_new_tokens=4000, kv_cache_gib=16,
                                 gemv_max_rows=args.gemv_max_rows), loaded)
    report = {"warm": {k: v for k, v in engine.warm([]).items() if k != "graphs"}}
    freeze_heap()
    rng = random.Random(0)
    ttft = []
    for _ in range(60):
        prompt = [rng.randrange(3, 32000) for _ in range(10)]
        start = time.perf_counter()
        steps = engine.generate(GenerationRequest(prompt, 1, ignore_eos=True))
        next(steps)
        ttft.append((time.perf_counter() - start) * 1e3)
        steps.close()
    report["ttft10_inproc_ms"] = statistics.median(ttft[10:])
    report["streams"] = {}
    for n in (int(s) for s in args.streams.split(",")):
        run_streams(engine, n, 16, rng)  # warm-up at this batch size
        report["streams"][str(n)] = run_streams(engine, n, args.tokens, rng)
        print(n, json.dumps(report["streams"][str(n)]), flush=True)
    report["device"] = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    report["gemv_max_rows"] = args.gemv_max_rows
    (args.out / f"batch_decode_gemv{args.gemv_max_rows}.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "streams"}))


if __name__ == "__main__":
    main()
