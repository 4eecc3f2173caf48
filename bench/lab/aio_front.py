"""Lab: an asyncio gRPC front (grpc.aio) for the same engine worker, to compare with the production server's
thread-per-stream front (grpc.server) under many callers.

The production front gives each streaming RPC a pool thread: every token wakes that thread, which builds the
message and waits for its send to complete, and the server's poller thread wakes it again; at 32 streams that
is over a hundred GIL hand-offs per decode step, competing with the engine thread. Here one event loop thread
serves every stream: the engine thread hands each event over with call_soon_threadsafe (the HTTP front's
LoopQueue), and the loop writes the messages.

Only what the benchmark's clients use is served: Generate (token ids, max_new_tokens, ignore_eos; token and
finish messages) and health. No auth, logging, metrics, deadlines or slow-reader handling: a measurement, not a
server. Run as `hjcg serve`'s command line (bench.lab.server_stalls starts it in the `aio` variant):

    python -c "from bench.lab.aio_front import serve; serve()" serve --model random:llama2-7b --device cuda \
        --listen 127.0.0.1:50051 --max-batch 32 --queue-size 128 --warm
"""
from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hjcg.engine import Engine, Finish, RequestError, TokenOutput, freeze_heap
from hjcg.v1 import hjcg_pb2 as pb
from hjcg_server import cli, convert
from hjcg_server.app import SWITCH_INTERVAL_S
from hjcg_server.openai_jobs import LoopQueue
from hjcg_server.servicer import SERVICE, _FINISH
from hjcg_server.worker import EngineWorker, Job, QueueFull


class _LoopEvents(asyncio.Queue):
    """A job's `events` read on the loop that puts them (the engine process's messages arrive on it)."""

    def put(self, event) -> None:
        self.put_nowait((0, event))


# set to a list by a tracer: (time, request id, index) of every token message built to yield
yield_log: list | None = None


async def _main(args, process: bool) -> None:
    loop = asyncio.get_running_loop()
    if process:  # the engine in a process of its own, its messages read by this loop (bench.lab.engine_process)
        from bench.lab.engine_process import FrontEngine, ProcessWorker

        config = cli.engine_config(args)
        worker = ProcessWorker(config, args.warm, args.queue_size, loop=loop)
        engine = FrontEngine(config, worker.info)
    else:
        engine = Engine(cli.engine_config(args))
        if args.warm:
            engine.warm([])
        freeze_heap()
        worker = EngineWorker(engine, args.queue_size)
    sys.setswitchinterval(SWITCH_INTERVAL_S)

    async def generate(request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        received = time.perf_counter()
        try:
            generation = convert.generation_request(request, engine)
        except RequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        events: asyncio.Queue = _LoopEvents() if process else asyncio.Queue()
        job = Job(generation, request.request_id or uuid.uuid4().hex, events=events if process else LoopQueue(loop, events, 0))
        try:
            worker.submit(job)
        except (QueueFull, RequestError) as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            while True:
                _, event = await events.get()
                if isinstance(event, TokenOutput):
                    if yield_log is not None:
                        yield_log.append((time.perf_counter(), job.request_id, event.index))
                    yield pb.GenerateResponse(request_id=job.request_id, token=pb.TokenEvent(
                        id=event.id, text=event.text, index=event.index,
                        server_ms=(time.perf_counter() - received) * 1e3))
                elif isinstance(event, Finish):
                    yield pb.GenerateResponse(request_id=job.request_id, finish=pb.GenerateFinish(
                        reason=_FINISH[event.reason], text=event.text))
                    return
                else:
                    await context.abort(grpc.StatusCode.INTERNAL, f"generation failed: {event}")
        finally:
            job.cancel.set()  # a client that went away: the stream leaves the batch (no effect once finished)

    handler = grpc.unary_stream_rpc_method_handler(generate, request_deserializer=pb.GenerateRequest.FromString,
                                                   response_serializer=pb.GenerateResponse.SerializeToString)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name,
                                                                         {"Generate": handler}),))
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    for address in args.listen:
        server.add_insecure_port(address)
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(server.stop(0)))
    await server.start()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        await server.wait_for_termination()
    finally:
        worker.stop()


def serve(process: bool = False) -> None:
    """process: the engine in a process of its own (bench.lab.engine_process), its messages read by the loop."""
    args = cli._parser().parse_args(sys.argv[1:])
    args.listen = args.listen or [cli.DEFAULT_LISTEN]
    asyncio.run(_main(args, process))
