"""Lab (GPU machine): fp8 (e4m3) weights at Llama-2-7B shapes, fp16 activations.

1. The decode step's GEMV chain in one CUDA graph, as the product runs it (bench/lab/gemv_rows.py's chain):
   per layer qkv 12288 x 4096 (norm fused), o 4096 x 4096 (residual in place), gate_up 22016 x 4096 (norm
   fused), down 4096 x 11008 (silu_mul of gate_up, residual in place); 32 layers, each with its own weights;
   then the lm head 32000 x 4096 (norm fused), fp8 too. hjcg's fp8 GEMV (csrc/gemv_mma_cuda.cu) at 1, 2, 4, 8
   and 16 rows, for each warps-per-block split; TB/s = weight bytes (e4m3 values and their float32 scales) / time,
   against the device copy rate. Beside it the fp16 chain (the fp16 GEMV, 1..8 rows) over the same weights
   before quantization, each shape alone, and whether stream 0's logits are bit-identical at every row count.
2. The prompt's products, 32 layers of the four matrices in one graph, as FusedCudaOps runs them (o and down
   adding into the residual stream in place) at 10 .. 512 tokens: fp16 weights through cuBLAS (today's
   path); fp8 through torch._scaled_mm after the per-token quantization kernel (with and without fast
   accumulation); fp8 dequantized to fp16, then cuBLAS; and the fp8 GEMV where the rows fit.

    python -m bench.lab.fp8_gemv OUT_DIR [SECTIONS]   (writes OUT_DIR/fp8_gemv.json; SECTIONS: a comma list of
                                                      chain, prompt, accuracy; all three by default)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from bench.common import cuda_time, environment, floors
from bench.lab.gemv_rows import EPS, FFN, HIDDEN, LM_HEAD_CALLS, SHAPES, Buffers, Weights, gemv_chain, graph_of
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)
from hjcg.fp8 import Fp8Weight, quantize_weight
from hjcg.fused_ops import FP8_GEMV_MAX_ROWS, FusedCudaOps

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

ROWS = (1, 2, 4, 8, 10, 16)
FP16_ROWS = (1, 2, 4, 8)  # the fp16 GEMV's limit
# the kernel's launch shapes swept, (warps per block, chunks per warp and batch, batches in flight: 1 in registers,
# more through the cp.async ring, tiles of 8 weight rows per block); (0, 0, 0, 0): its defaults
SHAPES_SWEPT = [(0, 0, 0, 0), (8, 2, 1, 1), (8, 2, 2, 1), (8, 2, 2, 2), (8, 1, 2, 2), (8, 1, 4, 2), (8, 2, 3, 2),
                (4, 2, 2, 2), (4, 2, 4, 2), (8, 4, 2, 1)]
SWEEP_ROWS = (1, 8, 10, 16)
SHAPE_ROWS = (1, 8, 16)
PROMPT_TOKENS = (10, 16, 48, 100, 128, 500, 512)  # 48 and 512: the smallest and largest prefill buckets
PROMPT_OPTIONS = ("fp16_cublas", "fp8_scaled_mm", "fp8_scaled_mm_fast", "fp8_dequant", "fp8_gemv")


class Fp8Weights:
    """Weights' matrices, each quantized (hjcg.fp8.quantize_weight)."""

    def __init__(self, w: Weights) -> None:
        self.layers = [{name: quantize_weight(m) for name, m in layer.items()} for layer in w.layers]
        self.lm_head = quantize_weight(w.lm_head)
        self.bytes = sum(m.nbytes for layer in self.layers for m in layer.values()) + self.lm_head.nbytes


# matrix -> the chain's call for it: (input buffer, output buffer, rms_eps, silu_mul, adds into out)
CALLS = {"qkv": ("x", "qkv", EPS, False, False), "o": ("attn", "x", -1.0, False, True),
         "gate_up": ("x", "gate_up", EPS, False, False), "down": ("gate_up", "x", -1.0, True, True),
         "lm_head": ("x", "logits", EPS, False, False)}


def call(shape: str, w: Fp8Weight, b: Buffers, launch: tuple = (0, 0, 0, 0)) -> None:
    """`launch`: gemv_fp8's trailing arguments (split, depth, stages, tiles[, copy_order, pdl])."""
    inp, out, rms_eps, silu_mul, residual = CALLS[shape]
    dst = getattr(b, out)
    _ops.gemv_fp8(getattr(b, inp), w.q, w.scale, rms_eps, silu_mul, dst if residual else None, dst, *launch)


def fp8_chain(w: Fp8Weights, b: Buffers, launch: tuple) -> None:
    b.x.copy_(b.x0)
    for layer in w.layers:
        for shape in SHAPES:
            call(shape, layer[shape], b, launch)
    call("lm_head", w.lm_head, b, launch)


def fp8_shape(shape: str, w: Fp8Weights, b: Buffers) -> tuple[Callable[[], None], int, int]:
    """`shape`'s calls alone (its 32 layers' matrices, or the lm head LM_HEAD_CALLS times)."""
    mats = [w.lm_head] * LM_HEAD_CALLS if shape == "lm_head" else [layer[shape] for layer in w.layers]

    def run() -> None:
        for m in mats:
            call(shape, m, b)
    return run, sum(m.nbytes for m in mats), len(mats)


def replay_s(graph: torch.cuda.CUDAGraph) -> float:
    return cuda_time(graph.replay, warmup=5, repeat=30)


def decode_chains(w16: Weights, w8: Fp8Weights, inputs: dict[str, torch.Tensor], result: dict) -> None:
    logits0 = {}
    for rows in ROWS:
        b = Buffers(rows, inputs)
        for launch in SHAPES_SWEPT if rows in SWEEP_ROWS else SHAPES_SWEPT[:1]:
            try:
                graph = graph_of(lambda: fp8_chain(w8, b, launch))
            except RuntimeError as e:  # a ring that does not fit in shared memory at this row count
                result["chain"].append({"impl": "fp8_gemv", "launch": launch, "rows": rows,
                                        "error": str(e).splitlines()[0]})
                print(f"chain  rows {rows:2d}  fp8 {launch}  {str(e).splitlines()[0]}", flush=True)
                continue
            if launch == SHAPES_SWEPT[0]:
                logits0[rows] = b.logits[0].clone()  # after one replay (graph_of replays once)
            s = replay_s(graph)
            result["chain"].append({"impl": "fp8_gemv", "launch": launch, "rows": rows, "ms": s * 1e3,
                                    "tb_s": w8.bytes / s / 1e12})
            print(f"chain  rows {rows:2d}  fp8 (split, depth, stages, tiles) {launch}  {s * 1e3:7.3f} ms  "
                  f"{w8.bytes / s / 1e12:5.2f} TB/s", flush=True)
            del graph
        if rows in FP16_ROWS:
            graph = graph_of(lambda: gemv_chain(w16, b))
            s = replay_s(graph)
            result["chain"].append({"impl": "fp16_gemv", "launch": (0, 0, 0, 0), "rows": rows, "ms": s * 1e3,
                                    "tb_s": w16.bytes / s / 1e12})
            print(f"chain  rows {rows:2d}  fp16 gemv     {s * 1e3:7.3f} ms  {w16.bytes / s / 1e12:5.2f} TB/s", flush=True)
            del graph
        if rows in SHAPE_ROWS:
            for shape in (*SHAPES, "lm_head"):
                run, nbytes, calls = fp8_shape(shape, w8, b)
                graph = graph_of(run)
                s = replay_s(graph)
                result["shapes"].append({"rows": rows, "shape": shape, "us_per_call": s * 1e6 / calls,
                                         "tb_s": nbytes / s / 1e12})
                del graph
    same = {rows: bool(torch.equal(logits0[rows], logits0[1])) for rows in ROWS}
    result["chain_logits_row0"] = {"bit_identical_to_rows_1": same, "finite": bool(torch.isfinite(logits0[1]).all())}


def prompt_chain(option: str, tokens: int, w16: Weights, w8: Fp8Weights) -> Callable[[], None] | None:
    """The 32 layers' four products for `tokens` rows as FusedCudaOps runs them with `option`'s weights and path;
    None where the option does not apply."""
    if option == "fp8_gemv" and tokens > FP8_GEMV_MAX_ROWS or option == "fp8_dequant" and tokens not in (10, 100, 500):
        return None  # the GEMV takes no more rows; the dequantizing path, 60 ms, is timed at three lengths
    fp8_gemm = {"fp8_scaled_mm": "scaled_mm", "fp8_scaled_mm_fast": "scaled_mm_fast"}.get(option, "dequant")
    ops = FusedCudaOps(gemv_max_rows=0, fp8_gemv_max_rows=FP8_GEMV_MAX_ROWS if option == "fp8_gemv" else 0,
                       fp8_gemm=fp8_gemm)
    layers = w16.layers if option == "fp16_cublas" else w8.layers
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=torch.float16)
    act = torch.randn(tokens, FFN, device="cuda", dtype=torch.float16)
    residual = torch.zeros(tokens, HIDDEN, device="cuda", dtype=torch.float16)

    def run() -> None:
        for layer in layers:
            ops.linear(x, layer["qkv"])
            ops.residual_linear(residual, x, layer["o"])
            ops.linear(x, layer["gate_up"])
            ops.residual_linear(residual, act, layer["down"])
    return run


def prompt_accuracy(w8: Fp8Weights, result: dict) -> None:
    """Each GEMM option's largest per-row error, relative to the row's norm, against its float32 reference
    (hjcg.fp8.linear_reference: per-token e4m3 inputs for scaled_mm), on layer 0's qkv and down."""
    from hjcg.fp8 import linear_reference

    for tokens in (17, 100, 500):
        for name, k in (("qkv", HIDDEN), ("down", FFN)):
            w = w8.layers[0][name]
            x = torch.randn(tokens, k, device="cuda", dtype=torch.float16)
            for fp8_gemm in ("scaled_mm", "scaled_mm_fast", "dequant"):
                got = FusedCudaOps(fp8_gemm=fp8_gemm).linear(x, w).double()
                ref = linear_reference(x.float(), w, fp8_gemm != "dequant").double()
                rel = ((got - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
                result["prompt_accuracy"].append({"tokens": tokens, "matrix": name, "fp8_gemm": fp8_gemm,
                                                  "max_row_rel_err": rel})
                print(f"accuracy {tokens:4d} {name:8s} {fp8_gemm:15s} {rel:.2e}", flush=True)


def prompt_products(w16: Weights, w8: Fp8Weights, result: dict) -> None:
    for tokens in PROMPT_TOKENS:
        for option in PROMPT_OPTIONS:
            run = prompt_chain(option, tokens, w16, w8)
            if run is None:
                continue
            row = {"tokens": tokens, "option": option}
            try:
                graph = graph_of(run)
                row["ms"] = replay_s(graph) * 1e3
                del graph
            except RuntimeError as e:  # e.g. a _scaled_mm configuration torch does not take
                row["error"] = str(e).splitlines()[0]
            result["prompt"].append(row)
            print(f"prompt {tokens:4d}  {option:20s} {row.get('ms', float('nan')):8.3f} ms {row.get('error', '')}",
                  flush=True)
            torch.cuda.empty_cache()


SECTIONS = ("chain", "prompt", "accuracy")


def main(out: Path, sections: tuple[str, ...] = SECTIONS) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rates = floors()
    result = {"environment": environment(), "eps": EPS, "copy_tb_s": rates["copy_bytes_per_s"] / 1e12,
              "chain": [], "shapes": [], "prompt": [], "prompt_accuracy": []}
    with torch.inference_mode():
        w16 = Weights()
        w8 = Fp8Weights(w16)
        result["weight_bytes"] = {"fp16": w16.bytes, "fp8": w8.bytes}
        inputs = {name: torch.randn(max(ROWS), n, device="cuda", dtype=torch.float16)
                  for name, n in (("x", HIDDEN), ("attn", HIDDEN), ("act", FFN))}
        runs = {"chain": lambda: decode_chains(w16, w8, inputs, result),
                "prompt": lambda: prompt_products(w16, w8, result), "accuracy": lambda: prompt_accuracy(w8, result)}
        for name in sections:
            runs[name]()
            (out / "fp8_gemv.json").write_text(json.dumps(result, indent=1))  # what is done so far
    print_tables(result)


def print_tables(result: dict) -> None:
    chain = {(r["impl"], tuple(r["launch"]), r["rows"]): r for r in result["chain"]}
    wb = result["weight_bytes"]
    print(f"\nLlama-2-7B decode GEMV chain: fp8 {wb['fp8'] / 1e9:.2f} GB, fp16 {wb['fp16'] / 1e9:.2f} GB; "
          f"device copy rate {result['copy_tb_s']:.2f} TB/s")
    print(f"{'rows':>4} | {'fp8 default':>16} | {'fp8 best (split, depth, stages, tiles)':>31} | {'fp16 GEMV':>16}")
    for rows in ROWS:
        default = chain[("fp8_gemv", SHAPES_SWEPT[0], rows)]
        best = min((r for r in result["chain"] if r["impl"] == "fp8_gemv" and r["rows"] == rows and "ms" in r),
                   key=lambda r: r["ms"])
        f16 = chain.get(("fp16_gemv", (0, 0, 0, 0), rows))
        print(f"{rows:>4} | {default['ms']:7.3f} ms {default['tb_s']:4.2f} | {best['ms']:7.3f} ms {best['tb_s']:4.2f} "
              f"{str(tuple(best['launch'])):>14} | " + (f"{f16['ms']:7.3f} ms {f16['tb_s']:4.2f}" if f16 else "-"))
    print("\nfp8 chain ms by (split, depth, stages, tiles), rows " + ", ".join(map(str, SWEEP_ROWS)) + ":")
    for launch in SHAPES_SWEPT[1:]:
        cells = (chain.get(("fp8_gemv", launch, rows), {}).get("ms") for rows in SWEEP_ROWS)
        print(f"  {str(launch):>12}: " + "  ".join("      -" if ms is None else f"{ms:7.3f}" for ms in cells))
    print("\nfp8 GEMV, each shape alone (TB/s):")
    shapes = list(dict.fromkeys(r["shape"] for r in result["shapes"]))
    cell = {(r["rows"], r["shape"]): r["tb_s"] for r in result["shapes"]}
    print(f"{'rows':>4} | " + " | ".join(f"{s:>8}" for s in shapes))
    for rows in SHAPE_ROWS:
        print(f"{rows:>4} | " + " | ".join(f"{cell[(rows, s)]:8.2f}" for s in shapes))
    print(f"\nstream 0's logits bit-identical to the 1-row chain: {result['chain_logits_row0']}")
    print("\nPrompt products, 32 layers x 4 matrices (ms):")
    prompt = {(r["tokens"], r["option"]): r for r in result["prompt"]}
    print(f"{'tokens':>6} | " + " | ".join(f"{o:>18}" for o in PROMPT_OPTIONS))
    for tokens in PROMPT_TOKENS:
        cells = []
        for o in PROMPT_OPTIONS:
            r = prompt.get((tokens, o))
            text = "-" if r is None else f"{r['ms']:.3f}" if "ms" in r else "error"
            cells.append(f"{text:>18}")
        print(f"{tokens:>6} | " + " | ".join(cells))


if __name__ == "__main__":
    main(Path(sys.argv[1]), tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else SECTIONS)
