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
