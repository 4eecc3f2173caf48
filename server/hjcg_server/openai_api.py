"""The OpenAI-compatible HTTP API: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

create_app builds the FastAPI app over a FrontState shared with the gRPC server (the same engine, worker,
metrics, limits and bearer token); the built-in page (hjcg_server.web_page) installs itself on the same app.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hjcg.engine import Engine, TokenOutput
from hjcg_server import openai_requests, web_page
from hjcg_server.metrics import Metrics
from hjcg_server.openai_errors import GRPC_CODE, OpenAIError, bad_request, install_error_handlers
from hjcg_server.openai_jobs import CLIENT_GONE, ClientGone, Generation
from hjcg_server.openai_responses import (ChatResponder, Choice, CompletionResponder, Responder, TokenText,
                                          usage)
from hjcg_server.openai_schema import ChatBody, CompletionBody
from hjcg_server.security import bearer_matches
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
    token_text: TokenText | None = None
    draining: bool = False       # shutting down: new requests get 503

    def attach(self, engine: Engine, worker: EngineWorker) -> None:
        self.token_text = TokenText(engine.tokenizer)
        self.engine, self.worker = engine, worker

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
    if not bearer_matches(request.headers.get("authorization", ""), token):
        raise OpenAIError(401, "a valid 'Authorization: Bearer <token>' header is required",
                          code="invalid_api_key")


def create_app(state: FrontState) -> FastAPI:
    """The HTTP front's app: the OpenAI routes, errors in OpenAI's shape, and the built-in page."""
    app = FastAPI(title="hjcg", summary="hjcg's OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.state.hjcg = state
    install_error_handlers(app, _log_refusal)
    auth = [Depends(require_token)]
    app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/completions", completions, methods=["POST"], dependencies=auth)
    web_page.install(app)
    return app


async def list_models(request: Request) -> dict:
    engine, _ = front_state(request).ready()
    return {"object": "list", "data": [model_card(engine, front_state(request).started)]}


def model_card(engine: Engine, started: float) -> dict:
    created = int(time.time() - (time.monotonic() - started))
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "hjcg",
            "max_model_len": engine.config.max_context}


async def chat_completions(body: ChatBody, request: Request) -> Response:
    return await _generate(request, body, ChatResponder, "chatcmpl")


async def completions(body: CompletionBody, request: Request) -> Response:
    return await _generate(request, body, CompletionResponder, "cmpl")


async def _generate(request: Request, body: ChatBody | CompletionBody, responder: type[Responder],
                    prefix: str) -> Response:
    state = front_state(request)
    engine, worker = state.ready()
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
    requests = await openai_requests.build(body, engine)
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    out = responder(request_id, engine.model_name, state.token_text, requests[0].logprobs is not None)
    generation = Generation(requests, request_id, state.metrics)
    generation.submit(worker)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(generation, out, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _answer(generation, out, request)


async def _answer(generation: Generation, out: Responder, request: Request) -> Response:
    """A non-streamed answer: every choice's whole text, then usage."""
    status = 500  # unless set below: an unexpected error
    choices = [Choice() for _ in generation.jobs]
    try:
        async for index, event in generation.events(request):
            if isinstance(event, TokenOutput):
                out.add(choices[index], event)
            else:
                choices[index].finish = event
        status = 200
        return JSONResponse(out.response(choices, usage([c.finish for c in choices])))
    except ClientGone:
        status = CLIENT_GONE
        return Response(status_code=CLIENT_GONE)  # never sent: the connection is gone
    except OpenAIError as e:
        status = e.status
        return e.response()  # not raised: this request's log line is its jobs'
    finally:
        generation.close(status)


async def _stream(generation: Generation, out: Responder, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per token (and per choice's end), then usage if asked, then [DONE]. A
    client that disconnects makes Starlette cancel this generator, which stops the generation."""
    status = CLIENT_GONE  # unless set below: cancelled, the client went away
    choices = [Choice() for _ in generation.jobs]
    try:
        first = out.start_choices(len(choices))
        if first:
            yield _event(out.chunk(first, with_usage=include_usage))
        async for index, event in generation.events():
            if isinstance(event, TokenOutput):
                choice = out.token_choice(index, event, choices[index])
                if choice is not None:
                    yield _event(out.chunk([choice], with_usage=include_usage))
            else:
                choices[index].finish = event
                yield _event(out.chunk([out.finish_choice(index, event)], with_usage=include_usage))
        if include_usage:
            yield _event(out.chunk([], usage([c.finish for c in choices]), with_usage=True))
        yield "data: [DONE]\n\n"
        status = 200
    except OpenAIError as e:  # the headers are out: the error goes as an event, which OpenAI's clients raise
        status = e.status
        yield _event(e.body())
    except Exception:
        status = 500
        raise
    finally:
        generation.close(status)


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def _log_refusal(request: Request, error: OpenAIError) -> None:
    """A generation request refused before it ran gets its log line and status count here (as gRPC's do)."""
    if request.url.path not in GENERATION_PATHS:
        return
    code = GRPC_CODE.get(error.status, "UNKNOWN")
    front_state(request).metrics.status.labels(code=code).inc()
    log.info("request=- http=%d status=%s error=%s", error.status, code, json.dumps(error.message))
