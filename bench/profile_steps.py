"""Where the time goes, through the engine's public API (hybrid mode, warmed, as served):

  - TTFT per prefill bucket: a prompt of exactly each bucket's length, random tokens, Engine.generate of one
    token (a graph replay plus the host work around it: padding, graph lookup, sampling, copy back);
  - the decode interval: median time between consecutive tokens of one stream;
  - kernel-time breakdown: torch.profiler (CUDA activity) over whole generate calls (one prefill of 16 and
    one of 500 tokens, and a 64-token decode), each kernel's device time and share, beside the wall time.
    CUPTI traces the kernels inside replayed CUDA graphs, so the table shows what the graphs run.

Writes the profiler tables to profile.txt; returns the figures.
"""
from __future__ import annotations

import random
import statistics

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import now
from bench.systems import HjcgSystem

PROFILED_PREFILLS = (16, 500)
PROFILED_DECODE_TOKENS = 64
TOP_KERNELS = 15


def _kernels(prof) -> tuple[float, list[dict]]:
    """(total kernel time in ms, per kernel name: calls, ms, share), largest first."""
    per_name: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            per_name.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
    total = sum(sum(v) for v in per_name.values())
    rows = sorted(({"name": k, "calls": len(v), "ms": sum(v)} for k, v in per_name.items()),
                  key=lambda r: -r["ms"])
    for r in rows:
        r["share"] = r["ms"] / total if total else 0.0
    return total, rows


def _profiled(label: str, fn, lines: list[str]) -> dict:
    fn()  # the same call once unprofiled: graphs captured, allocator warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = now()
        fn()
        torch.cuda.synchronize()
        wall_ms = (now() - start) * 1e3
    total, rows = _kernels(prof)
    lines.append(f"=== {label}: wall {wall_ms:.2f} ms (under the profiler), kernels {total:.2f} ms ===")
    lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=20, max_name_column_width=70))
    return {"wall_ms": wall_ms, "kernel_ms": total, "kernels": rows[:TOP_KERNELS]}


def run(loaded, out_path, **engine) -> dict:
    """`engine`: more EngineConfig settings (e.g. weights="fp8", prefill_buckets=...)."""
    system = HjcgSystem(loaded, "hybrid", max_context=1024, **engine)
    vocab = loaded.hf_model.config.vocab_size
    rng = random.Random(5)
    ids = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    buckets = system.engine.config.prefill_buckets
    report: dict = {"ttft_per_bucket_ms": {}, "profiles": {}}
    lines: list[str] = []
    try:
        for bucket in buckets:
            prompt = ids(bucket)
            for _ in range(3):
                system.ttft(prompt)
            report["ttft_per_bucket_ms"][bucket] = statistics.median(system.ttft(prompt) * 1e3 for _ in range(20))
        prompt = ids(10)
        system.decode(prompt, 8)
        report["decode_interval_ms"] = statistics.median(system.decode(prompt, 128)) * 1e3
        for n in PROFILED_PREFILLS:
            prompt = ids(n)
            report["profiles"][f"prefill:{n}"] = _profiled(f"hybrid prefill, {n} tokens (Engine.generate of 1 token)",
                                                           lambda: system.ttft(prompt), lines)
        prompt = ids(10)
        report["profiles"][f"decode:{PROFILED_DECODE_TOKENS}"] = _profiled(
            f"hybrid decode, 10-token prompt then {PROFILED_DECODE_TOKENS} tokens (one prefill included)",
            lambda: system.decode(prompt, PROFILED_DECODE_TOKENS - 1), lines)
        report["graph_stats"] = system.graph_stats()
    finally:
        system.close()
    with open(out_path, "w") as f:
        f.write("\n".join(lines))
    return report
