"""Timing helpers, summary statistics, environment facts and the hardware floors (BENCH_PROTOCOL.md)."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (10, 50, 100, 150, 200, 250, 300, 350, 400, 500)


def now() -> float:
    return time.perf_counter()


def summary(samples_s: list[float]) -> dict:
    """Median, mean, p99 and count, in milliseconds."""
    if not samples_s:
        return {"n": 0}
    ms = sorted(s * 1e3 for s in samples_s)
    p99 = ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))]
    return {"n": len(ms), "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms), "p99_ms": p99,
            "min_ms": ms[0], "max_ms": ms[-1]}


def git_commit() -> str:
    if os.environ.get("HJCG_COMMIT"):
        return os.environ["HJCG_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    import transformers

    env = {"commit": git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu"
    return env


def cuda_time(fn, warmup: int = 3, repeat: int = 20) -> float:
    """Median seconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def floors() -> dict:
    """Device-to-device copy rate (bytes read + written) and the 8192^3 fp16 matmul rate."""
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src))
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    mm_s = cuda_time(lambda: a @ b)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": 2 * n / copy_s, "matmul_flops_per_s": 2 * 8192**3 / mm_s}


def model_floors(hf_model, rates: dict) -> dict:
    """Decode floor: bytes of weights read per step (all but the embedding table) / copy rate.
    Prefill floor at length L: max(decode floor, 2 * parameters * L / matmul rate)."""
    params = sum(p.numel() for p in hf_model.parameters())
    embed = hf_model.get_input_embeddings().weight
    tied = hf_model.get_output_embeddings().weight is embed
    read = sum(p.numel() * p.element_size() for p in hf_model.parameters()) - (0 if tied else embed.numel() * embed.element_size())
    decode_s = read / rates["copy_bytes_per_s"]
    prefill = {L: max(decode_s, 2 * params * L / rates["matmul_flops_per_s"]) * 1e3 for L in PROMPT_LENGTHS}
    return {"parameters": params, "weight_bytes_read_per_step": read, "decode_floor_ms": decode_s * 1e3,
            "prefill_floor_ms": prefill}
