"""The samplers on the GPU against the one specification (hjcg.sampling's table, tests/sampling_spec.py):
the CUDA kernel and the torch sampler on CUDA agree with the CPU reference and the CPU torch sampler at
every parameter's edge values; seeded draws repeat, in a CUDA graph too; the 'graphs' mode repeats a
seeded request (GPU only)."""
import random

import pytest
import torch

from hjcg.native import _C
from hjcg.torch_sampler import philox_uniform, sample_rows
from sampling_spec import SAMPLERS, Batch, assert_batches_agree, random_batch

pytestmark = pytest.mark.gpu


def run_everywhere(batch: Batch, dtype=torch.float32) -> dict[str, dict]:
    """Every sampler on the CPU and on CUDA; the CPU reference kernel first (the others compare to it)."""
    results = {f"{name}-cpu": batch.run(fn, "cpu", dtype) for name, fn in SAMPLERS.items()}
    results.update({f"{name}-cuda": batch.run(fn, "cuda", dtype) for name, fn in SAMPLERS.items()})
    return results


@pytest.mark.parametrize("vocab", [1, 2, 7, 111, 1000, 32000, 152064])
def test_cuda_samplers_agree_with_the_cpu_reference_at_every_edge_value(vocab):
    rng = random.Random(vocab)
    rows, same = 0, {}
    for _ in range(12 if vocab > 1000 else 40):
        batch = random_batch(rng, 32, vocab)
        for name, n in assert_batches_agree(batch, run_everywhere(batch)).items():
            same[name] = same.get(name, 0) + n
        rows += 32
    # the same Philox draw over the same kept set; CUDA's exp (built with --use_fast_math) and its float
    # sums for top-p may move a token at a boundary
    assert all(n >= 0.98 * rows for n in same.values()), (same, rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_logits_agree_on_greedy_and_support(dtype):
    rng = random.Random(5)
    for _ in range(10):
        batch = random_batch(rng, 32, 32000)
        batch.logits = batch.logits.to(dtype).float()  # what the samplers read, for the specification too
        assert_batches_agree(batch, run_everywhere(batch, dtype))


def test_out_of_range_values_mean_off_on_cuda():
    rng = random.Random(9)
    for _ in range(10):
        raw = random_batch(rng, 32, 1000, raw_off=True)
        expected = raw.with_filters_off().run(torch.ops.hjcg.sample)
        for name, fn in SAMPLERS.items():
            got = raw.run(fn, "cuda")["out"]
            assert (got == expected["out"]).double().mean() >= 0.98, name


def test_penalised_ties_break_like_the_cpu_reference():
    # token 1's logit is exactly token 0's penalised logit: a tie, which the lowest index wins; an
    # approximate division (--use_fast_math) would break some of these ties the other way
    n, vocab = 4096, 64
    g = torch.Generator().manual_seed(3)
    logits = torch.rand(n, vocab, generator=g) - 4.0
    a = torch.rand(n, generator=g) * 10 + 0.1
    penalty = torch.rand(n, generator=g) * 3 + 1.01
    logits[:, 0], logits[:, 1] = a, a / penalty
    params = dict(temperature=torch.zeros(n), top_k=torch.zeros(n, dtype=torch.int32), top_p=torch.ones(n),
                  min_p=torch.zeros(n), repetition_penalty=penalty, seed=torch.zeros(n, dtype=torch.int64))
    batch = Batch(logits, params, torch.zeros(n, 1, dtype=torch.int64), torch.ones(n, dtype=torch.int64),
                  torch.zeros(n, dtype=torch.int64))
    expected = batch.run(torch.ops.hjcg.sample)["out"]
    assert bool((expected == 0).all())
    for name, fn in SAMPLERS.items():
        assert torch.equal(batch.run(fn, "cuda")["out"], expected), name


def test_a_rows_draw_on_cuda_does_not_depend_on_its_position_in_the_batch():
    batch = random_batch(random.Random(12), 64, 32000)
    batch.params["temperature"].fill_(1.0)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    moved = Batch(batch.logits[order], {k: v[order] for k, v in batch.params.items()}, batch.history[order],
                  batch.history_len[order], batch.offset[order])
    for name, fn in SAMPLERS.items():
        assert torch.equal(moved.run(fn, "cuda")["out"], batch.run(fn, "cuda")["out"][order]), name


def test_torch_philox_on_cuda_is_the_kernels_draw():
    rng = random.Random(1)
    seeds = [rng.getrandbits(64) for _ in range(500)]
    offsets = [rng.getrandbits(40) for _ in seeds]
    rows = [rng.getrandbits(16) for _ in seeds]
    expected = torch.tensor([_C.philox_uniform(s, o, r) for s, o, r in zip(seeds, offsets, rows)])
    as_int64 = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds])
    got = philox_uniform(as_int64.cuda(), torch.tensor(offsets).cuda(), torch.tensor(rows).cuda())
    assert torch.equal(got.cpu(), expected)


def test_torch_sampler_in_a_cuda_graph_draws_fresh_tokens_and_repeats_its_seeds():
    rng = random.Random(2)
    batch = random_batch(rng, 8, 5000)
    batch.params["temperature"].fill_(1.0)
    batch.offset.zero_()
    state = dict(history=batch.history.cuda(), history_len=batch.history_len.cuda(), offset=batch.offset.cuda(),
                 out=torch.zeros(8, dtype=torch.int64, device="cuda"))
    p = {k: v.cuda() for k, v in batch.params.items()}
    logits = batch.logits.cuda()

    def step() -> None:
        sample_rows(logits, state["history"], state["history_len"], p["temperature"], p["top_k"], p["top_p"],
                    p["min_p"], p["repetition_penalty"], p["seed"], state["offset"], state["out"], False)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()

    def replays(n: int) -> list[torch.Tensor]:
        state["offset"].zero_()
        out = []
        for _ in range(n):
            graph.replay()
            out.append(state["out"].cpu())
        return out

    first, again = replays(10), replays(10)
    assert all(torch.equal(a, b) for a, b in zip(first, again))       # same seeds and counters: same tokens
    assert len({tuple(t.tolist()) for t in first}) > 1                  # the counter advances on replay
    assert int(state["offset"][0]) == 10
    # and the draws are the CPU reference's, counter by counter
    for i, tokens in enumerate(first):
        reference = Batch(batch.logits, batch.params, batch.history, batch.history_len,
                          torch.full((8,), i, dtype=torch.int64)).run(torch.ops.hjcg.sample, append=False)["out"]
        assert (tokens == reference).double().mean() >= 0.75, i


def test_graphs_mode_repeats_a_seeded_request():
    from hjcg.config import EngineConfig
    from hjcg.engine import Engine, GenerationRequest
    from hjcg.random_models import random_llama
    from hjcg.sampling import SamplingParams

    # random weights at the SmolLM2 shape: the GPU machine has no copy of the embedded model's package
    loaded = random_llama("smollm2-135m", torch.float32, "cuda", seed=4)
    engine = Engine(EngineConfig(model=loaded.name, device="cuda", mode="graphs", max_context=512,
                                 max_prompt_tokens=256, max_new_tokens=64, prefill_buckets=(32, 64)), loaded)
    prompt = [5, 6, 7, 8, 9]

    def tokens(seed: int) -> list[int]:
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=seed)
        events = engine.generate(GenerationRequest(prompt_ids=prompt, max_new_tokens=24, sampling=params,
                                                   ignore_eos=True))
        return [e.id for e in events if hasattr(e, "id")]

    first = tokens(11)
    assert tokens(11) == first and tokens(12) != first
