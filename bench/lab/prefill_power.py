"""Lab (GPU machine): does a prefill graph's replay time depend on the tokens it runs, through the power
the tensor cores draw? Times bucket replays on all-pad input (what bench.bucket_sweep measures) and on
random tokens (what a TTFT series runs), logs SM clock and board power with nvidia-smi, and profiles the
432 bucket's kernels under sustained random-token load.

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

from bench.common import cuda_time, environment
from bench.systems import HjcgSystem
from hjcg import _C
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
    system = HjcgSystem(loaded, "hybrid", max_context=4608)
    runner = system.runner
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

    with torch.inference_mode():
        for bucket in BUCKETS:
            inp, key = runner._inputs(bucket), runner.prefill_key(bucket, True)
            replay = lambda: runner.graphs.replay(key)
            for label, ids in (("pad", torch.zeros(bucket, dtype=torch.int64)),
                               ("random", torch.randint(3, vocab, (bucket,), generator=gen))):
                _C.pad_prompt(ids.cuda(), 0, 0, inp.ids, inp.positions, inp.last_index, inp.seq_len)
                phase(f"replay {bucket} {label} x200", lambda: cuda_time(replay, warmup=20, repeat=200) * 1e3)
            n = {208: 200, 432: 400, 512: 500}[bucket]
            prompt = torch.randint(3, vocab, (n,), generator=gen).tolist()
            phase(f"ttft {n} (bucket {bucket}) x200",
                  lambda: sorted(system.ttft(prompt) for _ in range(200))[100] * 1e3)
        # kernels of the 432 bucket under sustained random-token load
        inp, key = runner._inputs(432), runner.prefill_key(432, True)
        _C.pad_prompt(torch.randint(3, vocab, (400,), generator=gen).cuda(), 0, 0, inp.ids, inp.positions,
                      inp.last_index, inp.seq_len)
        for _ in range(200):
            runner.graphs.replay(key)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                runner.graphs.replay(key)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70)
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
