"""Lab (GPU machine): does a prefill graph's time depend on the tokens it runs, through the power the
tensor cores draw? Times TTFT series (Engine.generate of one token) of prompts that fill a bucket exactly,
all pad tokens (id 0, what a bucket holds after warm-up) and random tokens (what a real prompt runs), logs
SM clock and board power with nvidia-smi, and profiles the 432 bucket's kernels under sustained
random-token load.

Through the engine's public API only: each figure is a TTFT, the bucket's graph replay plus the host work
around it, which is the same for pad and random prompts of one length, so the pad/random difference is
the graph's. (The first version of this lab, bench/results/2026-11-22-h100-prefill-lab/, timed the bare
replay with CUDA events.)

    python -m bench.lab.prefill_power OUT_DIR
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from bench.common import environment
from bench.systems import HjcgSystem
from hjcg.random_models import random_llama

BUCKETS = (208, 432, 512)


def smi_log(path: Path) -> subprocess.Popen:
    query = "timestamp,clocks.sm,power.draw,temperature.gpu"
    return subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "50"],
                            stdout=path.open("w"), stderr=subprocess.DEVNULL)


def smi_between(path: Path, start: float, end: float) -> dict:
    clocks, watts = [], []
    for line in path.read_text().splitlines():
        parts = [p.strip() for p in line.split(",")]
        try:
            t = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            if start <= t <= end:
                clocks.append(float(parts[1]))
                watts.append(float(parts[2]))
        except (ValueError, IndexError):
            continue
    if not clocks:
        return {}
    return {"sm_mhz": sum(clocks) / len(clocks), "min_sm_mhz": min(clocks), "watts": sum(watts) / len(watts),
            "samples": len(clocks)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "smi.csv"
    smi = smi_log(log_path)
    loaded = random_llama("llama2-7b", torch.float16, "cuda", seed=0)
    system = HjcgSystem(loaded, "hybrid", max_context=4608, max_batch=1)
    vocab = loaded.hf_model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    phases = []

    def phase(label: str, fn) -> float:
        time.sleep(1.0)  # the same idle start for every phase
        t0 = time.time()
        ms = fn()
        torch.cuda.synchronize()
        phases.append({"phase": label, "ms": ms, "t0": t0, "t1": time.time()})
        print(f"{label:40s} {ms:7.3f} ms", flush=True)
        return ms

    def median_ttft_ms(prompt: list[int], runs: int = 200) -> float:
        for _ in range(20):
            system.ttft(prompt)
        return sorted(system.ttft(prompt) for _ in range(runs))[runs // 2] * 1e3

    for bucket in BUCKETS:
        for label, ids in (("pad", [0] * bucket),
                           ("random", torch.randint(3, vocab, (bucket,), generator=gen).tolist())):
            phase(f"ttft {bucket} {label} x200", lambda: median_ttft_ms(ids))
        n = {208: 200, 432: 400, 512: 500}[bucket]
        prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
        phase(f"ttft {n} (bucket {bucket}) x200", lambda: median_ttft_ms(prompt))
    # kernels of the 432 bucket under sustained random-token load
    prompt = torch.randint(3, vocab, (400,), generator=gen).tolist()
    for _ in range(200):
        system.ttft(prompt)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            system.ttft(prompt)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=15, max_name_column_width=70)
    (out / "profile_432_random.txt").write_text(table)
    print(table)
    time.sleep(0.5)
    smi.terminate()
    for p in phases:
        p.update(smi_between(log_path, p["t0"], p["t1"]))
        print(p)
    (out / "prefill_power.json").write_text(json.dumps({"environment": environment(), "phases": phases}, indent=1))
    system.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
