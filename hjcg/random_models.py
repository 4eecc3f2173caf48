"""Llama-family models with random weights at real shapes, for benchmarks and GPU tests (latency does
not depend on weight values, and no real 7B weights are at hand). Served as model "random:<shape>"."""
from __future__ import annotations

import torch

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      intermediate_size=11008, vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096,
                      rope_theta=10000.0, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, rms_norm_eps=1e-5, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny-gqa": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, vocab_size=1000, rms_norm_eps=1e-5, max_position_embeddings=4096,
                     rope_theta=10000.0, tie_word_embeddings=False),
}


def word_tokenizer(vocab_size: int):
    """A tokenizer whose tokens are the words t0 ... t{N-1}: enough to stream text for token-id requests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t2", bos_token="t1")


def random_llama(shape: str, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
                 seed: int = 0):
    """Returns a model_source.LoadedModel of the named shape with N(0, 0.02) weights from `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hjcg.model_source import LoadedModel

    if shape not in SHAPES:
        raise ValueError(f"unknown random model shape {shape!r}; choose from {sorted(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    model.generation_config.eos_token_id = 2
    return LoadedModel(name=f"random:{shape}", path=f"random:{shape}", hf_model=model,
                       tokenizer=word_tokenizer(config.vocab_size))
