"""Lab: the engine in a process of its own, behind the production gRPC front, to test whether the inter-token p99
under many callers comes from the engine thread sharing the front's GIL.

bench/results/2026-11-23-h100-server-stalls-lab (run 8) traced every token at three layers: when the engine thread
hands it to its job's queue, when the RPC handler takes it to yield, and when the client has it. The jitter is
already there at the first layer (at 32 streams the engine's hand-over gaps have a p99 of 3.2-3.4x their median,
while the GPU's step times stay within 1.2x), so the engine thread is late, not the front. In one process the
engine thread re-takes the GIL after every torch operation, behind 16-32 RPC threads and gRPC's poller.

Here `hjcg serve` runs unchanged (the same servicer, handlers, Job queues) except that its engine worker is a
stand-in that runs the engine in a spawned process: requests cross a pipe to it, and each engine step's events come
back in one message, which a dispatcher thread puts into the jobs' queues. Only what the benchmark's clients use is
served faithfully (token ids in; the engine process checks the request as the in-process worker does). No graph
warm-up RPC, Status figures or metrics of the engine, slow-reader cancelling or draining: a measurement, not a
server. bench.lab.server_stalls runs it as its `process` variant.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

from hjcg.config import EngineConfig
from hjcg.engine import Finish, RequestError

log = logging.getLogger("hjcg.lab.engine_process")


def _engine_main(config: EngineConfig, warm: bool, conns: list) -> None:
    """The engine process, serving one or more fronts (a pipe each; bench.lab.multi_front runs several): receives
    ("submit", id, request) and ("cancel", id); sends each front, after every step, the step's events of its own
    requests as one list of (id, event), an event being a TokenOutput, a Finish or an exception, with the time it
    was sent."""
    from hjcg.engine import Engine, freeze_heap

    engine = Engine(config)
    if warm:
        engine.warm([])
    freeze_heap()
    streams: dict[tuple[int, int], object] = {}
    out: list = []              # this step's ((front, id), event), appended by the engine's sinks (this thread)
    refused: deque = deque()    # ((front, id), exception) from the receiving threads
    for conn in conns:
        conn.send(("ready", {"name": engine.model_name, "vocab_size": engine.vocab_size}))

    def receive(front: int, conn) -> None:
        while True:
            try:
                kind, jid, *rest = conn.recv()
            except EOFError:
                os._exit(0)
            key = (front, jid)
            if kind == "submit":
                try:
                    streams[key] = engine.submit(rest[0], lambda event, key=key: out.append((key, event)))
                except Exception as e:  # RequestError, QueueFull: to the front as the job's only event
                    refused.append((key, e))
                    engine.wake()
            elif kind == "cancel" and key in streams:
                streams[key].cancel()

    for front, conn in enumerate(conns):
        threading.Thread(target=receive, args=(front, conn), daemon=True, name=f"engine-receive-{front}").start()
    while True:
        if engine.has_work():
            engine.step()
        else:
            engine.wait_for_work(0.05)
        while refused:
            out.append(refused.popleft())
        if out:
            batch = out[:]
            out.clear()
            sent = time.perf_counter()
            per_front: dict[int, list] = {}
            for (front, jid), event in batch:
                per_front.setdefault(front, []).append((jid, event))
                if isinstance(event, (Finish, Exception)):
                    streams.pop((front, jid), None)
            for front, events in per_front.items():
                conns[front].send((sent, events))


@dataclass
class RemoteStream:
    """What the servicer's Job needs of its Sequence when the engine runs elsewhere."""
    worker: "ProcessWorker"
    jid: int
    queue_ms: float = 0.0

    def cancel(self) -> None:
        self.worker.send(("cancel", self.jid))


class FrontEngine:
    """The part of hjcg.engine.Engine the gRPC front reads, for requests with token ids."""

    version = "lab"

    def __init__(self, config: EngineConfig, info: dict):
        self.config, self.model_name, self.vocab_size = config, info["name"], info["vocab_size"]

    def validate(self, request) -> None:
        pass  # the engine process checks it again on submit, as the in-process engine does

    def encode_text(self, text: str) -> list[int]:
        raise RequestError("this lab front takes token ids only")

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0, "batch_bucket": 0, "kv_blocks_used": 0, "kv_blocks_total": 1}

    def graph_stats(self) -> dict:
        return {}

    def device_name(self) -> str:
        return self.config.device

    def model_info(self) -> dict:
        return {"name": self.model_name, "architecture": "llama", "dtype": self.config.dtype,
                "weights": self.config.weights, "context_length": self.config.max_context,
                "vocab_size": self.vocab_size}


class ProcessWorker:
    """hjcg_server.worker.EngineWorker's interface, with the engine in a spawned process."""

    # set to a list, it gets (time sent, request id, index) of every token as the engine process sent it (a tracer's)
    sent_log: list | None = None

    def __init__(self, config: EngineConfig, warm: bool, queue_size: int, on_job_done=None, loop=None, conn=None,
                 info: dict | None = None):
        """loop: an asyncio loop that reads the engine's messages itself (no dispatcher thread). conn, info: the pipe
        to an engine process already started (and its "ready" message's info) instead of spawning one."""
        self._process = None
        if conn is None:
            context = multiprocessing.get_context("spawn")
            conn, child = context.Pipe()
            self._process = context.Process(target=_engine_main, args=(config, warm, [child]), daemon=True,
                                            name="hjcg-engine")
            self._process.start()
            kind, info = conn.recv()
            assert kind == "ready", kind
        self._conn, self.info = conn, info
        self.queue_size = queue_size
        self._on_job_done = on_job_done
        self._jobs: dict[int, object] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        if loop is None:
            threading.Thread(target=self._dispatch, daemon=True, name="engine-dispatch").start()
        else:
            loop.add_reader(self._conn.fileno(), self._drain)

    def send(self, message) -> None:
        with self._send_lock:
            self._conn.send(message)

    def submit(self, job) -> None:
        with self._lock:
            jid, self._next = self._next, self._next + 1
            self._jobs[jid] = job
        job.seq = RemoteStream(self, jid)
        self.send(("submit", jid, job.request))
        job.cancel.attach(job.seq)

    def _dispatch(self) -> None:
        while True:
            try:
                self._deliver(*self._conn.recv())
            except EOFError:
                log.error("the engine process ended")
                return

    def _drain(self) -> None:
        """The event loop's reader: every message that has arrived."""
        while self._conn.poll():
            self._deliver(*self._conn.recv())

    def _deliver(self, sent: float, batch: list) -> None:
        for jid, event in batch:
            job = self._jobs.get(jid)
            if job is None:
                continue
            if self.sent_log is not None and hasattr(event, "index"):
                self.sent_log.append((sent, job.request_id, event.index))
            job.put(event)
            if isinstance(event, (Finish, Exception)):
                with self._lock:
                    del self._jobs[jid]
                if self._on_job_done:
                    self._on_job_done(job, event if isinstance(event, Finish) else None)

    @property
    def queue_depth(self) -> int:
        return 0

    @property
    def running(self) -> int:
        return len(self._jobs)

    def stop_accepting(self) -> int:
        return len(self._jobs)

    def drain(self, grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self._jobs

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.join(timeout=10)


def install() -> None:
    """Makes `hjcg serve` (hjcg_server.app.HjcgServer.load) run its engine through ProcessWorker."""
    from grpc_health.v1 import health_pb2

    from hjcg_server import app

    def load(self) -> None:
        worker = ProcessWorker(self.options.engine, self.options.warm, self.options.queue_size,
                               on_job_done=self._job_done)
        engine = FrontEngine(self.options.engine, worker.info)
        sys.setswitchinterval(app.SWITCH_INTERVAL_S)
        self.worker = worker
        self.servicer.attach(engine, worker)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        app.log.info("serving %s on %s (engine process %d)", engine.model_name, ", ".join(self.bound),
                     worker._process.pid)

    app.HjcgServer.load = load
