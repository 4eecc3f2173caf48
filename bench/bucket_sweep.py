"""Prefill graph replay time against bucket length (Llama-2-7B shape, fp16, hybrid): where cuBLAS's
token tiling makes a bucket cheap or dear, the evidence behind DEFAULT_PREFILL_BUCKETS.

Every bucket runs a full bucket of random tokens, 100 replays back to back as in a TTFT series: the tensor
cores draw more power on varied data than on a bucket of identical pad tokens, and the clock settles
~25% lower (bench.lab.prefill_power), so timing pad input ranks buckets at clocks no request sees.

    python -m bench.bucket_sweep OUT_DIR      (on the GPU machine; writes bucket_sweep.json)

From the times it also picks, for a budget of graphs, the bucket set that minimises the mean replay time
over every prompt length up to the largest bucket (choose_buckets): DEFAULT_PREFILL_BUCKETS is its pick.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import cuda_time, environment
from bench.systems import HjcgSystem
from hjcg import _C
from hjcg.random_models import random_llama

LENGTHS = tuple(range(16, 257, 16)) + tuple(range(272, 513, 16))
GRAPH_BUDGET = 15  # graphs in the default set: ~0.65 GiB on Llama-2-7B, inside the 1 GiB warm-up target


def choose_buckets(replay_ms: dict[int, float], count: int) -> tuple[int, ...]:
    """The set of at most `count` buckets, the largest measured one included, that minimises the summed
    replay time over prompt lengths 1..max (each length served by the smallest bucket that holds it)."""
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
                        graph_cache_max_bytes=16 << 30)
    runner = system.runner
    vocab = loaded.hf_model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    replay_ms = {}
    with torch.inference_mode():
        for n in LENGTHS:
            inp, key = runner._inputs(n), runner.prefill_key(n, True)
            tokens = torch.randint(3, vocab, (n,), generator=generator).cuda()
            _C.pad_prompt(tokens, 0, runner.pad_id, inp.ids, inp.positions, inp.last_index, inp.seq_len)
            replay_ms[n] = cuda_time(lambda: runner.graphs.replay(key), warmup=20, repeat=100) * 1e3
    system.close()
    result = {"environment": environment(), "model": "llama2-7b fp16 (random)", "replay_ms": replay_ms,
              "chosen": {GRAPH_BUDGET: choose_buckets(replay_ms, GRAPH_BUDGET)}}
    (out / "bucket_sweep.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    result = run(out)
    for n, ms in result["replay_ms"].items():
        print(f"{n:4d} tokens: {ms:6.2f} ms")
    print(f"best {GRAPH_BUDGET} buckets: {result['chosen'][GRAPH_BUDGET]}")
