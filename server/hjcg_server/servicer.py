"""The hjcg.v1.Hjcg servicer: checks requests, hands them to the engine worker, streams answers.

Every Generate RPC gets exactly one log line (logger hjcg.requests) and one count in
hjcg_requests_by_status_total, both carrying the status code its client received: a refused request at
once; an admitted one when both its RPC has ended and the engine is done with its job, whichever is last
(a client's cancel ends the RPC before the job; a normal end, the job before the RPC).
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, NoReturn

import grpc

from hjcg.engine import Engine, Finish, RequestError, TokenOutput
from hjcg.v1 import hjcg_pb2 as pb
from hjcg.v1 import hjcg_pb2_grpc as pb_grpc
from hjcg_server import convert
from hjcg_server.metrics import Metrics
from hjcg_server.worker import Draining, EngineWorker, Job, QueueFull, Task

log = logging.getLogger("hjcg.requests")

SERVICE = pb.DESCRIPTOR.services_by_name["Hjcg"]
_FINISH = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
MAX_WARM_LENGTHS = 64
# A stream whose client takes no message for this long while tokens wait is cancelled (--unread-timeout).
DEFAULT_UNREAD_TIMEOUT_S = 30.0
# A client's deadline and the server's copy of it differ by the time the request took to arrive: a cancel
# this close to the deadline is the client's deadline expiring.
_DEADLINE_SLACK_S = 0.05


class Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message of the method's input type."""

    def __init__(self, type_name: str):
        self.message = f"the request is not a valid {type_name} message (malformed protobuf or invalid UTF-8)"


def _lenient_parser(message_class):
    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception:  # DecodeError, or anything else the parser throws at hostile bytes
            return Undecodable(message_class.DESCRIPTOR.full_name)
    return parse


def add_to_server(servicer: "HjcgServicer", server: grpc.Server) -> None:
    """Registers the Hjcg methods as the generated add_HjcgServicer_to_server does, but with a request
    parser that never raises: gRPC's own answers a malformed request with INTERNAL and logs a traceback;
    ours hands the handler an Undecodable, which it answers with INVALID_ARGUMENT."""
    handlers = {}
    for method in SERVICE.methods:
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient_parser(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


@dataclass(eq=False)
class _RpcRecord:
    """What the one log line of an admitted Generate RPC needs from its two ends."""
    sent: str | None = None      # the status code the handler sent; None while it has sent none
    code: str = "UNKNOWN"        # the status code the client received, fixed when the RPC ended
    usage: pb.Usage | None = None
    reason: str = "-"
    ends: int = 0                # the RPC's end and the job's end: log at 2
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel_rpc: Callable[[], object] = lambda: None  # ends the RPC from any thread (its context's cancel)
    over: bool = False                                # the RPC has ended
    watchdog: threading.Timer | None = None           # see HjcgServicer.slow_reader


class HjcgServicer(pb_grpc.HjcgServicer):
    def __init__(self, metrics: Metrics, unread_timeout_s: float = DEFAULT_UNREAD_TIMEOUT_S):
        self.metrics = metrics
        self.unread_timeout_s = unread_timeout_s
        self.engine: Engine | None = None
        self.worker: EngineWorker | None = None
        self.started = time.monotonic()
        self.shutting_down = False

    def attach(self, engine: Engine, worker: EngineWorker) -> None:
        self.engine, self.worker = engine, worker

    def _unready(self) -> str | None:
        if self.shutting_down:
            return "the server is shutting down; retry on another replica"
        if self.engine is None or self.worker is None:
            return "the model is still loading; retry shortly"
        return None

    def _ready(self, context, method: str, request) -> tuple[Engine, EngineWorker]:
        """For Status and WarmGraphs: the engine and worker, or an abort."""
        if isinstance(request, Undecodable):
            self.refused(method, grpc.StatusCode.INVALID_ARGUMENT, request.message)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        reason = self._unready()
        if reason:
            context.abort(grpc.StatusCode.UNAVAILABLE, reason)
        return self.engine, self.worker

    def refused(self, method: str, code: grpc.StatusCode, message: str, request_id: str = "-") -> None:
        """Logs (and for Generate, counts) an RPC answered with an error before it reached the engine."""
        if method == "Generate":
            self.metrics.status.labels(code=code.name).inc()
            log.info("request=%s status=%s error=%s", request_id, code.name, json.dumps(message))
        else:
            log.info("rpc=%s status=%s error=%s", method, code.name, json.dumps(message))

    def unauthenticated(self, full_method: str, code: grpc.StatusCode, message: str) -> None:
        """The bearer-token interceptor's report of an RPC it refused."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.refused(method if service == SERVICE.full_name else full_method, code, message)

    def _refuse(self, context, request_id: str, code: grpc.StatusCode, message: str) -> NoReturn:
        self.refused("Generate", code, message, request_id)
        context.abort(code, message)

    # --- Generate ---------------------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context):
        request_id = _loggable_id(request)
        if isinstance(request, Undecodable):
            self._refuse(context, request_id, grpc.StatusCode.INVALID_ARGUMENT, request.message)
        engine, worker = self.engine, self.worker
        reason = self._unready()
        if reason:
            self._refuse(context, request_id, grpc.StatusCode.UNAVAILABLE, reason)
        try:
            request_id = convert.check_request_id(request.request_id) or uuid.uuid4().hex
            generation = convert.generation_request(request, engine)
        except RequestError as e:
            self._refuse(context, request_id, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        job = Job(generation, request_id, rpc=_RpcRecord(cancel_rpc=context.cancel),
                  unread_timeout_s=self.unread_timeout_s)
        self._submit_job(worker, job, context)
        try:
            yield from self._stream(job, context)
        except Exception:
            if job.rpc.sent is None:
                job.rpc.sent = grpc.StatusCode.UNKNOWN.name  # a bug: gRPC answers UNKNOWN
            raise
        # gRPC resumes the generator past its last message only once that message is sent: the status is OK.
        job.rpc.sent = grpc.StatusCode.OK.name

    def _submit_job(self, worker: EngineWorker, job: Job, context) -> None:
        try:
            worker.submit(job)
        except QueueFull as e:
            self._refuse(context, job.request_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RequestError as e:  # the KV cache could never hold this request
            self._refuse(context, job.request_id, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Draining as e:
            self._refuse(context, job.request_id, grpc.StatusCode.UNAVAILABLE, str(e))
        # Registered once the job is in: a refused request has no second end to wait for.
        if not context.add_callback(lambda: self._rpc_ended(job, context)):
            self._rpc_ended(job, context)  # the RPC has ended already

    def slow_reader(self, job: Job) -> None:
        """The worker's report (engine thread) that it cancelled `job` because its client stopped reading. The
        client gets RESOURCE_EXHAUSTED once it reads what was buffered. A client that reads nothing for another
        unread timeout has its RPC cancelled, so that its thread is not held for ever."""
        record = job.rpc

        def check() -> None:
            with record.lock:
                if record.over or record.sent is not None:  # ended, or the handler is sending its status
                    return
            if job.reader_stalled():
                record.cancel_rpc()
            else:  # it is reading what was buffered: look again later
                self.slow_reader(job)

        with record.lock:
            if record.over:
                return
            record.watchdog = threading.Timer(job.unread_timeout_s, check)
            record.watchdog.daemon = True
            record.watchdog.start()

    def _rpc_ended(self, job: Job, context) -> None:
        """Runs when the RPC ends for any reason, a normal end included."""
        record = job.rpc
        with record.lock:
            record.over = True
            if record.watchdog is not None:
                record.watchdog.cancel()
        if record.sent is None:
            # The handler sent no status: the client cancelled, went away or ran out of time. Stop the job.
            job.cancel.set()
            record.code = _client_end_code(context)
        else:
            record.code = record.sent
        self._one_end(job)

    def _fail(self, context, job: Job, code: grpc.StatusCode, message: str) -> NoReturn:
        job.rpc.sent = code.name
        context.abort(code, message)

    def _stream(self, job: Job, context):
        last_token_at = None
        while True:
            try:
                event = job.take(timeout=0.5)
            except queue.Empty:
                continue  # the worker always ends a job with a Finish or an error; keep waiting
            now = time.perf_counter()
            if isinstance(event, TokenOutput):
                if last_token_at is None:
                    self.metrics.ttft.observe(now - job.received)
                else:
                    self.metrics.inter_token.observe(now - last_token_at)
                last_token_at = now
                yield pb.GenerateResponse(request_id=job.request_id, token=self._token_event(job, event, now))
            elif isinstance(event, Finish):
                if event.reason == "cancelled" and job.slow_reader:
                    self._fail(context, job, grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the client read too slowly: it took no message for {job.unread_timeout_s:g} s while "
                               "tokens waited, so the request was cancelled; read the stream as it arrives")
                if event.reason == "cancelled" and self.shutting_down and not job.cancel.is_set():
                    self._fail(context, job, grpc.StatusCode.UNAVAILABLE,
                               "the server shut down before this request finished; retry on another replica")
                yield self._finish(job, event)
                return
            else:
                self._fail(context, job, grpc.StatusCode.INTERNAL, f"generation failed: {event}")

    def _token_event(self, job: Job, token: TokenOutput, now: float) -> pb.TokenEvent:
        event = pb.TokenEvent(id=token.id, text=token.text, index=token.index, server_ms=(now - job.received) * 1e3)
        if token.logprob is not None:
            event.logprob = token.logprob
            event.top_logprobs.extend(pb.TopLogprob(id=i, text=self.engine.token_text(i), logprob=lp)
                                      for i, lp in token.top_logprobs)
        return event

    @staticmethod
    def _usage(job: Job, finish: Finish) -> pb.Usage:
        return pb.Usage(prompt_tokens=finish.prompt_tokens, completion_tokens=finish.completion_tokens,
                        queue_ms=job.queue_ms, ttft_ms=finish.ttft_ms,
                        total_ms=(time.perf_counter() - job.received) * 1e3)

    def _finish(self, job: Job, finish: Finish) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=job.request_id, finish=pb.GenerateFinish(
            reason=_FINISH[finish.reason], usage=self._usage(job, finish), text=finish.text))

    def job_done(self, job: Job, finish: Finish | None) -> None:
        """Called on the engine thread when a job ends, whether or not its client is still there."""
        if finish is not None:
            usage = job.rpc.usage = self._usage(job, finish)
            job.rpc.reason = finish.reason
            self.metrics.job_finished(finish, usage.total_ms, usage.queue_ms)
        self._one_end(job)

    def _one_end(self, job: Job) -> None:
        record = job.rpc
        with record.lock:
            record.ends += 1
            if record.ends != 2:
                return
        self.metrics.status.labels(code=record.code).inc()
        self._log(job.request_id, record)

    @staticmethod
    def _log(request_id: str, record: _RpcRecord) -> None:
        usage = record.usage
        if usage is None:
            log.info("request=%s status=%s finish=-", request_id, record.code)
            return
        log.info("request=%s status=%s finish=%s prompt_tokens=%d completion_tokens=%d queue_ms=%.1f "
                 "ttft_ms=%.1f total_ms=%.1f", request_id, record.code, record.reason, usage.prompt_tokens,
                 usage.completion_tokens, usage.queue_ms, usage.ttft_ms, usage.total_ms)

    # --- Status and WarmGraphs --------------------------------------------------------------------------

    def Status(self, request: pb.StatusRequest, context) -> pb.StatusResponse:
        engine, worker = self._ready(context, "Status", request)
        stats = engine.stats()
        return pb.StatusResponse(
            model=pb.ModelInfo(**engine.model_info()),
            device=engine.device_name(),
            engine_mode=engine.config.mode,
            queue_depth=stats["waiting"],
            running=stats["running"],
            max_batch=engine.config.max_batch,
            batch_bucket=stats["batch_bucket"],
            kv_cache=pb.KvCacheStats(blocks_used=stats["kv_blocks_used"], blocks_total=stats["kv_blocks_total"],
                                     block_size=stats["kv_block_size"], bytes_total=stats["kv_bytes_total"]),
            uptime_s=time.monotonic() - self.started,
            version=engine.version,
            graph_cache=pb.GraphCacheStats(**engine.graph_stats()),
            max_prompt_tokens=engine.config.max_prompt_tokens,
            max_new_tokens=engine.config.max_new_tokens,
        )

    def WarmGraphs(self, request: pb.WarmGraphsRequest, context) -> pb.WarmGraphsResponse:
        engine, worker = self._ready(context, "WarmGraphs", request)
        lengths = list(request.prompt_lengths)
        if len(lengths) > MAX_WARM_LENGTHS:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_WARM_LENGTHS} prompt_lengths")
        bad = [n for n in lengths if not 1 <= n <= engine.config.max_prompt_tokens]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"prompt_lengths must be in [1, {engine.config.max_prompt_tokens}], got {bad[0]}")
        task = Task(lambda e: e.warm(lengths))
        try:
            worker.submit(task)
        except QueueFull as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except Draining as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        result = task.result.get()
        if isinstance(result, Draining):
            context.abort(grpc.StatusCode.UNAVAILABLE, str(result))
        if isinstance(result, Exception):
            context.abort(grpc.StatusCode.INTERNAL, f"warm-up failed: {result}")
        return pb.WarmGraphsResponse(
            available=result["available"], message=result.get("message", ""),
            graphs=[pb.CapturedGraph(**g) for g in result["graphs"]],
            total_ms=result["total_ms"], graph_bytes=result["graph_bytes"])


def _loggable_id(request) -> str:
    """The client's request_id where it is safe to log, else '-'."""
    if isinstance(request, Undecodable) or not request.request_id:
        return "-"
    try:
        return convert.check_request_id(request.request_id)
    except RequestError:
        return "-"


def _client_end_code(context) -> str:
    """The status a client that stopped listening saw: DEADLINE_EXCEEDED once its deadline has passed."""
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining < _DEADLINE_SLACK_S else "CANCELLED"
