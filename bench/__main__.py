"""python -m bench run | report | smoke

  run     the whole suite on a CUDA GPU (BENCH_PROTOCOL.md); writes raw.json, summary.json, CSV, PNG
  report  rebuild summary/CSV/PNG from an existing raw.json (and render the README section)
  smoke   a quick CPU run of the harness on a tiny model (CI); asserts nothing about speed
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _smoke(out: Path) -> dict:
    import torch

    from bench.common import environment
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
    return {"environment": environment(), "quick": True, "smoke": True,
            "floors": {"copy_bytes_per_s": 0, "matmul_flops_per_s": 0},
            "llama2_7b": {"floors": floors, "systems": systems}}


def _merge(into: dict, other: dict) -> dict:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
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
    r.add_argument("--sections", default="", help="comma-separated: llama7b,buckets,cache,smollm,grpc")
    p = sub.add_parser("report")
    p.add_argument("--out", default="bench/results/latest")
    s = sub.add_parser("smoke")
    s.add_argument("--out", default="build/bench-smoke")
    args = parser.parse_args(argv)

    from bench import report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        from bench.run_all import run

        raw = run(out, quick=args.quick, sections=tuple(x for x in args.sections.split(",") if x))
    elif args.command == "report":
        raw = _merged(out)
    else:
        raw = _smoke(out)
        (out / "raw.json").write_text(json.dumps(raw, default=str))
    summary = report.write_all(raw, out)
    print(json.dumps({k: v for k, v in summary.items() if k in ("environment", "floors")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
