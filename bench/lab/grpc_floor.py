"""Lab: the floor of Python grpcio on this machine. A trivial unary-stream handler (it yields two messages)
runs in a server process, sync (`grpc.server`) or asyncio (`grpc.aio.server`); a client in another process,
sync or asyncio, times N calls from the request to the first streamed message over loopback TCP and the
median and p90 are printed. No model and no torch unless asked: what it measures is grpcio's own round trip.

`--settings` turns on the production server's settings (server/hjcg_server/app.py) in the sync server, one
name or several: channel options, maximum_concurrent_rpcs, the RPC thread pool, torch with CUDA loaded,
the GIL switch interval, registered method handlers, and a hand-off of each request to an "engine thread"
(queue.Queue + Event, or SimpleQueue); `production` is all of them but the hand-off. `--all` runs the four
server/client pairs, then the settings one at a time, and prints one line each. Calls run back to back
unless `--gap-ms` lets the threads fall idle between them.

    python -m bench.lab.grpc_floor                                  # sync server, sync client
    python -m bench.lab.grpc_floor --server aio --client aio --calls 1000
    python -m bench.lab.grpc_floor --settings production            # or e.g. --settings engine-simple,switch
    python -m bench.lab.grpc_floor --all --out OUT/grpc_floor.json

On the GPU machine (Python 3.12, grpcio 1.84) it needs no build and no wheel: the server's constants are
read from app.py's source (importing app.py would need the built extension), so from the repository root
`python3 -m bench.lab.grpc_floor --all --out $OUT/grpc_floor.json` runs as it is (about a minute).
"""
from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "server" / "hjcg_server" / "app.py"
METHOD = "/t.T/G"
# As HjcgServer.__init__ sizes them for the default --queue-size 64: queue + 72 threads, queue + 64 RPCs
POOL_THREADS, MAX_RPCS = 64 + 72, 64 + 64
SETTINGS = {
    "options": "the server's channel options: message size limits, keepalive, so_reuseport 0",
    "maxrpc": f"maximum_concurrent_rpcs={MAX_RPCS}",
    "pool": f"a {POOL_THREADS}-thread RPC pool (grpc's default otherwise)",
    "torch": "torch imported, CUDA initialised (where there is a GPU), torch threads = the CPUs this process has",
    "switch": "the server's GIL switch interval (SWITCH_INTERVAL_S, 0.2 ms)",
    "registered": "the method also registered with add_registered_method_handlers",
    "engine": "the handler hands the request to an engine thread (queue.Queue + Event) and yields its reply",
    "engine-simple": "the same hand-off through queue.SimpleQueue",
}
PRODUCTION = ["options", "maxrpc", "pool", "torch", "switch", "registered"]
PAIRS = [("sync", "sync"), ("sync", "aio"), ("aio", "sync"), ("aio", "aio")]
ABLATION = [[], ["options"], ["maxrpc"], ["pool"], ["torch"], ["switch"], ["registered"], ["engine"],
            ["engine-simple"], ["engine-simple", "switch"], PRODUCTION, []]  # "none" twice: the run's noise


def app_constants() -> dict:
    """app.py's module-level constants, evaluated from its source: importing it would need the built extension."""
    values = {}
    for node in ast.parse(APP.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = eval(compile(ast.Expression(node.value), str(APP), "eval"),
                                                  {"__builtins__": {}})
            except Exception:  # an expression that is not a constant (a regex, a logger)
                pass
    return values


def channel_options() -> list[tuple[str, int]]:
    """The production server's grpc.server options, as HjcgServer.__init__ builds them."""
    c = app_constants()
    return ([("grpc.max_receive_message_length", c["MAX_MESSAGE_BYTES"]),
             ("grpc.max_send_message_length", c["MAX_MESSAGE_BYTES"])] + c["KEEPALIVE_OPTIONS"] + c["BIND_OPTIONS"])


def trivial(request, context):
    yield b"x"
    yield b"y"


async def trivial_aio(request, context):
    yield b"x"
    yield b"y"


def via_engine_thread(simple: bool):
    """A handler that hands each request to an engine thread and yields the reply it puts on the request's
    queue: with an Event as doorbell (the engine thread waits on it, 50 ms at most) or a blocking SimpleQueue."""
    new_queue = queue.SimpleQueue if simple else queue.Queue
    inbox, doorbell = new_queue(), threading.Event()

    def engine() -> None:
        while True:
            if not simple:
                doorbell.wait(0.05)
                doorbell.clear()
                if inbox.empty():
                    continue
            inbox.get().put(b"x")

    threading.Thread(target=engine, daemon=True).start()

    def handler(request, context):
        reply = new_queue()
        inbox.put(reply)
        if not simple:
            doorbell.set()
        yield reply.get(timeout=1.0)
        yield b"y"
    return handler


def exit_with_parent() -> None:
    """The server's stdin is a pipe from the lab: at its end (the lab exited, however) the server exits."""
    def watch() -> None:
        sys.stdin.read()
        os._exit(0)
    threading.Thread(target=watch, daemon=True).start()


def serve_sync(settings: list[str]) -> None:
    if "torch" in settings:
        import torch
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")
    if "switch" in settings:
        sys.setswitchinterval(app_constants()["SWITCH_INTERVAL_S"])
    handler = (via_engine_thread(simple="engine-simple" in settings)
               if {"engine", "engine-simple"} & set(settings) else trivial)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=POOL_THREADS if "pool" in settings else None),
                         options=channel_options() if "options" in settings else None,
                         maximum_concurrent_rpcs=MAX_RPCS if "maxrpc" in settings else None)
    handlers = {"G": grpc.unary_stream_rpc_method_handler(handler)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    if "registered" in settings:
        server.add_registered_method_handlers("t.T", handlers)
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    server.wait_for_termination()


async def serve_aio() -> None:
    server = grpc.aio.server()
    handlers = {"G": grpc.unary_stream_rpc_method_handler(trivial_aio)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def time_sync_client(target: str, calls: int, gap_s: float) -> list[float]:
    samples = []
    with grpc.insecure_channel(target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        method = channel.unary_stream(METHOD)
        for _ in range(calls):
            start = time.perf_counter()
            stream = method(b"a")
            next(stream)
            samples.append(time.perf_counter() - start)
            for _ in stream:
                pass
            time.sleep(gap_s)
    return samples


async def time_aio_client(target: str, calls: int, gap_s: float) -> list[float]:
    samples = []
    async with grpc.aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        method = channel.unary_stream(METHOD)
        for _ in range(calls):
            start = time.perf_counter()
            call = method(b"a")
            await call.read()
            samples.append(time.perf_counter() - start)
            while await call.read() is not grpc.aio.EOF:
                pass
            await asyncio.sleep(gap_s)
    return samples


def measure(server: str, client: str, settings: list[str], calls: int, warmup: int, gap_ms: float) -> dict:
    """One run: the server process, then the client process; request -> first message in ms."""
    lab = [sys.executable, "-m", "bench.lab.grpc_floor"]
    server_args = ["--role", "server", "--server", server, "--settings", ",".join(settings) or "none"]
    proc = subprocess.Popen(lab + server_args,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = threading.Timer(120.0, proc.kill)  # for a server that never prints its port
    deadline.start()
    try:
        port = proc.stdout.readline().strip()
        deadline.cancel()  # before the client runs, which may take longer
        if not port:
            raise RuntimeError(f"the {server} server with settings {settings} exited with code {proc.wait()}")
        out = subprocess.run(lab + ["--role", "client", "--client", client, "--port", port,
                                    "--calls", str(calls + warmup), "--gap-ms", str(gap_ms)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT, timeout=600, check=True).stdout
    finally:
        deadline.cancel()
        proc.kill()
        proc.wait()
    ms = sorted(s * 1e3 for s in json.loads(out)[warmup:])
    p90 = ms[int(0.9 * len(ms))]
    return {"server": server, "client": client, "settings": settings or ["none"], "calls": len(ms),
            "gap_ms": gap_ms, "median_ms": round(statistics.median(ms), 4), "p90_ms": round(p90, 4)}


def line(r: dict) -> str:
    settings = "production" if r["settings"] == PRODUCTION else "+".join(r["settings"])
    label = f"{r['server']} server + {r['client']} client, {settings}"
    return f"{label:<56} median {r['median_ms']:.3f} ms  p90 {r['p90_ms']:.3f} ms"


def environment() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"python": platform.python_version(), "grpcio": grpc.__version__, "cpus": len(os.sched_getaffinity(0)),
            "host": platform.node(), "commit": commit.stdout.strip() or "unknown",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def parse_settings(text: str) -> list[str]:
    names = {"none": [], "production": PRODUCTION}.get(text, [s for s in text.split(",") if s])
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or {"engine", "engine-simple"} <= set(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'none', 'production' or names from {', '.join(SETTINGS)} "
                                         "(one engine hand-off at most)")
    return names


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="settings: " + "; ".join(f"{k}: {v}" for k, v in SETTINGS.items()) +
                                f"; production: {','.join(PRODUCTION)}",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--server", choices=["sync", "aio"], default="sync", help="grpc.server or grpc.aio.server")
    p.add_argument("--client", choices=["sync", "aio"], default="sync", help="grpc or grpc.aio channel")
    p.add_argument("--settings", type=parse_settings, default="none",
                   help="production settings in the sync server: comma-separated names, 'production' or 'none'")
    p.add_argument("--calls", type=int, default=350, help="timed calls per run")
    p.add_argument("--warmup", type=int, default=50, help="untimed calls before them")
    p.add_argument("--gap-ms", type=float, default=0.0, help="the client's sleep after each call (0: back to back)")
    p.add_argument("--all", action="store_true", help="the four server/client pairs, then each setting alone")
    p.add_argument("--out", type=Path, help="also write the runs as JSON here")
    p.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    p.add_argument("--port", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.settings and args.server != "sync":
        p.error("--settings apply to the sync server")

    if args.role == "server":
        exit_with_parent()
        if args.server == "sync":
            serve_sync(args.settings)
        else:
            asyncio.run(serve_aio())
    elif args.role == "client":
        target = f"127.0.0.1:{args.port}"
        gap_s = args.gap_ms / 1e3
        samples = (time_sync_client(target, args.calls, gap_s) if args.client == "sync"
                   else asyncio.run(time_aio_client(target, args.calls, gap_s)))
        print(json.dumps(samples))
    else:
        runs = ([(s, c, []) for s, c in PAIRS] + [("sync", "sync", v) for v in ABLATION] if args.all
                else [(args.server, args.client, args.settings)])
        print(f"request -> first message: {args.calls} calls after {args.warmup} warm-up, "
              f"{args.gap_ms:g} ms between calls", flush=True)
        results = []
        for server, client, settings in runs:
            results.append(measure(server, client, settings, args.calls, args.warmup, args.gap_ms))
            print(line(results[-1]), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"environment": environment(), "runs": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
