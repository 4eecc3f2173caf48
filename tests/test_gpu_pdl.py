"""Programmatic dependent launch (csrc/pdl.cuh) on the GPU: a kernel launched with it starts before the kernel
before it has finished, so each must wait before reading what that kernel writes. A chain of dependent GEMVs, each
reading the one before's output, in a CUDA graph replayed on new inputs, gives the bits of the same chain launched
without it (GPU only; the engine's logits with and without it: tests/test_gpu_engine.py)."""
import pytest
import torch

from hjcg import fp8
from hjcg.native import _C

pytestmark = pytest.mark.gpu

EPS = 1e-5
HIDDEN = 2048  # small matrices: short kernels, so one that read its input early would read it stale
LINKS = 12


def weights(kind: str, rows: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(rows, HIDDEN, device="cuda", generator=g, dtype=torch.float16) * HIDDEN ** -0.5
    return fp8.quantize_weight(w) if kind == "fp8" else w


def gemv(kind: str, x, w, rms_eps: float, residual, out, pdl: bool) -> None:
    if kind == "fp8":
        _C.gemv_fp8(x, w.q, w.scale, rms_eps, False, residual, out, pdl=pdl)
    else:
        _C.gemv_mma(x, w, rms_eps, False, residual, out, pdl=pdl)


def chain(kind: str, mats, h: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, pdl: bool) -> None:
    """h = x0, then per link: t = norm(h) @ A.T, h += t @ B.T (in place): every call reads the last one's output."""
    h.copy_(x0)
    for a, b in mats:
        gemv(kind, h, a, EPS, None, t, pdl)
        gemv(kind, t, b, -1.0, h, h, pdl)


@pytest.mark.parametrize("kind, rows", [("tensor_cores", 1), ("tensor_cores", 4), ("fp8", 1), ("fp8", 12)])
def test_a_graph_of_dependent_gemvs_launched_with_pdl_gives_the_bits_of_one_launched_without(kind, rows):
    mats = [(weights(kind, HIDDEN, 2 * i), weights(kind, HIDDEN, 2 * i + 1)) for i in range(LINKS)]
    h = torch.empty(rows, HIDDEN, device="cuda", dtype=torch.float16)
    t = torch.empty_like(h)
    x0 = torch.empty_like(h)
    with torch.inference_mode():
        x0.normal_()
        chain(kind, mats, h, t, x0, True)  # warm-up (and eager PDL launches) before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain(kind, mats, h, t, x0, True)
        for seed in range(4):
            torch.manual_seed(seed)
            x0.normal_()
            h_ref, t_ref = torch.empty_like(h), torch.empty_like(t)
            chain(kind, mats, h_ref, t_ref, x0, False)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(h_ref).all()
            assert torch.equal(h, h_ref), (kind, rows, seed)
            assert torch.equal(t, t_ref), (kind, rows, seed)
