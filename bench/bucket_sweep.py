"""Prefill cost against bucket length (Llama-2-7B shape, fp16, hybrid): where cuBLAS's token tiling makes a
bucket cheap or dear, the evidence behind DEFAULT_PREFILL_BUCKETS.

Every bucket length is measured as the engine serves it, through its public API: a prompt of exactly that
many random tokens (so the bucket's graph runs full of real tokens), Engine.generate of one token, 100
times back to back as in a TTFT series, the median kept. Random tokens, not pads: the tensor cores draw
more power on varied data than on a bucket of identical pad tokens, and the clock settles ~25% lower
(bench.lab.prefill_power), so timing pad input ranks buckets at clocks no request sees.

A TTFT is the bucket's graph replay plus host work (request checks, padding, graph lookup, sampling, copy
back) that depends little on the length, so bucket sets rank as by their replay times alone: a constant
added to every bucket's cost adds the same amount (constant x longest length) to every set's total.
(Sweeps before the engine's rewrite timed the bare replay; their bucket_sweep.json calls it replay_ms.)

    python -m bench.bucket_sweep OUT_DIR      (on the GPU machine; writes bucket_sweep.json)

From the times it also picks, for a budget of graphs, the bucket set that minimises the mean cost over
every prompt length up to the largest bucket (choose_buckets): DEFAULT_PREFILL_BUCKETS is its pick.
"""
from __future__ import annotations

import json
import random
import statistics
import sys
from pathlib import Path

import torch

from bench.common import environment
from bench.systems import HjcgSystem
from hjcg.random_models import random_llama

LENGTHS = tuple(range(16, 257, 16)) + tuple(range(272, 513, 16))
GRAPH_BUDGET = 15  # graphs in the default set: ~0.65 GiB on Llama-2-7B, inside the 1 GiB warm-up target


def choose_buckets(replay_ms: dict[int, float], count: int) -> tuple[int, ...]:
    """The set of at most `count` buckets, the largest measured one included, that minimises the summed
    cost (replay or TTFT ms per bucket) over prompt lengths 1..max (each length served by the smallest
    bucket that holds it)."""
    lengths = sorted(replay_ms)
    # best[j][c]: (cost of lengths 1..lengths[j], chosen buckets) with c buckets, the largest lengths[j]
    best: list[dict[int, tuple[float, tuple[int, ...]]]] = []
    for j, b in enumerate(lengths):
        options = {1: (b * replay_ms[b], (b,))}
        for c in range(2, count + 1):
            candidates = [(best[i][c - 1][0] + (b - lengths[i]) * replay_ms[b], best[i][c - 1][1] + (b,))
                          for i in range(j) if c - 1 in best[i]]
            if candidates:
                options[c] = min(candidates, key=fewest_graphs_on_ties)
        best.append(options)
    return min(best[-1].values(), key=fewest_graphs_on_ties)[1]


def fewest_graphs_on_ties(option: tuple[float, tuple[int, ...]]) -> tuple[float, int]:
    return round(option[0], 6), len(option[1])


def run(out: Path) -> dict:
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    system = HjcgSystem(loaded, "hybrid", max_context=1024, buckets=LENGTHS, graph_cache_max_entries=64,
                        graph_cache_max_bytes=16 << 30, max_batch=1)
    vocab = loaded.hf_model.config.vocab_size
    rng = random.Random(0)
    ttft_ms = {}
    for n in LENGTHS:
        prompt = [rng.randrange(3, vocab) for _ in range(n)]
        for _ in range(20):
            system.ttft(prompt)
        ttft_ms[n] = statistics.median(system.ttft(prompt) for _ in range(100)) * 1e3
    system.close()
    result = {"environment": environment(), "model": "llama2-7b fp16 (random)",
              "measure": "TTFT median through Engine.generate, a prompt of each bucket's length (random tokens)",
              "ttft_ms": ttft_ms, "chosen": {GRAPH_BUDGET: choose_buckets(ttft_ms, GRAPH_BUDGET)}}
    (out / "bucket_sweep.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = run(out)
    for n, ms in result["ttft_ms"].items():
        print(f"{n:4d} tokens: {ms:6.2f} ms")
    print(f"best {GRAPH_BUDGET} buckets: {result['chosen'][GRAPH_BUDGET]}")
