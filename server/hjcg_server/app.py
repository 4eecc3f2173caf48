"""Builds and runs the gRPC server: hjcg.v1.Hjcg, health checking, reflection, metrics, shutdown."""
from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hjcg.config import EngineConfig
from hjcg.engine import Engine, freeze_heap
from hjcg.v1 import hjcg_pb2 as pb
from hjcg.v1 import hjcg_pb2_grpc as pb_grpc
from hjcg_server.metrics import Metrics
from hjcg_server.security import BearerTokenInterceptor, server_credentials
from hjcg_server.servicer import HjcgServicer
from hjcg_server.worker import EngineWorker

log = logging.getLogger("hjcg.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Hjcg"].full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# Keepalive: allow clients to ping every 10 s, even with no call in flight (matches hjcg_client).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


@dataclass
class ServerOptions:
    engine: EngineConfig = field(default_factory=EngineConfig)
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:50051"])
    queue_size: int = 64
    grace_s: float = 30.0
    warm: bool = False
    auth_token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"


class HjcgServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = Metrics()
        self.servicer = HjcgServicer(self.metrics)
        self.health = health.HealthServicer()
        self.worker: EngineWorker | None = None
        self._stopped = threading.Event()
        interceptors = [BearerTokenInterceptor(options.auth_token)] if options.auth_token else []
        # gRPC's own limit is only a backstop against running out of threads, set well above what the queue
        # admits: a burst of clients must meet the queue's clear "queue is full" message, not gRPC's
        # anonymous "Concurrent RPC limit exceeded" (seen with a limit only 8 above the queue size)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.queue_size + 72, thread_name_prefix="hjcg-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)] + KEEPALIVE_OPTIONS,
            maximum_concurrent_rpcs=options.queue_size + 64,
        )
        pb_grpc.add_HjcgServicer_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._unix_paths = [a[len("unix:"):] for a in options.listen if a.startswith("unix:")]
        self._bind()

    def _bind(self) -> None:
        o = self.options
        credentials = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca) if o.tls_cert else None
        for address in o.listen:
            if address.startswith("unix:"):
                path = address[len("unix:"):]
                if os.path.exists(path):
                    os.unlink(path)  # a stale socket from an earlier run
            port = (self.grpc_server.add_secure_port(address, credentials) if credentials
                    else self.grpc_server.add_insecure_port(address))
            if port == 0 and not address.startswith("unix:"):
                raise OSError(f"cannot listen on {address}")

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> None:
        # The unix socket appears at start(): create it owner-only (umask), so no other user can connect.
        old_umask = os.umask(0o177) if self._unix_paths else None
        try:
            self.grpc_server.start()
        finally:
            if old_umask is not None:
                os.umask(old_umask)
        for path in self._unix_paths:
            os.chmod(path, 0o600)
        if self.options.metrics_port is not None:
            self.metrics.serve(self.options.metrics_port, self.options.metrics_host)
        log.info("listening on %s (model loading)", ", ".join(self.options.listen))

    def load(self) -> None:
        """Loads the model (and warms graphs if asked); health turns SERVING after."""
        engine = Engine(self.options.engine)
        if self.options.warm:
            report = engine.warm([])
            log.info("warm-up: %s", report.get("message") or f"{len(report['graphs'])} graphs in "
                     f"{report['total_ms']:.0f} ms, {report['graph_bytes'] / 2**20:.1f} MiB")
        freeze_heap()  # a full collection during a request would land in its latency
        self.worker = EngineWorker(engine, self.options.queue_size, on_job_done=self.servicer.job_done)
        self.servicer.attach(engine, self.worker)
        self.metrics.watch(self.worker, engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s (%s, mode %s)", engine.model_name, ", ".join(self.options.listen),
                 engine.device_name(), engine.config.mode)

    def shutdown(self) -> None:
        """Stops new work, lets running requests finish within the grace period, cancels the rest."""
        if self._stopped.is_set():
            return
        log.info("shutting down: draining for up to %.0f s", self.options.grace_s)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.worker is not None:
            if not self.worker.drain(self.options.grace_s):
                log.warning("grace period over; ending the requests still running with UNAVAILABLE")
            self.servicer.shutting_down = True
            self.worker.stop()
        self.servicer.shutting_down = True
        self.grpc_server.stop(grace=2.0).wait()
        for path in self._unix_paths:
            if os.path.exists(path):
                os.unlink(path)
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(options: ServerOptions) -> int:
    server = HjcgServer(options)
    stop_requested = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop_requested.set())
    server.start()
    loader = threading.Thread(target=_load_or_stop, args=(server, stop_requested), daemon=True)
    loader.start()
    while not stop_requested.wait(0.5):
        pass
    server.shutdown()
    return getattr(server, "exit_code", 0)


def _load_or_stop(server: HjcgServer, stop_requested: threading.Event) -> None:
    try:
        server.load()
    except Exception as e:
        log.error("cannot load the model: %s", e)
        server.exit_code = 1
        stop_requested.set()
