"""The README's performance section is exactly what the committed results render (no drifting numbers)."""
import subprocess
import sys

from conftest import ROOT


def test_performance_section_matches_committed_results():
    result = subprocess.run([sys.executable, "-m", "bench.render_readme", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
