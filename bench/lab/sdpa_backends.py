"""Lab (GPU machine): prompt attention time per SDPA backend at bucket lengths, Llama-2-7B heads (32 x 128),
fp16, causal, laid out as the prefill graph calls it ([S, H, D] viewed as [1, H, S, D]), timed inside a
CUDA graph as the product runs it.

    python -m bench.lab.sdpa_backends
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def per_call_us(fn, calls: int = 32, repeat: int = 50) -> float:
    """Kernel time per call: `calls` calls captured in one CUDA graph, so host launch cost is not timed."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeat * calls)


def main() -> None:
    for n in (16, 48, 128, 208, 256, 400, 432, 512):
        q, k, v = (torch.randn(n, 32, 128, device="cuda", dtype=torch.float16).transpose(0, 1)[None] for _ in range(3))
        row = []
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    us = per_call_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
                row.append(f"{name} {us:6.1f} us")
            except RuntimeError as e:
                row.append(f"{name} n/a ({str(e)[:40]})")
        print(f"{n:4d} tokens: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
