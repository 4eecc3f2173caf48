"""Lab: the host's time from Engine.generate to the prefill graph's launch, split by the calls on that path
(fp8 Llama-2-7B random weights, 10-token prompt, medians over 200 TTFTs): each call wrapped with a timer.

    python -m bench.lab.ttft_host OUT.json
"""
import functools
import json
import statistics
import sys
import time

import torch

import hjcg.cuda_graphs as cg
import hjcg.engine as eng
import hjcg.model_runner as mr
from bench.systems import HjcgSystem
from hjcg import model_source
from hjcg.engine import TokenOutput

loaded = model_source.load("random:llama2-7b", torch.float16, random_device="cuda")
system = HjcgSystem(loaded, "hybrid", weights="fp8")
engine, runner = system.engine, system.engine.runner
spent = {}
def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t
    return wrapper
mr.upload = timed("upload", mr.upload)
cg.upload = timed("upload", cg.upload)
for name in ("prefill", "_load_table", "_prefill", "_prefill_chunk", "_run_graph", "first_tokens"):
    setattr(runner, name, timed(name, getattr(runner, name)))
for name in ("validate", "step", "_prefill", "_take_arrivals"):
    setattr(engine, name, timed("engine." + name, getattr(engine, name)))
engine.scheduler.admit = timed("scheduler.admit", engine.scheduler.admit)
engine.blocks.grow = timed("blocks.grow", engine.blocks.grow)
eng.Sequence = timed("Sequence()", eng.Sequence)
class Graphs:
    def __init__(self, inner): self._inner = inner
    def replay(self, key):
        if key.startswith("prefill"):
            spent.setdefault("launch_at", time.perf_counter())
        t = time.perf_counter(); ok = self._inner.replay(key); spent["replay." + key.split(":")[0]] = spent.get("replay." + key.split(":")[0], 0.0) + time.perf_counter() - t
        return ok
    def __getattr__(self, n): return getattr(self._inner, n)
    def __contains__(self, k): return k in self._inner
runner.graphs = Graphs(runner.graphs)
pad = torch.ops.hjcg.pad_prompt
ids = list(range(100, 110))
rows = []
for i in range(260):
    torch.cuda.synchronize()
    spent.clear()
    t0 = time.perf_counter()
    events = engine.generate(system.request(ids, 1))
    for ev in events:
        if isinstance(ev, TokenOutput):
            t_end = time.perf_counter(); break
    for _ in events: pass
    if i >= 60:
        row = {k: v * 1e3 for k, v in spent.items() if k != "launch_at"}
        row["to_launch"] = (spent["launch_at"] - t0) * 1e3
        row["ttft"] = (t_end - t0) * 1e3
        rows.append(row)
keys = sorted({k for r in rows for k in r})
med = {k: round(statistics.median(r.get(k, 0.0) for r in rows), 4) for k in keys}
for k, v in med.items(): print(f"{k:24s} {v:8.4f} ms")
# the custom op alone, and a small pinned upload alone
inp = runner._inputs(runner.bucket_for(10))
x = torch.tensor(ids, dtype=torch.int64).cuda()
for label, f in (("pad_prompt op", lambda: pad(x, 0, 0, inp.ids, inp.positions, inp.last_index, inp.seq_len)),
                 ("pinned upload 10 ids", lambda: torch.tensor(ids, dtype=torch.int64, pin_memory=True).to("cuda", non_blocking=True)),
                 ("plain upload 10 ids", lambda: torch.tensor(ids, dtype=torch.int64).to("cuda", non_blocking=True))):
    ts = []
    for _ in range(300):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    print(f"{label:24s} {statistics.median(ts) * 1e3:8.4f} ms")
json.dump(med, open(sys.argv[1], "w"), indent=1)
