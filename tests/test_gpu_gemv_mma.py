"""The tensor-core GEMV over fp16/bf16 weights (csrc/gemv_mma_cuda.cu, the fp8 GEMV's kernel with nothing to
convert): each fusion against float64 torch, batch invariance for 1..16 rows, the lab's launch shapes, its
refusals, and FusedCudaOps sending the decode steps of more than gemv_max_rows streams to it (GPU only)."""
import pytest
import torch
import torch.nn.functional as F

from hjcg.native import _C
# the fp8 GEMV's tolerances (float32 sums, then the output's rounding to the activation dtype) and row checks
from test_gpu_fp8 import EPS, TOL, close_rows

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

pytestmark = pytest.mark.gpu


def gemv(x, w, rms_eps, silu_mul, residual, split=0, depth=0, stages=0, tiles=0):
    """The tensor-core GEMV into `residual` (in place) where given, else into a NaN-poisoned out."""
    n = w.shape[0]
    out = residual if residual is not None else torch.full((len(x), n), float("nan"), device="cuda", dtype=x.dtype)
    _ops.gemv_mma(x, w, rms_eps, silu_mul, residual, out, split, depth, stages, tiles)
    return out


SHAPES = [(4096, 4096), (4096, 12288), (4096, 22016), (11008, 4096),  # Llama-2-7B's o, qkv, gate_up, down (K, N)
          (4096, 32000), (576, 1728), (32, 8), (1040, 577), (8, 3)]  # lm head; SmolLM2; K past whole chunks, N past blocks


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 13, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n", SHAPES)
def test_gemv_mma_with_each_fusion_matches_torch(dtype, k, n, rows):
    scales = torch.linspace(0.5, 3.0, rows, device="cuda")[:, None]  # each row its own norm
    x = (torch.randn(rows, k, device="cuda") * scales).to(dtype)
    # rows of different magnitudes, so a row's products landing in another's output shows
    w = (torch.randn(n, k, device="cuda") * torch.logspace(-2, 1, n, device="cuda")[:, None] * k ** -0.5).to(dtype)
    residual = torch.randn(rows, n, device="cuda", dtype=dtype)
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)
    assert _C.gemv_mma_supported(x, w) and _C.gemv_mma_supported(gate_up, w)
    assert not _C.gemv_mma_supported(torch.randn(17, k, device="cuda", dtype=dtype), w)  # 17 rows: the GEMM's
    tol = TOL[dtype]

    x64, w64 = x.double(), w.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    close_rows(gemv(x, w, -1.0, False, None), x64 @ w64.t(), tol)
    close_rows(gemv(x, w, EPS, False, None), normed @ w64.t(), tol)  # the norm as a scale (its weight folded into w)
    expected = residual.double() + x64 @ w64.t()
    close_rows(gemv(x, w, -1.0, False, residual.clone()), expected, tol)  # residual in place
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
    _ops.gemv_mma(x, w, -1.0, False, residual, out)  # residual into a separate out
    close_rows(out, expected, tol)
    act = F.silu(gate_up[:, :k]) * gate_up[:, k:]  # rounded to dtype as transformers rounds it
    close_rows(gemv(gate_up, w, -1.0, True, residual.clone()), residual.double() + act.double() @ w64.t(), tol)

    # batch invariance: row b of a `rows`-row call is bit for bit the one-row call on row b alone
    for inp, rms_eps, silu_mul, res in ((x, EPS, False, None), (x, -1.0, False, residual), (gate_up, -1.0, True, residual)):
        batch = gemv(inp, w, rms_eps, silu_mul, None if res is None else res.clone())
        for b in range(rows):
            alone = gemv(inp[b:b + 1], w, rms_eps, silu_mul, None if res is None else res[b:b + 1].clone())
            assert torch.equal(alone[0], batch[b]), (b, rms_eps, silu_mul)


@pytest.mark.parametrize("split,depth,stages,tiles", [(1, 2, 1, 1), (3, 4, 1, 1), (8, 2, 1, 1), (8, 1, 2, 1),
                                                      (5, 2, 6, 1), (4, 4, 3, 1), (8, 2, 2, 2), (4, 1, 8, 2),
                                                      (5, 2, 3, 2)])
@pytest.mark.parametrize("rows", [1, 6, 12])
def test_gemv_mma_any_launch_shape_matches_the_default(split, depth, stages, tiles, rows):
    # the lab's knobs (as gemv_fp8's): each sums the same products in its own order
    k, n = 11008 + 8, 4096 + 5  # K past whole chunks, N past whole blocks
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * k ** -0.5
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=torch.float16)
    residual = torch.randn(rows, n, device="cuda", dtype=torch.float16)
    for inp, rms_eps, silu_mul, res in ((x, EPS, False, None), (gate_up, -1.0, True, residual)):
        expected = gemv(inp, w, rms_eps, silu_mul, None if res is None else res.clone())
        got = gemv(inp, w, rms_eps, silu_mul, None if res is None else res.clone(), split, depth, stages, tiles)
        close_rows(got, expected, 1e-3)


def test_gemv_mma_rejects_what_it_cannot_take():
    w = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.float16)
    assert not _C.gemv_mma_supported(x.float(), w.float())  # fp16/bf16 only
    assert not _C.gemv_mma_supported(x, w.bfloat16())  # the weight in x's dtype
    assert not _C.gemv_mma_supported(x[:, 4:].contiguous(), w[:, 4:].contiguous())  # K % 8
    assert not _C.gemv_mma_supported(x, w.t())  # not contiguous
    assert not _C.gemv_mma_supported(x.cpu(), w.cpu())
    out = torch.empty(2, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="x must be a contiguous"):
        _ops.gemv_mma(x, w.bfloat16(), -1.0, False, None, out)
    with pytest.raises(RuntimeError, match="depth must be"):
        _ops.gemv_mma(x, w, -1.0, False, None, out, 0, 3)
    with pytest.raises(RuntimeError, match="2 tiles need the ring"):
        _ops.gemv_mma(x, w, -1.0, False, None, out, 8, 2, 1, 2)
    with pytest.raises(RuntimeError, match="copy_order must be"):
        _ops.gemv_mma(x, w, -1.0, False, None, out, 0, 0, 0, 0, 3)
    with pytest.raises(RuntimeError, match="norm and silu_mul"):
        _ops.gemv_mma(torch.randn(2, 8192, device="cuda", dtype=torch.float16), w, EPS, True, None, out)
    with pytest.raises(RuntimeError, match="must not overlap"):
        _ops.gemv_mma(x, w, -1.0, False, None, x.view(-1)[:128].view(2, 64))  # out inside x
    with pytest.raises(RuntimeError, match="out and residual must be"):
        _ops.gemv_mma(x, w, -1.0, False, None, torch.empty(2, 63, device="cuda", dtype=torch.float16))


@pytest.mark.parametrize("rows,kernel", [(1, "cuda_cores"), (4, "cuda_cores"), (5, "tensor_cores"),
                                         (16, "tensor_cores"), (17, None)])
def test_fused_ops_send_each_decode_size_to_its_gemv(rows, kernel):
    from hjcg.fused_ops import FusedCudaOps

    w = torch.randn(4096, 4096, device="cuda", dtype=torch.float16) * 4096 ** -0.5
    x = torch.randn(rows, 4096, device="cuda", dtype=torch.float16)
    ops = FusedCudaOps(gemv_max_rows=4)
    out = ops.linear(x, w)
    if kernel == "cuda_cores":
        expected = torch.full_like(out, float("nan"))
        _ops.gemv(x, w, -1.0, False, None, expected)
    elif kernel == "tensor_cores":
        expected = gemv(x, w, -1.0, False, None)
    else:
        expected = x @ w.t()
    assert torch.equal(out, expected)  # that kernel itself, bit for bit
    assert FusedCudaOps(gemv_max_rows=4, mma_gemv_max_rows=0).linear(x, w).equal(
        expected if kernel == "cuda_cores" else x @ w.t())  # mma_gemv_max_rows 0: the GEMM past gemv_max_rows


@pytest.mark.parametrize("fmt", ["fp16", "fp8"])
@pytest.mark.parametrize("split,depth,stages,tiles", [(8, 2, 2, 1), (8, 2, 2, 2), (4, 1, 3, 1), (5, 4, 2, 1),
                                                      (3, 2, 5, 2), (8, 1, 8, 2)])
@pytest.mark.parametrize("rows", [1, 7, 16])
def test_ring_copied_by_whole_rows_gives_the_same_bits(fmt, split, depth, stages, tiles, rows):
    # the ring's copy order moves weight bytes, not products: every output bit-identical to the copy by fragments
    from hjcg import fp8

    k, n = 4096 + 48, 1000 + 3  # K past whole batches of chunks (K % 16 == 0 for e4m3), N past blocks and tiles
    w = torch.randn(n, k, device="cuda", dtype=torch.float16) * k ** -0.5
    q = fp8.quantize_weight(w)
    x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=torch.float16)
    residual = torch.randn(rows, n, device="cuda", dtype=torch.float16)

    def run(inp, rms_eps, silu_mul, res, order):
        out = res.clone() if res is not None else torch.full((rows, n), float("nan"), device="cuda", dtype=x.dtype)
        launch = (split, depth, stages, tiles, order)
        if fmt == "fp16":
            _ops.gemv_mma(inp, w, rms_eps, silu_mul, out if res is not None else None, out, *launch)
        else:
            _ops.gemv_fp8(inp, q.q, q.scale, rms_eps, silu_mul, out if res is not None else None, out, *launch)
        return out

    for inp, rms_eps, silu_mul, res in ((x, EPS, False, None), (gate_up, -1.0, True, residual)):
        by_fragments = run(inp, rms_eps, silu_mul, res, 1)
        assert torch.isfinite(by_fragments).all()
        assert torch.equal(run(inp, rms_eps, silu_mul, res, 2), by_fragments)
