"""End to end through the gRPC server: a client on the same machine over loopback TCP and a unix socket,
token ids in the request. TTFT = request sent to first token message received; inter-token latency =
intervals between token messages."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
import time

from bench.common import ROOT, now, summary

SHAPE = "llama2-7b"
LENGTHS = (10, 100, 500)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(client, proc, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if client.health(timeout=1.0) == "SERVING":
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become SERVING")


def ttft_over_grpc(client, ids: list[int]) -> float:
    """Send to the first token of one Generate of `ids` (max_new_tokens 1), in seconds."""
    start = now()
    call = client.generate(token_ids=ids, max_new_tokens=1, ignore_eos=True)
    next(iter(call))
    elapsed = now() - start
    for _ in call:
        pass
    return elapsed


def _decode(client, ids, n) -> list[float]:
    stamps = []
    for response in client.generate(token_ids=ids, max_new_tokens=n + 1, ignore_eos=True):
        if response.HasField("token"):
            stamps.append(now())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run(quick: bool) -> dict:
    from hjcg_client import HjcgClient

    workdir = tempfile.mkdtemp(prefix="hjcg-bench-")
    tcp, unix = f"127.0.0.1:{_free_port()}", f"unix:{workdir}/hjcg.sock"
    log_path = os.path.join(workdir, "server.log")
    args = [sys.executable, "-m", "hjcg_server.cli", "serve", "--model", f"random:{SHAPE}", "--device", "cuda",
            "--dtype", "float16", "--warm", "--listen", tcp, "--listen", unix, "--max-context", "1024",
            "--max-prompt-tokens", "1000", "--max-new-tokens", "1000", "--log-level", "WARNING"]
    start = now()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    results: dict = {"model": f"random:{SHAPE}", "lengths": list(LENGTHS)}
    try:
        with HjcgClient(tcp) as probe:
            _wait_serving(probe, proc)
        results["server_start_s"] = now() - start
        rng = random.Random(3)
        prompts = {n: [rng.randrange(3, 32000) for _ in range(n)] for n in LENGTHS}
        runs = 20 if quick else 100
        for label, target in (("tcp", tcp), ("unix", unix)):
            with HjcgClient(target) as client:
                for ids in prompts.values():
                    ttft_over_grpc(client, ids)
                ttft = {n: [ttft_over_grpc(client, ids) for _ in range(runs)] for n, ids in prompts.items()}
                _decode(client, prompts[10], 5)
                decode = _decode(client, prompts[10], 397)
            results[label] = {"ttft": ttft, "decode": decode}
            print(f"[bench] grpc {label}: TTFT(10) {summary(ttft[10])['median_ms']:.2f} ms, "
                  f"decode {summary(decode)['median_ms']:.2f} ms/token", flush=True)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        results["server_log_tail"] = open(log_path).read()[-2000:]
    return results
