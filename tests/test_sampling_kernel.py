"""The samplers on the CPU, the fused kernel's CPU reference (torch.ops.hjcg.sample) and the torch sampler
(hjcg.torch_sampler, the graphs mode's): each step of the pipeline, their draws, and their agreement
with each other and with the specification on random batches at every parameter's edge values."""
import random

import pytest
import torch

from hjcg.native import _C
from hjcg.sampling import SamplingParams, row_tensors
from hjcg.torch_sampler import philox_uniform
from sampling_spec import SAMPLERS, Batch, KernelRow, assert_batches_agree, random_batch, target_distribution


@pytest.fixture(params=sorted(SAMPLERS))
def sampler(request):
    return SAMPLERS[request.param]


def draws(logits: torch.Tensor, n: int, sampler=torch.ops.hjcg.sample, **params) -> torch.Tensor:
    row = KernelRow(sampler=sampler, **params)
    return torch.tensor([row.sample(logits) for _ in range(n)])


def batch_draws(logits: torch.Tensor, n: int, sampler, seed: int, history=(), penalty=1.0, **params) -> torch.Tensor:
    """n draws in one call: n rows of the same logits and parameters, at draw counters 0..n-1."""
    rows = row_tensors([SamplingParams(seed=seed, repetition_penalty=penalty, **params)] * n, "cpu")
    histories = torch.tensor([list(history)] * n, dtype=torch.int64).reshape(n, len(history))
    batch = Batch(logits.expand(n, -1), rows, histories, torch.full((n,), len(history)), torch.arange(n))
    return batch.run(sampler)["out"]


@pytest.mark.parametrize("vocab", [1, 111, 32000])
def test_greedy_is_argmax(vocab, sampler):
    logits = torch.randn(vocab)
    assert KernelRow(sampler=sampler).sample(logits) == int(torch.argmax(logits))


def test_greedy_breaks_ties_by_lowest_index(sampler):
    logits = torch.zeros(10)
    logits[[3, 7]] = 5.0
    assert KernelRow(sampler=sampler).sample(logits) == 3


def test_repetition_penalty_applies_once_per_distinct_token(sampler):
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    assert KernelRow(penalty=2.0, history=[0, 0, 0], sampler=sampler).sample(logits) == 1   # 2.0 / 2 < 1.9
    logits = torch.tensor([-0.2, -0.3])
    assert KernelRow(penalty=2.0, history=[0], sampler=sampler).sample(logits) == 1         # -0.4 < -0.3


@pytest.mark.parametrize("params", [
    dict(top_k=5), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=20, top_p=0.8, min_p=0.05),
])
def test_draws_stay_inside_the_filtered_set(params, sampler):
    torch.manual_seed(0)
    logits = torch.randn(500) * 3
    target = target_distribution(logits, 1.0, **params)
    tokens = draws(logits, 300, sampler, temperature=1.0, seed=1, **params)
    assert bool((target[tokens] > 0).all())


def test_top_k_one_is_greedy(sampler):
    logits = torch.randn(1000)
    assert set(draws(logits, 50, sampler, temperature=1.5, top_k=1, seed=2).tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=8), dict(temperature=1.3, top_p=0.7),
    dict(temperature=1.0, min_p=0.1, penalty=1.5, history=[0, 1, 2]),
])
def test_empirical_distribution_matches_the_target(params, sampler):
    torch.manual_seed(1)
    logits = torch.randn(40) * 2
    n = 20000
    counts = torch.bincount(batch_draws(logits, n, sampler, seed=7, **params), minlength=40).double() / n
    spec = dict(params)
    history = spec.pop("history", [])
    target = target_distribution(logits, spec.pop("temperature"), history=history, **spec)
    total_variation = 0.5 * (counts - target).abs().sum().item()
    assert total_variation < 0.02, total_variation


def test_same_seed_same_tokens_different_seed_different_tokens(sampler):
    logits = torch.randn(1000)
    a = draws(logits, 30, sampler, temperature=1.0, seed=123)
    torch.rand(5)  # the global generator's state must not matter
    b = draws(logits, 30, sampler, temperature=1.0, seed=123)
    c = draws(logits, 30, sampler, temperature=1.0, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_each_draw_advances_the_offset_and_appends_to_history(sampler):
    row = KernelRow(temperature=1.0, seed=5, history=[9, 8], capacity=4, sampler=sampler)
    logits = torch.randn(100)
    first = row.sample(logits, append=True)
    assert int(row.offset) == 1 and int(row.history_len) == 3 and int(row.history[0, 2]) == first
    row.sample(logits, append=True)
    row.sample(logits, append=True)                       # history full: no append, no overflow
    assert int(row.offset) == 3 and int(row.history_len) == 4


def test_philox_uniform_is_in_unit_interval_and_depends_on_every_input():
    values = {_C.philox_uniform(s, o, r) for s in (0, 1) for o in (0, 1, 2**40) for r in (0, 1)}
    assert len(values) == 12
    assert all(0.0 <= v < 1.0 for v in values)


def test_rejects_malformed_arguments():
    row = KernelRow()
    with pytest.raises(RuntimeError, match="logits must be"):
        torch.ops.hjcg.sample(torch.randn(3), row.history, row.history_len, row.temperature, row.top_k, row.top_p,
                  row.min_p, row.penalty, row.seed, row.offset, row.out, False)
    bad = KernelRow()
    bad.top_k = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="top_k must be"):
        bad.sample(torch.randn(10))


def test_half_precision_logits_are_accepted(sampler):
    logits = torch.randn(300).half()
    assert KernelRow(sampler=sampler).sample(logits) == int(logits.float().argmax())


def test_torch_philox_is_the_kernels_draw():
    rng = random.Random(0)
    seeds = [rng.getrandbits(64) for _ in range(200)] + [0, 2**63, 2**64 - 1]
    offsets = [rng.getrandbits(rng.choice((4, 31, 33, 63))) for _ in seeds]
    rows = [rng.getrandbits(rng.choice((1, 16, 32))) for _ in seeds]
    expected = torch.tensor([_C.philox_uniform(s, o, r) for s, o, r in zip(seeds, offsets, rows)])
    as_int64 = [s - 2**64 if s >= 2**63 else s for s in seeds]
    got = philox_uniform(torch.tensor(as_int64), torch.tensor(offsets), torch.tensor(rows))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("vocab", [1, 2, 7, 111, 1000])
def test_torch_sampler_and_cpu_kernel_agree_at_every_edge_value(vocab):
    # random rows at the parameters' edge and "off" values, random histories (out-of-vocabulary ids too)
    rng = random.Random(vocab)
    rows = same = 0
    for _ in range(40):
        batch = random_batch(rng, 16, vocab)
        results = {name: batch.run(fn) for name, fn in SAMPLERS.items()}
        same += assert_batches_agree(batch, results)["torch"]
        rows += 16
        assert torch.equal(results["torch"]["history"], results["kernel"]["history"])
    # the same Philox draw over the same kept weights; exp's last bit may differ between implementations
    assert same >= 0.995 * rows, (same, rows)


def test_out_of_range_values_mean_off_in_every_sampler():
    # top_p <= 0 or > 1, repetition_penalty <= 0, top_k < 0, min_p < 0: never canonical (SamplingParams
    # rejects them), but a sampler handed one directly must read it as "off", as the others do
    rng = random.Random(7)
    for _ in range(30):
        raw = random_batch(rng, 16, 300, raw_off=True)
        expected = raw.with_filters_off().run(torch.ops.hjcg.sample)
        for name, fn in SAMPLERS.items():
            assert torch.equal(raw.run(fn)["out"], expected["out"]), name


def test_the_graphs_mode_sampler_follows_the_requests_seed():
    # the batch's sampler state as the 'graphs' mode drives it (the torch sampler): a seeded stream draws
    # the same tokens whatever the global generator did in between, in any row, and the fused kernel's
    from hjcg.row_sampler import RowSampler

    logits = torch.randn(20, 1, 5000) * 2
    params = SamplingParams(temperature=1.0, top_k=200, top_p=0.9, repetition_penalty=1.2, seed=42)
    runs = []
    for kernel, row in ((False, 0), (True, 0), (False, 2)):
        state = RowSampler(torch.device("cpu"), 3, 64, kernel=kernel)
        state.load(row, params, torch.tensor([1, 2, 3]))
        torch.rand(3)
        out = torch.zeros(1, dtype=torch.int64)
        tokens = []
        for x in logits:
            state.sample(x, row, out)
            tokens.append(int(out))
        runs.append(tokens)
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=-0.5), "top_p"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be in \(0, 100\]"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"), (dict(min_p=-0.1), "min_p"),
    (dict(top_p=float("nan")), "finite"), (dict(temperature=float("inf")), "finite"),
    (dict(top_k=1.5), "integer"), (dict(top_k=True), "integer"), (dict(seed=2**64), "seed"),
])
def test_sampling_params_outside_their_range_are_rejected(kwargs, message):
    # through the Python API 0 is a value, not "unset": top_p = 0 and repetition_penalty = 0 are out of range
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_are_stored_in_canonical_form():
    assert SamplingParams(temperature=5e-6).temperature == 0.0 and SamplingParams(temperature=5e-6).greedy
    assert SamplingParams(temperature=1e-5).temperature == 1e-5
    assert SamplingParams(top_k=2**40).top_k == 0 and SamplingParams(top_k=2**31 - 1).top_k == 2**31 - 1
    assert SamplingParams.from_wire(top_p=0.0, repetition_penalty=0.0) == SamplingParams()
    assert SamplingParams.from_wire(temperature=0.5, top_p=0.5) == SamplingParams(temperature=0.5, top_p=0.5)


def test_a_rows_draw_does_not_depend_on_its_position_in_the_batch(sampler):
    # rows move as streams join and leave: a seeded stream must draw alike in any row (batch invariance)
    batch = random_batch(random.Random(11), 16, 500)
    batch.params["temperature"].fill_(1.0)  # every row draws
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    moved = Batch(batch.logits[order], {k: v[order] for k, v in batch.params.items()}, batch.history[order],
                  batch.history_len[order], batch.offset[order])
    assert torch.equal(moved.run(sampler)["out"], batch.run(sampler)["out"][order])
