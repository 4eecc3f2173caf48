"""The extension's custom ops (torch.ops.hjcg.*) declare what they write, have fake kernels, and dispatch
to their CPU kernel here (their CUDA kernel on a GPU): torch.library.opcheck checks the schema against what
the op really mutates, the fake kernel, the autograd registration and AOT dispatch."""
import pytest
import torch

import hjcg.native  # registers torch.ops.hjcg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sample_args(device: str, append: bool = True) -> tuple:
    g = torch.Generator().manual_seed(0)
    rows, vocab, capacity = 3, 50, 8
    f32 = dict(dtype=torch.float32)
    args = (torch.randn(rows, vocab, generator=g),                          # logits
            torch.randint(0, vocab, (rows, capacity), generator=g),          # history
            torch.tensor([0, 3, 8]),                                         # history_len
            torch.tensor([0.0, 0.8, 1.2], **f32),                            # temperature (row 0 greedy)
            torch.tensor([0, 5, 0], dtype=torch.int32),                      # top_k
            torch.tensor([1.0, 0.9, 0.5], **f32),                            # top_p
            torch.tensor([0.0, 0.0, 0.1], **f32),                            # min_p
            torch.tensor([1.0, 1.3, 0.8], **f32),                            # repetition_penalty
            torch.tensor([1, 2, 3]),                                         # seed
            torch.zeros(rows, dtype=torch.int64),                            # offset
            torch.full((rows,), -1, dtype=torch.int64))                      # out
    return tuple(a.to(device) for a in args) + (append,)


def pad_args(device: str) -> tuple:
    out = lambda n: torch.full((n,), -7, dtype=torch.int64, device=device)  # noqa: E731
    return (torch.tensor([5, 6, 7], device=device), 16, 0, out(8), out(8), out(1), out(1))


def gpu_only(device: str) -> list:
    return [pytest.mark.gpu] if device == "cuda" else []


@pytest.mark.parametrize("device", [pytest.param(d, marks=gpu_only(d)) for d in DEVICES])
@pytest.mark.parametrize("append", [True, False])
def test_sample_passes_opcheck(device, append):
    torch.library.opcheck(torch.ops.hjcg.sample.default, sample_args(device, append))


def bitmask_args(device: str, rows: int = 3, vocab: int = 70, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31, (rows, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[0] = -1  # an unconstrained row
    return torch.randn(rows, vocab, generator=g).to(device), bitmask.to(device)


def bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The op's semantics in torch: bit (v % 32) of word v // 32 clear -> logit -inf."""
    v = torch.arange(logits.shape[1], device=logits.device)
    allowed = (bitmask.long()[:, v // 32] >> (v % 32)) & 1
    return logits.masked_fill(allowed == 0, float("-inf"))


@pytest.mark.parametrize("device", [pytest.param(d, marks=gpu_only(d)) for d in DEVICES])
def test_apply_token_bitmask_passes_opcheck(device):
    torch.library.opcheck(torch.ops.hjcg.apply_token_bitmask.default, bitmask_args(device))


@pytest.mark.parametrize("device", [pytest.param(d, marks=gpu_only(d)) for d in DEVICES])
@pytest.mark.parametrize("rows,vocab", [(1, 32), (3, 70), (5, 49152), (2, 32000)])
def test_apply_token_bitmask_masks_exactly_the_cleared_bits(device, rows, vocab):
    logits, bitmask = bitmask_args(device, rows, vocab, seed=rows)
    expected = bitmask_reference(logits, bitmask)
    torch.ops.hjcg.apply_token_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[0]).all()  # the all-ones row is untouched


def test_apply_token_bitmask_reads_row_views_and_refuses_short_masks():
    logits, bitmask = bitmask_args("cpu", rows=4, vocab=70)
    expected = bitmask_reference(logits[1:3], bitmask[1:3])
    torch.ops.hjcg.apply_token_bitmask(logits[1:3], bitmask[1:3])
    assert torch.equal(logits[1:3], expected)
    with pytest.raises(RuntimeError, match="cannot cover a vocabulary"):
        torch.ops.hjcg.apply_token_bitmask(logits, bitmask[:, :2])
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.hjcg.apply_token_bitmask(logits.double(), bitmask)


@pytest.mark.parametrize("device", [pytest.param(d, marks=gpu_only(d)) for d in DEVICES])
def test_pad_prompt_passes_opcheck(device):
    torch.library.opcheck(torch.ops.hjcg.pad_prompt.default, pad_args(device))


def test_sample_writes_the_tensors_its_schema_declares():
    args = sample_args("cpu")
    logits, history, history_len, offset, out = (a.clone() for a in (args[0], args[1], args[2], args[9], args[10]))
    torch.ops.hjcg.sample(*args)
    assert torch.equal(args[0], logits)                                    # read only
    assert torch.equal(args[9], offset + 1) and (args[10] >= 0).all()       # draw counter, token
    assert torch.equal(args[2], torch.clamp(history_len + 1, max=8))      # the token appended where there is room
    assert args[10][0] == int(torch.argmax(logits[0]))                    # row 0 is greedy
    schema = str(torch.ops.hjcg.sample.default._schema)
    assert "Tensor(a!) history" in schema and "Tensor(d!) out" in schema and "Tensor logits" in schema


def test_the_ops_refuse_bad_arguments_with_a_message():
    args = list(sample_args("cpu"))
    args[4] = args[4].long()  # top_k must be int32
    with pytest.raises(RuntimeError, match="top_k must be a contiguous int32"):
        torch.ops.hjcg.sample(*args)
    with pytest.raises(RuntimeError, match="does not fit a bucket"):
        torch.ops.hjcg.pad_prompt(torch.arange(9), 0, 0, *pad_args("cpu")[3:])


# --- the decode step's kernels: CUDA-only ops ---------------------------------------------------------------

# what each op writes, as ops.h documents it: the schema must say so (the dispatcher, torch.compile and
# functionalization trust it), and opcheck on the GPU checks that the kernel writes nothing else
WRITES = {
    "sample": {"history", "history_len", "offset", "out"},
    "pad_prompt": {"input_ids", "positions", "last_index", "seq_len"},
    "apply_token_bitmask": {"logits"},
    "decode_attention": {"out", "workspace", "counters"},
    "rope_decode_attention": {"k_pool", "v_pool", "out", "workspace", "counters"},
    "rms_norm": {"out"},
    "rope_cache": {"q_out", "k_out", "v_out", "k_cache", "v_cache"},
    "silu_mul": {"out"},
    "gemv": {"out"},
    "gemv_fp8": {"out"},
    "gemv_mma": {"out"},
    "quantize_rows": {"q", "scale"},
}


@pytest.mark.parametrize("name", hjcg.native.OPS)  # every op the extension registers
def test_every_op_declares_what_it_writes_and_returns_nothing(name):
    schema = getattr(torch.ops.hjcg, name).default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == WRITES[name] and not schema.returns


def test_a_cuda_only_op_refuses_cpu_tensors_with_a_message():
    x = torch.ones(2, 8)
    with pytest.raises(NotImplementedError, match="hjcg::rms_norm.*CPU"):
        torch.ops.hjcg.rms_norm(x, torch.ones(8), 1e-5, torch.empty_like(x))


def cuda_op_args(name: str) -> tuple:
    """Small valid arguments for a CUDA-only op (the GPU kernel tests check its values; these, its schema)."""
    from hjcg import fp8

    torch.manual_seed(0)
    d, f16, heads, kv_heads, dim, block, rows = "cuda", torch.float16, 4, 2, 64, 16, 2
    rand = lambda *shape, dtype=f16: torch.randn(*shape, device=d, dtype=dtype)  # noqa: E731
    pool = lambda: rand(5 * block, kv_heads, dim)  # noqa: E731  (blocks 0..4 of one layer)
    tables = torch.tensor([[1, 2], [3, 4]], device=d, dtype=torch.int32)
    seq_lens = torch.tensor([20, 5], device=d)
    angles = torch.rand(64, dim // 2, device=d) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(f16) for f in (torch.cos, torch.sin))
    qkv = rand(rows, (heads + 2 * kv_heads) * dim)
    scratch = lambda: (torch.empty(rows * heads, 16, dim + 2, device=d),  # noqa: E731
                       torch.zeros(rows * heads, device=d, dtype=torch.int32))
    k, n = 256, 128
    x, w = rand(rows, k), rand(n, k) * k ** -0.5
    if name == "decode_attention":
        return (rand(rows, heads, dim), pool(), pool(), tables, seq_lens, block, dim ** -0.5,
                rand(rows, heads, dim), *scratch(), False)
    if name == "rope_decode_attention":
        return (qkv, cos, sin, pool(), pool(), tables, seq_lens, block, dim ** -0.5, rand(rows, heads, dim),
                *scratch(), False)
    if name == "rms_norm":
        return x, rand(k), 1e-5, torch.empty_like(x)
    if name == "rope_cache":
        positions, slots = torch.tensor([3, 7], device=d), torch.tensor([5, 40], device=d)
        return (qkv, cos, sin, positions, slots, heads, kv_heads, rand(rows, heads, dim), rand(rows, kv_heads, dim),
                rand(rows, kv_heads, dim), pool(), pool(), x, 1e-5, False)
    if name == "silu_mul":
        return rand(rows, 2 * k), torch.empty_like(x), None, 0.0
    if name == "gemv":
        return x, w, 1e-5, False, rand(rows, n), torch.empty(rows, n, device=d, dtype=f16)
    if name == "gemv_mma":
        return x, w, 1e-5, False, rand(rows, n), torch.empty(rows, n, device=d, dtype=f16), 0, 0, 0, 0, 0, False
    if name == "gemv_fp8":
        q = fp8.quantize_weight(w)
        return (rand(rows, 2 * k), q.q, q.scale, -1.0, True, None, torch.empty(rows, n, device=d, dtype=f16),
                0, 0, 0, 0, 0, False)
    if name == "quantize_rows":
        return x, torch.empty(x.shape, device=d, dtype=fp8.FP8_DTYPE), torch.empty(rows, device=d)
    raise KeyError(name)


CUDA_ONLY = [name for name in hjcg.native.OPS if name not in ("sample", "pad_prompt", "apply_token_bitmask")]


# torch's schema check compares values with arithmetic that float8 tensors lack ("mul_cuda" not implemented for
# 'Float8_e4m3fn'): for the fp8 ops, test_writes_only_what_its_schema_declares below does its job
FP8_ARGS = {"gemv_fp8", "quantize_rows"}


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_op_passes_opcheck(name):
    checks = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(getattr(torch.ops.hjcg, name).default, cuda_op_args(name),
                          test_utils=checks if name in FP8_ARGS else checks + ("test_schema",))


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_ONLY)
def test_cuda_only_op_writes_only_what_its_schema_declares(name):
    args = cuda_op_args(name)
    schema = getattr(torch.ops.hjcg, name).default._schema
    raw = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731  (bytes compare)
    before = {a.name: raw(v).clone() for a, v in zip(schema.arguments, args) if isinstance(v, torch.Tensor)}
    getattr(torch.ops.hjcg, name)(*args)
    torch.cuda.synchronize()
    for a, v in zip(schema.arguments, args):
        if isinstance(v, torch.Tensor) and a.name not in WRITES[name]:
            assert torch.equal(raw(v), before[a.name]), a.name
    changed = {a.name for a, v in zip(schema.arguments, args)
               if isinstance(v, torch.Tensor) and not torch.equal(raw(v), before[a.name])}
    assert changed <= WRITES[name] and changed  # it wrote something, and only what it declares


def spoiled(name: str, **changes) -> tuple:
    """cuda_op_args(name) with the arguments named in `changes` replaced (each change: the old value -> the new)."""
    schema = getattr(torch.ops.hjcg, name).default._schema
    names = [a.name for a in schema.arguments]
    args = list(cuda_op_args(name))
    for arg, change in changes.items():
        args[names.index(arg)] = change(args[names.index(arg)])
    return tuple(args)


def head_dim_96(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*t.shape[:-1], 96 + (2 if t.dtype == torch.float32 else 0), device=t.device, dtype=t.dtype)


# Checks whose message carries the values they refuse (csrc/checks.h). With their messages formatted by c10::str,
# such checks crashed the process on the GPU machine's build instead of raising.
REFUSED = [
    ("decode_attention", dict(q=head_dim_96, k_pool=head_dim_96, v_pool=head_dim_96, out=head_dim_96,
                              workspace=head_dim_96), "head dims 64, 128 and 256, got 96"),
    ("decode_attention", dict(q=torch.Tensor.double, k_pool=torch.Tensor.double, v_pool=torch.Tensor.double,
                              out=torch.Tensor.double), "unsupported dtype Double"),
    ("rms_norm", dict(x=lambda x: x[:, :12].contiguous(), weight=lambda w: w[:12].contiguous(),
                      out=lambda o: o[:, :12].contiguous()), "multiple of 8 and at most 32768, got 12"),
    ("rms_norm", dict(x=torch.Tensor.double, weight=torch.Tensor.double, out=torch.Tensor.double),
     "unsupported dtype Double"),
    ("rms_norm", dict(x=lambda x: x[:, ::2]), "x must be a contiguous CUDA tensor"),
    ("silu_mul", dict(norm_x=lambda _: torch.zeros(2, 12, device="cuda", dtype=torch.float16)),
     r"norm_x must be \[S, H\] = \[2, H\] .* multiple of 8; got \[2, 12\] Half on cuda:0"),
    ("gemv", dict(x=lambda x: torch.zeros(9, x.size(1), device="cuda", dtype=x.dtype)),
     r"1 <= B <= 8 .*; got x \[9, 256\] Half on cuda:\d, weight \[128, 256\] Half"),
    ("gemv", dict(rms_eps=lambda _: -1.0, silu_mul=lambda _: True),
     r"x must be \[B, 512\] \(\[gate, up\] with silu_mul\), got \[2, 256\] Half"),
    ("gemv", dict(out=lambda o: o[:, :16].contiguous()), r"out must be a contiguous \[B, N\] = \[2, 128\] .*got \[2, 16\]"),
    ("gemv", dict(residual=lambda r: r[:, :16].contiguous()),
     r"residual must be a contiguous \[B, N\] = \[2, 128\] .*got \[2, 16\] Half"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,changes,message", REFUSED, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(REFUSED)])
def test_cuda_op_refuses_bad_values_saying_what_they_are(name, changes, message):
    with pytest.raises(RuntimeError, match=message):
        getattr(torch.ops.hjcg, name)(*spoiled(name, **changes))


@pytest.mark.gpu
def test_cuda_sample_refuses_float64_logits_saying_so():
    args = list(sample_args("cuda"))
    args[0] = args[0].double()
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16, got Double"):
        torch.ops.hjcg.sample(*args)
