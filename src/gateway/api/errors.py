"""Errors to HTTP responses: the one place status codes are chosen.

4xx are logged at WARNING (the client's mistake), never ERROR. An upstream failure
never becomes a 500: the pipeline answers it from the fallback. A 503 with
``Retry-After`` means not even the fallback could answer (shed by admission control).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.api.routes import OUTCOME_KEY
from gateway.errors import ClientDisconnected, GatewayError, Overloaded, RequestError

log = logging.getLogger("gateway.api")


def error_response(
    status: int,
    error: str,
    message: str,
    detail: list | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = orjson.dumps({"error": error, "message": message, "detail": detail or []})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    if isinstance(exc, ClientDisconnected):
        # Nobody is there to read an answer; not even the client's mistake to warn about.
        request.scope.setdefault("state", {})[OUTCOME_KEY] = "disconnected"
        log.debug("%s %s: %s", request.method, request.url.path, exc.message)
    else:
        log.warning(
            "%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.message
        )
    return error_response(exc.status_code, exc.error, exc.message, exc.detail)


async def _overloaded(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Overloaded)
    request.scope.setdefault("state", {})[OUTCOME_KEY] = "shed"
    return error_response(
        503, "overloaded", str(exc), headers={"Retry-After": str(exc.retry_after_s)}
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled gateway error on %s: %s", request.url.path, exc)
    return error_response(503, "unavailable", str(exc), headers={"Retry-After": "1"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code >= 500:
        log.error("%s %s -> %d", request.method, request.url.path, exc.status_code)
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
    return error_response(422, "validation_error", "invalid request", detail)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal_error", "internal error; see the gateway log")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(Overloaded, _overloaded)
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
