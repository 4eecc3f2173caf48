"""Lab (GPU machine): the many-callers concurrency section against `hjcg serve` with and without programmatic
dependent launch (--no-pdl), alternating servers (with, without, with, without) so drift shows.

    python -m bench.lab.pdl_serve OUT_DIR   (writes OUT_DIR/pdl_serve.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.many_callers import gpu_plan, run_sections

LEVELS = (1, 8, 16, 32)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    for label, flags in (("pdl", ()), ("no_pdl", ("--no-pdl",)), ("pdl_again", ()), ("no_pdl_again", ("--no-pdl",))):
        plan = gpu_plan()
        plan.server_flags = (*plan.server_flags, *flags)
        plan.levels = LEVELS
        print(label, flush=True)
        report[label] = {}
        run_sections(plan, {"concurrency"}, report[label])
        (out / "pdl_serve.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
