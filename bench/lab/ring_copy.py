"""Lab (GPU machine): the tensor-core GEMV's ring copied by fragments (each lane its own 16 bytes of 8 rows x 64
bytes per instruction: half lines) or by whole rows (csrc/gemv_mma_cuda.cu, RowLines: 4 rows x 128 bytes per
instruction at 2 chunks per batch), over the Llama-2-7B decode chain (bench/lab/gemv_rows.py) with fp16 weights
(gemv_mma) and e4m3 weights (gemv_fp8), at 1, 4, 8 and 16 rows; beside them the CUDA-core GEMV (up to 8 rows) and
cuBLAS. The copy order moves bytes only: stream 0's logits must be bit-identical whichever order copies them
(at one depth: the depth sets which chunks each warp sums).

    python -m bench.lab.ring_copy OUT_DIR   (writes OUT_DIR/ring_copy.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import environment, floors
from bench.lab.fp8_gemv import Fp8Weights, fp8_chain, replay_s
from bench.lab.gemv_rows import FFN, HIDDEN, Buffers, Weights, gemv_chain, graph_of, torch_chain
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

ROWS = (1, 4, 8, 16)
# name -> (split, depth, stages, tiles, copy_order); 0 = the default
LAUNCHES = {"fragments": (0, 0, 0, 0, 1), "rows": (0, 0, 0, 0, 2), "rows_depth4": (0, 4, 0, 1, 2)}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    result = {"environment": environment(), "copy_tb_s": floors()["copy_bytes_per_s"] / 1e12, "chain": [],
              "row0_bit_identical": {}}
    with torch.inference_mode():
        w16 = Weights()
        w8 = Fp8Weights(w16)
        inputs = {name: torch.randn(max(ROWS), n, device="cuda", dtype=torch.float16)
                  for name, n in (("x", HIDDEN), ("attn", HIDDEN), ("act", FFN))}
        for rows in ROWS:
            b = Buffers(rows, inputs)
            runs = {"torch_mm": (lambda: torch_chain(w16, b), w16.bytes)}
            if rows <= 8:
                runs["hjcg_gemv"] = (lambda: gemv_chain(w16, b), w16.bytes)
            for name, launch in LAUNCHES.items():
                runs[f"fp16_mma_{name}"] = (
                    lambda launch=launch: gemv_chain(w16, b, lambda *a: _ops.gemv_mma(*a, *launch)), w16.bytes)
                runs[f"fp8_{name}"] = (lambda launch=launch: fp8_chain(w8, b, launch), w8.bytes)
            logits0 = {}
            for impl, (fn, nbytes) in runs.items():
                graph = graph_of(fn)
                logits0[impl] = b.logits[0].clone()
                s = replay_s(graph)
                del graph
                result["chain"].append({"impl": impl, "rows": rows, "ms": s * 1e3, "tb_s": nbytes / s / 1e12})
                print(f"rows {rows:2d}  {impl:22s} {s * 1e3:7.3f} ms  {nbytes / s / 1e12:5.2f} TB/s", flush=True)
            for fmt in ("fp16_mma", "fp8"):
                ref = logits0[f"{fmt}_fragments"]
                result["row0_bit_identical"][f"{fmt}_{rows}"] = torch.equal(logits0[f"{fmt}_rows"], ref)
    (out / "ring_copy.json").write_text(json.dumps(result, indent=1))
    print("stream 0's logits bit-identical across copy orders:", result["row0_bit_identical"])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
