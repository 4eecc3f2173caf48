"""Programmatic dependent launch (csrc/pdl.cuh) on the GPU: a kernel launched with it starts before the kernel
before it has finished, so each must wait before reading what that kernel writes. A chain of dependent GEMVs, each
reading the one before's output, in a CUDA graph replayed on new inputs, gives the bits of the same chain launched
without it (GPU only; the engine's logits with and without it: tests/test_gpu_engine.py)."""
import pytest
import torch

from hjcg import fp8
import hjcg.native  # noqa: F401  (registers torch.ops.hjcg)

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

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
        _ops.gemv_fp8(x, w.q, w.scale, rms_eps, False, residual, out, pdl=pdl)
    else:
        _ops.gemv_mma(x, w, rms_eps, False, residual, out, pdl=pdl)


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


HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 2, 128, 16


def attention_step(w, x, qkv, cos, sin, positions, slots, q, k_new, v_new, cache, tables, seq_lens, out, ws,
                   counters, fused: bool, pdl: bool) -> None:
    """A decode step's attention: the qkv GEMV, then rope_cache (q, and the newest position's K/V into the cache) and
    the decode attention over every position, the newest included; or (fused) rope_decode_attention, both in one."""
    _ops.gemv_fp8(x, w.q, w.scale, EPS, False, None, qkv, pdl=pdl)
    if fused:
        _ops.rope_decode_attention(qkv, cos, sin, cache.k[0], cache.v[0], tables, seq_lens, BLOCK, HEAD_DIM ** -0.5,
                                   out, ws, counters, pdl=pdl)
        return
    _ops.rope_cache(qkv, cos, sin, positions, slots, HEADS, KV_HEADS, q, k_new, v_new, cache.k[0], cache.v[0],
                    pdl=pdl)
    _ops.decode_attention(q, cache.k[0], cache.v[0], tables, seq_lens, BLOCK, HEAD_DIM ** -0.5, out, ws, counters,
                          pdl=pdl)


@pytest.mark.parametrize("fused", [False, True])
def test_the_decode_attention_launched_with_pdl_reads_the_newest_position_only_after_the_kernel_before(fused):
    # The attention loads the older positions before it waits for the kernel before it; the newest (written in the
    # same step: by rope_cache, or from the GEMV's qkv by the fused kernel itself) only after. Lengths of one split,
    # of several, and past 16 splits; before each replay the newest positions hold NaNs, so one read early would
    # poison the output.
    from hjcg.kv_cache import PagedKVCache

    lengths = [1, 9, 70, 300]
    rows, width = len(lengths), -(-max(lengths) // BLOCK)
    cache = PagedKVCache(1, rows * width + 1, BLOCK, KV_HEADS, HEAD_DIM, torch.device("cuda"), torch.float16)
    cache.k.normal_()
    cache.v.normal_()
    tables = (torch.arange(rows * width, dtype=torch.int32) + 1).view(rows, width).cuda()
    seq_lens = torch.tensor(lengths, device="cuda")
    positions = seq_lens - 1
    slots = cache.slots_at(tables, positions)
    w = weights("fp8", (HEADS + 2 * KV_HEADS) * HEAD_DIM, 7)
    angles = torch.rand(max(lengths), HEAD_DIM, device="cuda") * 6.3
    cos, sin = angles.cos().half(), angles.sin().half()
    x = torch.empty(rows, HIDDEN, device="cuda", dtype=torch.float16)
    qkv = torch.empty(rows, w.q.shape[0], device="cuda", dtype=torch.float16)
    q = torch.empty(rows, HEADS, HEAD_DIM, device="cuda", dtype=torch.float16)
    k_new, v_new = (torch.empty(rows, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.float16) for _ in range(2))
    out = torch.empty_like(q)
    ws = torch.empty(rows * HEADS, 16, HEAD_DIM + 2, device="cuda", dtype=torch.float32)
    counters = torch.zeros(rows * HEADS, device="cuda", dtype=torch.int32)
    args = (w, x, qkv, cos, sin, positions, slots, q, k_new, v_new, cache, tables, seq_lens, out, ws, counters)
    with torch.inference_mode():
        x.normal_()
        attention_step(*args, fused, True)  # warm-up before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attention_step(*args, fused, True)
        for seed in range(4):
            torch.manual_seed(seed)
            x.normal_()
            attention_step(*args, fused, False)
            ref = out.clone()
            out.fill_(float("nan"))
            cache.k[0, slots] = float("nan")  # what an attention that read the newest position early would see
            cache.v[0, slots] = float("nan")
            graph.replay()
            torch.cuda.synchronize()
            assert torch.isfinite(ref).all()
            assert torch.equal(out, ref), seed
