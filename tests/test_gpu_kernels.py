"""The CUDA kernels against their CPU references and torch, on fresh random inputs (GPU only)."""
import pytest
import torch
import torch.nn.functional as F

from hjcg.native import _C
from sampling_spec import KernelRow, target_distribution

_ops = torch.ops.hjcg  # the extension's kernels (csrc/registration.cpp)

pytestmark = pytest.mark.gpu


def batch_rows(n, device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, penalty=1.0, seed=0, capacity=8):
    f = dict(device=device, dtype=torch.float32)
    return dict(
        history=torch.zeros(n, capacity, device=device, dtype=torch.int64),
        history_len=torch.zeros(n, device=device, dtype=torch.int64),
        temperature=torch.full((n,), temperature, **f), top_k=torch.full((n,), top_k, device=device, dtype=torch.int32),
        top_p=torch.full((n,), top_p, **f), min_p=torch.full((n,), min_p, **f),
        repetition_penalty=torch.full((n,), penalty, **f),
        seed=torch.full((n,), seed, device=device, dtype=torch.int64),
        offset=torch.zeros(n, device=device, dtype=torch.int64),
        out=torch.full((n,), -1, device=device, dtype=torch.int64))


def sample(logits, rows, append=False):
    torch.ops.hjcg.sample(logits, rows["history"], rows["history_len"], rows["temperature"], rows["top_k"], rows["top_p"],
              rows["min_p"], rows["repetition_penalty"], rows["seed"], rows["offset"], rows["out"], append)
    return rows["out"]


@pytest.mark.parametrize("vocab", [111, 32000, 152064])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_matches_cpu(vocab, dtype):
    logits = torch.randn(8, vocab, device="cuda").to(dtype)
    gpu = sample(logits, batch_rows(8, "cuda", temperature=0.0))
    cpu = sample(logits.cpu().float(), batch_rows(8, "cpu", temperature=0.0))
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("vocab", [111, 32000, 152064])
@pytest.mark.parametrize("params", [dict(), dict(top_k=50), dict(top_p=0.9), dict(min_p=0.05),
                                    dict(top_k=100, top_p=0.8, min_p=0.02, penalty=1.3, temperature=0.7)])
def test_seeded_draws_match_cpu(vocab, params):
    n = 64
    logits = torch.randn(n, vocab, device="cuda") * 3
    gpu_rows, cpu_rows = batch_rows(n, "cuda", seed=17, **params), batch_rows(n, "cpu", seed=17, **params)
    for rows in (gpu_rows, cpu_rows):
        rows["history"][:, :4] = torch.arange(4)
        rows["history_len"].fill_(4)
    gpu = sample(logits, gpu_rows).cpu()
    cpu = sample(logits.cpu(), cpu_rows)
    # the same Philox draw and the same kept set; float summation order may flip a token at a boundary
    assert (gpu == cpu).float().mean() >= 0.97
    assert torch.equal(gpu_rows["offset"].cpu(), cpu_rows["offset"])


@pytest.mark.parametrize("params", [dict(top_k=20), dict(top_p=0.6), dict(min_p=0.2, temperature=0.8)])
def test_distribution_of_1e5_draws_and_no_draw_outside_the_set(params):
    n, vocab = 100_000, 1000
    row_logits = torch.randn(vocab, device="cuda") * 2
    logits = row_logits.expand(n, vocab).contiguous()
    rows = batch_rows(n, "cuda", **params)
    rows["seed"] = torch.arange(n, device="cuda") + 5  # a row's draw depends on its seed and counter only
    tokens = sample(logits, rows).cpu()
    spec = dict(params)
    target = target_distribution(row_logits.cpu(), spec.pop("temperature", 1.0), **spec)
    assert bool((target[tokens] > 0).all())
    empirical = torch.bincount(tokens, minlength=vocab).double() / n
    assert 0.5 * (empirical - target).abs().sum().item() < 0.01


def test_two_replays_of_one_graph_draw_differently_and_seeds_repeat():
    logits = torch.randn(1, 5000, device="cuda")
    rows = batch_rows(1, "cuda", seed=3)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        sample(logits, rows)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            sample(logits, rows)
    rows["offset"].zero_()
    draws = []
    for _ in range(10):
        graph.replay()
        draws.append(int(rows["out"]))
    assert len(set(draws)) > 1
    rows["offset"].zero_()
    again = []
    for _ in range(10):
        graph.replay()
        again.append(int(rows["out"]))
    assert again == draws  # same seed, same offsets: same tokens


def test_padding_matches_cpu():
    for length, bucket, start in [(1, 16, 0), (16, 16, 0), (37, 64, 512), (500, 512, 0)]:
        prompt = torch.randint(0, 32000, (length,))
        outs = {}
        for device in ("cpu", "cuda"):
            bufs = [torch.full((bucket,), -3, dtype=torch.int64, device=device) for _ in range(2)]
            bufs += [torch.full((1,), -3, dtype=torch.int64, device=device) for _ in range(2)]
            torch.ops.hjcg.pad_prompt(prompt, start, 2, *bufs)
            outs[device] = [b.cpu() for b in bufs]
        for a, b in zip(outs["cpu"], outs["cuda"]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 32, 128), (9, 3, 64), (8, 1, 256)])
@pytest.mark.parametrize("length", [1, 7, 33, 300, 4000])  # 1, 1, 2, 10 and 16 (all) splits
def test_decode_attention_matches_sdpa(dtype, tol, heads, kv_heads, dim, length):
    # a batch of rows with their own lengths and scattered blocks; row 0 has the test's length
    from hjcg.kv_cache import PagedKVCache
    from hjcg.llama import paged_decode_attention

    block_size, rows = 16, 3
    lengths = [length, max(1, length // 3), 1]
    width = -(-max(lengths) // block_size)
    cache = PagedKVCache(1, rows * width + 1, block_size, kv_heads, dim, torch.device("cuda"), dtype)
    cache.k.normal_()
    cache.v.normal_()
    order = torch.randperm(rows * width, generator=torch.Generator().manual_seed(length)) + 1  # never block 0
    tables = order.view(rows, width).to(device="cuda", dtype=torch.int32)
    for r, n in enumerate(lengths):  # slots past a row's length must never be read
        past = cache.table_slots(tables[r:r + 1], width * block_size)[0, n:]
        cache.k[0, past] = float("nan")
        cache.v[0, past] = float("nan")
    seq_lens = torch.tensor(lengths, device="cuda")
    q = torch.randn(rows, heads, dim, device="cuda", dtype=dtype)
    out = torch.full_like(q, float("nan"))
    ws = torch.empty(rows * heads, 16, dim + 2, device="cuda", dtype=torch.float32)
    counters = torch.zeros(rows * heads, device="cuda", dtype=torch.int32)
    _ops.decode_attention(q, cache.k[0], cache.v[0], tables, seq_lens, block_size, dim ** -0.5, out, ws, counters)
    assert not counters.any()  # the last split of each head left its counter ready for the next launch
    for r, n in enumerate(lengths):
        keys, values = cache.gather(0, cache.table_slots(tables[r:r + 1], n)[0])
        ref = F.scaled_dot_product_attention(q[r].double()[:, None], keys.double().transpose(0, 1),
                                             values.double().transpose(0, 1), enable_gqa=heads != kv_heads)[:, 0]
        assert ((out[r].double() - ref).norm() / ref.norm()).item() < tol, r
    # the torch twin (the 'graphs' mode) agrees, reading the whole table and masking (masked NaNs would
    # still poison its softmax: zero them first)
    cache.k.nan_to_num_(0.0)
    cache.v.nan_to_num_(0.0)
    torch_out = paged_decode_attention(cache, tables, seq_lens)(0, q, None, None, None)
    assert _rel(torch_out, out) < 10 * tol


def test_decode_attention_row_depends_on_its_own_length_only_and_relaunches_bit_identically():
    # rows of 300 positions (10 splits merged by the last block), 20 (one split) and 0 (an idle row: zeros)
    from hjcg.kv_cache import PagedKVCache

    block_size, heads, dim, lengths = 16, 8, 128, [300, 20, 0]
    width = -(-max(lengths) // block_size)
    cache = PagedKVCache(1, len(lengths) * width + 1, block_size, heads, dim, torch.device("cuda"), torch.float16)
    cache.k.normal_()
    cache.v.normal_()
    tables = (torch.arange(len(lengths) * width, dtype=torch.int32) + 1).view(len(lengths), width).cuda()
    seq_lens = torch.tensor(lengths, device="cuda")
    q = torch.randn(len(lengths), heads, dim, device="cuda", dtype=torch.float16)

    def attend(rows: slice) -> torch.Tensor:
        n = len(range(*rows.indices(len(lengths))))
        out = torch.full((n, heads, dim), float("nan"), device="cuda", dtype=torch.float16)
        ws = torch.empty(n * heads, 16, dim + 2, device="cuda", dtype=torch.float32)
        counters = torch.zeros(n * heads, device="cuda", dtype=torch.int32)
        for _ in range(3):  # the counters are reused, as by every layer of a graph
            _ops.decode_attention(q[rows], cache.k[0], cache.v[0], tables[rows], seq_lens[rows], block_size,
                                  dim ** -0.5, out, ws, counters)
        assert not counters.any()
        return out

    batch = attend(slice(0, 3))
    assert torch.equal(attend(slice(0, 1))[0], batch[0]) and torch.equal(attend(slice(1, 2))[0], batch[1])
    assert not batch[2].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 32, 128), (9, 3, 64)])
def test_rope_decode_attention_gives_the_bits_of_rope_cache_then_decode_attention(dtype, heads, kv_heads, dim):
    # rows of 1, 9, 70 and 300 positions (1, 2, 9 and 16 splits) and an empty one; the newest position of each is
    # seq_len - 1. Both paths start from the same cache, NaN at every newest slot: each must write it first.
    from hjcg.kv_cache import PagedKVCache

    block_size, lengths = 16, [1, 9, 70, 300, 0]
    rows, width = len(lengths), -(-max(lengths) // block_size)
    caches = [PagedKVCache(1, rows * width + 1, block_size, kv_heads, dim, torch.device("cuda"), dtype) for _ in "ab"]
    caches[0].k.normal_()
    caches[0].v.normal_()
    order = torch.randperm(rows * width, generator=torch.Generator().manual_seed(dim)) + 1
    tables = order.view(rows, width).to(device="cuda", dtype=torch.int32)
    seq_lens = torch.tensor(lengths, device="cuda")
    positions = (seq_lens - 1).clamp(min=0)
    slots = caches[0].slots_at(tables, positions)
    live = seq_lens > 0
    caches[0].k[0, slots[live]] = float("nan")
    caches[0].v[0, slots[live]] = float("nan")
    caches[1].k.copy_(caches[0].k)
    caches[1].v.copy_(caches[0].v)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    angles = torch.rand(max(lengths), dim, device="cuda") * 6.3
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    outs = [torch.full((rows, heads, dim), float("nan"), device="cuda", dtype=dtype) for _ in "ab"]
    scratch = [(torch.empty(rows * heads, 16, dim + 2, device="cuda"),
                torch.zeros(rows * heads, device="cuda", dtype=torch.int32)) for _ in "ab"]

    q = torch.empty(rows, heads, dim, device="cuda", dtype=dtype)
    k_new, v_new = (torch.empty(rows, kv_heads, dim, device="cuda", dtype=dtype) for _ in range(2))
    # the empty row writes nothing in the fused kernel: leave rope_cache nothing to write for it either
    _ops.rope_cache(qkv[live], cos, sin, positions[live], slots[live], heads, kv_heads, q[:4], k_new[:4], v_new[:4],
                    caches[0].k[0], caches[0].v[0])
    q[4] = 0
    _ops.decode_attention(q, caches[0].k[0], caches[0].v[0], tables, seq_lens, block_size, dim ** -0.5, outs[0],
                          *scratch[0])
    _ops.rope_decode_attention(qkv, cos, sin, caches[1].k[0], caches[1].v[0], tables, seq_lens, block_size,
                               dim ** -0.5, outs[1], *scratch[1])
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[1], outs[0])
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)
    assert not scratch[1][1].any()


def test_rope_decode_attention_rejects_a_qkv_of_the_wrong_width_and_a_strided_out_by_their_names():
    from hjcg.kv_cache import PagedKVCache

    cache = PagedKVCache(1, 2, 16, 2, 64, torch.device("cuda"), torch.float16)
    cos = torch.ones(16, 64, device="cuda", dtype=torch.float16)

    def call(qkv_width: int, out: torch.Tensor) -> None:
        _ops.rope_decode_attention(torch.zeros(1, qkv_width, device="cuda", dtype=torch.float16), cos, cos, cache.k[0],
                                   cache.v[0], torch.ones(1, 1, dtype=torch.int32, device="cuda"),
                                   torch.ones(1, dtype=torch.int64, device="cuda"), 16, 0.125, out,
                                   torch.empty(4, 16, 66, device="cuda"),
                                   torch.zeros(4, dtype=torch.int32, device="cuda"))

    out = torch.empty(1, 4, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="qkv must be contiguous"):
        call(7 * 64, out)
    strided = torch.empty(1, 64, 4, device="cuda", dtype=torch.float16).transpose(1, 2)
    with pytest.raises(RuntimeError, match="out must be a contiguous"):
        call(8 * 64, strided)


def test_decode_attention_rejects_counters_of_the_wrong_shape():
    from hjcg.kv_cache import PagedKVCache

    cache = PagedKVCache(1, 4, 16, 2, 64, torch.device("cuda"), torch.float16)
    q = torch.zeros(1, 2, 64, device="cuda", dtype=torch.float16)
    ws = torch.empty(2, 16, 66, device="cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="counters must be int32"):
        _ops.decode_attention(q, cache.k[0], cache.v[0], torch.ones(1, 1, dtype=torch.int32, device="cuda"),
                              torch.ones(1, dtype=torch.int64, device="cuda"), 16, 0.125, torch.empty_like(q), ws,
                              torch.zeros(1, dtype=torch.int32, device="cuda"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# hidden 100 is not a multiple of a 16-byte vector: the fused op falls back to plain torch
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("tokens,hidden", [(5, 4096), (512, 4096), (3, 576), (2, 100)])
def test_fused_rms_norm_matches_torch(dtype, tol, tokens, hidden):
    from hjcg.fused_ops import FusedCudaOps
    from hjcg.llama import LayerOps

    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    w = torch.randn(hidden, device="cuda", dtype=dtype)
    assert _rel(FusedCudaOps().rms_norm(x, w, 1e-5), LayerOps().rms_norm(x, w, 1e-5)) < tol


# widths that are and are not a multiple of a 16-byte vector (vectorised and element-wise paths)
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("tokens,width", [(5, 1536), (512, 11008), (3, 1537)])
def test_fused_silu_mul_matches_torch(dtype, tol, tokens, width):
    from hjcg.fused_ops import FusedCudaOps
    from hjcg.llama import LayerOps

    gu = torch.randn(tokens, 2 * width, device="cuda", dtype=dtype)
    assert _rel(FusedCudaOps().silu_mul(gu), LayerOps().silu_mul(gu)) < tol


# Llama-2-7B (MHA, several blocks per token), SmolLM2 (GQA 9/3, D 64) and a tiny GQA shape
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.float32, 1e-6)])
@pytest.mark.parametrize("heads,kv_heads,dim,tokens", [(32, 32, 128, 512), (9, 3, 64, 7), (4, 2, 64, 6)])
def test_fused_rope_and_cache_match_torch(dtype, tol, heads, kv_heads, dim, tokens):
    from types import SimpleNamespace

    from hjcg.fused_ops import FusedCudaOps
    from hjcg.kv_cache import PagedKVCache
    from hjcg.llama import LayerOps

    max_pos = 1024
    angles = torch.rand(max_pos, dim // 2, device="cuda") * 6.3
    model = SimpleNamespace(shape=SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim),
                            cos=torch.cat([angles.cos()] * 2, -1).to(dtype), sin=torch.cat([angles.sin()] * 2, -1).to(dtype))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, device="cuda", dtype=dtype)
    positions = torch.randperm(max_pos, device="cuda")[:tokens]
    slots = torch.randperm(max_pos, device="cuda")[:tokens]  # the cache rows: not the positions
    caches = [PagedKVCache(2, max_pos // 16, 16, kv_heads, dim, torch.device("cuda"), dtype) for _ in range(2)]
    q_fused, k_fused, v_fused = FusedCudaOps().rope_and_cache(qkv, positions, slots, model, caches[0], 1)
    q_plain, k_plain, v_plain = LayerOps().rope_and_cache(qkv, positions, slots, model, caches[1], 1)
    assert _rel(q_fused, q_plain) < tol and _rel(k_fused, k_plain) < tol and torch.equal(v_fused, v_plain)
    assert torch.equal(caches[0].k[1, slots], k_fused) and torch.equal(caches[0].v[1, slots], v_fused)
    assert _rel(caches[0].k[1], caches[1].k[1]) < tol and torch.equal(caches[0].v[1], caches[1].v[1])
    assert not caches[0].k[0].any()  # other layers untouched


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(4096, 12288), (11008, 4096), (576, 49152), (4096, 32000), (1536, 577), (8, 3)])
def test_gemv_with_fused_norm_activation_and_residual_matches_torch(dtype, k, n, rows):
    # one decode step of `rows` streams: each row its own scale (so its own norm), against float64 torch
    scales = torch.linspace(0.5, 3.0, rows, device="cuda", dtype=dtype)[:, None]
    x = torch.randn(rows, k, device="cuda", dtype=dtype) * scales
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
    residual = torch.randn(rows, n, device="cuda", dtype=dtype)
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=dtype)
    assert _C.gemv_supported(x, w) and _C.gemv_supported(gate_up, w)
    assert not _C.gemv_supported(torch.randn(9, k, device="cuda", dtype=dtype), w)  # 9 rows: the GEMM's
    tol = 2e-3 if dtype == torch.float16 else 1e-2

    def close(out, expected):
        for b in range(rows):  # row by row: a row mixed up with another, or missed, shows
            assert _rel(out[b], expected[b]) < tol, b

    def gemv(x, rms_eps, silu_mul, residual):  # in place into residual where given, as the layer runs it
        out = residual if residual is not None else torch.full((len(x), n), float("nan"), device="cuda", dtype=dtype)
        _ops.gemv(x, w, rms_eps, silu_mul, residual, out)
        return out

    x64, w64 = x.double(), w.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    close(gemv(x, 1e-5, False, None), normed @ w64.t())  # the norm as a scale (its weight folded into w)
    close(gemv(x, -1.0, False, residual.clone()), residual.double() + x64 @ w64.t())
    out = torch.full((rows, n), float("nan"), device="cuda", dtype=dtype)
    _ops.gemv(x, w, -1.0, False, residual, out)  # residual into a separate out
    close(out, residual.double() + x64 @ w64.t())
    act = torch.nn.functional.silu(gate_up[:, :k]) * gate_up[:, k:]
    close(gemv(gate_up, -1.0, True, residual.clone()), residual.double() + act.double() @ w64.t())

    # batch invariance: row b of a `rows`-row call is bit for bit the one-row call on row b alone
    for args in ((x, 1e-5, False, None), (x, -1.0, False, residual), (gate_up, -1.0, True, residual)):
        inp, rms_eps, silu_mul, res = args
        batch = gemv(inp, rms_eps, silu_mul, None if res is None else res.clone())
        for b in range(rows):
            alone = gemv(inp[b:b + 1], rms_eps, silu_mul, None if res is None else res[b:b + 1].clone())
            assert torch.equal(alone[0], batch[b]), (b, rms_eps, silu_mul)


# The prompt path defers the RMSNorm past the GEMM (norm weights folded, so they are ones): the kernels
# after it scale each row by 1 / rms(x). Same result as normalising first, up to rounding.
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("tokens", [7, 300])
def test_deferred_norm_in_attention_input_and_mlp_matches_torch(dtype, tol, tokens):
    from types import SimpleNamespace

    from hjcg.fused_ops import FusedCudaOps
    from hjcg.kv_cache import PagedKVCache
    from hjcg.llama import LayerOps

    heads, kv_heads, dim, hidden, ffn, max_pos = 8, 2, 64, 512, 1376, 1024
    angles = torch.rand(max_pos, dim // 2, device="cuda") * 6.3
    model = SimpleNamespace(shape=SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=dim),
                            cos=torch.cat([angles.cos()] * 2, -1).to(dtype), sin=torch.cat([angles.sin()] * 2, -1).to(dtype))
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype) * 3
    ones = torch.ones(hidden, device="cuda", dtype=dtype)
    qkv_w = torch.randn((heads + 2 * kv_heads) * dim, hidden, device="cuda", dtype=dtype) * hidden ** -0.5
    gate_up_w = torch.randn(2 * ffn, hidden, device="cuda", dtype=dtype) * hidden ** -0.5
    down_w = torch.randn(hidden, ffn, device="cuda", dtype=dtype) * ffn ** -0.5
    positions = torch.arange(tokens, device="cuda")
    caches = [PagedKVCache(1, max_pos // 16, 16, kv_heads, dim, torch.device("cuda"), dtype) for _ in range(2)]
    q = [ops.attention_input(x, ones, 1e-5, qkv_w, positions, positions + 16, model, cache, 0)[0]
         for ops, cache in zip((FusedCudaOps(), LayerOps()), caches)]
    assert _rel(q[0], q[1]) < tol
    assert _rel(caches[0].k[0], caches[1].k[0]) < tol and _rel(caches[0].v[0], caches[1].v[0]) < tol
    fused_out = FusedCudaOps().mlp(x.clone(), ones, 1e-5, gate_up_w, down_w)
    plain_out = LayerOps().mlp(x.clone(), ones, 1e-5, gate_up_w, down_w)
    assert _rel(fused_out - x, plain_out - x) < tol  # the MLP's contribution, not just the residual
