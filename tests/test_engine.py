"""The engine on the CPU: outputs identical to transformers, sampling, stops, limits."""
import pytest
import torch

from hjcg.config import EngineConfig
from hjcg.engine import Finish, GenerationRequest, RequestError, TokenOutput
from hjcg.sampling import SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def run(engine, **kwargs):
    events = list(engine.generate(GenerationRequest(**kwargs)))
    assert isinstance(events[-1], Finish) and all(isinstance(e, TokenOutput) for e in events[:-1])
    return [e.id for e in events[:-1]], "".join(e.text for e in events[:-1]) + events[-1].text, events[-1]


def hf_greedy(hf_model, ids, n):
    with torch.inference_mode():
        out = hf_model.hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_answers_the_capital_of_france(engine):
    ids = engine.encode_chat(QUESTION)
    _, text, finish = run(engine, prompt_ids=ids, max_new_tokens=30)
    assert "Paris" in text
    assert finish.reason == "eos"


@pytest.mark.parametrize("prompt", ["The quick brown fox", "def fibonacci(n):", "Once upon a time, in a land"])
def test_greedy_tokens_identical_to_transformers_generate(engine, hf_model, prompt):
    ids = engine.encode_text(prompt)
    expected = hf_greedy(hf_model, ids, 40)
    got, _, _ = run(engine, prompt_ids=ids, max_new_tokens=40, ignore_eos=True)
    eos = engine.eos_ids
    cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
    assert got[:cut] == expected[:cut]


def test_chunked_prefill_matches_transformers(engine, hf_model):
    # 16- and 64-token buckets: a 150-token prompt prefills in three chunks
    ids = engine.encode_text("Count: " + ", ".join(str(i) for i in range(60)))
    assert len(ids) > 128
    got, _, _ = run(engine, prompt_ids=ids, max_new_tokens=12, ignore_eos=True)
    assert got == hf_greedy(hf_model, ids, 12)


def test_seeded_sampling_is_reproducible(engine):
    ids = engine.encode_text("My favourite food is")
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    first, _, _ = run(engine, prompt_ids=ids, max_new_tokens=20, sampling=params, ignore_eos=True)
    again, _, _ = run(engine, prompt_ids=ids, max_new_tokens=20, sampling=params, ignore_eos=True)
    other, _, _ = run(engine, prompt_ids=ids, max_new_tokens=20, ignore_eos=True,
                      sampling=SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=99))
    assert first == again and first != other


def test_stop_string_ends_generation_and_is_not_returned(engine):
    ids = engine.encode_chat(QUESTION)
    _, text, finish = run(engine, prompt_ids=ids, max_new_tokens=30, stop=[" Paris"])
    assert finish.reason == "stop" and text == "The capital of France is"


def test_stop_token_id_and_max_new_tokens(engine):
    ids = engine.encode_chat(QUESTION)
    paris = engine.tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    got, _, finish = run(engine, prompt_ids=ids, max_new_tokens=30, stop_token_ids=[paris])
    # the stop token is counted in usage but not streamed (like EOS)
    assert finish.reason == "stop" and paris not in got and finish.completion_tokens == len(got) + 1
    got, _, finish = run(engine, prompt_ids=ids, max_new_tokens=3)
    assert finish.reason == "length" and len(got) == 3


def test_cancellation_stops_within_a_token(engine):
    ids = engine.encode_text("Tell me a long story")
    seen = []
    for event in engine.generate(GenerationRequest(ids, 100, ignore_eos=True), cancelled=lambda: len(seen) >= 3):
        seen.append(event)
    assert seen[-1].reason == "cancelled"
    assert len(seen) == 4  # three tokens, then the finish


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_ids=[]), "empty"),
    (dict(prompt_ids=[1] * 769), "at most 768"),
    (dict(prompt_ids=[49152]), "outside the vocabulary"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[1], max_new_tokens=129), "max_new_tokens"),
    (dict(prompt_ids=[1], stop_token_ids=[-1]), "stop token id"),
])
def test_invalid_requests_are_rejected_with_a_reason(engine, kwargs, message):
    kwargs.setdefault("max_new_tokens", 5)
    with pytest.raises(RequestError, match=message):
        list(engine.generate(GenerationRequest(**kwargs)))


def test_status_figures(engine):
    info = engine.model_info()
    assert info == {"name": "SmolLM2-135M-Instruct", "architecture": "llama", "dtype": "float32", "weights": "float32",
                    "context_length": 1024, "vocab_size": 49152}
    assert engine.graph_stats() == {}
    assert engine.warm([])["available"] is False


@pytest.mark.parametrize("kwargs,message", [
    (dict(device="tpu"), "device"), (dict(mode="hybrid", device="cpu"), "needs a CUDA device"),
    (dict(dtype="int8"), "dtype"), (dict(max_prompt_tokens=5000), "smaller than max_context"),
    (dict(decode_lookahead=4), r"decode_lookahead must be in \[0, 3\]"),
    (dict(decode_lookahead=-1), "decode_lookahead"),
    (dict(gemv_max_rows=9), r"gemv_max_rows must be in \[0, 8\]"),
    (dict(mma_gemv_max_rows=17), r"mma_gemv_max_rows must be in \[0, 16\]"),
    (dict(mma_gemv_max_rows=-1), "mma_gemv_max_rows"),
])
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2), dict(min_p=2),
                                    dict(seed=-1), dict(temperature=float("nan"))])
def test_sampling_params_reject_out_of_range_values(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampled_rows_alone_in_the_last_layer_give_the_full_forward_logits():
    # The last layer runs its attention, o projection and MLP on the rows the lm head reads; their logits
    # must be those of the full forward, wherever the rows sit in the prompt.
    from hjcg.llama import FastLlama, causal_self_attention
    from hjcg.random_models import random_llama

    loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=3)
    model = FastLlama(loaded.hf_model, torch.device("cpu"), torch.float32, 64)
    ids = torch.randint(3, loaded.hf_model.config.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(20)
    cache = model.new_cache(num_blocks=4, block_size=16)
    slots = positions + 16  # blocks 1 and 2 (block 0 is the trash block)
    full = model.forward(ids, positions, slots, cache, causal_self_attention(), None)
    rows = torch.tensor([19, 4])
    trimmed = model.forward(ids, positions, slots, cache, causal_self_attention(), rows)
    torch.testing.assert_close(trimmed, full[rows], rtol=1e-5, atol=1e-5)
