"""Logprobs (hjcg.logprobs defines them): each token's log_softmax of the step's logits and its top
alternatives equal transformers' in float32, cost nothing to the tokens, and reach gRPC clients."""
import grpc
import pytest
import torch

from hjcg.engine import Finish, GenerationRequest, TokenOutput
from hjcg.sampling import SamplingParams
from hjcg.v1 import hjcg_pb2 as pb


def tokens_of(engine, **kwargs) -> list[TokenOutput]:
    events = list(engine.generate(GenerationRequest(**kwargs)))
    assert isinstance(events[-1], Finish)
    return events[:-1]


def hf_logprobs(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """Teacher-forced log_softmax of transformers' logits at each generated position [n, V]."""
    with torch.inference_mode():
        logits = hf_model.hf_model(torch.tensor([prompt + generated])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1:len(prompt) - 1 + len(generated)]


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(temperature=0.8, top_k=20, seed=7,
                                                                       repetition_penalty=1.3)])
def test_logprobs_equal_log_softmax_of_transformers_logits(engine, hf_model, sampling):
    prompt = engine.encode_text("The capital of France is")
    tokens = tokens_of(engine, prompt_ids=prompt, max_new_tokens=12, ignore_eos=True, logprobs=5, sampling=sampling)
    reference = hf_logprobs(hf_model, prompt, [t.id for t in tokens])
    for t, ref in zip(tokens, reference):
        # before penalty, temperature and filters: the model's own distribution whatever the settings
        assert t.logprob == pytest.approx(ref[t.id].item(), abs=1e-3)
        ids = [i for i, _ in t.top_logprobs]
        values = torch.tensor([v for _, v in t.top_logprobs])
        assert len(ids) == 5 and torch.all(values[:-1] >= values[1:])
        assert torch.allclose(values, ref[ids], atol=1e-3)
        assert torch.allclose(values, ref.topk(5).values, atol=1e-3)


def test_greedy_token_has_the_top_logprob_and_asking_changes_no_token(engine):
    prompt = engine.encode_text("def fibonacci(n):")
    plain = tokens_of(engine, prompt_ids=prompt, max_new_tokens=10, ignore_eos=True)
    with_logprobs = tokens_of(engine, prompt_ids=prompt, max_new_tokens=10, ignore_eos=True, logprobs=1)
    assert [t.id for t in plain] == [t.id for t in with_logprobs]
    assert all(t.logprob is None and t.top_logprobs == () for t in plain)
    for t in with_logprobs:
        assert t.top_logprobs[0][0] == t.id and t.top_logprobs[0][1] == pytest.approx(t.logprob)


def test_each_stream_of_a_batch_gets_its_own_number_of_alternatives(engine):
    prompt = engine.encode_text("Once upon a time")
    events = {n: [] for n in (None, 0, 3)}
    for n in events:
        engine.submit(GenerationRequest(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True, logprobs=n),
                      events[n].append)
    while engine.has_work():
        engine.step()
    assert all(e.logprob is None for e in events[None][:-1])
    assert all(e.logprob is not None and e.top_logprobs == () for e in events[0][:-1])
    assert all(len(e.top_logprobs) == 3 for e in events[3][:-1])
    assert [e.logprob for e in events[0][:-1]] == pytest.approx([e.logprob for e in events[3][:-1]], abs=1e-4)


def test_logprobs_over_grpc(client, engine):
    request = client.request(text="The capital of France is", max_new_tokens=4, ignore_eos=True, logprobs=2)
    tokens = [r.token for r in client.generate_stream(request) if r.HasField("token")]
    assert len(tokens) == 4
    for token in tokens:
        assert token.HasField("logprob") and token.logprob <= 0
        assert [t.id for t in token.top_logprobs][0] == token.id
        assert token.top_logprobs[0].text == engine.token_text(token.id)
    plain = [r.token for r in client.generate(text="The capital of France is", max_new_tokens=2) if r.HasField("token")]
    assert not plain[0].HasField("logprob") and not plain[0].top_logprobs


@pytest.mark.parametrize("request_,message", [
    (pb.GenerateRequest(text="x", top_logprobs=3), "top_logprobs needs logprobs"),
    (pb.GenerateRequest(text="x", logprobs=True, top_logprobs=21), "top_logprobs must be in [0, 20]"),
])
def test_bad_logprobs_are_invalid_argument(client, request_, message):
    with pytest.raises(grpc.RpcError) as info:
        list(client.generate_stream(request_))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in info.value.details()
