"""POST /predict as a plain ASGI app: parse, call the pipeline, render. Nothing else.

Why not a FastAPI route like the others: FastAPI's per-request machinery (its
middleware stack, routing, dependency solving, request/response wrappers) cost 118 us of
CPU per /predict in-process (221 us through the FastAPI app vs 104 us for the same parse,
pipeline and render as a plain ASGI callable, fake dependencies, 50 items), more than
the whole resilience layer (budgets, breakers, retries, admission, metrics: ~40 us).
Under bursts of 20 simultaneous requests that is 2.4 ms of one event loop per burst.
The other endpoints stay FastAPI routes (api/routes.py); /predict is documented in the
same OpenAPI schema (:func:`openapi_path`).

Also here: the shed fast path (admission control refuses before anything is read), the
arrival stamp that starts a client's deadline (``policy/budget.py``), and the end-to-end
latency histogram for every outcome.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from gateway.api import errors
from gateway.api.schemas import (
    ErrorResponse,
    PredictResponse,
    parse_predict,
    parse_timeout_header,
)
from gateway.errors import (
    ClientDisconnected,
    GatewayError,
    MethodNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.pipeline import PredictResult
from gateway.runtime import Gateway

log = logging.getLogger("gateway.api")

_JSON = (b"content-type", b"application/json")
# The 503 a shed request gets, rendered once.
_SHED_STATUS, _SHED_BODY, _SHED_HEADERS = errors.render_error(errors.SHED)


def render(result: PredictResult) -> bytes:
    """The 200 body (the shape PredictResponse documents)."""
    return orjson.dumps(
        {
            "request_id": result.request_id,
            "model": {"name": result.model_name, "version": result.model_version},
            "variant": result.variant,
            "scores": result.rows,
            "fallback": result.fallback.as_dict() if result.fallback else None,
            "missing": {"user": result.missing_user, "items": result.missing_items},
            "timings_ms": result.timings_ms,
        }
    )


class PredictEndpoint:
    """The /predict ASGI app; one per process, holding the :class:`Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gw = self.gateway
        arrival = time.perf_counter()
        if gw.admission.full(gw.can_wait):
            # Shedding must cost far less than serving, or at 3x capacity the loop spends
            # itself on refusals: one comparison and two ASGI messages.
            gw.metrics.shed.inc()
            await _respond(send, _SHED_STATUS, _SHED_BODY, _SHED_HEADERS)
            gw.observe(arrival, "shed")
            return
        outcome = "error"
        try:
            try:
                result = await self._predict(scope, receive, arrival)
                status, body, headers = 200, render(result), [_JSON]
                outcome = "fallback" if result.fallback else "model"
            except GatewayError as exc:
                status, body, headers = errors.render_error(exc)
                errors.log_error(scope.get("method", ""), "/predict", exc)
                outcome = errors.outcome_of(exc)
            except Exception:
                log.exception("unexpected error on /predict")
                status, body, headers = errors.render_error(None)
            await _respond(send, status, body, headers)
        except asyncio.CancelledError:
            outcome = "disconnected"
            raise
        finally:
            gw.observe(arrival, outcome)

    async def _predict(self, scope: Scope, receive: Receive, arrival: float) -> PredictResult:
        gw = self.gateway
        settings = gw.settings
        if scope.get("method") != "POST":
            raise MethodNotAllowed(f"{scope.get('method')} /predict: only POST is allowed")
        ctype = length = timeout = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = value
            elif name == b"content-length":
                length = value
            elif name == b"x-request-timeout-ms":
                timeout = value
        if ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json":
            shown = ctype.decode("latin-1") if ctype is not None else "none"
            raise UnsupportedMediaType(f"content type must be application/json, got {shown!r}")
        header_ms = parse_timeout_header(None if timeout is None else timeout.decode("latin-1"))
        limit = settings.max_body_bytes
        if length is not None and length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"body of {int(length)} bytes is over the {limit}-byte limit")
        # The body gets GATEWAY_BODY_TIMEOUT_MS whatever the client's deadline: a request
        # whose deadline passed while it uploaded still gets an answer (from the fallback,
        # with no dependency call), not an error.
        body = await _read_body(receive, limit, settings.body_timeout_ms / 1e3)
        # Admitted only once the body is in: a slow client never holds an in-flight slot.
        # The budget starts before admission: a wait for a slot is spent from it. The body
        # is validated after admission (a bad one holds a slot for the ~10 us that takes),
        # so a request that is refused in the end costs no validation.
        budget = gw.budget_policy.start(header_ms, arrival)
        await gw.admit()
        admitted = time.perf_counter()
        try:
            req = parse_predict(body, settings.max_items)
            return await gw.pipeline.predict(req, budget)
        finally:
            gw.release(admitted)


async def _respond(send: Send, status: int, body: bytes, headers: errors.Headers) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``timeout_s``.

    The common case (the body came with the headers) costs one ``receive``; only a body
    that arrives in pieces runs under a timer.
    """
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientDisconnected("the client closed the connection before sending a body")
    body = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        return body
    parts = bytearray(body)
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if len(parts) > limit:
                    await _drain(receive, len(parts), limit)
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnected("the client closed the connection while sending")
                parts += message.get("body", b"")
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        if len(parts) > limit:  # the timer ran out while draining an oversized body
            raise PayloadTooLarge(f"body is over the {limit}-byte limit") from None
        raise RequestTimeout(
            f"request body not received within {timeout_s * 1e3:.0f} ms "
            f"({len(parts)} bytes arrived)"
        ) from None
    if len(parts) > limit:
        raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    return bytes(parts)


# How much of an oversized streamed body is read and dropped before the 413 goes out.
DRAIN_FACTOR = 4


async def _drain(receive: Receive, seen: int, limit: int) -> None:
    """Read and drop the rest of an oversized streamed body, up to ``DRAIN_FACTOR`` x
    ``limit`` in all, inside the body's own timeout.

    A client that sends its whole body before reading (urllib, most simple clients)
    would otherwise still be writing when the 413 is answered and the connection
    closed: the kernel then resets the connection, and the reset can discard the 413
    before the client reads it ("connection reset by peer" instead of a clear error;
    ``tests/test_hostile.py`` saw it on a busy machine). Draining first is nginx's
    lingering close, bounded here so a client cannot make us read without end.
    """
    while seen <= DRAIN_FACTOR * limit:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


_ERROR_CODES = (
    (405, "method is not POST"),
    (408, "body not received within GATEWAY_BODY_TIMEOUT_MS"),
    (413, "body over GATEWAY_MAX_BODY_BYTES"),
    (415, "content type is not application/json"),
    (422, "validation error: which field and why"),
    (503, "overloaded (Retry-After); not even the fallback could answer"),
)


def openapi_path(schema: dict[str, Any]) -> None:
    """Add /predict to the OpenAPI schema FastAPI generated for the other routes."""
    comps = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (PredictResponse, ErrorResponse):
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        comps.update(doc.pop("$defs", {}))
        comps[model.__name__] = doc

    def content(ref: str) -> dict[str, Any]:
        return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}

    responses: dict[str, Any] = {
        "200": {
            "description": "scores, from the model or (fallback not null) the rule-based fallback",
            "content": content("PredictResponse"),
        }
    }
    for code, desc in _ERROR_CODES:
        responses[str(code)] = {"description": desc, "content": content("ErrorResponse")}
    responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    schema.setdefault("paths", {})["/predict"] = {
        "post": {
            "summary": "Score candidate items for a user",
            "description": "Always 200 unless the request is bad or shed: a dependency's "
            "failure is answered by the fallback, and says so. Header X-Request-Timeout-Ms "
            "(a positive number) tightens the budget, counted from the request's arrival.",
            "operationId": "predict",
            "requestBody": {"required": True, "content": content("PredictRequest")},
            "responses": responses,
        }
    }
