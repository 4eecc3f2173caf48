"""The fused sampler's CPU kernel (hjcg._C.sample): each step of its pipeline, and its draws."""
import pytest
import torch

from hjcg.native import _C
from sampling_spec import KernelRow, target_distribution


def draws(logits: torch.Tensor, n: int, **params) -> torch.Tensor:
    row = KernelRow(**params)
    return torch.tensor([row.sample(logits) for _ in range(n)])


@pytest.mark.parametrize("vocab", [1, 111, 32000])
def test_greedy_is_argmax(vocab):
    logits = torch.randn(vocab)
    assert KernelRow().sample(logits) == int(torch.argmax(logits))


def test_greedy_breaks_ties_by_lowest_index():
    logits = torch.zeros(10)
    logits[[3, 7]] = 5.0
    assert KernelRow().sample(logits) == 3


def test_repetition_penalty_applies_once_per_distinct_token():
    logits = torch.tensor([2.0, 1.9, -1.0, 0.5])
    assert KernelRow(penalty=2.0, history=[0, 0, 0]).sample(logits) == 1   # 2.0 / 2 = 1.0 < 1.9
    logits = torch.tensor([-0.2, -0.3])
    assert KernelRow(penalty=2.0, history=[0]).sample(logits) == 1         # -0.2 * 2 = -0.4 < -0.3


@pytest.mark.parametrize("params", [
    dict(top_k=5), dict(top_p=0.5), dict(min_p=0.3), dict(top_k=20, top_p=0.8, min_p=0.05),
])
def test_draws_stay_inside_the_filtered_set(params):
    torch.manual_seed(0)
    logits = torch.randn(500) * 3
    target = target_distribution(logits, 1.0, **params)
    tokens = draws(logits, 300, temperature=1.0, seed=1, **params)
    assert bool((target[tokens] > 0).all())


def test_top_k_one_is_greedy():
    logits = torch.randn(1000)
    assert set(draws(logits, 50, temperature=1.5, top_k=1, seed=2).tolist()) == {int(logits.argmax())}


@pytest.mark.parametrize("params", [
    dict(temperature=1.0), dict(temperature=0.7, top_k=8), dict(temperature=1.3, top_p=0.7),
    dict(temperature=1.0, min_p=0.1, penalty=1.5, history=[0, 1, 2]),
])
def test_empirical_distribution_matches_the_target(params):
    torch.manual_seed(1)
    logits = torch.randn(40) * 2
    n = 20000
    counts = torch.bincount(draws(logits, n, seed=7, **params), minlength=40).double() / n
    spec = dict(params)
    history = spec.pop("history", [])
    target = target_distribution(logits, spec.pop("temperature"), history=history, **spec)
    total_variation = 0.5 * (counts - target).abs().sum().item()
    assert total_variation < 0.02, total_variation


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = torch.randn(1000)
    a = draws(logits, 30, temperature=1.0, seed=123)
    b = draws(logits, 30, temperature=1.0, seed=123)
    c = draws(logits, 30, temperature=1.0, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_each_draw_advances_the_offset_and_appends_to_history():
    row = KernelRow(temperature=1.0, seed=5, history=[9, 8], capacity=4)
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
        _C.sample(torch.randn(3), row.history, row.history_len, row.temperature, row.top_k, row.top_p,
                  row.min_p, row.penalty, row.seed, row.offset, row.out, False)
    bad = KernelRow()
    bad.top_k = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="top_k must be"):
        bad.sample(torch.randn(10))


def test_half_precision_logits_are_accepted():
    logits = torch.randn(300).half()
    assert KernelRow().sample(logits) == int(logits.float().argmax())
