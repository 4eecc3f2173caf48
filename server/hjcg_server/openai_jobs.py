"""Running an HTTP request's generation jobs on the engine worker, from asyncio.

The engine thread hands each event to the job's LoopQueue, which forwards it into the request's
asyncio.Queue with call_soon_threadsafe: no thread blocks per event, and the event loop never waits on the
engine. Like gRPC's requests, each job gets one log line (logger hjcg.requests) and one count in
hjcg_requests_by_status_total once both the engine is done with it and its HTTP response has ended.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from hjcg.engine import Finish, GenerationRequest, RequestError, TokenOutput
from hjcg_server.metrics import Metrics
from hjcg_server.openai_errors import GRPC_CODE, OpenAIError, bad_request
from hjcg_server.worker import Draining, EngineWorker, Job, QueueFull

log = logging.getLogger("hjcg.requests")

DISCONNECT_POLL_S = 0.2   # how often a non-streamed request checks that its client is still there
CLIENT_GONE = 499         # nginx's status for "the client closed the request": logged, never sent


class ClientGone(Exception):
    """The client of a non-streamed request disconnected."""


class LoopQueue:
    """A job's `events` for the HTTP front: put() runs on the engine thread and only schedules the event
    into the request's asyncio.Queue, tagged with the choice index it belongs to."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self._loop, self._queue, self._index = loop, queue, index

    def put(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (self._index, event))
        except RuntimeError:  # the event loop has closed (the server is stopping): nobody is listening
            pass


@dataclass(eq=False)
class HttpJob:
    """A job's record on the HTTP side (its Job.rpc): metrics at its end, and its one log line."""
    metrics: Metrics
    http_status: int = 0
    finish: Finish | None = None
    queue_ms: float = 0.0
    total_ms: float = 0.0
    ends: int = 0                # the engine's end and the HTTP response's end: log at 2
    lock: threading.Lock = field(default_factory=threading.Lock)

    def job_done(self, job: Job, finish: Finish | None) -> None:
        """The worker's report (engine thread) that the job ended, whether or not its client is there."""
        if finish is not None:
            self.finish, self.queue_ms = finish, job.queue_ms
            self.total_ms = (time.perf_counter() - job.received) * 1e3
            self.metrics.job_finished(finish, self.total_ms, self.queue_ms)
        self._one_end(job)

    def http_ended(self, job: Job, status: int) -> None:
        self.http_status = status
        self._one_end(job)

    def _one_end(self, job: Job) -> None:
        with self.lock:
            self.ends += 1
            if self.ends != 2:
                return
        code = GRPC_CODE.get(self.http_status, "UNKNOWN")
        self.metrics.status.labels(code=code).inc()
        f = self.finish
        if f is None:
            log.info("request=%s http=%d status=%s finish=-", job.request_id, self.http_status, code)
            return
        log.info("request=%s http=%d status=%s finish=%s prompt_tokens=%d completion_tokens=%d queue_ms=%.1f "
                 "ttft_ms=%.1f total_ms=%.1f", job.request_id, self.http_status, code, f.reason, f.prompt_tokens,
                 f.completion_tokens, self.queue_ms, f.ttft_ms, self.total_ms)


class Generation:
    """The jobs of one HTTP request (n choices: n jobs), their events in arrival order, and their end."""

    def __init__(self, requests: list[GenerationRequest], request_id: str, metrics: Metrics):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._metrics = metrics
        self.jobs = [Job(r, request_id if len(requests) == 1 else f"{request_id}-{i}",
                         events=LoopQueue(self._loop, self._queue, i), rpc=HttpJob(metrics))
                     for i, r in enumerate(requests)]
        self._submitted: list[Job] = []
        self._finished: set[int] = set()
        self._last_token_at: dict[int, float] = {}

    def submit(self, worker: EngineWorker) -> None:
        """Queues every job; a refusal cancels those already queued and raises the OpenAIError to answer."""
        for job in self.jobs:
            try:
                worker.submit(job)
            except QueueFull as e:
                self._refused(429, OpenAIError(429, str(e), code="queue_full"))
            except Draining as e:
                self._refused(503, OpenAIError(503, str(e), code="shutting_down"))
            except RequestError as e:  # the KV cache could never hold this request
                self._refused(400, bad_request(str(e), code="context_length_exceeded"))
            self._submitted.append(job)

    def _refused(self, status: int, error: OpenAIError):
        self.close(status)
        raise error

    async def events(self, request: Request | None = None) -> AsyncIterator[tuple[int, TokenOutput | Finish]]:
        """(choice index, event) until every job has finished. With request (non-streamed answers), raises
        ClientGone when its client disconnects; streamed answers learn that from Starlette, which cancels them."""
        next_check = time.monotonic() + DISCONNECT_POLL_S
        while len(self._finished) < len(self.jobs):
            if request is None:
                index, event = await self._queue.get()
                yield index, self._checked(index, event)
                continue
            # Checked on a clock, not only when the queue is idle: tokens that come faster than the poll
            # interval must not hide a client that has gone.
            try:
                index, event = await asyncio.wait_for(self._queue.get(), max(0.0, next_check - time.monotonic()))
            except TimeoutError:
                index = event = None
            if time.monotonic() >= next_check:
                if await request.is_disconnected():
                    raise ClientGone()
                next_check = time.monotonic() + DISCONNECT_POLL_S
            if event is not None:
                yield index, self._checked(index, event)

    def _checked(self, index: int, event):
        now = time.perf_counter()
        if isinstance(event, TokenOutput):
            last = self._last_token_at.get(index)
            if last is None:
                self._metrics.ttft.observe(now - self.jobs[index].received)
            else:
                self._metrics.inter_token.observe(now - last)
            self._last_token_at[index] = now
            return event
        if isinstance(event, Finish):
            self._finished.add(index)
            # Only the server cancels a stream its client still waits for: past the shutdown's grace period.
            if event.reason == "cancelled" and not self.jobs[index].cancel.is_set():
                raise OpenAIError(503, "the server shut down before this request finished; retry on another "
                                  "replica", code="shutting_down")
            return event
        raise OpenAIError(500, f"generation failed: {event}", code="internal_error")

    def close(self, status: int) -> None:
        """The HTTP response has ended with status (CLIENT_GONE: its client left): stops what still runs."""
        for job in self._submitted:
            job.cancel.set()  # a no-op for a finished job
            job.rpc.http_ended(job, status)
        self._submitted = []

