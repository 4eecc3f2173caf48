"""Lab: the fp8 and fp16 decode GEMVs at one row under Nsight Compute, shape by shape (Llama-2-7B: qkv, o, gate_up,
down, lm head), to see why the fp8 kernel streams at 2.3 TB/s where the fp16 one reaches 2.8
(bench/results/2026-11-23-h100-fp8-ring-lab).

Each kernel runs once per shape after a warm-up of every call; run it under ncu, skipping the warm-up launches:

    ncu --clock-control none --kernel-name regex:gemv --launch-skip 10 --launch-count 10 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \\
        --section WarpStateStats --section SchedulerStats python -m bench.lab.fp8_ncu
"""
from __future__ import annotations

import torch

from bench.lab.fp8_gemv import CALLS, call
from bench.lab import gemv_rows
from bench.lab.gemv_rows import FFN, HIDDEN, VOCAB, Buffers
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)
from hjcg.fp8 import quantize_weight

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

SHAPES = {**gemv_rows.SHAPES, "lm_head": (VOCAB, HIDDEN)}  # (N, K) of the chain's matrices, the lm head last


def fp16_call(shape: str, w: torch.Tensor, b: Buffers) -> None:
    inp, out, rms_eps, silu_mul, residual = CALLS[shape]
    dst = getattr(b, out)
    _ops.gemv(getattr(b, inp), w, rms_eps, silu_mul, dst if residual else None, dst)


def main() -> None:
    torch.manual_seed(0)
    with torch.inference_mode():
        inputs = {name: torch.randn(1, n, device="cuda", dtype=torch.float16)
                  for name, n in (("x", HIDDEN), ("attn", HIDDEN), ("act", FFN))}
        b = Buffers(1, inputs)
        weights = {s: torch.empty(n, k, device="cuda", dtype=torch.float16).uniform_(-0.02, 0.02)
                   for s, (n, k) in SHAPES.items()}
        fp8 = {s: quantize_weight(w) for s, w in weights.items()}
        runs = [(lambda s=s: call(s, fp8[s], b)) for s in SHAPES] + [(lambda s=s: fp16_call(s, weights[s], b))
                                                                      for s in SHAPES]
        for run in runs:  # the warm-up: ncu skips these launches
            run()
        torch.cuda.synchronize()
        for run in runs:  # fp8: qkv, o, gate_up, down, lm head; then fp16 in the same order
            run()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
