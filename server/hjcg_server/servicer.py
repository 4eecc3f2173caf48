"""The hjcg.v1.Hjcg servicer: checks requests, hands them to the engine worker, streams answers."""
from __future__ import annotations

import logging
import queue
import time
import uuid

import grpc

from hjcg.engine import Engine, Finish, RequestError, TokenOutput
from hjcg.v1 import hjcg_pb2 as pb
from hjcg.v1 import hjcg_pb2_grpc as pb_grpc
from hjcg_server import convert
from hjcg_server.metrics import Metrics
from hjcg_server.worker import Draining, EngineWorker, Job, QueueFull, Task

log = logging.getLogger("hjcg.requests")

_FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
MAX_WARM_LENGTHS = 64


class HjcgServicer(pb_grpc.HjcgServicer):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.engine: Engine | None = None
        self.worker: EngineWorker | None = None
        self.started = time.monotonic()
        self.shutting_down = False

    def attach(self, engine: Engine, worker: EngineWorker) -> None:
        self.engine, self.worker = engine, worker

    def _ready(self, context) -> tuple[Engine, EngineWorker]:
        if self.shutting_down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        if self.engine is None or self.worker is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.engine, self.worker

    def _abort(self, context, code: grpc.StatusCode, message: str):
        self.metrics.status.labels(code=code.name).inc()
        context.abort(code, message)

    # --- Generate ---------------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context):
        engine, worker = self._ready(context)
        try:
            request_id = convert.check_request_id(request.request_id) or uuid.uuid4().hex
            generation = convert.generation_request(request, engine)
        except RequestError as e:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        job = Job(generation, request_id)
        self._submit(worker, job, context)
        yield from self._stream(job, context)

    def _submit(self, worker: EngineWorker, item: Job | Task, context) -> None:
        context.add_callback(item.cancel.set)  # client cancel, disconnect or deadline
        try:
            worker.submit(item)
        except QueueFull as e:
            self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Draining as e:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, str(e))

    def _stream(self, job: Job, context):
        last_token_at = None
        while True:
            try:
                event = job.events.get(timeout=0.5)
            except queue.Empty:
                continue  # the worker always ends a job with a Finish or an error; keep waiting
            now = time.perf_counter()
            if isinstance(event, TokenOutput):
                if last_token_at is None:
                    self.metrics.ttft.observe(now - job.received)
                else:
                    self.metrics.inter_token.observe(now - last_token_at)
                last_token_at = now
                yield pb.GenerateResponse(request_id=job.request_id, token=pb.TokenEvent(
                    id=event.id, text=event.text, index=event.index, server_ms=(now - job.received) * 1e3))
            elif isinstance(event, Finish):
                if event.reason == "cancelled" and self.shutting_down and not job.cancel.is_set():
                    self._abort(context, grpc.StatusCode.UNAVAILABLE,
                                "the server shut down before this request finished; retry on another replica")
                yield self._finish(job, event, context, now)
                return
            else:
                self._abort(context, grpc.StatusCode.INTERNAL, f"generation failed: {event}")

    @staticmethod
    def _usage(job: Job, finish: Finish) -> pb.Usage:
        return pb.Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                        queue_ms=job.queue_ms, ttft_ms=job.queue_ms + finish.ttft_ms,
                        total_ms=(time.perf_counter() - job.received) * 1e3)

    def _finish(self, job: Job, finish: Finish, context, now: float) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=job.request_id, finish=pb.GenerateFinish(
            reason=_FINISH[finish.reason], usage=self._usage(job, finish), text=finish.text))

    def job_done(self, job: Job, finish: Finish | None) -> None:
        """Called on the engine thread when a job ends, whether or not its client is still there."""
        if finish is None:
            self._log(job, None, "INTERNAL")
            self.metrics.status.labels(code="INTERNAL").inc()
            return
        usage = self._usage(job, finish)
        m = self.metrics
        m.e2e.observe(usage.total_ms / 1e3)
        m.queue_time.observe(usage.queue_ms / 1e3)
        m.prompt_tokens.inc(finish.prompt_tokens)
        m.generation_tokens.inc(finish.completion_tokens)
        m.finished.labels(finished_reason=finish.reason).inc()
        code = "CANCELLED" if job.cancel.is_set() else "OK"
        m.status.labels(code=code).inc()
        self._log(job, usage, code, finish.reason)

    @staticmethod
    def _log(job: Job, usage: pb.Usage | None, code: str, reason: str = "-") -> None:
        if usage is None:
            log.info("request=%s status=%s", job.request_id, code)
            return
        log.info("request=%s status=%s finish=%s prompt_tokens=%d completion_tokens=%d queue_ms=%.1f "
                 "ttft_ms=%.1f total_ms=%.1f", job.request_id, code, reason, usage.prompt_tokens,
                 usage.completion_tokens, usage.queue_ms, usage.ttft_ms, usage.total_ms)

    # --- Status and WarmGraphs --------------------------------------------------------------------------

    def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        engine, worker = self._ready(context)
        stats = engine.graph_stats()
        return pb.StatusResponse(
            model=pb.ModelInfo(**engine.model_info()),
            device=engine.device_name(),
            engine_mode=engine.config.mode,
            queue_depth=worker.queue_depth,
            running=worker.running,
            uptime_s=time.monotonic() - self.started,
            version=engine.version,
            graph_cache=pb.GraphCacheStats(**stats),
            max_prompt_tokens=engine.config.max_prompt_tokens,
            max_new_tokens=engine.config.max_new_tokens,
        )

    def WarmGraphs(self, request: pb.WarmGraphsRequest, context) -> pb.WarmGraphsResponse:
        engine, worker = self._ready(context)
        lengths = list(request.prompt_lengths)
        if len(lengths) > MAX_WARM_LENGTHS:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_WARM_LENGTHS} prompt_lengths")
        bad = [n for n in lengths if not 1 <= n <= engine.config.max_prompt_tokens]
        if bad:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"prompt_lengths must be in [1, {engine.config.max_prompt_tokens}], got {bad[0]}")
        task = Task(lambda e: e.warm(lengths))
        self._submit(worker, task, context)
        result = task.result.get()
        if isinstance(result, Draining):
            self._abort(context, grpc.StatusCode.UNAVAILABLE, str(result))
        if isinstance(result, Exception):
            self._abort(context, grpc.StatusCode.INTERNAL, f"warm-up failed: {result}")
        return pb.WarmGraphsResponse(
            available=result["available"], message=result.get("message", ""),
            graphs=[pb.CapturedGraph(**g) for g in result["graphs"]],
            total_ms=result["total_ms"], graph_bytes=result["graph_bytes"])
