"""The benchmark harness runs end to end on the CPU (tiny model): results, tables and plots appear.
It checks the harness, never speed."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run of every section: the in-process systems, and the many-callers sections against
    `hjcg serve` on the CPU (random:tiny-gqa), which loads while the in-process part runs."""
    out = tmp_path_factory.mktemp("bench-smoke")
    result = subprocess.run([sys.executable, "-m", "bench", "smoke", "--out", str(out), "--sections",
                             "systems,fp8,concurrency,grpc_overhead,open_loop"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, json.loads((out / "summary.json").read_text())


def test_bench_smoke_writes_results(smoke):
    out, summary = smoke
    systems = summary["llama2_7b"]["systems"]
    assert {"hjcg-eager", "hf-eager"} <= set(systems)
    assert systems["hjcg-eager"]["ttft"]["10"]["n"] == 3 and systems["hjcg-eager"]["decode"]["n"] == 8
    for name in ("ttft.csv", "decode.csv", "ttft.png", "decode.png", "p99_vs_median.png"):
        assert (out / name).stat().st_size > 0


def test_bench_smoke_many_callers_through_a_cpu_server(smoke):
    """The server subprocess, the spawned client processes and their barrier, the open-loop schedule, the
    figures and the plots, end to end."""
    out, summary = smoke
    streams = summary["concurrency"]["streams"]
    assert set(streams) == {"1", "2", "4"}
    for n, e in streams.items():
        assert e["completed"] == int(n) and e["tokens"] == 8 * int(n) and not e["errors"]
        assert e["tokens_per_s"] > 0 and e["itl_median_ms"] <= e["itl_p99_ms"]
        assert e["ttft_median_ms"] <= e["ttft_p99_ms"]
    overhead = summary["grpc_overhead"]
    for key in ("ttft10_inproc_ms", "ttft10_grpc_ms", "itl_median_inproc_ms", "itl_p99_grpc_ms"):
        assert overhead[key] > 0, key
    rates = summary["open_loop"]["rates"]
    assert set(rates) == {"8", "32"}
    for e in rates.values():
        assert e["completed"] == e["requests"] and e["ttft_p50_ms"] <= e["ttft_p99_ms"] and e["tokens_per_s"] > 0
    for name in ("concurrency.csv", "concurrency.png", "open_loop.csv", "open_loop.png"):
        assert (out / name).stat().st_size > 0


def test_open_loop_schedule_is_fixed_by_its_seed():
    from bench.callers import poisson_schedule

    a = poisson_schedule(8, 200, 1000, (10, 500), (64, 256), seed=3)
    assert a == poisson_schedule(8, 200, 1000, (10, 500), (64, 256), seed=3)
    assert a[0]["offset"] == 0 and all(x["offset"] <= y["offset"] for x, y in zip(a, a[1:]))
    assert all(10 <= len(r["ids"]) <= 500 and 64 <= r["max_new_tokens"] <= 256 for r in a)
    assert 0.5 < (len(a) - 1) / a[-1]["offset"] / 8 < 2  # about 8 arrivals a second


def test_stream_figures_pool_intervals_and_span_every_stream():
    from bench.callers import stream_figures

    streams = [{"send_ms": 0.0, "ttft_ms": 10.0, "end_ms": 30.0, "itl_ms": [10.0, 10.0], "tokens": 3, "error": None},
               {"send_ms": 5.0, "ttft_ms": 40.0, "end_ms": 85.0, "itl_ms": [20.0, 20.0], "tokens": 3, "error": None},
               {"send_ms": 6.0, "tokens": 0, "error": "RESOURCE_EXHAUSTED"}]
    f = stream_figures(streams)
    assert f["tokens_per_s"] == 6 / 0.085 and f["itl_median_ms"] == 15.0 and f["itl_p99_ms"] == 20.0
    assert f["ttft_median_ms"] == 25.0 and f["completed"] == 2 and f["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert f["peak_streams_in_flight"] == 1  # the second stream's first token came after the first's last


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


def test_a_flag_the_server_does_not_know_is_dropped_with_its_value():
    from bench.server_proc import _drop

    args = ["serve", "--model", "m", "--warm", "--max-batch", "32", "--queue-size", "128", "--x=1"]
    assert _drop(args, ["--max-batch", "--x"]) == ["serve", "--model", "m", "--warm", "--queue-size", "128"]
    assert _drop(args, ["--warm"]) == ["serve", "--model", "m", "--max-batch", "32", "--queue-size", "128", "--x=1"]


def test_bench_smoke_compares_fp8_with_the_dtype(smoke):
    fp8 = smoke[1]["fp8"]
    assert fp8["fp16"]["weights"] == "float32" and fp8["fp8"]["weights"] == "fp8_e4m3"
    assert fp8["decode_median_ms"] == fp8["fp8"]["decode_median_ms"] > 0 and set(fp8["ttft_median_ms"]) == {"10", "50"}
    assert 0.25 < fp8["weight_bytes_ratio"] < 0.5  # e4m3 against float32, plus the lm head kept in float32
