"""A checkpoint's own context limit (max_position_embeddings) caps the engine's context, the prompt limit
follows it, and the figure reported is the one served: a tiny local Llama checkpoint of 64 positions."""
import logging

import pytest
import torch

from hjcg import model_source
from hjcg.config import EngineConfig, fit_to_model
from hjcg.engine import Engine, GenerationRequest, RequestError

POSITIONS = 64


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A random 2-layer Llama with max_position_embeddings 64, beside the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-64")
    tokenizer = AutoTokenizer.from_pretrained(model_source.resolve("smollm2")[1])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_engine(path, **limits) -> Engine:
    return Engine(EngineConfig(model=str(path), device="cpu", prefill_buckets=(16,), **limits))


@pytest.fixture(scope="module")
def capped(tiny_checkpoint):
    return make_engine(tiny_checkpoint)  # the defaults: max_context 4096, max_prompt_tokens 3072


def test_the_default_context_is_capped_with_a_warning(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="hjcg.config"):
        engine = make_engine(tiny_checkpoint)
    assert engine.model_info()["context_length"] == POSITIONS
    assert (engine.config.max_context, engine.config.max_prompt_tokens) == (POSITIONS, POSITIONS - 1)
    assert "max_context 4096" in caplog.text and f"{POSITIONS} positions" in caplog.text


def test_an_explicit_larger_context_is_not_honoured(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="hjcg.config"):
        engine = make_engine(tiny_checkpoint, max_context=700, max_prompt_tokens=40)
    assert engine.model_info()["context_length"] == POSITIONS
    assert engine.config.max_prompt_tokens == 40  # already within the cap: kept
    assert "max_context 700" in caplog.text


def test_prompts_past_the_models_context_are_rejected(capped):
    capped.validate(GenerationRequest(prompt_ids=[5] * (POSITIONS - 1), max_new_tokens=1))
    for n in (POSITIONS, 70, 700):
        with pytest.raises(RequestError, match=f"at most {POSITIONS - 1}"):
            capped.validate(GenerationRequest(prompt_ids=[5] * n, max_new_tokens=1))


def test_generation_stops_at_the_models_context(capped):
    events = list(capped.generate(GenerationRequest(prompt_ids=[5] * 60, max_new_tokens=10, ignore_eos=True)))
    finish = events[-1]
    assert finish.reason == "length" and finish.completion_tokens == POSITIONS - 60


def test_a_context_within_the_models_is_kept(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="hjcg.config"):
        engine = make_engine(tiny_checkpoint, max_context=32, max_prompt_tokens=20)
    assert engine.model_info()["context_length"] == 32 and engine.config.max_prompt_tokens == 20
    assert "max_position_embeddings" not in caplog.text


@pytest.mark.parametrize("positions", [None, 0, 4096, 8192])
def test_fit_leaves_a_config_that_fits_alone(positions):
    config = EngineConfig(device="cpu")
    assert fit_to_model(config, positions) is config
