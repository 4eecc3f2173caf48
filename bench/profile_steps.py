"""Where the time goes: per-kernel CUDA time of one hybrid prefill (16 and 512 tokens) and one decode
step, run eagerly under torch.profiler, and each graph's replay time alone (CUDA events)."""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import cuda_time
from bench.systems import HjcgSystem


def run(loaded, out_path) -> dict:
    system = HjcgSystem(loaded, "hybrid", max_context=1024)
    runner = system.runner
    report: dict = {"graph_replay_ms": {}}
    lines = []
    with torch.inference_mode():
        for bucket in runner.buckets:
            key = runner.prefill_key(bucket, True)
            report["graph_replay_ms"][f"prefill:{bucket}"] = cuda_time(lambda: runner.graphs.replay(key)) * 1e3
        report["graph_replay_ms"]["decode"] = cuda_time(lambda: runner.graphs.replay("decode:1:1")) * 1e3
        for bucket in (16, 512):
            fn = runner._prefill_fn(bucket, True)
            fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
            lines.append(f"=== eager hybrid prefill, bucket {bucket} ===")
            lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
        runner._decode_step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner._decode_step()
            torch.cuda.synchronize()
        lines.append("=== eager hybrid decode step ===")
        lines.append(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    system.close()
    with open(out_path, "w") as f:
        f.write("\n".join(lines))
    return report
