"""Lab: the many-callers concurrency section at several --decode-lookahead settings, one server each, in one
run (H100, Llama-2-7B random weights): does queuing more decode steps ahead of the host take the inter-token
p99 spikes away?

    python -m bench.lab.lookahead OUT.json [SETTING ...]   (settings: lookahead values, default 1 2 3)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.callers import stream_figures
from bench.many_callers import _log, gpu_plan, run_sections


def main(out: Path, settings: list[int]) -> None:
    report = {}
    for lookahead in settings:
        plan = gpu_plan()
        plan.server_flags = (*plan.server_flags, "--decode-lookahead", str(lookahead))
        plan.levels, plan.rounds = (1, 8, 16, 32), 2
        results: dict = {}
        run_sections(plan, {"concurrency"}, results, log=_log)
        levels = results["concurrency"].get("levels", {})
        report[str(lookahead)] = {n: [stream_figures(r) for r in level["rounds"]] for n, level in levels.items()}
        for n, rounds in report[str(lookahead)].items():
            for f in rounds:
                _log(f"lookahead {lookahead} streams {n}: {f['tokens_per_s']:.0f} tokens/s, inter-token median "
                     f"{f['itl_median_ms']:.2f} p99 {f['itl_p99_ms']:.2f} ms, TTFT median {f['ttft_median_ms']:.2f}")
        out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(x) for x in sys.argv[2:]] or [1, 2, 3])
