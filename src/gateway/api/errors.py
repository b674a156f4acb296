"""Errors to HTTP responses: the one place status codes are chosen.

:func:`render_error` maps a :class:`GatewayError` to (status, body, headers); the /predict
endpoint (api/predict.py) calls it directly and the FastAPI routes through the exception
handlers installed here, so both answer the same. 4xx are logged at WARNING (the
client's mistake), never ERROR. An upstream failure never becomes a 500: the pipeline
answers it from the fallback. A 503 with ``Retry-After`` means not even the fallback
could answer (shed by admission control).
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from gateway.errors import ClientDisconnected, GatewayError, Overloaded, RequestError

log = logging.getLogger("gateway.api")

Headers = list[tuple[bytes, bytes]]
_JSON = (b"content-type", b"application/json")
# What admission control answers: one instance, rendered once by the /predict endpoint.
SHED = Overloaded(retry_after_s=1)


def _body(error: str, message: str, detail: list | None = None) -> bytes:
    return orjson.dumps({"error": error, "message": message, "detail": detail or []})


def render_error(exc: GatewayError | None) -> tuple[int, bytes, Headers]:
    """(status, JSON body, headers) for one of our errors; ``None``: an unexpected one."""
    if isinstance(exc, RequestError):
        headers = [_JSON, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
        return exc.status_code, _body(exc.error, exc.message, exc.detail), headers
    if isinstance(exc, Overloaded):
        # Retry-After 1: see Gateway.admit.
        retry = str(exc.retry_after_s).encode()
        return 503, _body("overloaded", str(exc)), [_JSON, (b"retry-after", retry)]
    if exc is not None:
        return 503, _body("unavailable", str(exc)), [_JSON, (b"retry-after", b"1")]
    return 500, _body("internal_error", "internal error; see the gateway log"), [_JSON]


def outcome_of(exc: GatewayError) -> str:
    """The ``outcome`` label of gateway_request_duration_seconds for a request that failed."""
    if isinstance(exc, ClientDisconnected):
        return "disconnected"
    if isinstance(exc, RequestError):
        return "client_error"
    if isinstance(exc, Overloaded):
        return "shed"
    return "error"


def log_error(method: str, path: str, exc: GatewayError) -> None:
    if isinstance(exc, ClientDisconnected):
        # Nobody is there to read an answer; not even the client's mistake to warn about.
        log.debug("%s %s: %s", method, path, exc)
    elif isinstance(exc, RequestError):
        log.warning("%s %s -> %d: %s", method, path, exc.status_code, exc.message)
    elif not isinstance(exc, Overloaded):
        log.error("unhandled gateway error on %s: %s", path, exc)


def _response(status: int, body: bytes, headers: Headers) -> Response:
    return Response(
        body,
        status_code=status,
        media_type="application/json",
        headers={k.decode(): v.decode() for k, v in headers if k != b"content-type"},
    )


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    log_error(request.method, request.url.path, exc)
    return _response(*render_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code >= 500:
        log.error("%s %s -> %d", request.method, request.url.path, exc.status_code)
    return _response(exc.status_code, _body("http_error", str(exc.detail)), [_JSON])


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [{"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()]
    return _response(422, _body("validation_error", "invalid request", detail), [_JSON])


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return _response(*render_error(None))


def install(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
