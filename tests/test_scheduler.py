"""Continuous batching on the CPU, through the engine's public API (submit, step, stats): streams join and
leave the running batch at step boundaries, each stream's tokens are those of its solo run, requests wait
for KV room in arrival order, and the queue stays bounded."""
import pytest
import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, Finish, GenerationRequest, QueueFull, RequestError, TokenOutput
from hjcg.sampling import SamplingParams


class Collector:
    """A sink: the stream's token ids, its text and its finish."""

    def __init__(self):
        self.ids, self.text, self.finish = [], "", None

    def __call__(self, event):
        if isinstance(event, TokenOutput):
            self.ids.append(event.id)
            self.text += event.text
        else:
            assert isinstance(event, Finish) and self.finish is None
            self.finish = event


def drive(engine, collectors, max_steps=10_000):
    for _ in range(max_steps):
        if all(c.finish for c in collectors) and not engine.has_work():
            return
        engine.step()
    raise AssertionError("the streams did not finish")


def solo(engine, request):
    return [e.id for e in engine.generate(request) if isinstance(e, TokenOutput)]


def hf_greedy(hf_model, ids, n):
    with torch.inference_mode():
        out = hf_model.hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


@pytest.fixture(scope="module")
def tiny():
    """A two-layer random model whose KV pool holds 11 blocks of 16 tokens (two 60-token streams)."""
    from hjcg.random_models import random_llama

    loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=5)
    per_block = 2 * 2 * 16 * 2 * 64 * 4  # K and V, 2 layers, 16 tokens, 2 KV heads, head dim 64, fp32
    config = EngineConfig(model=loaded.name, device="cpu", max_context=64, max_prompt_tokens=48, max_new_tokens=48,
                          prefill_buckets=(16,), max_batch=4, max_waiting=3, kv_cache_gib=12 * per_block / 2**30)
    return Engine(config, loaded)


def test_streams_joining_at_different_steps_each_get_their_solo_tokens(engine, hf_model):
    prompts = ["The quick brown fox", "def fibonacci(n):",
               "Count: " + ", ".join(str(i) for i in range(40)),  # longer than a 64-token prefill chunk
               "Once upon a time, in a land"]
    requests = [GenerationRequest(engine.encode_text(p), max_new_tokens=12 + 3 * i, ignore_eos=True)
                for i, p in enumerate(prompts)]
    collectors = [Collector() for _ in requests]
    engine.submit(requests[0], collectors[0])
    engine.submit(requests[1], collectors[1])
    engine.step()
    engine.step()
    engine.submit(requests[2], collectors[2])
    engine.step()
    assert engine.stats()["running"] == 3 and engine.stats()["batch_bucket"] == 4
    engine.submit(requests[3], collectors[3])
    drive(engine, collectors)
    for request, c in zip(requests, collectors):
        assert c.finish.reason == "length" and c.finish.completion_tokens == request.max_new_tokens
        assert c.ids == solo(engine, request)
        assert c.ids == hf_greedy(hf_model, request.prompt_ids, request.max_new_tokens)


def test_a_seeded_sampled_stream_draws_the_same_tokens_alone_and_in_a_batch(engine):
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=77)
    request = GenerationRequest(engine.encode_text("My favourite food is"), 16, sampling=params, ignore_eos=True)
    alone = solo(engine, request)
    collectors = [Collector() for _ in range(3)]
    # a neighbour first, so the seeded stream runs in row 1, not row 0
    engine.submit(GenerationRequest(engine.encode_text("Hello there"), 20, ignore_eos=True), collectors[0])
    engine.step()
    engine.submit(request, collectors[1])
    engine.submit(GenerationRequest(engine.encode_text("Why is the sky blue?"), 8,
                                    sampling=SamplingParams(temperature=1.0, seed=3), ignore_eos=True), collectors[2])
    drive(engine, collectors)
    assert collectors[1].ids == alone


def test_the_batch_shrinks_to_a_smaller_bucket_as_streams_finish(engine):
    ids = engine.encode_text("Tell me a story")
    lengths = [3, 3, 3, 20, 20]
    collectors = [Collector() for _ in lengths]
    for n, c in zip(lengths, collectors):
        engine.submit(GenerationRequest(ids, n, ignore_eos=True), c)
    engine.step()
    assert engine.stats()["running"] == 5 and engine.stats()["batch_bucket"] == 8
    steps = 1
    while not collectors[0].finish:
        engine.step()
        steps += 1
    engine.step()  # the finished streams leave at the step boundary
    assert engine.stats()["running"] == 2 and engine.stats()["batch_bucket"] == 2
    drive(engine, collectors)
    assert [c.finish.completion_tokens for c in collectors] == lengths


def test_a_cancelled_stream_leaves_the_batch_within_a_step(engine):
    ids = engine.encode_text("Tell me a long story")
    a, b = Collector(), Collector()
    engine.submit(GenerationRequest(ids, 50, ignore_eos=True), a)
    seq = engine.submit(GenerationRequest(ids, 50, ignore_eos=True), b)
    engine.step()
    engine.step()
    seq.cancel()
    engine.step()
    assert b.finish is not None and b.finish.reason == "cancelled"
    assert engine.stats()["running"] == 1
    drive(engine, [a])
    assert a.finish.completion_tokens == 50


def test_requests_wait_for_kv_room_in_arrival_order(tiny):
    used_before = tiny.stats()["kv_blocks_used"]
    collectors = [Collector() for _ in range(3)]
    seqs = [tiny.submit(GenerationRequest(list(range(3, 23)), n, ignore_eos=True), c)
            for n, c in zip((40, 44, 40), collectors)]
    tiny.step()
    stats = tiny.stats()
    assert stats["running"] == 2 and stats["waiting"] == 1  # 4 blocks each; 11 in the pool
    assert stats["kv_blocks_used"] - used_before == 4        # the prompts' blocks: taken as tokens arrive
    while not collectors[0].finish:
        tiny.step()
    tiny.step()
    assert tiny.stats()["running"] == 2 and collectors[2].ids  # the third joined once the first left
    drive(tiny, collectors)
    assert [s.admitted_at for s in seqs] == sorted(s.admitted_at for s in seqs)
    assert tiny.stats()["kv_blocks_used"] == used_before


def test_the_queue_is_bounded(tiny):
    collectors = [Collector() for _ in range(3)]
    for c in collectors:
        tiny.submit(GenerationRequest([5, 6, 7], 4), c)
    with pytest.raises(QueueFull, match="queue is full"):
        tiny.submit(GenerationRequest([5, 6, 7], 4), Collector())
    drive(tiny, collectors)


def test_a_kv_cache_too_small_for_one_full_context_stream_is_refused_at_start():
    from hjcg.random_models import random_llama

    loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=5)
    config = EngineConfig(model=loaded.name, device="cpu", max_context=256, max_prompt_tokens=48, max_new_tokens=48,
                          prefill_buckets=(16,), kv_cache_gib=0.0005)
    with pytest.raises(ValueError, match="cannot hold one stream of max_context 256"):
        Engine(config, loaded)


def test_invalid_requests_are_refused_at_submit(tiny):
    with pytest.raises(RequestError, match="at most 48"):
        tiny.submit(GenerationRequest(list(range(49)), 4), Collector())
    assert tiny.stats()["waiting"] == 0
