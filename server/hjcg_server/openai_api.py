"""The OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

create_app builds the FastAPI app over a FrontState shared with the gRPC server (the same engine, worker,
metrics, limits and bearer token); the built-in page (hjcg_server.web_page) installs itself on the same app.
"""
from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request

from hjcg.engine import Engine
from hjcg_server import web_page
from hjcg_server.metrics import Metrics
from hjcg_server.openai_errors import GRPC_CODE, OpenAIError, install_error_handlers
from hjcg_server.worker import EngineWorker

log = logging.getLogger("hjcg.requests")

GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


@dataclass(eq=False)
class FrontState:
    """What the routes share with the gRPC server; engine and worker stay None while the model loads."""
    metrics: Metrics
    auth_token: str | None = None
    started: float = field(default_factory=time.monotonic)
    engine: Engine | None = None
    worker: EngineWorker | None = None
    draining: bool = False       # shutting down: new requests get 503
    shut_down: bool = False      # past the grace period: requests still running were cancelled by the server

    def ready(self) -> tuple[Engine, EngineWorker]:
        """The engine and worker, or the 503 a client should retry after."""
        if self.draining:
            raise OpenAIError(503, "the server is shutting down; retry on another replica", code="shutting_down")
        if self.engine is None or self.worker is None:
            raise OpenAIError(503, "the model is still loading; retry shortly", code="model_loading")
        return self.engine, self.worker


def front_state(request: Request) -> FrontState:
    return request.app.state.hjcg


async def require_token(request: Request) -> None:
    """FastAPI dependency: when the server has a bearer token, the request must carry
    `Authorization: Bearer <token>` (compared in constant time); else a 401 in OpenAI's shape."""
    token = front_state(request).auth_token
    if token is None:
        return
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        raise OpenAIError(401, "a valid 'Authorization: Bearer <token>' header is required",
                          code="invalid_api_key")


def create_app(state: FrontState) -> FastAPI:
    """The HTTP front's app: the OpenAI routes, errors in OpenAI's shape, and the built-in page."""
    app = FastAPI(title="hjcg", summary="hjcg's OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.hjcg = state
    install_error_handlers(app, _log_refusal)
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=[Depends(require_token)])
    web_page.install(app)
    return app


async def list_models(request: Request) -> dict:
    engine, _ = front_state(request).ready()
    return {"object": "list", "data": [model_card(engine, front_state(request).started)]}


def model_card(engine: Engine, started: float) -> dict:
    created = int(time.time() - (time.monotonic() - started))
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "hjcg",
            "max_model_len": engine.config.max_context}


def _log_refusal(request: Request, error: OpenAIError) -> None:
    """A generation request refused before it ran gets its log line and status count here (as gRPC's do)."""
    if request.url.path not in GENERATION_PATHS:
        return
    code = GRPC_CODE.get(error.status, "UNKNOWN")
    front_state(request).metrics.status.labels(code=code).inc()
    log.info("request=- http=%d status=%s error=%s", error.status, code, json.dumps(error.message))
