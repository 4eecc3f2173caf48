"""fp8 weights cost little quality on real weights: the perplexity of the embedded SmolLM2-135M-Instruct on
the reference text (hjcg.perplexity), float32 against fp8, within the issue's 1.5%."""
import math

import pytest
import torch
import torch.nn.functional as F

from hjcg import perplexity as ppl
from hjcg.llama import FastLlama

# The first two windows of 1024 tokens keep the test near 30 s on two cores; measured there: float32
# 21.257, fp8 21.422 (+0.77%). Over the whole text (7658 tokens, `python -m hjcg.perplexity`): 19.029 and
# 19.104 (+0.39%).
TOKENS, WINDOW = 2048, 1024
FP8_BAR = 0.015


@pytest.fixture(scope="module")
def token_ids(hf_model):
    return ppl.reference_token_ids(hf_model.tokenizer)


def test_the_reference_text_is_about_8k_tokens(token_ids):
    assert 7000 < len(token_ids) < 9000
    assert ppl.load_reference_text().startswith("                    GNU GENERAL PUBLIC LICENSE")


def test_a_missing_reference_text_says_where_it_was_looked_for(monkeypatch, tmp_path):
    monkeypatch.setattr(ppl, "REFERENCE_TEXT", tmp_path / "GPL-3")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/GPL-3 is missing"):
        ppl.load_reference_text()


def test_perplexity_is_transformers_loss_over_the_same_windows(hf_model, token_ids):
    ids = token_ids[:300]  # windows of 128, 128 and 44 tokens
    nll, scored = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), 128):
            window = torch.tensor(ids[start:start + 128])
            logits = hf_model.hf_model(window[None]).logits[0]
            nll += float(F.cross_entropy(logits[:-1], window[1:], reduction="sum"))
            scored += window.numel() - 1
    model = FastLlama(hf_model.hf_model, torch.device("cpu"), torch.float32, 128)
    assert ppl.perplexity(model, ids, window=128) == pytest.approx(math.exp(nll / scored), rel=1e-5)


def test_fp8_perplexity_is_within_1_5_percent_of_float32(hf_model, token_ids):
    ids = token_ids[:TOKENS]
    exact = ppl.perplexity(FastLlama(hf_model.hf_model, torch.device("cpu"), torch.float32, WINDOW), ids, WINDOW)
    model = FastLlama(hf_model.hf_model, torch.device("cpu"), torch.float32, WINDOW)
    model.quantize_weights()
    fp8 = ppl.perplexity(model, ids, WINDOW)
    print(f"perplexity over {len(ids)} tokens, windows of {WINDOW}: float32 {exact:.4f}, fp8 {fp8:.4f} "
          f"({100 * (fp8 / exact - 1):+.2f}%)")
    assert 1 < exact < 100  # a model that reads the text at all
    assert abs(fp8 / exact - 1) <= FP8_BAR
