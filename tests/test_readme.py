"""The README as a user reads it: the performance section is what the committed results render, and every code
block runs as printed (bash and Python against a live CPU server, JavaScript with node)."""
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
NODE_DIR = ROOT / "client" / "node"
# an HTML comment right before a block: `skip (reason)`, or `needs tool tool...` (run where they are installed)
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^\n]*?) -->\n)?^```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$",
                   re.S | re.M)


@dataclass
class Block:
    line: int
    lang: str
    body: str
    marker: str | None

    @property
    def id(self) -> str:
        return f"{self.lang or 'plain'}-line{self.line}"


def readme_blocks(text: str) -> list[Block]:
    return [Block(text.count("\n", 0, m.start("body")), m["lang"], m["body"], m["marker"])
            for m in BLOCK.finditer(text)]


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def test_performance_section_matches_committed_results():
    result = subprocess.run([sys.executable, "-m", "bench.render_readme", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_block_finder_sees_every_fence():
    fences = sum(1 for line in README.read_text(encoding="utf-8").splitlines() if line.startswith("```"))
    assert len(BLOCKS) > 5 and fences == 2 * len(BLOCKS)


def _env(server) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # hjcg, hjcg-client and python of this environment
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HJCG_TARGET": server.tcp}


def _run(command: list[str], code: str, cwd: Path, env: dict) -> str:
    result = subprocess.run(command, input=code, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_readme_block_runs_as_printed(block: Block, request, tmp_path):
    marker = block.marker or ""
    if marker.startswith("skip"):
        pytest.skip(f"README line {block.line}: {marker}")
    if marker.startswith("needs "):
        missing = [tool for tool in marker.split()[1:] if shutil.which(tool) is None]
        if missing:
            pytest.skip(f"README line {block.line} needs {', '.join(missing)}, not installed here")
        # a command meant for the repository root, run on a copy of what it reads so it writes nothing here
        shutil.copytree(ROOT / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("node_modules"))
        _run(["bash", "-euo", "pipefail"], block.body, tmp_path, dict(os.environ))
        return
    assert not marker, f"README line {block.line}: unknown readme-test marker {marker!r}"
    assert block.lang in ("bash", "python", "js"), \
        f"README line {block.line}: a ```{block.lang} block runs nowhere: mark it <!-- readme-test: skip (why) -->"
    assert not re.search(r"^\s*make\b", block.body, re.M), "make targets in the README must be marked skip"
    env = _env(request.getfixturevalue("server"))
    if block.lang == "bash":
        out = _run(["bash", "-euo", "pipefail"], block.body, ROOT, env)
    elif block.lang == "python":
        out = _run([sys.executable, "-"], block.body, ROOT, env)
    else:
        if shutil.which("node") is None:
            pytest.skip("node is not installed")
        if not (NODE_DIR / "node_modules").is_dir():
            if os.environ.get("CI"):
                pytest.fail("CI must run the README's Node.js example: make test installs client/node's packages")
            pytest.skip("client/node/node_modules missing (run: cd client/node && npm ci)")
        # `node example.js` in the repository root: a CommonJS script, require() relative to the root
        out = _run(["node", "-"], block.body, ROOT, env)
    if "What is the capital of France?" in block.body and "--system" not in block.body:
        assert "Paris" in out


def test_performance_section_names_only_files_the_run_has():
    line = next(l for l in README.read_text(encoding="utf-8").splitlines() if l.startswith("Measured on **"))
    results = ROOT / re.search(r"\[`([^`]+)/`\]", line).group(1)
    named = re.search(r"\(([^()]*)\)\.$", line).group(1).split(", ")
    assert named and all(any(results.glob(n)) for n in named), named
