"""Prefill graph replay time against bucket length (Llama-2-7B shape, fp16, hybrid): where cuBLAS's
token tiling makes a bucket cheap or dear, the evidence behind DEFAULT_PREFILL_BUCKETS.

    python -m bench.bucket_sweep OUT_DIR      (on the GPU machine; writes bucket_sweep.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import cuda_time, environment
from bench.systems import HjcgSystem
from hjcg.random_models import random_llama

LENGTHS = tuple(range(16, 257, 16)) + tuple(range(272, 513, 16))


def run(out: Path) -> dict:
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    system = HjcgSystem(loaded, "hybrid", max_context=1024, buckets=LENGTHS, graph_cache_max_entries=64,
                        graph_cache_max_bytes=16 << 30)
    runner = system.runner
    replay_ms = {}
    with torch.inference_mode():
        for n in LENGTHS:  # sustained load first, as in a TTFT series: clocks settle where they stay
            key = runner.prefill_key(n, True)
            replay_ms[n] = cuda_time(lambda: runner.graphs.replay(key), warmup=10, repeat=30) * 1e3
    system.close()
    result = {"environment": environment(), "model": "llama2-7b fp16 (random)", "replay_ms": replay_ms}
    (out / "bucket_sweep.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for n, ms in run(out)["replay_ms"].items():
        print(f"{n:4d} tokens: {ms:6.2f} ms")
