"""Lab: does the engine thread block inside CUDA calls while it holds the GIL (so that the gRPC threads
cannot stream tokens meanwhile)? In-process, Llama-2-7B random weights on the GPU: N streams decode on an
engine thread (as the server's worker drives it) at each --decode-lookahead, while a probe thread measures
how late it gets the GIL back after a 0.2 ms sleep, and the engine's host calls are timed.

    python -m bench.lab.host_blocking OUT.json [LOOKAHEAD ...]   (default 0 1 2)
"""
from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, Finish, GenerationRequest
from hjcg.random_models import random_llama


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Timed:
    """Wraps a bound method: host wall time per call, in ms."""

    def __init__(self, owner, name: str):
        self.fn, self.ms = getattr(owner, name), []
        setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.ms.append((time.perf_counter() - t) * 1e3)


def run(loaded, lookahead: int, streams: int, tokens: int) -> dict:
    config = EngineConfig(model=loaded.name, device="cuda", dtype="float16", max_batch=32, decode_lookahead=lookahead)
    engine = Engine(config, loaded)
    runner = engine.runner
    timers = {name: Timed(runner, name) for name in ("set_blocks", "launch_decode", "_ship", "read_tokens",
                                                       "first_tokens")}
    late: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            time.sleep(0.0002)
            late.append((time.perf_counter() - t) * 1e3 - 0.2)

    delivered: list[list[float]] = [[] for _ in range(streams)]
    done = threading.Event()
    finished = [0]

    def sink(i):
        def put(event):
            delivered[i].append(time.perf_counter())
            if isinstance(event, Finish):
                finished[0] += 1
                if finished[0] == streams:
                    done.set()
        return put

    def loop() -> None:
        while not done.is_set() or engine.has_work():
            if engine.has_work():
                engine.step()
            else:
                time.sleep(0.0001)

    for i in range(streams):  # warm-up: the graphs these shapes use
        engine.submit(GenerationRequest([5 + i] * 10, 4, ignore_eos=True), lambda e: None)
    while engine.has_work():
        engine.step()
    for t in timers.values():
        t.ms.clear()
    prober = threading.Thread(target=probe)
    prober.start()
    worker = threading.Thread(target=loop)
    start = time.perf_counter()
    for i in range(streams):
        engine.submit(GenerationRequest([7 + i] * 10, tokens, ignore_eos=True), sink(i))
    worker.start()
    done.wait(120)
    worker.join()
    stop.set()
    prober.join()
    itl = [(b - a) * 1e3 for d in delivered for a, b in zip(d[1:-1], d[2:-1])]
    result = {
        "lookahead": lookahead, "streams": streams,
        "ttft_ms": statistics.median((d[0] - start) * 1e3 for d in delivered),
        "itl_median_ms": statistics.median(itl), "itl_p99_ms": pct(itl, 0.99),
        "gil_late_ms": {"median": statistics.median(late), "p99": pct(late, 0.99), "max": max(late)},
        "host_calls_ms": {name: {"calls": len(t.ms), "median": statistics.median(t.ms) if t.ms else None,
                                 "p99": pct(t.ms, 0.99), "max": max(t.ms, default=None)}
                          for name, t in timers.items()},
    }
    del engine, runner
    torch.cuda.empty_cache()
    return result


def main(out: Path, lookaheads: list[int]) -> None:
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    report = []
    for lookahead in lookaheads:
        for streams in (1, 8, 32):
            r = run(loaded, lookahead, streams, 200)
            report.append(r)
            print(json.dumps(r), flush=True)
            out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(x) for x in sys.argv[2:]] or [0, 1, 2])
