"""The benchmark suite of docs/benchmarks.md in one run: floors, every system side by side on the
Llama-2-7B shape (and SmolLM2-135M), bucket sets, the rolling cache, end to end through gRPC, and the
many-callers sections (bench.many_callers). Sections are selectable (SECTIONS), and so are the systems of
the llama7b section (SYSTEMS; env BENCH_SYSTEMS or --systems), so that a run fits one device call."""
from __future__ import annotations

import gc
import json
import random
import time
from pathlib import Path

import torch

from bench import fp8_bench, grpc_bench, structured_bench
from bench.common import PROMPT_LENGTHS, environment, floors, model_floors, now, summary
from bench.systems import HFEager, HFStaticCompiled, HjcgSystem, SeedPaper, measure
from hjcg.config import DEFAULT_PREFILL_BUCKETS
from hjcg.random_models import random_llama

DECODE_TOKENS = 397
SECTIONS = ("llama7b", "profile", "buckets", "cache", "grpc_overhead", "fp8", "fp8_quality", "smollm", "grpc",
            "concurrency", "open_loop", "structured")
# need the 7B model in this process
MODEL_SECTIONS = ("llama7b", "profile", "buckets", "cache", "grpc_overhead", "fp8", "structured")
SYSTEMS = ("hybrid", "graphs", "eager", "compiled", "hf-eager", "hf-static-compile", "seed-paper")
_STARTED = time.monotonic()


def prompts_for(vocab: int, lengths=PROMPT_LENGTHS, seed: int = 0) -> dict[int, list[int]]:
    rng = random.Random(seed)
    return {n: [rng.randrange(3, vocab) for _ in range(n)] for n in lengths}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')} +{time.monotonic() - _STARTED:.0f}s] {message}", flush=True)


def parse_systems(text: str | None) -> tuple[str, ...]:
    """'hybrid,hf-eager' -> ('hybrid', 'hf-eager'); hjcg-<mode> names are taken too; empty: every system."""
    names = tuple(n.strip().removeprefix("hjcg-") for n in (text or "").split(",") if n.strip())
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    return names or SYSTEMS


def run_system(make, prompts, ttft_runs, decode_tokens, decode_runs, results, extra=None):
    name = "?"
    try:
        start = now()
        system = make()
        name = system.name
        log(f"{name}: set up in {now() - start:.1f} s")
        record = measure(system, prompts, ttft_runs, prompts[10], decode_tokens, decode_runs)
        if extra:
            record.update(extra(system))
        system.close()
        results[name] = record
        ttft10 = summary(record["ttft"][10])["median_ms"]
        dec = summary(record["decode"]).get("median_ms", float("nan"))
        log(f"{name}: TTFT(10) {ttft10:.2f} ms, decode median {dec:.2f} ms/token")
    except Exception as e:  # one failing baseline must not sink the run; the error is in the results
        log(f"{name}: FAILED {type(e).__name__}: {e}")
        results[getattr(make, "label", name)] = {"error": f"{type(e).__name__}: {e}"}
    gc.collect()
    torch.cuda.empty_cache()


def long_context_decode(system: HjcgSystem, vocab: int, contexts=(1024, 2048, 4000), tokens: int = 64) -> dict:
    rng = random.Random(1)
    out = {}
    for n in contexts:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        system.decode(ids, 4)
        out[n] = system.decode(ids, tokens)
    return {"decode_at_context": out}


def llama7b_systems(loaded, quick: bool, systems: tuple[str, ...] = SYSTEMS) -> dict:
    vocab = loaded.hf_model.config.vocab_size
    prompts = prompts_for(vocab)
    runs = 20 if quick else 100
    results: dict = {}

    def hjcg(mode, **kw):
        make = lambda: HjcgSystem(loaded, mode, **kw)
        make.label = f"hjcg-{mode}"
        return make

    plan = {
        "hybrid": lambda: run_system(hjcg("hybrid"), prompts, runs, DECODE_TOKENS, 1 if quick else 3, results,
                                     extra=lambda s: {**long_context_decode(s, vocab), "warm": s.warm_report}),
        "graphs": lambda: run_system(hjcg("graphs"), prompts, max(20, runs // 2), DECODE_TOKENS, 1, results,
                                     extra=lambda s: {"warm": s.warm_report}),
        "eager": lambda: run_system(hjcg("eager"), prompts, 20, 100, 1, results),
        "compiled": lambda: run_system(hjcg("compiled", max_context=1024), prompts, 20, DECODE_TOKENS, 1, results),
        "hf-eager": lambda: run_system(lambda: HFEager(loaded.hf_model), prompts, 20, 100, 1, results),
        "hf-static-compile": lambda: run_system(lambda: HFStaticCompiled(loaded.hf_model), prompts,
                                                50 if not quick else 10, DECODE_TOKENS, 1, results),
        "seed-paper": lambda: run_system(lambda: SeedPaper(loaded.hf_model, PROMPT_LENGTHS), prompts, runs, 0, 0,
                                         results, extra=lambda s: {"capture_s": s.capture_s,
                                                                   "graph_bytes": s.graph_bytes}),
    }
    for name in SYSTEMS:
        if name in systems:
            plan[name]()
    return results


def smollm_systems(quick: bool) -> tuple[dict, dict]:
    loaded = random_llama("smollm2-135m", torch.float16, "cuda", seed=0)
    prompts = prompts_for(loaded.hf_model.config.vocab_size)
    results: dict = {}
    run_system(lambda: HjcgSystem(loaded, "hybrid"), prompts, 20 if quick else 100, DECODE_TOKENS, 1, results)
    run_system(lambda: HFEager(loaded.hf_model), prompts, 20, 100, 1, results)
    run_system(lambda: HFStaticCompiled(loaded.hf_model), prompts, 20, DECODE_TOKENS, 1, results)
    return results, {"parameters": sum(p.numel() for p in loaded.hf_model.parameters())}


BUCKET_SETS = {
    "default": DEFAULT_PREFILL_BUCKETS,
    "power-of-two": (16, 32, 64, 128, 256, 512),
    "dense-16": tuple(range(16, 513, 16)),
    "exact-lengths": PROMPT_LENGTHS,
}


def bucket_sets(loaded, quick: bool) -> dict:
    """The paper's coverage table redone: warm-up time, graph memory and TTFT for several bucket sets."""
    prompts = prompts_for(loaded.hf_model.config.vocab_size)
    out = {}
    for label, buckets in BUCKET_SETS.items():
        try:
            torch.cuda.synchronize()
            system = HjcgSystem(loaded, "hybrid", max_context=1024, buckets=buckets, graph_cache_max_entries=64,
                                graph_cache_max_bytes=16 << 30)
            ttft = {n: summary([system.ttft(ids) for _ in range(10 if quick else 30)])["median_ms"]
                    for n, ids in prompts.items()}
            report = system.warm_report
            out[label] = {"buckets": list(buckets), "warm_ms": report["total_ms"],
                          "graph_bytes": report["graph_bytes"], "ttft_median_ms": ttft}
            log(f"buckets {label}: {len(buckets)} graphs, warm {report['total_ms'] / 1e3:.1f} s, "
                f"{report['graph_bytes'] / 2**20:.0f} MiB")
            system.close()
        except Exception as e:
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            log(f"buckets {label}: FAILED {e}")
    return out


def rolling_cache(loaded, quick: bool) -> dict:
    """Random prompt lengths 1-2048 through a cache with a budget: hits, captures, evictions, memory."""
    budget = 1 << 30
    # one row: one decode graph pinned, five entries left for prefill graphs
    system = HjcgSystem(loaded, "hybrid", max_context=2304, buckets=(16, 32, 64, 128, 256, 512, 1024, 2048),
                        graph_cache_max_entries=6, graph_cache_max_bytes=budget, max_prompt_tokens=2048,
                        max_batch=1)
    vocab = loaded.hf_model.config.vocab_size
    rng = random.Random(7)
    timeline = []
    for i in range(40 if quick else 120):
        n = rng.randint(1, 2048)
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        before = system.graph_stats()
        ttft = system.ttft(ids)
        stats = system.graph_stats()
        timeline.append({"request": i, "prompt_tokens": n, "ttft_ms": ttft * 1e3,
                         "hit": stats["captures"] == before["captures"], "entries": stats["entries"],
                         "bytes": stats["bytes"], "captures": stats["captures"], "evictions": stats["evictions"],
                         "reserved_bytes": torch.cuda.memory_reserved()})
    final = system.graph_stats()
    system.close()
    hits = sum(t["hit"] for t in timeline)
    log(f"rolling cache: {hits}/{len(timeline)} requests without a capture, {final['evictions']} evictions, "
        f"max {max(t['bytes'] for t in timeline) / 2**20:.0f} MiB of {budget / 2**20:.0f}")
    return {"budget_bytes": budget, "max_entries": 6, "timeline": timeline, "final": final}


def run(out: Path, quick: bool = False, sections: tuple[str, ...] = (), systems: tuple[str, ...] = SYSTEMS,
        raw_name: str = "raw.json") -> dict:
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    want = lambda s: not sections or s in sections
    results: dict = {"environment": environment(), "protocol": "docs/benchmarks.md", "quick": quick,
                     "sections": list(sections or SECTIONS), "systems": list(systems)}
    save = lambda: _save(out, results, raw_name)
    log(f"environment: {results['environment']}")
    log(f"sections: {', '.join(results['sections'])}; llama7b systems: {', '.join(systems)}")
    rates = floors()
    results["floors"] = rates
    log(f"floors: copy {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {rates['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s")
    from bench import many_callers

    plan = many_callers.gpu_plan(quick)
    if any(want(s) for s in MODEL_SECTIONS):
        start = now()
        loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
        log(f"llama2-7b random weights in {now() - start:.1f} s")
        results["llama2_7b"] = {"floors": model_floors(loaded.hf_model, rates)}
        if want("profile"):
            from bench import profile_steps

            log("profile: start")
            results["llama2_7b"]["profile"] = profile_steps.run(loaded, out / "profile.txt")
            prof = results["llama2_7b"]["profile"]
            per_bucket = ", ".join(f"{b}: {ms:.2f}" for b, ms in prof["ttft_per_bucket_ms"].items())
            log(f"profile: TTFT per bucket (ms) {per_bucket}; decode interval {prof['decode_interval_ms']:.2f} ms")
            save()
        if want("llama7b"):
            results["llama2_7b"]["systems"] = llama7b_systems(loaded, quick, systems)
            save()
        if want("buckets"):
            log("buckets: start")
            results["llama2_7b"]["bucket_sets"] = bucket_sets(loaded, quick)
            save()
        if want("cache"):
            log("rolling cache: start")
            results["llama2_7b"]["rolling_cache"] = rolling_cache(loaded, quick)
            save()
        if want("fp8"):
            log("fp8: start")
            results["fp8"] = fp8_bench.speed(loaded, quick, log)
            save()
        if want("structured"):
            log("structured: start")
            try:
                results["structured"] = structured_bench.run(loaded, None, quick, log)
            except Exception as e:  # one failing section must not sink the run; the error is in the results
                results["structured"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"structured: FAILED {type(e).__name__}: {e}")
            save()
        if want("grpc_overhead"):  # its in-process half, on the model already loaded
            log("grpc_overhead in-process: start")
            many_callers.inproc_section(plan, results, save, log, loaded)
        del loaded
        gc.collect()
        torch.cuda.empty_cache()
        save()
    if want("fp8_quality"):
        log("fp8 quality: start")
        try:
            results["fp8_quality"] = fp8_bench.quality(log)
        except Exception as e:  # e.g. the embedded model's package is not installed here
            results["fp8_quality"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"fp8 quality: FAILED {type(e).__name__}: {e}")
        save()
    if want("smollm"):
        log("smollm: start")
        systems_, info = smollm_systems(quick)
        results["smollm2_135m"] = {"systems": systems_, **info}
        save()
    if want("grpc"):
        log("grpc: start")
        try:
            results["grpc"] = grpc_bench.run(quick)
        except Exception as e:
            results["grpc"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"grpc: FAILED {e}")
        save()
    server_sections = {s for s in ("grpc_overhead", "concurrency", "open_loop") if want(s)}
    if server_sections:
        gc.collect()
        memory = ""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            memory = (f"; this process holds {torch.cuda.memory_reserved() / 2**30:.2f} GiB of GPU memory, "
                      f"{torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB are free for the server")
        log(f"many callers: {', '.join(sorted(server_sections))}{memory}")
        many_callers.run_sections(plan, server_sections, results, save, log)
    log("done")
    return results


def _save(out: Path, results: dict, name: str = "raw.json") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(results, default=str))
