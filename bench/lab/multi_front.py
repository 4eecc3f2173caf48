"""Lab: the engine in a process of its own behind K gRPC front processes that share one port (SO_REUSEPORT),
to test whether spreading the streams over K GILs brings the inter-token p99 at 16-32 streams within the issue's
1.25x of the median, and what the extra process hop does to the time to first token.

bench/results/2026-11-23-h100-server-stalls-lab (runs 8-10) found the engine alone in a process steady (its send
gaps within 1.03-1.16x of the median at every level), and one Python front taking the tokens late (1.2-2.6x): its
receiver thread queues for the GIL behind the RPC threads of every stream. Here each front serves the connections
the kernel hands it (a hash of the connection's addresses), so a front's convoy is about 1/K of the streams.

    python -m bench.lab.multi_front OUT.json default fronts1 fronts4 fronts8 [--cpu]

Each variant is one server: `default` is `hjcg serve` as shipped; `frontsK` the engine process and K fronts, each the
production servicer (bench.lab.engine_process's worker stand-in, so token ids only). Per variant: one caller's TTFT
at 10 tokens over gRPC, then the concurrency section (levels 1, 4, 8, 16, 32; two measured rounds each).

    python -m bench.lab.multi_front serve K serve <hjcg serve flags>   (the server, as the lab starts it)
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench.lab import run_delay
from bench.server_proc import ServerProcess


def _front_main(options, conn, info: dict, all_bound) -> None:
    """One front: the production gRPC server on the shared port, its engine worker the pipe to the engine process.
    Health turns SERVING once every front is bound, so no client lands on the first front only."""
    from grpc_health.v1 import health_pb2

    from bench.lab.engine_process import FrontEngine, ProcessWorker
    from hjcg_server import app

    app.BIND_OPTIONS = [("grpc.so_reuseport", 1)]  # the fronts share the port; the kernel spreads the connections
    server = app.HjcgServer(options)
    server.start()
    worker = ProcessWorker(options.engine, False, options.queue_size, on_job_done=server._job_done, conn=conn,
                           info=info)
    sys.setswitchinterval(app.SWITCH_INTERVAL_S)
    server.worker = worker
    server.servicer.attach(FrontEngine(options.engine, info), worker)
    all_bound.wait()
    server._set_health(health_pb2.HealthCheckResponse.SERVING)
    threading.Event().wait()


def serve(fronts: int, argv: list[str]) -> None:
    """The engine process and `fronts` front processes; ends them all on SIGTERM."""
    import logging

    from bench.lab.engine_process import _engine_main
    from hjcg_server import cli

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = cli._parser().parse_args(argv)
    options = cli.ServerOptions(engine=cli.engine_config(args), listen=args.listen, queue_size=args.queue_size,
                                warm=args.warm)
    ctx = multiprocessing.get_context("spawn")
    pipes = [ctx.Pipe() for _ in range(fronts)]
    children = [ctx.Process(target=_engine_main, args=(options.engine, options.warm, [c for _, c in pipes]),
                            daemon=True, name="hjcg-engine")]
    children[0].start()
    infos = [conn.recv() for conn, _ in pipes]
    assert all(kind == "ready" for kind, _ in infos), infos
    all_bound = ctx.Barrier(fronts)
    for i, (conn, _) in enumerate(pipes):
        front = ctx.Process(target=_front_main, args=(options, conn, infos[i][1], all_bound), daemon=True,
                            name=f"hjcg-front-{i}")
        front.start()
        children.append(front)
    print(f"engine process {children[0].pid}, fronts {[p.pid for p in children[1:]]}", flush=True)

    def stop(*_) -> None:
        for p in children:
            p.terminate()
        for p in children:
            p.join(timeout=10)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while all(p.is_alive() for p in children):
        children[0].join(timeout=1.0)
    print("a child process ended; stopping", flush=True)
    stop()


class MultiFrontServer(ServerProcess):
    """ServerProcess running `serve` above instead of `hjcg serve`."""

    def __init__(self, fronts: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fronts = fronts

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "bench.lab.multi_front", "serve", str(self.fronts), *self.args]


def main(out: Path, variants: list[str], cpu: bool = False) -> None:
    from bench.callers import ClientPool, random_ids, stream_figures
    from bench.common import summary
    from bench.many_callers import _log, concurrency, gpu_plan, grpc_overhead_grpc, smoke_plan

    plan = smoke_plan() if cpu else gpu_plan()
    plan.levels = (1, 4) if cpu else (1, 4, 8, 16, 32)
    plan.rounds = 2
    plan.itl_streams = 1
    report: dict = {"plan": {"model": plan.model, "levels": plan.levels, "rounds": plan.rounds,
                             "server_flags": plan.server_flags}}
    for variant in variants:
        flags = list(plan.server_flags)
        server = (ServerProcess(plan.model, plan.device, extra=flags, log=_log) if variant == "default"
                  else MultiFrontServer(int(variant.removeprefix("fronts")), plan.model, plan.device, extra=flags,
                                        log=_log))
        entry: dict = {}
        try:
            server.start()
            one_caller = grpc_overhead_grpc(plan, server.target, _log)
            entry["ttft10_grpc"] = summary(one_caller["ttft10"])
            with ClientPool(server.target, max(plan.levels), levels=plan.levels) as pool:
                pool.together([random_ids(random.Random(i), plan.prompt_tokens, plan.vocab)
                               for i in range(pool.size)], plan.warm_tokens)
                levels, entry["cpu"] = {}, {}
                for n in plan.levels:  # one level at a time, the machine's threads' CPU waits around each
                    groups = {"server": run_delay.descendants(server.proc.pid),
                              "clients": set(pool.pids), "lab": {os.getpid()}}
                    before, busy0, t0 = run_delay.snapshot(), run_delay.machine_busy(), time.perf_counter()
                    levels.update(concurrency(replace(plan, levels=(n,)), pool, _log)["levels"])
                    seconds, busy1 = time.perf_counter() - t0, run_delay.machine_busy()
                    entry["cpu"][n] = run_delay.delta(before, run_delay.snapshot(), groups, seconds)
                    entry["cpu"][n]["machine_busy"] = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1)
                    _log(f"{variant} {n} streams, CPU: " + json.dumps(entry["cpu"][n]))
            entry["streams"] = {n: [stream_figures(r) for r in level["rounds"]] for n, level in levels.items()}
            for n, rounds in entry["streams"].items():
                ratios = ", ".join(f"{f['itl_p99_ms'] / f['itl_median_ms']:.2f}" for f in rounds if f["itl_median_ms"])
                rates = ", ".join(f"{f['tokens_per_s']:.0f}" for f in rounds)
                _log(f"{variant} {n} streams: p99/median {ratios}; tokens/s {rates}")
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
            _log(f"{variant}: FAILED {entry['error']}\n{server.log_tail()}")
        finally:
            server.stop()
        report[variant] = entry
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3:])
    else:
        flags = [a for a in sys.argv[2:] if a.startswith("--")]
        main(Path(sys.argv[1]), [a for a in sys.argv[2:] if not a.startswith("--")], cpu="--cpu" in flags)
