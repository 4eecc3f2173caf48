"""Every relative link and every repository path that the README and docs/ name exists in the repository (and
the file names that requirements*.txt comments name)."""
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_SUFFIXES = {".py", ".md", ".txt", ".sh", ".h", ".cu", ".cpp", ".proto", ".json", ".yaml", ".yml", ".csv",
                 ".js", ".png", ".log", ".pid", ".toml", ".cfg", ".ini", ".lock", ".tgz", ".whl"}
# names in code spans that look like paths but name something else, or files that a user or a command makes
NOT_IN_REPOSITORY = {
    "hjcg_num_requests_waiting/running": "two Prometheus metric names",
    ".whl/": "a directory the user fills with wheels for bench/gpu_run.sh (ignored by git)",
    "hjcg-demo.log": "written by make demo (ignored by git)",
    "example.js": "the file the README asks the reader to save its Node.js example in",
    "results.tgz": "written by bench/gpu_run.sh with PACK=1",
}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def without_code(text: str) -> str:
    """The text without its fenced code blocks (the README test runs those)."""
    return re.sub(r"^```.*?^```$", "", text, flags=re.S | re.M)


def prose(text: str) -> str:
    """The text without fenced code blocks and HTML comments."""
    return re.sub(r"<!--.*?-->", "", without_code(text), flags=re.S)


def path_like(span: str) -> bool:
    if re.search(r"[\s:|\\$<>{}()=,\[\]\"']", span) or span.startswith(("-", "~", "/", "@", "+")):
        return False  # flags, URLs and addresses, home and absolute paths, npm scopes, code
    return "/" in span or Path(span).suffix in FILE_SUFFIXES


def exists(path: str, files: list[str]) -> bool:
    path = path.removeprefix("./")
    if "*" in path:
        return any(True for _ in ROOT.glob(path.rstrip("/")))
    if "/" not in path.rstrip("/"):  # a bare file name: anywhere in the repository
        return (ROOT / path).exists() or any(f.rsplit("/", 1)[-1] == path for f in files)
    return (ROOT / path).exists()


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_relative_links_resolve_inside_the_repository(doc: Path):
    text = without_code(doc.read_text(encoding="utf-8"))
    broken = []
    for match in LINK.finditer(text):
        target = match[1].split("#", 1)[0]
        if not target or re.match(r"[a-z]+:", target):  # an anchor, or http:, https:, mailto:
            continue
        resolved = (doc.parent / target).resolve()
        if resolved.is_relative_to(ROOT) and resolved.exists():
            continue
        broken.append(target)
    assert not broken, f"{doc.name}: links to nothing in the repository: {broken}"


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_named_paths_exist(doc: Path):
    files = tracked_files()
    spans = {s.strip() for s in CODE_SPAN.findall(prose(doc.read_text(encoding="utf-8")))}
    missing = sorted(s for s in spans if path_like(s) and s not in NOT_IN_REPOSITORY and not exists(s, files))
    assert not missing, f"{doc.name} names paths that are not in the repository: {missing}"


def test_requirements_comments_name_existing_files():
    for req in sorted(ROOT.glob("requirements*.txt")):
        comments = " ".join(line for line in req.read_text().splitlines() if line.lstrip().startswith("#"))
        for name in re.findall(r"[\w.-]+\.txt", comments):
            assert (ROOT / name).is_file(), f"{req.name} names {name}, which does not exist"


def test_the_path_finder_finds_paths():
    """The checks above see paths and links at all (a pattern that matched nothing would pass everything)."""
    readme = prose((ROOT / "README.md").read_text(encoding="utf-8"))
    spans = {s for s in CODE_SPAN.findall(readme) if path_like(s)}
    assert {"csrc/lru_cache.h", "proto/hjcg/v1/hjcg.proto", "hjcg/v1/", "setup.py"} <= spans
    assert not exists("csrc/no_such_file.h", tracked_files()) and not path_like("--tls-ca/--tls-cert")
    assert any(m[1].startswith("bench/results/") for m in LINK.finditer(readme))  # the rendered results link
