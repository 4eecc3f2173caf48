"""`hjcg serve` as a subprocess of the benchmark: started, waited for (health SERVING), stopped.

    with ServerProcess("random:llama2-7b", "cuda", extra=["--max-batch", "32"]) as server:
        HjcgClient(server.target) ...

A flag this server does not know yet (argparse: "unrecognized arguments") is dropped, said in the log and
in `dropped_flags`, and the server started again without it, so the suite runs against an older server.
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT

UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop(args: list[str], flags: list[str]) -> list[str]:
    """args without each of `flags` and the value after it (a value never starts with --)."""
    out, skip = [], False
    for i, a in enumerate(args):
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a and i + 1 < len(args) and not args[i + 1].startswith("--")
            continue
        out.append(a)
    return out


class ServerProcess:
    def __init__(self, model: str, device: str, extra: list[str] = (), warm: bool = True,
                 start_timeout: float = 420.0, log=print):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.workdir = tempfile.mkdtemp(prefix="hjcg-bench-")
        self.log_path = os.path.join(self.workdir, "server.log")
        self.args = ["serve", "--model", model, "--device", device, "--listen", self.target, *extra]
        if warm:
            self.args.insert(5, "--warm")
        self.start_timeout = start_timeout
        self.dropped_flags: list[str] = []
        self.start_s = 0.0
        self._launched = 0.0
        self.proc: subprocess.Popen | None = None
        self._log = log

    @property
    def command(self) -> str:
        return "hjcg " + shlex.join(self.args)

    def _spawn(self) -> None:
        env = dict(os.environ)
        paths = [str(ROOT), str(ROOT / "server"), str(ROOT / "client")]
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def argv(self) -> list[str]:
        """The server's command line (a lab's server subclasses this)."""
        return [sys.executable, "-m", "hjcg_server.cli", *self.args]

    def launch(self) -> "ServerProcess":
        """Starts the process and returns at once (wait() waits for it to serve)."""
        self._launched = time.perf_counter()
        self._spawn()
        return self

    def wait(self) -> "ServerProcess":
        """Waits until health says SERVING; a flag the server does not know is dropped and it is started
        again without it."""
        from hjcg_client import HjcgClient

        for attempt in range(3):
            deadline = time.monotonic() + self.start_timeout
            with HjcgClient(self.target) as probe:
                while time.monotonic() < deadline:
                    code = self.proc.poll()
                    if code is not None:
                        break
                    try:
                        if probe.health(timeout=1.0) == "SERVING":
                            self.start_s = time.perf_counter() - self._launched
                            self._log(f"server up {self.start_s:.1f} s after its start: {self.command}")
                            return self
                    except Exception:
                        pass
                    time.sleep(0.25)
                else:
                    self.stop()
                    raise TimeoutError(f"the server did not become SERVING in {self.start_timeout:.0f} s; "
                                       f"log tail:\n{self.log_tail()}")
            unknown = UNRECOGNIZED.search(self.log_tail())
            if code == 2 and unknown and attempt < 2:
                flags = [a.split("=", 1)[0] for a in unknown.group(1).split() if a.startswith("--")]
                self._log(f"this server does not know {flags}: starting it without them")
                self.dropped_flags += flags
                self.args = _drop(self.args, flags)
                self._spawn()
                continue
            raise RuntimeError(f"the server exited with code {code} during start-up; log tail:\n{self.log_tail()}")
        raise RuntimeError("the server did not start")

    def start(self) -> "ServerProcess":
        return self.launch().wait()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return open(self.log_path, errors="replace").read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def info(self) -> dict:
        return {"command": self.command, "start_s": self.start_s, "dropped_flags": self.dropped_flags}

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
