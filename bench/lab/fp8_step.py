"""Lab (GPU machine): where an fp8 decode step's time goes beyond the GEMV chain, and what short prompts cost per
prefill bucket. The Llama-2-7B shape (random weights quantized at load), hybrid engine, fp8 weights, with the
short buckets 8, 10, 12 and 16 beside the default ones: bench.profile_steps' TTFT per bucket (a prompt of exactly
each bucket's length), the decode interval, and torch.profiler's kernel table of a 64-token decode and of the
prefills. fp16 weights too with `fp16` (the default buckets).

    python -m bench.lab.fp8_step OUT_DIR [fp16]      (writes OUT_DIR/fp8_step.json and the kernel tables)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench import profile_steps
from bench.common import environment
from hjcg.config import FP8_PREFILL_BUCKETS
from hjcg.random_models import random_llama

SHORT_BUCKETS = (8, 10, 12, 16)


def main(out: Path, formats: tuple[str, ...]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    report: dict = {"environment": environment()}
    for label in formats:
        engine = ({"weights": "fp8", "prefill_buckets": tuple(sorted({*SHORT_BUCKETS, *FP8_PREFILL_BUCKETS}))}
                  if label == "fp8" else {})
        report[label] = profile_steps.run(loaded, out / f"profile_{label}.txt", **engine)
        print(label, "TTFT per bucket (ms):", {b: round(ms, 3) for b, ms in report[label]["ttft_per_bucket_ms"].items()},
              "decode interval", round(report[label]["decode_interval_ms"], 3), flush=True)
        (out / "fp8_step.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]), ("fp8", *sys.argv[2:]))
