"""Lab: where do the server's all-stream stalls come from? (H100, Llama-2-7B random weights, many callers)

At 16 and 32 streams over gRPC, every stream's inter-token gap jumps to 15-30 ms at the same moments
(bench/results/2026-11-23-h100-3df0dc7/raw.json), while the in-process engine's p99 stays near its median. This
runs `hjcg serve` under a tracer (this module, run as the server's entry point) that records, with the clients'
clock (time.perf_counter, CLOCK_MONOTONIC):
  - every engine step (start, end, the engine thread's CPU time in it, the streams it ran) and its collect phase;
  - every garbage collection (generation, start, duration);
  - a probe thread's oversleeps: it sleeps 1 ms in a loop, and a late wake-up means the GIL or the CPUs were
    taken for that long.
then runs the concurrency section at a few levels, and prints for each stall that the clients saw (every stream
late at once) what the server was doing.

    python -m bench.lab.server_stalls OUT.json [VARIANT ...] [--cpu]
        variants: default, nogc (collector off once loaded), switch5ms (Python's default switch interval), switch50us
        (a quarter of the server's), simplequeue (jobs' events through queue.SimpleQueue), process (the engine in a
        process of its own: bench.lab.engine_process), process-aio (that, behind the asyncio front, its messages
        read by the event loop), aio (the
        engine behind bench.lab.aio_front's asyncio gRPC front), pinned (the server on one half of the CPUs, the
        client processes on the other), blocking (the engine waits for the GPU's events asleep, not spinning);
        ttft, ttft-aio: one caller's time to first token
        split into hops
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import summary

TRACE_ENV = "HJCG_STALL_TRACE"
VARIANT_ENV = "HJCG_STALL_VARIANT"
CPUS_ENV = "HJCG_STALL_SERVER_CPUS"
now = time.perf_counter
_TRACE: dict = {}  # the server process's trace (see _install_tracer)


# --- the tracer, inside the server process ------------------------------------------------------------------

def _install_tracer(path: str, variant: str) -> None:
    from hjcg.engine import Engine

    trace = _TRACE
    trace.update({"steps": [], "collects": [], "gc": [], "probe": [], "sent": [], "variant": variant})
    gc_start: dict[str, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start["t"] = now()
        elif "t" in gc_start:
            t = gc_start.pop("t")
            trace["gc"].append((t, now() - t, info["generation"], info["collected"]))

    gc.callbacks.append(on_gc)

    step, collect = Engine.step, Engine._collect
    _trace_hops(trace.setdefault("hops", []))
    _trace_gpu_steps(trace.setdefault("gpu", []))
    _trace_phases(trace.setdefault("phases", []))
    _trace_tokens(trace.setdefault("puts", []), trace.setdefault("yields", []))

    def traced_step(self) -> None:
        t, cpu = now(), time.thread_time()
        step(self)
        trace["steps"].append((t, now() - t, time.thread_time() - cpu, len(self.scheduler.running)))

    def traced_collect(self) -> None:
        t = now()
        collect(self)
        trace["collects"].append((t, now() - t))

    Engine.step, Engine._collect = traced_step, traced_collect

    def probe() -> None:
        while True:
            t = now()
            time.sleep(0.001)
            late = now() - t - 0.001
            if late > 0.002:
                trace["probe"].append((t, late))

    write_lock = threading.Lock()  # the flush thread and the exit's write must not share the temporary file

    def write() -> None:
        with write_lock:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump({k: list(v) if isinstance(v, list) else v for k, v in trace.items()}, f)
            os.replace(tmp, path)

    def flush() -> None:
        while True:
            time.sleep(1.0)
            write()

    atexit.register(write)  # the server returns from main on SIGTERM
    threading.Thread(target=probe, daemon=True, name="stall-probe").start()
    threading.Thread(target=flush, daemon=True, name="stall-flush").start()


def _trace_phases(phases: list) -> None:
    """(start, ms, CPU ms, name) of every call over 2 ms to the parts of an engine step: which part a stall is in."""
    from hjcg.cuda_graphs import GraphRunner
    from hjcg.engine import Engine
    from hjcg.model_runner import EagerRunner
    from hjcg.scheduler import Scheduler
    from hjcg_server.worker import EngineWorker

    def timed(cls, name: str) -> None:
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            t, cpu = now(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                ms = (now() - t) * 1e3
                if ms > 2:
                    phases.append((t, ms, (time.thread_time() - cpu) * 1e3, f"{cls.__name__}.{name}"))

        setattr(cls, name, wrapper)

    for cls, name in ((Engine, "_launch"), (Engine, "_retire"), (Engine, "_prefill"), (Scheduler, "admit"),
                      (EagerRunner, "set_blocks"), (EagerRunner, "_ship"), (EagerRunner, "read_tokens"),
                      (GraphRunner, "_decode"), (EngineWorker, "_deliver"), (EngineWorker, "_run_tasks")):
        timed(cls, name)


def _trace_tokens(puts: list, yields: list) -> None:
    """(time, request id, token index) of every token the engine thread hands to its job's queue (`puts`) and of
    every token message its RPC handler builds to yield (`yields`): with the clients' receipts, which layer adds
    the jitter to a stream's inter-token gaps."""
    from hjcg.engine import TokenOutput
    from hjcg_server.servicer import HjcgServicer
    from hjcg_server.worker import Job

    put, token_event = Job.put, HjcgServicer._token_event

    def traced_put(self, event) -> None:
        if isinstance(event, TokenOutput):
            puts.append((now(), self.request_id, event.index))
        put(self, event)

    def traced_token_event(self, job, token, t):
        yields.append((now(), job.request_id, token.index))
        return token_event(self, job, token, t)

    Job.put, HjcgServicer._token_event = traced_put, traced_token_event


def _layer_gaps(trace: dict, t0: float, end: float) -> dict:
    """Inter-token gaps (ms) of every stream in [t0, end] as the engine thread handed its tokens over (`put`) and as
    its RPC handler took them to yield (`yield`), and in the `process` variant as the engine process sent them
    (`sent`): median, p99 and p99 / median of each (bench.common.summary)."""
    out = {}
    for layer in ("sent", "puts", "yields"):
        per_stream: dict[str, list[float]] = {}
        for t, rid, _ in trace.get(layer, []):
            if t0 <= t <= end:
                per_stream.setdefault(rid, []).append(t)
        gaps = summary([b - a for times in per_stream.values() for a, b in zip(times, times[1:])])
        if gaps["n"]:
            mid, p99 = gaps["median_ms"], gaps["p99_ms"]
            out[layer] = {"median_ms": round(mid, 3), "p99_ms": round(p99, 3),
                          "p99_over_median": round(p99 / mid, 3) if mid else None}
    return out


def _trace_gpu_steps(gpu: list) -> None:
    """(launch time, GPU ms, rows) of every decode step: CUDA events around its launch time the step's own work
    on the device (work queued before it runs before the first event), read back once both have passed."""
    from collections import deque

    import torch

    from hjcg.model_runner import EagerRunner

    launch = EagerRunner.launch_decode
    timed: deque = deque()

    def traced_launch(self, n: int, bucket: int, max_len: int, top=None) -> int:
        if self.device.type != "cuda":
            return launch(self, n, bucket, max_len, top)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = now()
        start.record()
        handle = launch(self, n, bucket, max_len, top)
        end.record()
        timed.append((t, n, start, end))
        while timed and timed[0][3].query():
            t0, rows, first, last = timed.popleft()
            gpu.append((t0, first.elapsed_time(last), rows))
        return handle

    EagerRunner.launch_decode = traced_launch


def _trace_hops(hops: list) -> None:
    """(time, name) of a request's hops to its first token: the RPC handler starts, the job is submitted, the
    engine starts and ends its prefill, the engine hands the first token over, the handler yields it."""
    from hjcg.engine import Engine, TokenOutput
    from hjcg_server.servicer import HjcgServicer
    from hjcg_server.worker import EngineWorker

    generate, submit, prefill, deliver = (HjcgServicer.Generate, EngineWorker.submit, Engine._prefill,
                                          EngineWorker._deliver)

    def traced_generate(self, request, context):
        hops.append((now(), "handler"))
        for i, response in enumerate(generate(self, request, context)):
            if i == 0:
                hops.append((now(), "yield"))
            yield response

    def traced_submit(self, item) -> None:
        submit(self, item)
        hops.append((now(), "submitted"))

    def traced_prefill(self, group) -> None:
        hops.append((now(), "prefill"))
        prefill(self, group)
        hops.append((now(), "prefilled"))

    def traced_deliver(self, job, event) -> None:
        if isinstance(event, TokenOutput) and event.index == 0:
            hops.append((now(), "delivered"))
        deliver(self, job, event)

    HjcgServicer.Generate, EngineWorker.submit, Engine._prefill, EngineWorker._deliver = (
        traced_generate, traced_submit, traced_prefill, traced_deliver)


HOPS = ["handler", "submitted", "prefill", "delivered", "prefilled", "yield"]


def ttft_hops(target: str, trace_path: str, vocab: int, calls: int = 200, gap_s: float = 0.0) -> dict:
    """`calls` Generate calls one after another (10-token prompt, 1 token, as grpc_overhead times them), `gap_s`
    apart. Returns the median TTFT and, for each hop (HOPS, then the client's receipt), its median time after
    the client's send, in ms."""
    import random
    import statistics

    from bench.callers import random_ids
    from bench.grpc_bench import ttft_over_grpc
    from hjcg_client import HjcgClient

    ids = random_ids(random.Random(11), 10, vocab)
    windows = []
    with HjcgClient(target) as client:
        for i in range(calls + 10):
            send = now()
            ttft = ttft_over_grpc(client, ids)
            if i >= 10:
                windows.append((send, send + ttft))
            time.sleep(gap_s)
    time.sleep(2.5)  # the tracer writes every second
    hops = json.loads(Path(trace_path).read_text())["hops"]
    per_hop: dict[str, list[float]] = {}
    for send, received in windows:
        inside = {name: t for t, name in hops if send <= t <= received}
        if all(name in inside for name in HOPS):
            for name in HOPS:
                per_hop.setdefault(name, []).append((inside[name] - send) * 1e3)
            per_hop.setdefault("received", []).append((received - send) * 1e3)
    return {"calls": len(windows), "with_every_hop": len(per_hop.get("received", [])),
            "ttft_median_ms": statistics.median((r - s) * 1e3 for s, r in windows),
            "median_ms_after_send": {k: round(statistics.median(v), 3) for k, v in per_hop.items()}}


def _split_cpus() -> tuple[set[int], set[int]]:
    """The machine's CPUs in two halves: the server's and the clients' (the `pinned` variant)."""
    cpus = sorted(os.sched_getaffinity(0))
    return set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])


def _serve() -> None:
    variant = os.environ.get(VARIANT_ENV, "default")
    if variant == "pinned":  # the server on one half of the CPUs, the clients on the other
        os.sched_setaffinity(0, {int(c) for c in os.environ[CPUS_ENV].split(",")})
    _install_tracer(os.environ[TRACE_ENV], variant)
    from hjcg_server import app, cli

    if variant == "nogc":
        import hjcg.engine

        freeze = hjcg.engine.freeze_heap

        def freeze_and_disable() -> None:
            freeze()
            gc.disable()
        app.freeze_heap = freeze_and_disable
    if variant == "switch5ms":
        app.SWITCH_INTERVAL_S = 0.005
    if variant == "switch50us":
        app.SWITCH_INTERVAL_S = 0.00005
    if variant == "simplequeue":  # a job's events through queue.SimpleQueue (C, no Condition) instead of queue.Queue
        import queue

        from hjcg_server.worker import Job

        init = Job.__init__

        def simple_events(self, *args, **kwargs) -> None:
            init(self, *args, **kwargs)
            if type(self.events) is queue.Queue:
                self.events = queue.SimpleQueue()
        Job.__init__ = simple_events
    if variant == "blocking":  # the host waits for the GPU asleep (cudaEventBlockingSync), not spinning
        import functools

        import torch

        torch.cuda.Event = functools.partial(torch.cuda.Event, blocking=True)
    if variant.startswith("process"):  # the engine in a process of its own (bench.lab.engine_process)
        from bench.lab.engine_process import ProcessWorker, install

        install()
        ProcessWorker.sent_log = _TRACE["sent"]
    if variant.endswith("aio"):  # the same engine behind an asyncio front (bench.lab.aio_front)
        from bench.lab import aio_front

        aio_front.yield_log = _TRACE["yields"]
        aio_front.serve(process=variant.startswith("process"))
        return
    sys.exit(cli.main(sys.argv[1:]))


# --- the lab, in the benchmark process -----------------------------------------------------------------------

def _stalls(rounds: list[list[dict]], factor: float = 2.0) -> list[tuple[float, float, int]]:
    """Moments (ms since the round's t0, in the clients' clock; duration ms; streams late) when at least half
    the streams waited more than `factor` x the median gap for the same token."""
    import statistics

    out = []
    for streams in rounds:
        gaps = [g for s in streams for g in s["itl_ms"]]
        if not gaps:
            continue
        limit = factor * statistics.median(gaps)
        late: dict[int, list[float]] = {}
        for s in streams:
            t = s["send_ms"] + s["ttft_ms"]
            for g in s["itl_ms"]:
                t += g
                if g > limit:
                    late.setdefault(int((t - g) // 5), []).append(g)
        for bucket, found in sorted(late.items()):
            if len(found) >= len(streams) // 2:
                out.append((bucket * 5.0, max(found), len(found)))
    return out


@contextlib.contextmanager
def _traced(trace_path: str, variant: str):
    """Servers launched inside run `hjcg serve`'s command line with this module as the entry point."""
    from bench import server_proc

    original = server_proc.ServerProcess._spawn

    def spawn(self) -> None:
        paths = [str(server_proc.ROOT), str(server_proc.ROOT / "server"), str(server_proc.ROOT / "client")]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
        env[TRACE_ENV], env[VARIANT_ENV] = trace_path, variant
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from bench.lab.server_stalls import _serve; _serve()", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=server_proc.ROOT, env=env)

    server_proc.ServerProcess._spawn = spawn
    try:
        yield
    finally:
        server_proc.ServerProcess._spawn = original


def main(out: Path, variants: list[str], cpu: bool = False) -> None:
    from bench.callers import stream_figures
    from bench.many_callers import _log, gpu_plan, run_sections, server_for, smoke_plan

    report = {}
    for variant in variants:
        trace_path = str(out.with_suffix(f".{variant}.trace.json"))
        plan = smoke_plan() if cpu else gpu_plan()
        if variant.startswith("ttft"):  # one caller, request after request: where the time to the first token goes
            with _traced(trace_path, variant):
                server = server_for(plan, _log).start()
            try:
                report[variant] = {f"gap_{gap}ms": ttft_hops(server.target, trace_path, plan.vocab, 150 if cpu else 300, gap / 1e3)
                                   for gap in (0, 5)}
            finally:
                server.stop()
            _log(f"ttft: {json.dumps(report[variant])}")
            out.write_text(json.dumps(report, indent=1))
            continue
        plan.levels, plan.rounds = ((2, 4) if cpu else (4, 8, 16, 32)), 2
        results: dict = {}
        all_cpus = os.sched_getaffinity(0)
        if variant == "pinned":  # this process's children (the client processes) inherit its CPUs
            server_cpus, client_cpus = _split_cpus()
            os.environ[CPUS_ENV] = ",".join(map(str, sorted(server_cpus)))
            os.sched_setaffinity(0, client_cpus)
        with _traced(trace_path, variant):
            server = server_for(plan, _log).launch()
        try:
            run_sections(plan, {"concurrency"}, results, log=_log, server=server)
        finally:
            os.sched_setaffinity(0, all_cpus)
        levels = results.get("concurrency", {}).get("levels", {})
        trace = json.loads(Path(trace_path).read_text()) if Path(trace_path).exists() else {}
        entry = {"figures": {n: [stream_figures(r) for r in level["rounds"]] for n, level in levels.items()},
                 "stalls": {}, "error": results.get("concurrency", {}).get("error")}
        for n, level in levels.items():
            for i, streams in enumerate(level["rounds"]):
                t0 = level["t0_s"][i]
                end = t0 + max((s["send_ms"] + s["ttft_ms"] + sum(s["itl_ms"]) for s in streams
                                if s["ttft_ms"] is not None), default=0.0) / 1e3
                entry["stalls"][f"{n}/{i}"] = {"client_stalls_ms": _stalls([streams]),
                                               "server": _summarize(trace, t0, end),
                                               "gaps_by_layer": _layer_gaps(trace, t0, end)}
        report[variant] = entry
        for n, rounds in entry["figures"].items():
            for f in rounds:
                _log(f"{variant} streams {n}: {f['tokens_per_s']:.0f} tokens/s, inter-token median "
                     f"{f['itl_median_ms']:.2f} p99 {f['itl_p99_ms']:.2f} ms")
        for key, stalls in entry["stalls"].items():
            _log(f"{variant} {key} gaps by layer: {json.dumps(stalls['gaps_by_layer'])}")
        for key, stalls in entry["stalls"].items():
            _log(f"{variant} {key}: {json.dumps(stalls)}")
        out.write_text(json.dumps(report, indent=1))


def _summarize(trace: dict, t0: float, end: float) -> dict:
    """The server's slow moments in [t0, end] (s, the clients' clock), as ms since t0: steps over 15 ms (start,
    ms, engine-thread CPU ms, streams), gaps over 5 ms between steps, collections over 2 ms (start, ms,
    generation, objects freed), probe oversleeps over 3 ms, plus counts."""
    if not trace:
        return {"error": "no trace"}
    trace = {k: [(round((e[0] - t0) * 1e3, 2), *e[1:]) for e in v if t0 <= e[0] <= end]
             for k, v in trace.items() if isinstance(v, list)}
    slow_steps = [(t, round(d * 1e3, 2), round(c * 1e3, 2), n) for t, d, c, n in trace["steps"] if d > 0.015]
    gaps = []
    steps = trace["steps"]
    for (t1, d1, _, n1), (t2, _, _, _) in zip(steps, steps[1:]):
        gap = t2 - (t1 + d1 * 1e3)
        if gap > 5 and n1:
            gaps.append((round(t1 + d1 * 1e3, 2), round(gap, 2)))
    return {
        "steps": len(steps),
        "step_ms_median": round(sorted(d for _, d, _, _ in steps)[len(steps) // 2] * 1e3, 2) if steps else None,
        "slow_steps": slow_steps[:60],
        "gaps_between_steps": gaps[:60],
        "gc_over_2ms": [(t, round(d * 1e3, 2), g, c) for t, d, g, c in trace["gc"] if d > 0.002][:60],
        "gc_count_by_generation": {str(g): sum(1 for e in trace["gc"] if e[2] == g) for g in (0, 1, 2)},
        "gc_total_ms": round(sum(e[1] for e in trace["gc"]) * 1e3, 1),
        "probe_over_3ms": [(t, round(d * 1e3, 2)) for t, d in trace["probe"] if d > 0.003][:60],
        "slow_collects": [(t, round(d * 1e3, 2)) for t, d in trace["collects"] if d > 0.015][:60],
        # GPU time of the decode steps (bench.common.summary), and the steps over 12 ms (launch time, ms, rows)
        "gpu_step_ms": summary([ms / 1e3 for _, ms, _ in trace.get("gpu", [])]),
        "gpu_slow_steps": [(t, round(ms, 2), rows) for t, ms, rows in trace.get("gpu", []) if ms > 12][:60],
        # the parts of a step that took over 5 ms (start, ms, CPU ms, part)
        "slow_phases": [(t, round(ms, 2), round(c, 2), name) for t, ms, c, name in trace.get("phases", []) if ms > 5][:80],
    }


if __name__ == "__main__":
    cpu = "--cpu" in sys.argv  # the tiny CPU workload of the smoke run: checks the lab itself, not the figures
    args = [a for a in sys.argv[1:] if a != "--cpu"]
    main(Path(args[0]), args[1:] or ["default"], cpu)
