"""Bearer-token authentication for every RPC (health checks excepted, for load balancers) and TLS."""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid 'authorization: Bearer <token>' is required")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_SERVICES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = str(metadata.get("authorization", "")).encode()
        if hmac.compare_digest(given, self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain and key; with client_ca, clients must present a certificate."""
    chain = Path(cert).read_bytes()
    private_key = Path(key).read_bytes()
    ca = Path(client_ca).read_bytes() if client_ca else None
    return grpc.ssl_server_credentials([(private_key, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)
