"""Prefill packing: streams that join in the same step run their prompts as one forward (hjcg.packing), and
each gets exactly what its own prefill gives: the same first-token logprobs, the same K/V, the same tokens."""
from types import SimpleNamespace

import pytest
import torch

from hjcg.config import EngineConfig
from hjcg.engine import Engine, GenerationRequest, TokenOutput
from hjcg.packing import PackedPrompts, attention_mask
from hjcg.sampling import SamplingParams
from hjcg.scheduler import Scheduler


class Collector:
    def __init__(self):
        self.events, self.finish = [], None

    def __call__(self, event):
        if isinstance(event, TokenOutput):
            self.events.append(event)
        else:
            self.finish = event

    @property
    def ids(self):
        return [e.id for e in self.events]


def tiny_engine(**settings) -> Engine:
    from hjcg.random_models import random_llama

    loaded = random_llama("tiny-gqa", torch.float32, "cpu", seed=11)
    config = EngineConfig(model=loaded.name, device="cpu", max_context=256, max_prompt_tokens=200, max_new_tokens=48,
                          prefill_buckets=(32, 64), max_batch=8, **settings)
    return Engine(config, loaded)


@pytest.fixture(scope="module")
def tiny():
    return tiny_engine()


def drive(engine, collectors):
    for _ in range(10_000):
        if all(c.finish for c in collectors) and not engine.has_work():
            return
        engine.step()
    raise AssertionError("the streams did not finish")


def alone(engine, request):
    c = Collector()
    engine.submit(request, c)
    drive(engine, [c])
    return c


def counting_packed_prefills(engine):
    calls = []
    original = engine.runner.prefill_packed

    def spy(first_row, prompts, *args):
        calls.append([len(p) for p in prompts])
        return original(first_row, prompts, *args)

    engine.runner.prefill_packed = spy
    return calls


def test_the_layout_keeps_each_prompts_positions_and_pads_continue_the_last_prompt():
    layout = PackedPrompts.of([[7, 8, 9], [4, 5]])
    assert (layout.ids, layout.positions, layout.segments, layout.last) == (
        [7, 8, 9, 4, 5], [0, 1, 2, 0, 1], [0, 0, 0, 1, 1], [2, 4])
    assert layout.padded(8, 4, pad_id=0) == ([7, 8, 9, 4, 5, 0, 0, 0] + [0, 1, 2, 0, 1, 2, 3, 4]
                                             + [0, 0, 0, 1, 1, 1, 1, 1] + [2, 4, 7, 7] + [3, 2, 1, 1])
    with pytest.raises(ValueError, match="do not fit"):
        layout.padded(4, 4, 0)
    with pytest.raises(ValueError, match="no empty one"):
        PackedPrompts.of([[1], []])


def test_the_mask_lets_a_token_see_its_own_prompt_up_to_itself():
    mask = attention_mask(torch.tensor([0, 0, 1, 1, 1]), torch.float32)
    seen = (mask == 0).int().tolist()
    assert seen == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert mask[0, 1] == float("-inf")


def test_a_batch_invariant_engine_prefills_streams_that_join_together_one_by_one():
    from hjcg_server.cli import _parser, engine_config

    args = _parser().parse_args(["serve", "--device", "cpu", "--batch-invariant"])
    assert engine_config(args).batch_invariant and not engine_config(_parser().parse_args(["serve"])).batch_invariant
    engine = tiny_engine(batch_invariant=True)
    # decode: the tensor-core GEMV at every size up to its limit (one arithmetic per row), never the CUDA-core one
    assert (engine.config.gemv_max_rows, engine.config.mma_gemv_max_rows) == (0, 16)
    calls = counting_packed_prefills(engine)
    collectors = [Collector() for _ in range(3)]
    for n, c in zip((5, 17, 1), collectors):
        engine.submit(GenerationRequest(list(range(3, 3 + n)), 4, ignore_eos=True), c)
    engine.step()
    assert calls == [] and all(len(c.events) >= 1 for c in collectors)  # all three joined, each prefilled alone
    drive(engine, collectors)


def test_no_pdl_turns_programmatic_dependent_launch_off_and_it_is_on_by_default():
    from hjcg_server.cli import _parser, engine_config

    assert not engine_config(_parser().parse_args(["serve", "--device", "cpu", "--no-pdl"])).pdl
    assert engine_config(_parser().parse_args(["serve"])).pdl


def test_streams_that_join_together_prefill_in_one_forward_and_get_their_solo_results(tiny):
    prompts = [list(range(3, 3 + n)) for n in (5, 17, 1, 30)]
    requests = [GenerationRequest(p, 6, logprobs=3, ignore_eos=True) for p in prompts]
    solo = [alone(tiny, r) for r in requests]
    calls = counting_packed_prefills(tiny)
    collectors = [Collector() for _ in requests]
    for request, c in zip(requests, collectors):
        tiny.submit(request, c)
    tiny.step()
    assert calls == [[5, 17, 1, 30]]
    assert all(len(c.events) >= 1 for c in collectors)  # every first token streamed in the step that joined them
    drive(tiny, collectors)
    for got, want in zip(collectors, solo):
        assert got.ids == want.ids
        for g, w in zip(got.events, want.events):
            assert g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert [t for t, _ in g.top_logprobs] == [t for t, _ in w.top_logprobs]


def test_a_seeded_stream_draws_the_same_tokens_packed_as_alone(tiny):
    request = GenerationRequest([9, 8, 7, 6], 20, SamplingParams(temperature=1.0, seed=5), ignore_eos=True)
    want = alone(tiny, request).ids
    collectors = [Collector() for _ in range(3)]
    tiny.submit(GenerationRequest([3, 4], 10, SamplingParams(temperature=0.8, seed=1), ignore_eos=True), collectors[0])
    tiny.submit(request, collectors[1])
    tiny.submit(GenerationRequest(list(range(40)), 5, ignore_eos=True), collectors[2])
    drive(tiny, collectors)
    assert collectors[1].ids == want and len(set(want)) > 3


def test_more_prompt_tokens_than_the_largest_bucket_split_into_several_packs(tiny):
    calls = counting_packed_prefills(tiny)
    collectors = [Collector() for _ in range(5)]
    for i, c in enumerate(collectors):
        tiny.submit(GenerationRequest([5 + i] * 25, 3, ignore_eos=True), c)
    drive(tiny, collectors)
    assert calls == [[25, 25], [25, 25]]  # 64 tokens at most: the fifth stream prefills alone
    assert all(c.finish.completion_tokens == 3 for c in collectors)


def fake(prompt_len, constrained=False):
    return SimpleNamespace(prompt_len=prompt_len, matcher=object() if constrained else None)


def test_packs_are_consecutive_streams_within_the_token_budget_and_constrained_ones_go_alone():
    a, b, c, d, e, f = fake(10), fake(20), fake(5, constrained=True), fake(30), fake(40), fake(70)
    groups = Scheduler.prefill_groups([a, b, c, d, e, f], max_tokens=64)
    assert groups == [[a, b], [c], [d], [e], [f]]
    g, h = fake(30), fake(34)
    assert Scheduler.prefill_groups([g, h], 64) == [[g, h]]  # exactly the budget
    assert Scheduler.prefill_groups([], 64) == []
