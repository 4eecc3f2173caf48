"""Logprobs and structured output on the GPU through the hybrid path (CUDA graphs, fused kernels): logprobs
equal transformers' log_softmax in float32, constrained streams give valid JSON, and a batch mixing
constrained and free streams gives every stream its solo tokens.

Uses random weights of SmolLM2-135M's shape with SmolLM2's tokenizer, whose directory HJCG_TEST_TOKENIZER
names (the converted embedded model's, e.g. ~/.cache/hjcg/converted/<name>/; bench/gpu_run.sh's README
section says how to carry it)."""
import json
import os

import pytest
import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, GenerationRequest, TokenOutput
from hjcg.random_models import random_llama
from hjcg.requests import Constraint

pytestmark = pytest.mark.gpu

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                    "maxItems": 4}},
          "required": ["name", "tags"], "additionalProperties": False}


def loaded_model():
    from transformers import AutoTokenizer

    directory = os.environ.get("HJCG_TEST_TOKENIZER")
    if not directory:
        pytest.fail("set HJCG_TEST_TOKENIZER to a SmolLM2 tokenizer directory")
    loaded = random_llama("smollm2-135m", torch.float32, "cuda", seed=3)
    loaded.tokenizer = AutoTokenizer.from_pretrained(directory)
    return loaded


@pytest.fixture(scope="module")
def reference_model():
    return loaded_model().hf_model  # the same seed: the engine's weights


@pytest.fixture(scope="module")
def engine():
    return Engine(EngineConfig(model="random:smollm2-135m", device="cuda", dtype="float32", mode="hybrid",
                               max_context=1024, max_prompt_tokens=512, max_new_tokens=256, max_batch=8),
                  loaded_model())


def run_together(engine, requests: list[GenerationRequest], join_every: int = 1) -> list[list[TokenOutput]]:
    """Submits the requests `join_every` steps apart and runs them to the end; each stream's tokens."""
    outputs = [[] for _ in requests]
    for i, request in enumerate(requests):
        engine.submit(request, lambda e, i=i: isinstance(e, TokenOutput) and outputs[i].append(e))
        for _ in range(join_every):
            engine.step()
    while engine.has_work():
        engine.step()
    return outputs


def test_logprobs_equal_transformers_log_softmax(engine, reference_model):
    prompt = engine.encode_text("The weather today is")
    (tokens,) = run_together(engine, [GenerationRequest(prompt_ids=prompt, max_new_tokens=16, ignore_eos=True,
                                                        logprobs=4)])
    with torch.inference_mode():
        logits = reference_model(torch.tensor([prompt + [t.id for t in tokens]], device="cuda")).logits[0].float()
    reference = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].cpu()
    for t, ref in zip(tokens, reference):
        assert t.logprob == pytest.approx(ref[t.id].item(), abs=1e-3)
        ids = [i for i, _ in t.top_logprobs]
        assert torch.allclose(torch.tensor([v for _, v in t.top_logprobs]), ref[ids], atol=1e-3)
        assert torch.allclose(torch.tensor([v for _, v in t.top_logprobs]), ref.topk(4).values, atol=1e-3)


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "tags"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and isinstance(value["tags"], list) and len(value["tags"]) <= 4
            and all(isinstance(t, str) and len(t) <= 6 for t in value["tags"]))


def test_mixed_batch_gives_every_stream_its_solo_tokens(engine):
    schema = Constraint("json_schema", json.dumps(PERSON))
    prompts = [engine.encode_text(p) for p in ("A person:", "Numbers: 1, 2,", "The story begins", "Tags for a cat:")]
    requests = [GenerationRequest(prompt_ids=prompts[0], max_new_tokens=80, constraint=schema),
                GenerationRequest(prompt_ids=prompts[1], max_new_tokens=40, ignore_eos=True),
                GenerationRequest(prompt_ids=prompts[2], max_new_tokens=40, ignore_eos=True, logprobs=2),
                GenerationRequest(prompt_ids=prompts[3], max_new_tokens=80, constraint=Constraint("json_object"))]
    solo = [run_together(engine, [r])[0] for r in requests]
    together = run_together(engine, requests, join_every=3)  # joining at different steps
    for alone, batched in zip(solo, together):
        assert [t.id for t in batched] == [t.id for t in alone]
    assert valid_person("".join(t.text for t in together[0]))
    assert isinstance(json.loads("".join(t.text for t in together[3])), dict)
    assert [t.logprob for t in together[2]] == pytest.approx([t.logprob for t in solo[2]], abs=1e-5)


def test_constrained_sampling_gives_valid_json_in_every_row(engine):
    from hjcg.sampling import SamplingParams

    schema = Constraint("json_schema", json.dumps(PERSON))
    requests = [GenerationRequest(prompt_ids=engine.encode_text(f"Person {i}:"), max_new_tokens=96, constraint=schema,
                                  sampling=SamplingParams(temperature=1.0, seed=i)) for i in range(8)]
    for tokens in run_together(engine, requests):
        assert valid_person("".join(t.text for t in tokens))
