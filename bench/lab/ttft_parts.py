"""Lab: where a batch-1 TTFT goes on the GPU. CUDA events on the compute stream at the TTFT's start, before and
after the prefill graph's replay and when first_tokens() is entered; host stamps at the same points. Per format
(fp16, fp8), 10-token prompt, median of 200 after warm-up:
  pre_gpu  : GPU clock from the TTFT's start to the graph's start (the host's work before launching it)
  graph    : the graph's GPU time
  post_gpu : after the graph to first_tokens' entry on the GPU (sampler load/sample, fills)
  tail     : host time from the GPU reaching first_tokens' entry to the token on the host (copy, sync, Python)

    python -m bench.lab.ttft_parts OUT.json [FORMAT...]   (default: fp16 fp8; a format given n times: n fresh engines;
                                                         fp16x6: one engine measured in 6 blocks of 200 calls)
"""
import json
import statistics
import sys
import time

import torch

from bench.systems import HjcgSystem
from hjcg import model_source
from hjcg.engine import TokenOutput

loaded = model_source.load("random:llama2-7b", torch.float16, random_device="cuda")
ids = list(range(100, 110))
out = {}
FORMATS = {"fp16": "dtype", "fp8": "fp8"}
ENGINES = [arg.partition("x") for arg in sys.argv[2:] or ["fp16", "fp8"]]  # (format, "x", blocks) per engine
for i_engine, (fmt, _, blocks) in enumerate(ENGINES):
    blocks = int(blocks or 1)
    # a format measured in one engine keeps its name; several engines of one format are told apart by their index
    label = fmt if [f for f, _, _ in ENGINES].count(fmt) == 1 else f"{fmt}#{i_engine}"
    system = HjcgSystem(loaded, "hybrid", weights=FORMATS[fmt])
    engine = system.engine
    runner = engine.runner
    marks = {}

    def mark(name):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        marks[name] = (e, time.perf_counter())

    replay = runner.graphs.replay

    def timed_replay(key):
        if key.startswith("prefill"):
            mark("graph_start")
            ok = replay(key)
            mark("graph_end")
            return ok
        return replay(key)

    first_tokens = runner.first_tokens

    def timed_first(*a, **k):
        mark("first_tokens")
        return first_tokens(*a, **k)

    class Graphs:  # the graph cache with its replay timed (a pybind11 object takes no new attributes)
        def __init__(self, inner):
            self._inner = inner
        def replay(self, key):
            return timed_replay(key)
        def __getattr__(self, name):
            return getattr(self._inner, name)
        def __contains__(self, key):
            return key in self._inner

    inner = runner.graphs
    runner.graphs = Graphs(inner)
    rows = []
    for i in range(60 + 200 * blocks):
        runner.first_tokens = timed_first
        torch.cuda.synchronize()
        marks.clear()
        mark("start")
        t0 = marks["start"][1]
        events = engine.generate(system.request(ids, 1))
        for ev in events:
            if isinstance(ev, TokenOutput):
                t_end = time.perf_counter()
                break
        for _ in events:
            pass
        torch.cuda.synchronize()
        if i < 60 or "graph_start" not in marks:
            continue
        g = lambda a, b: marks[a][0].elapsed_time(marks[b][0])
        rows.append({"ttft": (t_end - t0) * 1e3, "pre_gpu": g("start", "graph_start"), "graph": g("graph_start", "graph_end"),
                     "post_gpu": g("graph_end", "first_tokens"),
                     "host_launch": (marks["graph_start"][1] - t0) * 1e3,
                     "host_first_tokens": (marks["first_tokens"][1] - t0) * 1e3,
                     "tail": (t_end - t0) * 1e3 - g("start", "first_tokens")})
    for b in range(blocks):
        block = rows[200 * b:200 * (b + 1)]
        med = {k: round(statistics.median(r[k] for r in block), 4) for k in block[0]}
        for k in ("ttft", "graph", "tail"):  # the spread within one engine, beside the medians between engines
            deciles = statistics.quantiles([r[k] for r in block], n=10)
            med[f"{k}_p10"], med[f"{k}_p90"] = round(deciles[0], 4), round(deciles[-1], 4)
        name = label if blocks == 1 else f"{label}/{b}"
        out[name] = med
        print(name, med, flush=True)
    runner.graphs = inner
    del runner.first_tokens
    system.close()
    del system, engine, runner
json.dump(out, open(sys.argv[1], "w"), indent=1)
