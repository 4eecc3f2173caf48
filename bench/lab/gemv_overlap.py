"""Lab (GPU machine): can the decode GEMV chain overlap its kernels' fixed costs with streaming?

The fp8 GEMV chain at Llama-2-7B shapes streams 2.27 TB/s against the device's 2.98 copy rate, the fp16 one 2.81
(bench/results/2026-11-23-h100-fp8-ring-lab). Two questions:

1. hot: is a GEMV faster when its weights are already in L2? Each case (a shape that fits in L2) runs one matrix 32
   times in a CUDA graph (hot after the first) and 32 distinct matrices (cold, from HBM). If the fp8 kernel runs
   no faster hot, it is bound by its own instructions and no prefetch can help it.
2. prefetch (measured once, then removed with its op; bench/results/2026-11-24-h100-pdl-lab/ keeps the op and the
   figures): each GEMV of the chain with a prefetch of the next matrix's first bytes into L2 on a side stream.
3. pdl: the fp8 chain (and the tensor-core GEMV over fp16 weights) with every GEMV launched with programmatic
   dependent launch: each kernel's blocks request their first weight batches, let the next kernel launch, and
   only then wait for the kernel before (gemv_mma_cuda.cu), so one kernel's launch, ramp and tail overlap the
   next one's weight reads. By stages (weight batches in flight per warp, all requested before the wait).

    python -m bench.lab.gemv_overlap OUT_DIR [SECTIONS]   (writes OUT_DIR/gemv_overlap.json; SECTIONS: a comma list
                                                          of hot, pdl; both by default)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import cuda_time, environment, floors
from bench.lab.fp8_gemv import Fp8Weights, fp8_chain
from bench.lab.gemv_rows import EPS, HIDDEN, FFN, Buffers, Weights, gemv_chain, graph_of
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)
from hjcg.fp8 import quantize_weight

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

# (name, N, K, kind): kinds as the chain calls them; every case <= 17 MB in fp8 (the fp16 ones <= 34 MB)
HOT_CASES = [("o", HIDDEN, HIDDEN, "residual"), ("norm_4096", HIDDEN, HIDDEN, "norm"), ("down_1536", 1536, FFN, "silu"),
             ("norm_2048_fp16", 2048, HIDDEN, "norm")]


def gemv_call(kind: str, w, x: torch.Tensor, act: torch.Tensor, out: torch.Tensor) -> None:
    """One GEMV as the chain makes it; w an Fp8Weight or an fp16 matrix."""
    rms_eps = EPS if kind == "norm" else -1.0
    inp = act if kind == "silu" else x
    residual = out if kind in ("residual", "silu") else None
    if isinstance(w, torch.Tensor):
        _ops.gemv(inp, w, rms_eps, kind == "silu", residual, out)
    else:
        _ops.gemv_fp8(inp, w.q, w.scale, rms_eps, kind == "silu", residual, out)


def hot(result: dict) -> None:
    for name, n, k, kind in HOT_CASES:
        for fmt in ("fp8", "fp16"):
            if fmt == "fp8" and name.endswith("fp16"):
                continue
            mats16 = [torch.empty(n, k, device="cuda", dtype=torch.float16).uniform_(-0.02, 0.02) for _ in range(32)]
            mats = mats16 if fmt == "fp16" else [quantize_weight(m) for m in mats16]
            nbytes = mats16[0].numel() * (2 if fmt == "fp16" else 1)
            x = torch.randn(1, k, device="cuda", dtype=torch.float16)
            act = torch.randn(1, 2 * k, device="cuda", dtype=torch.float16)
            out = torch.zeros(1, n, device="cuda", dtype=torch.float16)
            for temp, chosen in (("cold", mats), ("hot", [mats[0]] * 32)):
                graph = graph_of(lambda: [gemv_call(kind, m, x, act, out) for m in chosen])
                s = cuda_time(graph.replay, warmup=5, repeat=30) / 32
                row = {"case": name, "format": fmt, "temperature": temp, "us": s * 1e6, "tb_s": nbytes / s / 1e12,
                       "bytes": nbytes}
                result["hot"].append(row)
                print(f"hot   {name:15s} {fmt:4s} {temp:4s} {s * 1e6:7.2f} us  {nbytes / s / 1e12:5.2f} TB/s", flush=True)
            del mats, mats16


PDL_STAGES = (2, 3, 4, 6)


def pdl(result: dict, w16: Weights, w8: Fp8Weights, b: Buffers) -> None:
    for fmt, w in (("fp8", w8), ("fp16_mma", w16)):
        ref = None
        for stages in PDL_STAGES:
            for on in (False, True):
                launch = (0, 0, stages, 0, 0, on)  # split, depth, stages, tiles, copy_order, pdl
                if fmt == "fp8":
                    graph = graph_of(lambda: fp8_chain(w, b, launch))
                else:
                    graph = graph_of(lambda: gemv_chain(w, b, lambda *a: _ops.gemv_mma(*a, *launch)))
                logits = b.logits.clone()
                ref = logits if ref is None else ref
                s = cuda_time(graph.replay, warmup=5, repeat=30)
                row = {"format": fmt, "stages": stages, "pdl": on, "ms": s * 1e3, "tb_s": w.bytes / s / 1e12,
                       "same_logits": bool(torch.equal(logits, ref))}
                result["pdl"].append(row)
                print(f"pdl {fmt:15s} stages {stages} pdl {int(on)}  {s * 1e3:7.3f} ms  {w.bytes / s / 1e12:5.2f} TB/s  "
                      f"same logits {row['same_logits']}", flush=True)


SECTIONS = ("hot", "pdl")


def main(out: Path, sections: tuple[str, ...] = SECTIONS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    result = {"environment": environment(), "copy_tb_s": floors()["copy_bytes_per_s"] / 1e12,
              **{section: [] for section in SECTIONS}}
    with torch.inference_mode():
        if "hot" in sections:
            hot(result)
        if "pdl" in sections:
            w16 = Weights()
            w8 = Fp8Weights(w16)
            inputs = {name: torch.randn(1, n, device="cuda", dtype=torch.float16)
                      for name, n in (("x", HIDDEN), ("attn", HIDDEN), ("act", FFN))}
            pdl(result, w16, w8, Buffers(1, inputs))
    (out / "gemv_overlap.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else SECTIONS)
