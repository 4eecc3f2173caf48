"""Builds and runs the gRPC server: hjcg.v1.Hjcg, health checking, reflection, metrics, shutdown."""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hjcg.config import EngineConfig
from hjcg.engine import Engine, freeze_heap
from hjcg_server.http_front import HttpFront
from hjcg_server.metrics import Metrics
from hjcg_server.openai_api import FrontState
from hjcg_server.openai_jobs import HttpJob
from hjcg_server.security import BearerTokenInterceptor, server_credentials
from hjcg_server.servicer import DEFAULT_UNREAD_TIMEOUT_S, SERVICE, HjcgServicer, add_to_server
from hjcg_server.worker import EngineWorker

log = logging.getLogger("hjcg.server")

SERVICE_NAME = SERVICE.full_name
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SWITCH_INTERVAL_S = 0.0002  # see HjcgServer.load
# Keepalive: allow clients to ping every 10 s, even with no call in flight (matches hjcg_client).
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# gRPC turns SO_REUSEPORT on by default: a second server on a busy port would bind silently and take half
# of the first one's connections. Off, a busy port is "address already in use".
BIND_OPTIONS = [("grpc.so_reuseport", 0)]
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
_SUN_PATH_MAX = 107  # bytes in sockaddr_un.sun_path, less the terminating NUL (Linux)


@dataclass(frozen=True)
class ListenAddress:
    """One checked --listen address: a TCP host and port, or a unix socket path."""
    text: str
    host: str = ""            # as gRPC takes it: an IPv6 address in brackets
    port: int = 0             # 0: any free port
    path: str | None = None   # a unix socket's path

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def is_loopback(self) -> bool:
        """True where only this machine can connect (a host name may resolve to any interface: False)."""
        if self.is_unix or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False

    def bound(self, port: int) -> str:
        """The address as bound: port 0 replaced by the port the system chose."""
        return self.text if self.is_unix else f"{self.host}:{port}"


def parse_listen_address(text: str) -> ListenAddress:
    """Checks host:port, [ipv6]:port or unix:/path; raises ValueError saying what is wrong."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path:
            raise ValueError(f"listen address {text!r}: give the socket's path, e.g. unix:/run/hjcg.sock")
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            raise ValueError(f"listen address {text!r}: a unix socket path has at most {_SUN_PATH_MAX} bytes")
        return ListenAddress(text, path=path)
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"listen address {text!r}: expected host:port, [ipv6]:port or unix:/path")
    if host.startswith("["):
        _check_ipv6(text, host)
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"listen address {text!r}: {host!r} is not an IPv4 address or host name "
                         "(write IPv6 addresses in brackets, e.g. [::1]:50051)")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"listen address {text!r}: the port must be 1 to 65535 (or 0 for any free port), "
                         f"got {port!r}")
    return ListenAddress(text, host=host, port=int(port))


def _check_ipv6(text: str, host: str) -> None:
    try:
        ipaddress.IPv6Address(host[1:-1] if host.endswith("]") else "")
    except ValueError:
        raise ValueError(f"listen address {text!r}: {host!r} is not a bracketed IPv6 address") from None


def claim_unix_socket(path: str) -> None:
    """Makes path free for our socket: refuses anything but a stale socket there, which it removes."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"cannot listen on unix:{path}: it exists and is not a socket; "
                      "remove it or choose another path")
    if _accepts_connections(path):
        raise OSError(f"cannot listen on unix:{path}: a server is already listening there; "
                      "stop it or choose another path")
    os.unlink(path)  # a stale socket: its server is gone


def _accepts_connections(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
        except ConnectionRefusedError:
            return False
        except TimeoutError:
            return True  # a full backlog: a live server that is busy
        except OSError as e:
            raise OSError(f"cannot listen on unix:{path}: cannot tell whether a server is listening there "
                          f"({e.strerror})") from None
        return True


def bind_error(address: ListenAddress) -> str:
    """Why the system refuses address (gRPC says only "failed to bind"), found by binding a plain socket."""
    if address.is_unix:
        parent = os.path.dirname(os.path.abspath(address.path))
        if not os.path.isdir(parent):
            return f"directory {parent} does not exist"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"no permission to create a socket in {parent}"
        return _UNKNOWN_BIND_ERROR
    try:
        candidates = socket.getaddrinfo(address.host.strip("[]"), address.port, type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {address.host!r} ({e.strerror})"
    for family, kind, proto, _, sockaddr in candidates:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
            try:
                s.bind(sockaddr)
            except OSError as e:
                return (e.strerror or str(e)).lower()  # e.g. "address already in use"
    return _UNKNOWN_BIND_ERROR


_UNKNOWN_BIND_ERROR = "refused (set GRPC_VERBOSITY=debug to see gRPC's reason)"


def default_threads() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and cpusets narrow), not the
    machine's count: more torch threads than CPUs to run them fight each other and collapse under load."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this platform (macOS)
        return os.cpu_count() or 1


def quiet_progress_bars() -> None:
    """Loading weights draws tqdm bars that redraw themselves with \\r: right on a terminal, junk in a log."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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
    threads: int | None = None  # torch CPU threads; None: default_threads()
    http_listen: str | None = None  # the OpenAI-compatible HTTP front's address; None: no HTTP front
    unread_timeout_s: float = DEFAULT_UNREAD_TIMEOUT_S  # see worker.Job.unread_timeout_s


class HjcgServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.addresses = [parse_listen_address(a) for a in options.listen]
        self.metrics = Metrics()
        self.servicer = HjcgServicer(self.metrics, options.unread_timeout_s)
        self.health = health.HealthServicer()
        self.worker: EngineWorker | None = None
        self.exit_code = 0
        self._stopped = threading.Event()
        interceptors = ([BearerTokenInterceptor(options.auth_token, on_deny=self.servicer.unauthenticated)]
                        if options.auth_token else [])
        # gRPC's own limit is only a backstop against running out of threads, set well above what the queue
        # admits: a burst of clients must meet the queue's clear "queue is full" message, not gRPC's
        # anonymous "Concurrent RPC limit exceeded" (seen with a limit only 8 above the queue size)
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=options.queue_size + 72, thread_name_prefix="hjcg-rpc"),
            interceptors=interceptors,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)] + KEEPALIVE_OPTIONS + BIND_OPTIONS,
            maximum_concurrent_rpcs=options.queue_size + 64,
        )
        add_to_server(self.servicer, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME),
                                            self.grpc_server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._unix_paths = [a.path for a in self.addresses if a.is_unix]
        self.bound = self._bind()
        # Bound now, like the gRPC ports: a busy address fails the start before the model loads.
        self.http = (HttpFront(parse_listen_address(options.http_listen),
                               FrontState(self.metrics, options.auth_token, started=self.servicer.started))
                     if options.http_listen else None)

    def _bind(self) -> list[str]:
        """Binds every address; returns them as bound (port 0 -> the real port)."""
        for path in self._unix_paths:  # all checked before any is bound
            claim_unix_socket(path)
        o = self.options
        credentials = server_credentials(o.tls_cert, o.tls_key, o.tls_client_ca) if o.tls_cert else None
        return [address.bound(self._add_port(address, credentials)) for address in self.addresses]

    def _add_port(self, address: ListenAddress, credentials: grpc.ServerCredentials | None) -> int:
        try:
            port = (self.grpc_server.add_secure_port(address.text, credentials) if credentials
                    else self.grpc_server.add_insecure_port(address.text))
        except RuntimeError:  # gRPC's message says only that binding failed
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {address.text}: {bind_error(address)}")
        return port

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)

    def start(self) -> None:
        # Threads before the model loads: loading and every request after it run on torch's pool.
        threads = self.options.threads or default_threads()
        torch.set_num_threads(threads)
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
        log.info("listening on %s (model loading)", ", ".join(self.bound))
        if self.http is not None:
            self.http.start()
            log.info("HTTP (OpenAI-compatible API) on http://%s (model loading)", self.http.bound)
        log.info("torch CPU threads: %d (%s)", threads, "--threads" if self.options.threads
                 else "the CPUs this process may use")
        self._warn_if_open()

    def _warn_if_open(self) -> None:
        """Says so when anyone on the network may use the model: a non-loopback address, no authentication."""
        o = self.options
        exposed = [b for a, b in zip(self.addresses, self.bound) if not a.is_loopback()]
        if self.http is not None and not self.http.address.is_loopback():
            exposed.append(f"http://{self.http.bound}")
        if not exposed or o.auth_token or o.tls_client_ca:
            return
        tls = " (TLS encrypts the traffic but checks no client)" if o.tls_cert else ""
        log.warning("the API is open to the network without authentication on %s%s: anyone who can reach it "
                    "can use the model; set --auth-token-file (or HJCG_AUTH_TOKEN) or --tls-client-ca, or "
                    "listen on 127.0.0.1", ", ".join(exposed), tls)

    def load(self) -> None:
        """Loads the model (and warms graphs if asked); health turns SERVING after."""
        engine = Engine(self.options.engine)
        if self.options.warm:
            report = engine.warm([])
            log.info("warm-up: %s", report.get("message") or f"{len(report['graphs'])} graphs in "
                     f"{report['total_ms']:.0f} ms, {report['graph_bytes'] / 2**20:.1f} MiB")
        freeze_heap()  # a full collection during a request would land in its latency
        # The engine thread holds the GIL for a fraction of a millisecond per step and each RPC thread for tens
        # of microseconds per token; with Python's default 5 ms switch interval a thread woken by a token (or
        # the engine thread woken by the GPU) could wait up to that long for the GIL behind a busy neighbour.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.worker = EngineWorker(engine, self.options.queue_size, on_job_done=self._job_done,
                                   on_slow_reader=self.servicer.slow_reader)
        self.servicer.attach(engine, self.worker)
        if self.http is not None:
            self.http.attach(engine, self.worker)
        self.metrics.watch(self.worker, engine)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        http = [f"http://{self.http.bound}"] if self.http is not None else []
        log.info("serving %s on %s (%s, mode %s)", engine.model_name, ", ".join(self.bound + http),
                 engine.device_name(), engine.config.mode)

    def _job_done(self, job, finish) -> None:
        """The worker's report of a finished job, to the front that submitted it."""
        if isinstance(job.rpc, HttpJob):
            job.rpc.job_done(job, finish)
        else:
            self.servicer.job_done(job, finish)

    def shutdown(self) -> None:
        """Stops new work, lets running requests finish within the grace period, cancels the rest."""
        if self._stopped.is_set():
            return
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.http is not None:
            self.http.start_draining()
        pending = self.worker.stop_accepting() if self.worker is not None else 0
        if pending:
            log.info("shutting down: draining %d request(s) for up to %.0f s", pending, self.options.grace_s)
        else:
            log.info("shutting down")
        if self.worker is not None:
            if not self.worker.drain(self.options.grace_s):
                log.warning("grace period over; ending the requests still running with UNAVAILABLE")
            self.servicer.shutting_down = True
            self.worker.stop()
        self.servicer.shutting_down = True
        self.grpc_server.stop(grace=2.0).wait()
        if self.http is not None:
            self.http.stop()
        for path in self._unix_paths:
            if os.path.exists(path):
                os.unlink(path)
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()


def serve(options: ServerOptions) -> int:
    quiet_progress_bars()
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
    log.info("stopped (exit code %d)", server.exit_code)
    return server.exit_code


def _load_or_stop(server: HjcgServer, stop_requested: threading.Event) -> None:
    try:
        server.load()
    except Exception as e:
        log.error("cannot load the model: %s", e)
        server.exit_code = 1
        stop_requested.set()
