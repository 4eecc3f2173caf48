"""Bearer-token authentication for every RPC (health checks excepted, for load balancers) and TLS."""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Callable

import grpc

_OPEN_SERVICES = ("/grpc.health.v1.Health/",)
_DENIED = "a valid 'authorization: Bearer <token>' is required"


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an authorization header (gRPC metadata or HTTP) is `Bearer <token>`, compared in constant time.
    Both fronts check their callers with it."""
    return hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets through RPCs that carry the token; answers the rest UNAUTHENTICATED and reports each one to
    on_deny(full method name, status code, message), so that refused requests are logged like the others."""

    def __init__(self, token: str, on_deny: Callable[[str, grpc.StatusCode, str], None] | None = None):
        self._token = token
        self._on_deny = on_deny

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_SERVICES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if bearer_matches(str(metadata.get("authorization", "")), self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        method = handler_call_details.method  # e.g. "/hjcg.v1.Hjcg/Generate"

        def deny(request, context):
            if self._on_deny is not None:
                self._on_deny(method, grpc.StatusCode.UNAUTHENTICATED, _DENIED)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key; with client_ca, clients must present a certificate."""
    chain = Path(cert).read_bytes()
    private_key = Path(key).read_bytes()
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)
