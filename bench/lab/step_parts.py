"""Lab (GPU machine): what each part of an fp8 decode step costs inside the step's CUDA graph, one row, PDL on.

The Llama-2-7B fp8 GEMV chain of bench/lab/fp8_gemv.py (qkv with the norm, o with the residual, gate_up with the
norm, down with silu_mul and the residual; 32 layers; the lm head in fp16 as the engine keeps it), then the same
chain with one part taken out or put in, so the difference is that part's cost in place:
  base         the GEMVs as the engine runs them
  no_norm      qkv and gate_up without the fused norm (rms_eps -1)
  no_silu      down over a ready [1, 11008] activation instead of silu_mul of gate_up
  plain        both of the above
  rope         base plus rope_cache after each qkv (as FusedCudaOps.rope_and_cache)
  rope_attn    base plus rope_cache and the decode attention (64 positions) per layer: the engine's kernels
  attn         base plus the attention alone: what the step would cost with rope folded into another kernel
  fused        base plus rope_decode_attention per layer: rope, the newest K/V's store and the attention in one kernel

    python -m bench.lab.step_parts OUT_DIR   (writes OUT_DIR/step_parts.json)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from bench.common import environment
from bench.lab.fp8_gemv import Fp8Weights
from bench.lab.gemv_rows import EPS, FFN, HIDDEN, Buffers, Weights, graph_of, replay_s
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

HEADS, HEAD_DIM, BLOCK, POSITIONS = 32, 128, 16, 64
VARIANTS = ("base", "no_norm", "no_silu", "plain", "rope", "rope_attn", "attn", "fused")
PDL = (0, 0, 0, 0, 0, True)  # gemv_fp8's launch tuple: default shape, programmatic dependent launch


class Attention:
    """One layer's rope_cache and decode attention tensors for one row at POSITIONS positions."""

    def __init__(self) -> None:
        dev, f16 = "cuda", torch.float16
        slots = 2 * POSITIONS
        self.k = torch.randn(slots, HEADS, HEAD_DIM, device=dev, dtype=f16)
        self.v = torch.randn_like(self.k)
        self.cos = torch.randn(slots, HEAD_DIM, device=dev, dtype=f16).clamp(-1, 1)
        self.sin = torch.randn_like(self.cos).clamp(-1, 1)
        self.positions = torch.tensor([POSITIONS - 1], device=dev)
        self.slots = self.positions.clone()
        self.tables = torch.arange(slots // BLOCK, device=dev, dtype=torch.int32)[None]
        self.lens = torch.tensor([POSITIONS], device=dev)
        self.q, self.out = (torch.empty(1, HEADS, HEAD_DIM, device=dev, dtype=f16) for _ in range(2))
        self.k_new, self.v_new = (torch.empty(1, HEADS, HEAD_DIM, device=dev, dtype=f16) for _ in range(2))
        self.workspace = torch.empty(HEADS, 16, HEAD_DIM + 2, device=dev)
        self.counters = torch.zeros(HEADS, device=dev, dtype=torch.int32)

    def rope(self, qkv: torch.Tensor) -> None:
        _ops.rope_cache(qkv, self.cos, self.sin, self.positions, self.slots, HEADS, HEADS, self.q, self.k_new,
                        self.v_new, self.k, self.v, None, 0.0, pdl=True)

    def rope_attend(self, qkv: torch.Tensor) -> None:
        _ops.rope_decode_attention(qkv, self.cos, self.sin, self.k, self.v, self.tables, self.lens, BLOCK,
                                   HEAD_DIM ** -0.5, self.out, self.workspace, self.counters, pdl=True)

    def attend(self) -> None:
        _ops.decode_attention(self.q, self.k, self.v, self.tables, self.lens, BLOCK, HEAD_DIM ** -0.5, self.out,
                              self.workspace, self.counters, pdl=True)


def chain(variant: str, w16: Weights, w8: Fp8Weights, b: Buffers, att: Attention) -> None:
    norm = -1.0 if variant in ("no_norm", "plain") else EPS
    ready_act = variant in ("no_silu", "plain")
    b.x.copy_(b.x0)
    for layer in w8.layers:
        qkv, o, gate_up, down = (layer[name] for name in ("qkv", "o", "gate_up", "down"))
        _ops.gemv_fp8(b.x, qkv.q, qkv.scale, norm, False, None, b.qkv, *PDL)
        if variant in ("rope", "rope_attn"):
            att.rope(b.qkv)
        if variant in ("rope_attn", "attn"):
            att.attend()
        if variant == "fused":
            att.rope_attend(b.qkv)
        _ops.gemv_fp8(b.attn, o.q, o.scale, -1.0, False, b.x, b.x, *PDL)
        _ops.gemv_fp8(b.x, gate_up.q, gate_up.scale, norm, False, None, b.gate_up, *PDL)
        act = b.act if ready_act else b.gate_up
        _ops.gemv_fp8(act, down.q, down.scale, -1.0, not ready_act, b.x, b.x, *PDL)
    _ops.gemv(b.x, w16.lm_head, EPS, False, None, b.logits)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    result = {"environment": environment(), "positions": POSITIONS, "variants": {}}
    with torch.inference_mode():
        w16 = Weights()
        w8 = Fp8Weights(w16)
        inputs = {"x": torch.randn(1, HIDDEN, device="cuda", dtype=torch.float16),
                  "attn": torch.randn(1, HIDDEN, device="cuda", dtype=torch.float16),
                  "act": torch.randn(1, FFN, device="cuda", dtype=torch.float16)}
        b = Buffers(1, inputs)
        att = Attention()
        graphs = {v: graph_of(lambda v=v: chain(v, w16, w8, b, att)) for v in VARIANTS}
        for round_ in range(3):  # interleaved rounds: a drifting clock shows as spread, not as a difference
            for v, graph in graphs.items():
                ms = replay_s(graph, repeat=50) * 1e3
                result["variants"].setdefault(v, []).append(ms)
                print(f"round {round_}  {v:10s} {ms:7.3f} ms", flush=True)
    base = min(result["variants"]["base"])
    result["delta_vs_base_ms"] = {v: min(ms) - base for v, ms in result["variants"].items()}
    print(json.dumps(result["delta_vs_base_ms"], indent=1))
    (out / "step_parts.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
