"""The engine worker: the one thread that owns the model and the GPU and drives the engine's steps.

RPC threads submit generation jobs straight to the engine (its queue is bounded and keeps arrival
order); the engine thread runs steps while there is work, each step serving every running stream, and
runs control tasks (graph warm-up) between steps. A job's events (TokenOutput..., Finish, or an
exception) go to its own queue, which the RPC thread drains: the engine thread never waits on a client.
A client that stops reading is buffered (gRPC's flow-control window, then the job's queue); once a token
has waited untaken for the job's unread_timeout_s, the job is cancelled, so its batch row and KV blocks go
to others.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from hjcg.engine import Engine, Finish, GenerationRequest, TokenOutput
from hjcg.scheduler import QueueFull as EngineQueueFull
from hjcg.sequence import Sequence

log = logging.getLogger("hjcg.worker")


class QueueFull(Exception):
    pass


class Draining(Exception):
    pass


class CancelFlag:
    """Set by the RPC layer when its client goes away; cancels the job's stream in the engine (which
    ends it at its next step boundary)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._seq: Sequence | None = None

    def attach(self, seq: Sequence) -> None:
        self._seq = seq
        if self._event.is_set():  # set before the stream existed
            seq.cancel()

    def set(self) -> None:
        self._event.set()
        if self._seq is not None:
            self._seq.cancel()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass(eq=False)
class Job:
    request: GenerationRequest
    request_id: str
    received: float = field(default_factory=time.perf_counter)
    cancel: CancelFlag = field(default_factory=CancelFlag)
    events: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    rpc: Any = None  # the servicer's record of the RPC that submitted this job
    seq: Sequence | None = None
    # With unread_timeout_s set (a reader taking from `events`, a queue.Queue, through take()), a job whose oldest
    # event the reader has not taken has waited longer than that is a slow reader, and is cancelled (see put).
    unread_timeout_s: float | None = None
    waiting_since: float = field(default_factory=time.perf_counter)  # the unread clock's start
    slow_reader: bool = False

    def put(self, event) -> None:
        """Hands an event to the job's reader (engine thread). Into an empty queue it starts the unread clock:
        the reader had taken everything, so time spent with nothing to read (queued, prefilling) never counts."""
        if self.unread_timeout_s is not None and self.events.empty():
            self.waiting_since = time.perf_counter()
        self.events.put(event)

    def take(self, timeout: float):
        """The next event for the job's reader (queue.Empty after `timeout` s); restarts the unread clock."""
        event = self.events.get(timeout=timeout)
        self.waiting_since = time.perf_counter()
        return event

    def reader_stalled(self) -> bool:
        """Whether an event has waited untaken for longer than unread_timeout_s."""
        return (self.unread_timeout_s is not None and not self.events.empty()
                and time.perf_counter() - self.waiting_since > self.unread_timeout_s)

    @property
    def queue_ms(self) -> float:
        """From arrival to joining the running batch (to now while it waits)."""
        return self.seq.queue_ms if self.seq is not None else (time.perf_counter() - self.received) * 1e3


@dataclass(eq=False)
class Task:
    """A control task run on the engine thread; its result (or exception) lands in `result`."""
    fn: Callable[[Engine], Any]
    result: "queue.Queue[Any]" = field(default_factory=queue.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)


class EngineWorker:
    def __init__(self, engine: Engine, queue_size: int, on_job_done: Callable[[Job, Finish | None], None] | None = None,
                 on_slow_reader: Callable[[Job], None] | None = None):
        self.engine = engine
        self._on_slow_reader = on_slow_reader
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()        # submitted, not finished
        self._tasks: deque[Task] = deque()
        self._draining = False
        self._stopping = False  # past the grace period: what is left ends as cancelled
        self._on_job_done = on_job_done
        self._thread = threading.Thread(target=self._loop, name="hjcg-engine", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self.engine.stats()["waiting"]

    @property
    def running(self) -> int:
        return self.engine.stats()["running"]

    def submit(self, item: Job | Task) -> None:
        """Queues a job or a task. Raises Draining, QueueFull, or hjcg's RequestError (a request the KV
        cache could never hold)."""
        with self._lock:
            if self._draining:
                raise Draining("the server is shutting down and takes no new requests")
            if isinstance(item, Task):
                self._tasks.append(item)
                self.engine.wake()
                return
            try:
                item.seq = self.engine.submit(item.request, lambda event: self._deliver(item, event))
            except EngineQueueFull as e:
                raise QueueFull(str(e)) from None
            self._jobs.add(item)
        item.cancel.attach(item.seq)

    def _deliver(self, job: Job, event) -> None:
        """The engine's sink for one job (engine thread): hand the event to the RPC thread."""
        job.put(event)
        if isinstance(event, TokenOutput) and not job.slow_reader and job.reader_stalled():
            job.slow_reader = True
            log.warning("request %s: its client took no message for %.1f s while %d waited; cancelling it",
                        job.request_id, job.unread_timeout_s, job.events.qsize())
            job.cancel.set()  # the stream ends at the next step boundary
            if self._on_slow_reader:
                self._on_slow_reader(job)
        if isinstance(event, Finish):
            with self._lock:
                self._jobs.discard(job)
            if self._on_job_done:
                self._on_job_done(job, event)

    def _busy(self) -> int:
        with self._lock:
            return len(self._jobs) + len(self._tasks)

    def stop_accepting(self) -> int:
        """Refuses new work from now on; returns how many jobs and tasks are queued or running."""
        with self._lock:
            self._draining = True
        return self._busy()

    def drain(self, grace_s: float) -> bool:
        """Stops new work and waits for queued and running work; returns True when all of it finished."""
        self.stop_accepting()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if self._busy() == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Cancels whatever is left, lets those streams end, and ends the thread (after drain)."""
        with self._lock:
            self._draining = True
        self._stopping = True
        self.engine.cancel_all()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            self._run_tasks()
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as e:  # a broken invariant: every stream in flight gets the error
                    log.exception("an engine step failed; ending every running request")
                    self._fail_all(e)
            elif self._stopping:
                return
            else:
                self.engine.wait_for_work(0.05)

    def _run_tasks(self) -> None:
        while self._tasks:
            with self._lock:
                task = self._tasks.popleft()
            if self._stopping:
                task.result.put(Draining("the server is shutting down"))
                continue
            try:
                task.result.put(task.fn(self.engine))
            except Exception as e:  # handed to the caller, who answers with a status
                task.result.put(e)

    def _fail_all(self, error: Exception) -> None:
        self.engine.abort_all()
        with self._lock:
            jobs, self._jobs = list(self._jobs), set()
        for job in jobs:
            job.events.put(error)
            if self._on_job_done:
                self._on_job_done(job, None)
