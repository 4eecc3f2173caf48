"""Lab (GPU machine): the decode GEMVs for B = 1, 2, 4, 8, 16 rows (streams) against torch matmul (cuBLAS), over the
Llama-2-7B decode step's weight chain in fp16, timed inside one CUDA graph as the product runs it. Per layer:
qkv 12288 x 4096 (norm fused), o 4096 x 4096 (residual, in place), gate_up 22016 x 4096 (norm fused), down
4096 x 11008 (silu_mul of gate_up, residual, in place); 32 layers, each with its own weights (13.2 GB in all,
so every matrix streams from HBM); then the lm head 32000 x 4096 (norm fused). The torch chain runs the same
GEMMs only (mm, addmm_ in place for the residual; no norm, no activation kernel), which flatters it slightly.
The GEMVs: hjcg_gemv (CUDA cores, up to 8 rows) and hjcg_mma (tensor cores, up to 16).
TB/s = weight bytes / time. Also each shape alone (its 32 layers' matrices, the lm head 8 times), the
device copy rate for reference, and whether the chain's logits for stream 0 are bit-identical at every B.

    python -m bench.lab.gemv_rows OUT_DIR   (writes OUT_DIR/gemv_rows.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import cuda_time, environment, floors
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

HIDDEN, FFN, QKV, VOCAB, LAYERS = 4096, 11008, 12288, 32000, 32
ROWS = (1, 2, 4, 8, 16)
GEMVS = {"hjcg_gemv": (_ops.gemv, 8), "hjcg_mma": (_ops.gemv_mma, 16)}  # the op and the most rows it takes
EPS = 1e-5
DTYPE = torch.float16
SHAPES = {"qkv": (QKV, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * FFN, HIDDEN), "down": (HIDDEN, FFN)}
LM_HEAD_CALLS = 8


class Weights:
    """Every matrix a contiguous slice of one buffer, uniform in [-0.02, 0.02] (as bench/lab/gemv_chain.cu)."""

    def __init__(self) -> None:
        sizes = [n * k for _ in range(LAYERS) for n, k in SHAPES.values()] + [VOCAB * HIDDEN]
        self.flat = torch.empty(sum(sizes), device="cuda", dtype=DTYPE).uniform_(-0.02, 0.02)
        views, offset = [], 0
        for size in sizes:
            views.append(self.flat[offset:offset + size])
            offset += size
        self.layers = []
        for layer in range(LAYERS):
            chunk = views[layer * len(SHAPES):(layer + 1) * len(SHAPES)]
            self.layers.append({name: v.view(n, k) for (name, (n, k)), v in zip(SHAPES.items(), chunk)})
        self.lm_head = views[-1].view(VOCAB, HIDDEN)
        self.bytes = self.flat.numel() * self.flat.element_size()


class Buffers:
    """The chain's static tensors for `rows` streams, the inputs the first `rows` rows of `inputs` (so stream 0
    sees the same step at every B). x0 is copied into x at the start of each replay (the residual adds work
    in place), so every replay computes the same step."""

    def __init__(self, rows: int, inputs: dict[str, torch.Tensor]) -> None:
        self.x0 = inputs["x"][:rows].clone()
        self.x = self.x0.clone()
        self.attn = inputs["attn"][:rows].clone()  # stands in for the attention output, the o projection's input
        self.act = inputs["act"][:rows].clone()  # the torch chain's down input (silu(gate) * up not computed)
        self.qkv, self.gate_up, self.logits = (torch.empty(rows, n, device="cuda", dtype=DTYPE)
                                               for n in (QKV, 2 * FFN, VOCAB))


def gemv_chain(w: Weights, b: Buffers, gemv=_ops.gemv) -> None:
    b.x.copy_(b.x0)
    for layer in w.layers:
        gemv(b.x, layer["qkv"], EPS, False, None, b.qkv)
        gemv(b.attn, layer["o"], -1.0, False, b.x, b.x)
        gemv(b.x, layer["gate_up"], EPS, False, None, b.gate_up)
        gemv(b.gate_up, layer["down"], -1.0, True, b.x, b.x)
    gemv(b.x, w.lm_head, EPS, False, None, b.logits)


def torch_chain(w: Weights, b: Buffers) -> None:
    b.x.copy_(b.x0)
    for layer in w.layers:
        torch.mm(b.x, layer["qkv"].t(), out=b.qkv)
        b.x.addmm_(b.attn, layer["o"].t())
        torch.mm(b.x, layer["gate_up"].t(), out=b.gate_up)
        b.x.addmm_(b.act, layer["down"].t())
    torch.mm(b.x, w.lm_head.t(), out=b.logits)


def one_shape(impl: str, shape: str, w: Weights, b: Buffers):
    """A function running `shape`'s calls alone (the 32 layers' matrices, or the lm head 8 times)."""
    if shape == "lm_head":
        mats, inp, out, kind = [w.lm_head] * LM_HEAD_CALLS, b.x, b.logits, "norm"
    else:
        mats = [layer[shape] for layer in w.layers]
        inp, out, kind = {"qkv": (b.x, b.qkv, "norm"), "o": (b.attn, b.x, "residual"),
                          "gate_up": (b.x, b.gate_up, "norm"), "down": (b.gate_up, b.x, "silu")}[shape]

    def run() -> None:
        for m in mats:
            if impl == "torch":
                if kind == "residual":
                    out.addmm_(inp, m.t())
                elif kind == "silu":
                    out.addmm_(b.act, m.t())
                else:
                    torch.mm(inp, m.t(), out=out)
            elif kind == "norm":
                GEMVS[impl][0](inp, m, EPS, False, None, out)
            else:
                GEMVS[impl][0](inp, m, -1.0, kind == "silu", out, out)
    return run, sum(m.numel() * m.element_size() for m in mats), len(mats)


def graph_of(fn) -> torch.cuda.CUDAGraph:
    for _ in range(3):  # warm-up outside the capture (cuBLAS handles and workspaces)
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph


def replay_s(graph: torch.cuda.CUDAGraph, repeat: int = 30) -> float:
    return cuda_time(graph.replay, warmup=5, repeat=repeat)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rates = floors()
    result = {"environment": environment(), "dtype": str(DTYPE).removeprefix("torch."), "eps": EPS,
              "copy_tb_s": rates["copy_bytes_per_s"] / 1e12, "chain": [], "shapes": [], "chain_logits_row0": {}}
    with torch.inference_mode():
        w = Weights()
        result["weight_bytes"] = w.bytes
        inputs = {name: torch.randn(max(ROWS), n, device="cuda", dtype=DTYPE)
                  for name, n in (("x", HIDDEN), ("attn", HIDDEN), ("act", FFN))}
        logits0 = {impl: {} for impl in GEMVS}
        for rows in ROWS:
            b = Buffers(rows, inputs)
            gemvs = [impl for impl, (_, most) in GEMVS.items() if rows <= most]
            chains = [(impl, lambda impl=impl: gemv_chain(w, b, GEMVS[impl][0])) for impl in gemvs]
            for impl, chain in (*chains, ("torch_mm", lambda: torch_chain(w, b))):
                graph = graph_of(chain)
                if impl in GEMVS:
                    logits0[impl][rows] = b.logits[0].clone()  # after one replay (graph_of replays once)
                s = replay_s(graph)
                result["chain"].append({"impl": impl, "rows": rows, "ms": s * 1e3, "tb_s": w.bytes / s / 1e12})
                print(f"chain  rows {rows}  {impl:9s}  {s * 1e3:7.3f} ms  {w.bytes / s / 1e12:5.2f} TB/s", flush=True)
                del graph
            for shape in (*SHAPES, "lm_head"):
                for impl in (*gemvs, "torch"):
                    run, nbytes, calls = one_shape(impl, shape, w, b)
                    graph = graph_of(run)
                    s = replay_s(graph)
                    result["shapes"].append({"impl": impl if impl in GEMVS else "torch_mm", "rows": rows,
                                             "shape": shape, "us_per_call": s * 1e6 / calls,
                                             "tb_s": nbytes / s / 1e12})
                    del graph
        # stream 0 has the same input at every B: its logits must not depend on the batch
        same = {impl: {rows: bool(torch.equal(per_rows[rows], per_rows[1])) for rows in per_rows}
                for impl, per_rows in logits0.items()}
        result["chain_logits_row0"] = {"bit_identical_to_rows_1": same,
                                       "finite": bool(torch.isfinite(logits0["hjcg_gemv"][1]).all())}
    (out / "gemv_rows.json").write_text(json.dumps(result, indent=1))
    print_tables(result)


def print_tables(result: dict) -> None:
    chain = {(r["impl"], r["rows"]): r for r in result["chain"]}
    print(f"\nLlama-2-7B decode GEMV chain, {result['weight_bytes'] / 1e9:.2f} GB of {result['dtype']} weights; "
          f"device copy rate {result['copy_tb_s']:.2f} TB/s")
    impls = list(dict.fromkeys(r["impl"] for r in result["chain"]))
    print(f"{'rows':>4} | " + " | ".join(f"{impl + ' ms':>13} {'TB/s':>5}" for impl in impls))
    for rows in ROWS:
        cells = [chain.get((impl, rows)) for impl in impls]
        print(f"{rows:>4} | " + " | ".join(f"{c['ms']:13.3f} {c['tb_s']:5.2f}" if c else f"{'-':>13} {'':5}"
                                          for c in cells))
    print(f"(1-row hjcg_gemv chain: {chain[('hjcg_gemv', 1)]['ms']:.3f} ms)")
    print("\nEach shape alone (TB/s, by impl):")
    shapes = list(dict.fromkeys(r["shape"] for r in result["shapes"]))
    print(f"{'rows':>4} | " + " | ".join(f"{s:>13}" for s in shapes))
    cell = {(r["impl"], r["rows"], r["shape"]): r["tb_s"] for r in result["shapes"]}
    for rows in ROWS:
        for impl in impls:
            if (impl, rows, shapes[0]) in cell:
                print(f"{rows:>4} {impl:>9} | " + " | ".join(f"{cell[(impl, rows, s)]:13.2f}" for s in shapes))
    print(f"\nstream 0's logits bit-identical to the 1-row chain: {result['chain_logits_row0']}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
