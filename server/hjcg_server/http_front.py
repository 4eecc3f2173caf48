"""The HTTP front (OpenAI-compatible API and the built-in page): uvicorn on a thread of its own, in the
gRPC server's process, over the same engine worker.

The socket is bound when the front is built, so a busy or malformed address fails `hjcg serve` at once
with a clear message; requests get 503 until attach() hands over the loaded engine, and again from
start_draining() on, while the requests already running finish.
"""
from __future__ import annotations

import logging
import os
import socket
import threading

import uvicorn

from hjcg.engine import Engine
from hjcg_server.openai_api import FrontState, create_app
from hjcg_server.worker import EngineWorker

log = logging.getLogger("hjcg.http")

# After the engine has drained, what uvicorn still waits for before closing connections (keep-alive ones,
# streams finishing their last chunk).
_CLOSE_GRACE_S = 2


def bind_socket(address) -> socket.socket:
    """A listening socket for a checked ListenAddress (hjcg_server.app); OSError names the address and why."""
    try:
        if address.is_unix:
            from hjcg_server.app import claim_unix_socket

            claim_unix_socket(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o177)  # owner-only, like the gRPC unix sockets
            try:
                sock.bind(address.path)
            finally:
                os.umask(old_umask)
        else:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                address.host.strip("[]"), address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no obstacle; a live one is
            sock.bind(sockaddr)
        sock.listen(2048)
    except socket.gaierror as e:
        raise OSError(f"cannot listen on {address.text} (--http-listen): cannot resolve {address.host!r} "
                      f"({e.strerror})") from None
    except OSError as e:
        raise OSError(f"cannot listen on {address.text} (--http-listen): {(e.strerror or str(e)).lower()}") from None
    sock.setblocking(False)
    return sock


class HttpFront:
    def __init__(self, address, state: FrontState):
        self.address = address
        self.state = state
        self.socket = bind_socket(address)
        self.bound = address.bound(self.socket.getsockname()[1]) if not address.is_unix else address.text
        config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=_CLOSE_GRACE_S, server_header=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="hjcg-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self.socket])
        except BaseException:  # uvicorn exits with SystemExit on a startup failure
            log.exception("the HTTP front stopped")

    def attach(self, engine: Engine, worker: EngineWorker) -> None:
        self.state.attach(engine, worker)

    def start_draining(self) -> None:
        """New requests get 503 from now on; running ones go on (the worker drains them)."""
        self.state.draining = True

    def stop(self) -> None:
        """After the worker has stopped: closes the listener and the connections left."""
        self._server.should_exit = True
        self._thread.join(timeout=_CLOSE_GRACE_S + 5)
        if self.address.is_unix and os.path.exists(self.address.path):
            os.unlink(self.address.path)
