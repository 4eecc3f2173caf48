"""The engine worker: the one thread that owns the model and the GPU, fed by a bounded FIFO queue.

Generation jobs and control tasks (graph warm-up) run one at a time, in arrival order. A job's events
(TokenOutput..., Finish, or an exception) go to its own queue, which the RPC thread drains.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from hjcg.engine import FINISH_CANCELLED, Engine, Finish, GenerationRequest

log = logging.getLogger("hjcg.worker")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    request_id: str
    received: float = field(default_factory=time.perf_counter)
    started: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    rpc: Any = None  # the servicer's record of the RPC that submitted this job

    @property
    def queue_ms(self) -> float:
        return ((self.started or time.perf_counter()) - self.received) * 1e3


@dataclass(eq=False)
class Task:
    """A control task run on the engine thread; its result (or exception) lands in `result`."""
    fn: Callable[[Engine], Any]
    result: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineWorker:
    def __init__(self, engine: Engine, queue_size: int, on_job_done: Callable[[Job, Finish | None], None] | None = None):
        self.engine = engine
        self.queue_size = queue_size
        self._queue: "queue.Queue[Job | Task | None]" = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._draining = False
        self._stopping = False  # past the grace period: what is left ends as cancelled
        self._on_job_done = on_job_done
        self._thread = threading.Thread(target=self._loop, name="hjcg-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def running(self) -> int:
        return self._running

    def submit(self, item: Job | Task) -> None:
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down and takes no new requests")
            if self._waiting >= self.queue_size:
                raise QueueFull(f"the request queue is full ({self.queue_size} waiting); retry later")
            self._waiting += 1
        self._queue.put(item)

    def stop_accepting(self) -> int:
        """Refuses new work from now on; returns how many items are queued or running."""
        with self._lock:
            self._draining = True
            return self._waiting + self._running

    def drain(self, grace_s: float) -> bool:
        """Stops new work and waits for queued and running work; returns True when all of it finished."""
        self.stop_accepting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self._waiting == 0 and self._running == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Cancels whatever is left and ends the thread (after drain)."""
        with self._lock:
            self._draining = True
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            with self._lock:
                self._waiting -= 1
                self._running += 1
            try:
                if isinstance(item, Task):
                    self._run_task(item)
                else:
                    self._run_job(item)
            finally:
                with self._lock:
                    self._running -= 1

    def _run_task(self, task: Task) -> None:
        if self._stopping:
            task.result.put(Draining("the server is shutting down"))
            return
        try:
            task.result.put(task.fn(self.engine))
        except Exception as e:  # handed to the caller, who answers with a status
            task.result.put(e)

    def _run_job(self, job: Job) -> None:
        job.started = time.perf_counter()
        finish = None
        stop = lambda: job.cancel.is_set() or self._stopping  # noqa: E731
        if stop():
            finish = Finish(FINISH_CANCELLED, "", len(job.request.prompt_ids), 0, 0.0, 0.0)
            job.events.put(finish)
        else:
            try:
                for event in self.engine.generate(job.request, stop):
                    job.events.put(event)
                    if isinstance(event, Finish):
                        finish = event
            except Exception as e:
                log.exception("request %s failed", job.request_id)
                job.events.put(e)
        if self._on_job_done:
            self._on_job_done(job, finish)
