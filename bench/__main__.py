"""python -m bench run | report | smoke

  run     the suite on a CUDA GPU (docs/benchmarks.md); writes raw.json, summary.json, CSV, PNG.
          --sections picks sections (bench.run_all.SECTIONS), --systems the llama7b section's systems
          (or env BENCH_SYSTEMS, e.g. hybrid), --part NAME writes raw-NAME.json so that several calls of
          one run merge (the summary is then rebuilt from every raw-*.json in the directory)
  report  rebuild summary/CSV/PNG from an existing raw.json or raw-*.json parts
  smoke   a quick CPU run of the harness on a tiny model (CI); asserts nothing about speed. --sections:
          systems (in-process) and/or concurrency, grpc_overhead, open_loop (a CPU server, random:tiny-gqa)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


SMOKE_SECTIONS = ("systems", "fp8", "concurrency", "grpc_overhead", "open_loop")


def _smoke(out: Path, sections: tuple[str, ...]) -> dict:
    import torch

    from bench.common import environment

    unknown = [x for x in sections if x not in SMOKE_SECTIONS]
    if unknown:
        raise SystemExit(f"unknown smoke sections {unknown}; choose from {', '.join(SMOKE_SECTIONS)}")
    raw = {"environment": environment(), "quick": True, "smoke": True,
           "floors": {"copy_bytes_per_s": 0, "matmul_flops_per_s": 0}}
    torch.set_num_threads(1)  # the CPU server of the callers' sections gets the other cores
    callers = {s for s in sections if s not in ("systems", "fp8")}
    server = None
    if callers:
        from bench import many_callers

        plan = many_callers.smoke_plan()
        server = many_callers.server_for(plan).launch()  # it loads while the in-process parts run
    try:
        if "systems" in sections:
            from bench.run_all import prompts_for
            from bench.systems import HFEager, HjcgSystem, measure
            from hjcg.random_models import random_llama

            loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=0)
            prompts = prompts_for(loaded.hf_model.config.vocab_size, lengths=(10, 50))
            systems = {}
            for system in (HjcgSystem(loaded, "eager", max_context=256, device="cpu", dtype="float32"),
                           HFEager(loaded.hf_model)):
                systems[system.name] = measure(system, prompts, 3, prompts[10], 8)
                system.close()
            floors = {"decode_floor_ms": 1.0, "prefill_floor_ms": {10: 1.0, 50: 1.0}}
            raw["llama2_7b"] = {"floors": floors, "systems": systems}
        if "fp8" in sections:
            from bench import fp8_bench
            from hjcg.random_models import random_llama

            loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=0)
            raw["fp8"] = fp8_bench.speed(loaded, True, lengths=(10, 50), decode_tokens=8, mode="eager", device="cpu",
                                         dtype="float32", max_context=256)
        if callers:
            many_callers.run_sections(plan, callers, raw, server=server)
    finally:
        if server is not None:
            server.stop()
    return raw


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif key in ("sections", "systems") and isinstance(into.get(key), list):  # what each part ran
            into[key] += [x for x in value if x not in into[key]]
        elif key not in into:
            into[key] = value
    return into


def _merged(out: Path) -> dict:
    """raw.json, or the parts of one suite run in several calls (raw-*.json, same commit) merged."""
    parts = sorted(out.glob("raw-*.json"))
    if not parts:
        return json.loads((out / "raw.json").read_text())
    raws = [json.loads(p.read_text()) for p in parts]
    commits = {r["environment"]["commit"] for r in raws}
    if len(commits) != 1:
        raise SystemExit(f"parts come from different commits: {commits}")
    merged: dict = {}
    for r in raws:
        _merge(merged, r)
    merged["parts"] = [p.name for p in parts]
    (out / "raw.json").write_text(json.dumps(merged, default=str))
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default="bench/results/latest")
    r.add_argument("--quick", action="store_true", help="fewer repetitions")
    r.add_argument("--sections", default="",
                   help="comma-separated, default all: llama7b,profile,buckets,cache,grpc_overhead,fp8,"
                   "fp8_quality,smollm,grpc,concurrency,open_loop")
    r.add_argument("--systems", default=os.environ.get("BENCH_SYSTEMS", ""),
                   help="the llama7b section's systems, comma-separated, default all (env BENCH_SYSTEMS): "
                   "hybrid,graphs,eager,compiled,hf-eager,hf-static-compile,seed-paper")
    r.add_argument("--part", default="", help="write raw-PART.json (one part of a run split over calls)")
    p = sub.add_parser("report")
    p.add_argument("--out", default="bench/results/latest")
    s = sub.add_parser("smoke")
    s.add_argument("--out", default="build/bench-smoke")
    s.add_argument("--sections", default="systems",
                   help=f"comma-separated: {','.join(SMOKE_SECTIONS)} (default: %(default)s)")
    args = parser.parse_args(argv)

    from bench import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = tuple(x.strip() for x in getattr(args, "sections", "").split(",") if x.strip())
    if args.command == "run":
        from bench.run_all import parse_systems, run

        raw_name = f"raw-{args.part}.json" if args.part else "raw.json"
        raw = run(out, quick=args.quick, sections=sections, systems=parse_systems(args.systems), raw_name=raw_name)
        if args.part:
            raw = _merged(out)
    elif args.command == "report":
        raw = _merged(out)
    else:
        raw = _smoke(out, sections)
        (out / "raw.json").write_text(json.dumps(raw, default=str))
    summary = report.write_all(raw, out)
    print(json.dumps({k: v for k, v in summary.items() if k in ("environment", "floors")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
