"""The benchmark harness runs end to end on the CPU (tiny model): results, tables and plots appear.
It checks the harness, never speed."""
import json
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke_writes_results(tmp_path):
    subprocess.run([sys.executable, "-m", "bench", "smoke", "--out", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    systems = summary["llama2_7b"]["systems"]
    assert {"hjcg-eager", "hf-eager"} <= set(systems)
    assert systems["hjcg-eager"]["ttft"]["10"]["n"] == 3 and systems["hjcg-eager"]["decode"]["n"] == 8
    for name in ("ttft.csv", "decode.csv", "ttft.png", "decode.png", "p99_vs_median.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_bucket_choice_minimises_the_mean_replay_time_over_lengths():
    from bench.bucket_sweep import choose_buckets

    # 48 costs what 64 does, so 48 is never worth a graph; 32 is, where two buckets are allowed
    replay_ms = {16: 1.0, 32: 1.0, 48: 2.0, 64: 2.0}
    assert choose_buckets(replay_ms, 1) == (64,)
    assert choose_buckets(replay_ms, 2) == (32, 64)
    assert choose_buckets(replay_ms, 4) == (32, 64)  # more graphs than pay: the cheapest set, not the largest
    # non-monotonic times: the dearer, smaller bucket is skipped in favour of the cheaper, larger one
    assert choose_buckets({16: 1.0, 32: 3.0, 48: 2.0, 64: 4.0}, 3) == (16, 48, 64)


def test_default_buckets_are_the_choice_from_the_committed_sweep():
    from bench.bucket_sweep import choose_buckets
    from hjcg.config import DEFAULT_PREFILL_BUCKETS

    sweep = json.loads((ROOT / "bench/results/2026-11-22-h100-sweep/bucket_sweep.json").read_text())
    replay_ms = {int(n): ms for n, ms in sweep["replay_ms"].items()}
    assert choose_buckets(replay_ms, len(DEFAULT_PREFILL_BUCKETS)) == DEFAULT_PREFILL_BUCKETS
