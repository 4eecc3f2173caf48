"""Errors of the HTTP front in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Every refusal, FastAPI's own included (validation, unknown route, wrong method), leaves the server in this
shape, so OpenAI clients raise their usual typed exceptions (BadRequestError, AuthenticationError, ...).
"""
from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("hjcg.requests")

# The gRPC status code each HTTP status stands for: hjcg_requests_by_status_total{code} and the request log
# count both fronts' requests under one set of names. 499: nginx's "client closed the request".
GRPC_CODE = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 405: "UNIMPLEMENTED",
             413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
             503: "UNAVAILABLE"}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class OpenAIError(Exception):
    """A request answered with an error: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def install_error_handlers(app: FastAPI, on_error) -> None:
    """Routes every error through OpenAIError; on_error(request, error) sees each one (to log and count it)."""

    async def openai_error(request: Request, e: OpenAIError) -> JSONResponse:
        on_error(request, e)
        return e.response()

    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return await openai_error(request, from_validation(e))

    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            error = OpenAIError(404, f"no route {request.method} {request.url.path}", code="not_found")
        elif e.status_code == 405:
            error = OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                                code="method_not_allowed")
        else:
            error = OpenAIError(e.status_code, str(e.detail))
        return await openai_error(request, error)

    app.add_exception_handler(OpenAIError, openai_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


def from_validation(e: RequestValidationError) -> OpenAIError:
    """The first of pydantic's complaints, with the parameter's path (e.g. messages[0].role) as param."""
    first = e.errors()[0]
    loc = [part for part in first.get("loc", ()) if part != "body"]
    param = _param_path(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first.get('msg', '')}", code="invalid_json")
    if kind == "extra_forbidden":
        return bad_request(f"unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"{param} is required", param=param, code="missing_required_parameter")
    message = first.get("msg", "invalid value")
    if "input" in first and kind not in ("model_type", "dict_type"):
        message = f"{message}, got {json.dumps(first['input'], default=str)[:200]}"
    return bad_request(f"{param}: {message}" if param else message, param=param or None)


def _param_path(loc: list) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not isinstance(part, str) or part.startswith(("function-", "json-or-python", "list[", "str",
                                                            "int", "union[", "literal[")):
            continue  # pydantic's names of union members, not parameter names
        else:
            out += f".{part}" if out else part
    return out
