"""Many callers (docs/benchmarks.md): concurrency, gRPC overhead and open-loop load, against `hjcg serve`
in a subprocess, with client processes from bench.callers.

  concurrency    N clients (N = 1, 2, 4, ... 32), started together, each a 10-token prompt then 256 tokens
  grpc_overhead  the same model in-process (Engine.generate) and through loopback gRPC, one caller
  open_loop      Poisson arrivals at fixed rates, random prompt and output lengths, a fixed seed

raw.json keeps every stream (bench.callers.compact); bench.report turns them into the figures.
"""
from __future__ import annotations

import gc
import random
import time
from dataclasses import dataclass, field

from bench.callers import ClientPool, compact, poisson_schedule, random_ids, stream_figures
from bench.common import now, summary
from bench.grpc_bench import ttft_over_grpc


@dataclass
class Plan:
    """What the sections run: the GPU suite's workload, or a tiny one for the CPU smoke run."""
    model: str = "random:llama2-7b"
    device: str = "cuda"
    vocab: int = 32000
    server_flags: tuple[str, ...] = ("--max-batch", "32", "--queue-size", "128")
    levels: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    prompt_tokens: int = 10
    new_tokens: int = 256
    warm_tokens: int = 16             # the unmeasured round before each level
    rounds: int = 1                   # measured rounds per level
    ttft_runs: int = 100
    itl_streams: int = 5              # 256-token streams through gRPC for the inter-token p99
    inproc_decode_runs: int = 3
    rates: dict[float, int] = field(default_factory=lambda: {2: 40, 8: 120, 32: 320})  # rate -> requests
    prompt_range: tuple[int, int] = (10, 500)
    new_range: tuple[int, int] = (64, 256)
    open_loop_workers: int = 16       # client processes at least (the pool has max(levels) when larger);
                                      # each call runs in its own thread, so no arrival waits for a client
    open_loop_tail_s: float = 30.0    # calls still running this long after the last arrival are cut off
    seed: int = 0
    # the in-process engine's settings beyond `hjcg serve`'s defaults: what server_flags set
    engine: dict = field(default_factory=lambda: {"max_batch": 32, "max_waiting": 128})

    @property
    def pool_size(self) -> int:
        return max(max(self.levels, default=1), self.open_loop_workers)


def gpu_plan(quick: bool = False) -> Plan:
    plan = Plan()
    if quick:
        plan.ttft_runs, plan.itl_streams, plan.inproc_decode_runs = 20, 2, 1
        plan.rates = {2: 20, 8: 60, 32: 160}
    return plan


def smoke_plan() -> Plan:
    """The CPU smoke run: a tiny model, few tokens; exercises the machinery, measures nothing."""
    return Plan(model="random:tiny-gqa", device="cpu", vocab=1000, levels=(1, 2, 4), new_tokens=8,
                warm_tokens=2, ttft_runs=5, itl_streams=2, inproc_decode_runs=1, rates={8: 6, 32: 8},
                prompt_range=(10, 40), new_range=(4, 8), open_loop_workers=4, open_loop_tail_s=60.0,
                server_flags=("--max-batch", "4", "--queue-size", "16"),
                engine={"max_batch": 4, "max_waiting": 16})


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- in-process half of grpc_overhead ----------------------------------------------------------------------

def grpc_overhead_inproc(plan: Plan, loaded=None, log=_log) -> dict:
    """TTFT at 10 tokens and decode intervals through Engine.generate in this process, the engine set up as
    `hjcg serve` sets up its own (hybrid on CUDA, warmed). `loaded`: the model already in memory (the same
    random weights the server builds from the same seed), or None to build it."""
    import torch

    from bench.systems import HjcgSystem
    from hjcg.random_models import random_llama

    shape = plan.model.removeprefix("random:")
    on_cuda = plan.device.startswith("cuda")
    if loaded is None:
        loaded = random_llama(shape, torch.float16 if on_cuda else torch.float32, plan.device, seed=0)
    # `hjcg serve`'s defaults, and the flags the plan gives the server
    settings = dict(max_context=4096, max_prompt_tokens=3072, max_new_tokens=1024,
                    device=plan.device, dtype="float16" if on_cuda else "float32")
    settings.update(plan.engine)
    mode = "hybrid" if on_cuda else "eager"
    system = HjcgSystem(loaded, mode, **settings)
    try:
        ids = random_ids(random.Random(plan.seed + 11), plan.prompt_tokens, plan.vocab)
        for _ in range(5):
            system.ttft(ids)
        ttft = [system.ttft(ids) for _ in range(plan.ttft_runs)]
        system.decode(ids, 5)
        decode = []
        for _ in range(plan.inproc_decode_runs):
            decode += system.decode(ids, plan.new_tokens - 1)
        result = {"ttft10": ttft, "decode": decode, "engine": dict(settings, mode=mode)}
    finally:
        system.close()
        del system
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
    log(f"grpc_overhead in-process: TTFT(10) {summary(ttft)['median_ms']:.2f} ms, decode median "
        f"{summary(decode)['median_ms']:.2f} ms/token")
    return result


# --- through the server ------------------------------------------------------------------------------------

def grpc_overhead_grpc(plan: Plan, target: str, log=_log) -> dict:
    """One caller through loopback gRPC: TTFT at 10 tokens, and several 256-token streams."""
    from hjcg_client import HjcgClient

    ids = random_ids(random.Random(plan.seed + 11), plan.prompt_tokens, plan.vocab)
    with HjcgClient(target) as client:
        for _ in range(5):
            ttft_over_grpc(client, ids)
        ttft = [ttft_over_grpc(client, ids) for _ in range(plan.ttft_runs)]
        streams = []
        from bench.callers import stream

        for _ in range(plan.itl_streams):
            streams.append(stream(client, ids, plan.new_tokens))
    t0 = min(s["send"] for s in streams)
    result = {"ttft10": ttft, "streams": compact(streams, t0)}
    figures = stream_figures(result["streams"])
    log(f"grpc_overhead gRPC: TTFT(10) {summary(ttft)['median_ms']:.2f} ms, inter-token median "
        f"{figures['itl_median_ms']:.2f} p99 {figures['itl_p99_ms']:.2f} ms")
    return result


def concurrency(plan: Plan, pool: ClientPool, log=_log) -> dict:
    """Per level N: an unmeasured round of N short calls, then `rounds` rounds of N calls (a 10-token
    prompt, 256 tokens) released together."""
    rng = random.Random(plan.seed + 1)
    levels = {}
    for n in plan.levels:
        pool.together([random_ids(rng, plan.prompt_tokens, plan.vocab) for _ in range(n)], plan.warm_tokens)
        rounds, t0s = [], []
        for _ in range(plan.rounds):
            records = pool.together([random_ids(rng, plan.prompt_tokens, plan.vocab) for _ in range(n)],
                                    plan.new_tokens)
            t0 = min(r["send"] for r in records)
            rounds.append(compact(records, t0))
            t0s.append(t0)  # the clients' clock (CLOCK_MONOTONIC): lines a round up with server-side traces
        levels[str(n)] = {"rounds": rounds, "t0_s": t0s}
        f = stream_figures(rounds[0])
        log(f"concurrency {n:2d}: {f['tokens_per_s']:8.1f} tokens/s, inter-token median {_fmt(f['itl_median_ms'])} "
            f"p99 {_fmt(f['itl_p99_ms'])} ms, TTFT median {_fmt(f['ttft_median_ms'])} p99 {_fmt(f['ttft_p99_ms'])} ms"
            + (f", errors {f['errors']}" if f["errors"] else ""))
    return {"levels": levels, "prompt_tokens": plan.prompt_tokens, "new_tokens": plan.new_tokens,
            "rounds": plan.rounds}


def open_loop(plan: Plan, pool: ClientPool, log=_log) -> dict:
    rates = {}
    for rate, count in plan.rates.items():
        schedule = poisson_schedule(rate, count, plan.vocab, plan.prompt_range, plan.new_range,
                                    seed=plan.seed + int(rate * 1000))
        start = now()
        t0, records = pool.open_loop(schedule, tail_s=plan.open_loop_tail_s)
        streams = compact(records, t0)
        rates[_rate_key(rate)] = {"rate": rate, "requests": count, "streams": streams}
        f = stream_figures(streams)
        lag = max(s["send_ms"] - s["scheduled_ms"] for s in streams)
        log(f"open loop {rate:g}/s: {count} requests in {now() - start:.1f} s, {f['tokens_per_s']:.0f} tokens/s, "
            f"TTFT p50 {_fmt(f['ttft_median_ms'])} p99 {_fmt(f['ttft_p99_ms'])} ms, inter-token p50 "
            f"{_fmt(f['itl_median_ms'])} p99 {_fmt(f['itl_p99_ms'])} ms, latest send {lag:.1f} ms behind schedule"
            + (f", errors {f['errors']}" if f["errors"] else ""))
    return {"rates": rates, "prompt_range": list(plan.prompt_range), "new_range": list(plan.new_range),
            "seed": plan.seed, "workers": pool.size, "tail_s": plan.open_loop_tail_s}


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def inproc_section(plan: Plan, results: dict, save=lambda: None, log=_log, loaded=None) -> None:
    """The in-process half of grpc_overhead into results["grpc_overhead"]["inproc"] (an error recorded, not
    raised); its engine is freed on return."""
    results["grpc_overhead"] = {"model": plan.model}
    try:
        results["grpc_overhead"]["inproc"] = grpc_overhead_inproc(plan, loaded, log)
    except Exception as e:
        results["grpc_overhead"] = {"model": plan.model, "error": f"in-process: {type(e).__name__}: {e}"}
        log(f"grpc_overhead in-process: FAILED {type(e).__name__}: {e}")
    save()


def server_for(plan: Plan, log=_log):
    from bench.server_proc import ServerProcess

    return ServerProcess(plan.model, plan.device, extra=list(plan.server_flags), log=log)


def run_sections(plan: Plan, sections: set[str], results: dict, save=lambda: None, log=_log, server=None) -> None:
    """The wanted sections of {concurrency, grpc_overhead, open_loop} into `results` (raw form), one
    server for all of them. The in-process half of grpc_overhead runs first (unless it already has, see
    inproc_section), and its engine is freed before the server starts. `server`: one already launched
    (server_for(plan).launch(): the CPU smoke run lets it load meanwhile; on a GPU the two would share
    the device while the in-process half is timed). A section's failure is recorded under its key."""
    if "grpc_overhead" in sections and "grpc_overhead" not in results:
        inproc_section(plan, results, save, log)
    server_sections = [s for s in ("grpc_overhead", "concurrency", "open_loop") if s in sections]
    if not server_sections:
        if server is not None:
            server.stop()
        return
    server = server or server_for(plan, log).launch()
    try:
        server.wait()
    except Exception as e:
        for s in server_sections:
            results.setdefault(s, {})["error"] = f"server: {type(e).__name__}: {e}"
        log(f"server FAILED to start: {e}")
        save()
        return
    info = dict(server.info(), model=plan.model, transport="tcp")
    try:
        if "grpc_overhead" in sections and "error" not in results.get("grpc_overhead", {}):
            try:
                results["grpc_overhead"]["grpc"] = grpc_overhead_grpc(plan, server.target, log)
                results["grpc_overhead"]["server"] = info
            except Exception as e:
                results["grpc_overhead"]["error"] = f"{type(e).__name__}: {e}"
                log(f"grpc_overhead gRPC: FAILED {type(e).__name__}: {e}")
            save()
        pooled = [s for s in ("concurrency", "open_loop") if s in sections]
        if not pooled:
            return
        start = now()
        try:
            pool = ClientPool(server.target, plan.pool_size, levels=plan.levels)
        except Exception as e:
            for s in pooled:
                results[s] = {"error": f"client pool: {type(e).__name__}: {e}", "server": info}
            log(f"client pool FAILED: {e}")
            save()
            return
        with pool:
            try:  # every connection, and the server's batch sizes, used once
                pool.together([random_ids(random.Random(i), plan.prompt_tokens, plan.vocab)
                               for i in range(pool.size)], plan.warm_tokens)
            except Exception as e:
                for s in pooled:
                    results[s] = {"error": f"warm-up round: {type(e).__name__}: {e}", "server": info}
                log(f"warm-up round FAILED: {e}")
                return
            log(f"{pool.size} client processes ready and warm in {now() - start:.1f} s")
            for name, fn in (("concurrency", concurrency), ("open_loop", open_loop)):
                if name not in sections:
                    continue
                try:
                    results[name] = dict(fn(plan, pool, log), server=info, model=plan.model, transport="tcp")
                except Exception as e:
                    results[name] = {"error": f"{type(e).__name__}: {e}", "server": info}
                    log(f"{name}: FAILED {type(e).__name__}: {e}")
                save()
    finally:
        server.stop()
        tail = server.log_tail(2000)
        for s in server_sections:
            if isinstance(results.get(s), dict):
                results[s]["server_log_tail"] = tail
        save()
