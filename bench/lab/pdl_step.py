"""Lab (GPU machine): the decode step and TTFT with and without programmatic dependent launch (EngineConfig.pdl),
same run, same model: Llama-2-7B shapes (random weights), hybrid engine, fp8 and fp16 weights. bench.profile_steps'
TTFT per prefill bucket, decode interval and kernel tables for each.

    python -m bench.lab.pdl_step OUT_DIR [FORMATS]   (FORMATS: a comma list of fp8, fp16; writes OUT_DIR/pdl_step.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench import profile_steps
from bench.common import environment
from hjcg.random_models import random_llama


def main(out: Path, formats: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    report: dict = {"environment": environment()}
    for fmt in formats:
        for pdl in (False, True):
            label = f"{fmt}_pdl{int(pdl)}"
            engine = {"weights": "fp8"} if fmt == "fp8" else {}
            report[label] = profile_steps.run(loaded, out / f"profile_{label}.txt", pdl=pdl, **engine)
            ttft = {b: round(ms, 3) for b, ms in report[label]["ttft_per_bucket_ms"].items()}
            print(label, "decode interval", round(report[label]["decode_interval_ms"], 3), "ms; TTFT per bucket (ms):",
                  ttft, flush=True)
            (out / "pdl_step.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("fp8", "fp16"))
