"""Shared fixtures: the embedded model loaded once, and real server processes on loopback and unix sockets."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def engine():
    from hjcg.config import EngineConfig
    from hjcg.engine import Engine

    return Engine(EngineConfig(device="cpu", max_context=1024, max_prompt_tokens=768, max_new_tokens=128,
                               prefill_buckets=(16, 64)))


@pytest.fixture(scope="session")
def hf_model():
    from hjcg import model_source

    return model_source.load("smollm2", torch.float32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args, target: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """hjcg-client with `args` against `target` (env: the process environment, e.g. with HJCG_AUTH_TOKEN)."""
    return subprocess.run([sys.executable, "-m", "hjcg_client.cli", "--target", target, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


class ServerProcess:
    """`hjcg serve` in a child process, with its addresses and log; http=True adds the HTTP front on a free
    port (http_port, http_url)."""

    def __init__(self, *extra: str, env: dict | None = None, http: bool = False):
        self.dir = Path(tempfile.mkdtemp(prefix="hjcg-test-"))
        self.port = free_port()
        self.tcp = f"127.0.0.1:{self.port}"
        self.unix = f"unix:{self.dir}/hjcg.sock"
        self.log_path = self.dir / "server.log"
        self.http_port = free_port() if http else None
        self.http_url = f"http://127.0.0.1:{self.http_port}" if http else None
        http_args = ["--http-listen", f"127.0.0.1:{self.http_port}"] if http else []
        args = [sys.executable, "-m", "hjcg_server.cli", "serve", "--device", "cpu", "--listen", self.tcp,
                "--listen", self.unix, "--max-context", "1024", "--max-prompt-tokens", "768",
                "--max-new-tokens", "128", "--default-max-new-tokens", "16", *http_args, *extra]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, **(env or {})})

    def wait_serving(self, timeout: float = 120.0) -> "ServerProcess":
        from hjcg_client import HjcgClient

        deadline = time.monotonic() + timeout
        with HjcgClient(self.tcp) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.log_path.read_text()}")
                try:
                    if client.health(timeout=1.0) == "SERVING":
                        return self
                except Exception:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"server not serving after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log_path.read_text()


@pytest.fixture(scope="session")
def server():
    s = ServerProcess("--queue-size", "8").wait_serving()
    yield s
    s.stop()


@pytest.fixture
def client(server):
    from hjcg_client import HjcgClient

    with HjcgClient(server.tcp) as c:
        yield c
