"""fp8 (e4m3) weights on the CPU: the quantization's spec (hjcg.fp8), the model's products through it, and
the engine serving fp8 weights (EngineConfig.weights="fp8")."""
import pytest
import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, Finish, GenerationRequest, TokenOutput
from hjcg.fp8 import FP8_DTYPE, FP8_MAX, Fp8Weight, linear_reference, quantize_rows, quantize_weight
from hjcg.llama import FastLlama, LayerOps, W8A8ReferenceOps, causal_self_attention, linear

E4M3_HALF_ULP = 2.0 ** -4        # relative rounding error of a normal e4m3 value (3 mantissa bits)
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # spacing below e4m3's smallest normal, 2^-6


def wide_rows(n: int = 64, k: int = 256, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, each with values spread over ~6 binary orders (subnormals too)."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-6, 1, (n, k), generator=g).float())
    return values * torch.exp2(torch.linspace(-12, 12, n))[:, None]


# --- the quantization --------------------------------------------------------------------------------------

def test_round_trip_error_is_bounded_per_element_by_e4m3_rounding_at_the_rows_scale():
    w = wide_rows()
    fp8 = quantize_weight(w)
    err = (fp8.dequantize() - w).abs()
    # half an ulp of the scaled value, or half the subnormal step, back in the row's units (+ float32 slack)
    bound = torch.maximum(E4M3_HALF_ULP * w.abs(), E4M3_SUBNORMAL_STEP / 2 * fp8.scale[:, None]) * (1 + 1e-6)
    assert (err <= bound).all()
    assert (err > 0).any()  # a bound that holds because nothing was rounded would test nothing
    # per row: at most half an ulp of e4m3's top binade [256, 448] (16), in units of the row's largest value
    assert (err.amax(dim=1) <= 16 / FP8_MAX * w.abs().amax(dim=1) * (1 + 1e-6)).all()


def test_each_rows_largest_magnitude_maps_to_448_and_no_value_past_it():
    w = wide_rows()
    fp8 = quantize_weight(w)
    amax = w.abs().amax(dim=1)
    torch.testing.assert_close(fp8.scale, amax / FP8_MAX, rtol=0, atol=0)
    assert (fp8.q.float().abs().amax(dim=1) == FP8_MAX).all()
    torch.testing.assert_close(fp8.dequantize().abs().amax(dim=1), amax, rtol=1e-6, atol=0)
    assert torch.isfinite(fp8.q.float()).all()  # e4m3fn has no infinity: past 464 a cast would give NaN


def test_an_all_zero_row_gets_scale_one_and_zeros():
    w = torch.randn(3, 32)
    w[1] = 0
    fp8 = quantize_weight(w)
    assert fp8.scale[1] == 1.0 and (fp8.q[1].float() == 0).all() and (fp8.dequantize()[1] == 0).all()


def test_the_scale_is_per_row_scaling_a_row_scales_only_its_scale():
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    scaled = w * torch.tensor([1.0, 8.0, 2.0 ** -10, 1.0])[:, None]  # powers of two: exact in any float
    a, b = quantize_weight(w), quantize_weight(scaled)
    assert torch.equal(a.q.float(), b.q.float())
    torch.testing.assert_close(b.scale / a.scale, torch.tensor([1.0, 8.0, 2.0 ** -10, 1.0]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shapes_dtypes_and_bytes(dtype):
    w = torch.randn(48, 80).to(dtype)
    fp8 = quantize_weight(w)
    assert fp8.q.dtype == FP8_DTYPE and fp8.q.shape == (48, 80) and fp8.q.is_contiguous()
    assert fp8.scale.dtype == torch.float32 and fp8.scale.shape == (48,)
    assert fp8.shape == w.shape and fp8.device == w.device
    assert fp8.nbytes == 48 * 80 + 4 * 48
    assert fp8.dequantize(dtype).dtype == dtype
    q, scale = quantize_rows(w)
    assert q.dtype == FP8_DTYPE and q.shape == (48, 80) and scale.dtype == torch.float32 and scale.shape == (48,)


@pytest.mark.parametrize("shape", [(16,), (2, 3, 4), ()])
def test_a_weight_must_be_a_matrix(shape):
    with pytest.raises(ValueError, match="2 dimensions"):
        quantize_weight(torch.ones(shape))


# --- the products --------------------------------------------------------------------------------------------

def dequantized64(weight: Fp8Weight) -> torch.Tensor:
    return weight.q.double() * weight.scale.double()[:, None]


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_reference_product_is_the_float64_product_with_the_dequantized_weight(dtype, rtol):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(7, 96, generator=g).to(dtype), quantize_weight(torch.randn(40, 96, generator=g))
    expected = x.double() @ dequantized64(w).t()
    got = linear_reference(x, w)
    assert got.dtype == dtype and got.shape == (7, 40)
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())
    torch.testing.assert_close(linear(x, w), got, rtol=0, atol=0)  # the model's helper is that product


def test_reference_product_with_quantized_input_rounds_each_row_to_e4m3():
    g = torch.Generator().manual_seed(3)
    x, w = wide_rows(9, 96, seed=4), quantize_weight(torch.randn(40, 96, generator=g))
    q, scale = quantize_rows(x)
    x64 = q.double() * scale.double()[:, None]
    expected = x64 @ dequantized64(w).t()
    got = linear_reference(x, w, quantize_input=True)
    assert ((got.double() - expected).abs() <= 1e-5 * expected.abs().amax(1, keepdim=True)).all()  # rows' own scale
    assert not torch.allclose(got, linear_reference(x, w))  # the activations' rounding shows
    torch.testing.assert_close(W8A8ReferenceOps().linear(x, w), got, rtol=0, atol=0)


def test_a_plain_weight_is_a_plain_product_in_every_ops():
    x, w = torch.randn(5, 32), torch.randn(12, 32)
    for ops in (LayerOps(), W8A8ReferenceOps()):
        torch.testing.assert_close(ops.linear(x, w), x @ w.t(), rtol=0, atol=0)


# --- the model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from hjcg.random_models import random_llama

    return random_llama("tiny-gqa", torch.float32, "cpu", seed=7).hf_model


def prompt_logits(model: FastLlama, ids: torch.Tensor, ops: LayerOps | None = None) -> torch.Tensor:
    positions = torch.arange(ids.numel())
    cache = model.new_cache(num_blocks=1 + -(-ids.numel() // 16), block_size=16)
    with torch.inference_mode():
        return model.forward(ids, positions, positions + 16, cache, causal_self_attention(), None, ops)


def test_quantize_weights_replaces_the_layers_matrices_only(tiny):
    model = FastLlama(tiny, torch.device("cpu"), torch.float32, 64)
    float_bytes = model.weight_bytes()
    model.quantize_weights()
    for layer in model.layers:
        assert all(isinstance(w, Fp8Weight) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
        assert layer.input_norm.dtype == layer.post_norm.dtype == torch.float32
    assert model.embed.dtype == torch.float32 and isinstance(model.lm_head, torch.Tensor)
    assert model.weight_format == "fp8_e4m3"
    # a decode step reads a quarter of the float32 layer bytes plus the scales; the lm head as before
    s = model.shape
    head = s.vocab_size * s.hidden_size * 4
    rows = s.num_layers * ((s.num_heads + 2 * s.num_kv_heads) * s.head_dim + s.hidden_size  # qkv, o
                           + 2 * s.intermediate_size + s.hidden_size)                        # gate_up, down
    assert model.weight_bytes() == (float_bytes - head) // 4 + 4 * rows + head


def test_the_fp8_lm_head_is_optional(tiny):
    model = FastLlama(tiny, torch.device("cpu"), torch.float32, 64)
    model.quantize_weights(lm_head=True)
    assert isinstance(model.lm_head, Fp8Weight) and model.embed.dtype == torch.float32


def test_folded_norms_keep_the_torch_forward_equal_to_transformers(hf_model):
    # quantize_weights folds the norms into the matrices first; folding alone is exact maths
    ids = torch.tensor(hf_model.tokenizer("The quick brown fox jumps over the lazy dog because")["input_ids"])
    model = FastLlama(hf_model.hf_model, torch.device("cpu"), torch.float32, 64)
    model.fold_norm_weights()
    with torch.inference_mode():
        expected = hf_model.hf_model(ids[None]).logits[0]
    got = prompt_logits(model, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=5e-4)  # measured: 5.4e-5
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def test_the_fp8_forward_is_the_float_forward_over_the_dequantized_matrices(tiny):
    ids = torch.randint(3, 1000, (24,), generator=torch.Generator().manual_seed(0))
    model = FastLlama(tiny, torch.device("cpu"), torch.float32, 64)
    model.quantize_weights()
    dequantized = FastLlama(tiny, torch.device("cpu"), torch.float32, 64)
    dequantized.fold_norm_weights()
    for layer in dequantized.layers:
        layer.qkv, layer.o, layer.gate_up, layer.down = (quantize_weight(w).dequantize() for w in layer.matrices())
    fp8 = prompt_logits(model, ids)
    torch.testing.assert_close(fp8, prompt_logits(dequantized, ids))
    # random N(0, 0.02) weights, measured: 5.7% relative error against float32, 7.2% with fp8 activations too
    exact = prompt_logits(FastLlama(tiny, torch.device("cpu"), torch.float32, 64), ids)
    w8a8 = prompt_logits(model, ids, W8A8ReferenceOps())
    assert 0 < relative_error(fp8, exact) < 0.08
    assert relative_error(fp8, exact) < relative_error(w8a8, exact) < 0.1


# --- the engine ----------------------------------------------------------------------------------------------

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fp8_engine(hf_model):
    return Engine(EngineConfig(device="cpu", max_context=1024, max_prompt_tokens=768, max_new_tokens=128,
                               prefill_buckets=(16, 64), weights="fp8"), hf_model)


def greedy(engine: Engine, ids: list[int], n: int) -> tuple[list[int], str, Finish]:
    events = list(engine.generate(GenerationRequest(prompt_ids=ids, max_new_tokens=n)))
    tokens = [e for e in events if isinstance(e, TokenOutput)]
    return [e.id for e in tokens], "".join(e.text for e in tokens) + events[-1].text, events[-1]


def test_fp8_engine_answers_as_the_float32_engine(engine, fp8_engine):
    # measured: the whole answer, "The capital of France is Paris." (7 tokens, then EOS), is the float32 one
    ids = engine.encode_chat(QUESTION)
    expected, expected_text, _ = greedy(engine, ids, 30)
    got, text, finish = greedy(fp8_engine, ids, 30)
    assert got == expected and text == expected_text and "Paris" in text and finish.reason == "eos"


def test_fp8_engine_reports_its_weights(engine, fp8_engine):
    assert fp8_engine.model_info()["weights"] == "fp8_e4m3"
    assert engine.model_info()["weights"] == "float32"
    assert fp8_engine.model.weight_bytes() < 0.45 * engine.model.weight_bytes()  # measured 0.41: lm head in float32


def test_config_names_the_allowed_weight_formats():
    with pytest.raises(ValueError, match=r"weights must be one of \('dtype', 'fp8'\).*got 'int4'"):
        EngineConfig(device="cpu", weights="int4")


def test_fp8_weights_add_short_prefill_buckets_that_the_fp8_gemv_serves():
    from hjcg.config import DEFAULT_PREFILL_BUCKETS, DEFAULT_GRAPH_CACHE_ENTRIES
    from hjcg.fused_ops import FP8_GEMV_MAX_ROWS

    fp8_buckets = EngineConfig(device="cpu", weights="fp8").prefill_buckets
    short = fp8_buckets[:-len(DEFAULT_PREFILL_BUCKETS)]
    assert fp8_buckets == (*short, *DEFAULT_PREFILL_BUCKETS) and short == (8, 12, 16)
    assert max(short) <= FP8_GEMV_MAX_ROWS  # every short bucket runs the GEMV
    # the default graph cache holds each bucket's two prefill graphs and the 6 batch buckets' 3 decode graphs
    assert 2 * len(fp8_buckets) + 3 * 6 <= DEFAULT_GRAPH_CACHE_ENTRIES
    assert EngineConfig(device="cpu").prefill_buckets == DEFAULT_PREFILL_BUCKETS
    assert EngineConfig(device="cpu", weights="fp8", prefill_buckets=(64, 32)).prefill_buckets == (32, 64)
