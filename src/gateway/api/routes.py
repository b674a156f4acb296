"""Routes: parse, call the pipeline, render. No business logic here."""

from __future__ import annotations

import asyncio
import time

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gateway.api.schemas import ErrorResponse, PredictResponse, parse_predict, parse_timeout_header
from gateway.errors import (
    ClientDisconnected,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.metrics import render
from gateway.runtime import Gateway

router = APIRouter()

# Keys in the ASGI scope's "state" (request.state) shared with api/app.py's middleware:
# when the request arrived, and how it ended (model or fallback).
ARRIVAL_KEY = "gateway_arrival"
OUTCOME_KEY = "gateway_outcome"

_ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (408, "body not received within GATEWAY_BODY_TIMEOUT_MS (or the client's deadline)"),
        (413, "body over GATEWAY_MAX_BODY_BYTES"),
        (415, "content type is not application/json"),
        (422, "validation error: which field and why"),
        (503, "overloaded (Retry-After); not even the fallback could answer"),
    )
}


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most ``limit`` bytes, within ``timeout_s`` of now."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
    except TimeoutError:
        raise RequestTimeout(
            f"request body not received within {timeout_s * 1e3:.0f} ms ({len(body)} bytes arrived)"
        ) from None
    except ClientDisconnect:
        raise ClientDisconnected("the client closed the connection while sending") from None
    return bytes(body)


def _json_content_type(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaType(
            f"content type must be application/json, got {ctype or 'none'!r}"
        )


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=_ERRORS,  # type: ignore[arg-type]
    summary="Score candidate items for a user",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}
            },
        }
    },
)
async def predict(request: Request) -> Response:
    """Score ``item_ids`` for ``user_id``; always 200 unless the request is bad or shed.

    The body is read and validated before admission: a slow or bad client never holds an
    in-flight slot. The budget starts once the body is in (see ``policy/budget.py``).
    """
    gw = _gw(request)
    state = request.scope.setdefault("state", {})
    arrival = state.get(ARRIVAL_KEY) or time.perf_counter()
    _json_content_type(request)
    header_ms = parse_timeout_header(request.headers.get("x-request-timeout-ms"))
    # The body gets GATEWAY_BODY_TIMEOUT_MS whatever the client's deadline: a request
    # whose deadline passed while it uploaded still gets an answer (from the fallback,
    # with no dependency call), not an error.
    body = await _read_body(request, gw.settings.max_body_bytes, gw.settings.body_timeout_ms / 1e3)
    req = parse_predict(body, gw.settings.max_items)
    with gw.admit():
        budget = gw.budget_policy.start(header_ms, arrival)
        result = await gw.pipeline.predict(req, budget)
    state[OUTCOME_KEY] = "fallback" if result.fallback else "model"
    payload = orjson.dumps(
        {
            "request_id": result.request_id,
            "model": {"name": result.model_name, "version": result.model_version},
            "scores": result.rows,
            "fallback": result.fallback,
            "missing": {"user": result.missing_user, "items": result.missing_items},
            "timings_ms": result.timings_ms,
        }
    )
    return Response(payload, media_type="application/json")


@router.get("/healthz", summary="Liveness: the process answers; calls no dependency")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get(
    "/readyz",
    summary="Readiness: this process can answer (from the model or the fallback); "
    "dependency health is in the body",
)
async def readyz(request: Request) -> Response:
    ok, body = _gw(request).readiness()
    return Response(
        orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json"
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    data, ctype = render(_gw(request).metrics)
    return Response(data, media_type=ctype)
