"""Routes: parse, call the pipeline, render. No business logic here."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.schemas import ErrorResponse, PredictResponse, parse_predict, parse_timeout_header
from gateway.errors import GatewayError, PayloadTooLarge, UnsupportedMediaType
from gateway.metrics import render
from gateway.runtime import Gateway

router = APIRouter()

_ERRORS = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in (
        (413, "body over GATEWAY_MAX_BODY_BYTES"),
        (415, "content type is not application/json"),
        (422, "validation error: which field and why"),
        (503, "overloaded (Retry-After); not even the fallback could answer"),
    )
}


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
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
    """Score ``item_ids`` for ``user_id``; always 200 unless the request is bad or shed."""
    gw = _gw(request)
    t0 = time.perf_counter()
    with gw.admit():
        try:
            _json_content_type(request)
            header_ms = parse_timeout_header(request.headers.get("x-request-timeout-ms"))
            budget = gw.budget_policy.start(header_ms)
            body = await _read_body(request, gw.settings.max_body_bytes)
            req = parse_predict(body, gw.settings.max_items)
            result = await gw.pipeline.predict(req, budget)
        except GatewayError:
            gw.observe(t0, "error")
            raise
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
        gw.observe(t0, "fallback" if result.fallback else "model")
        return Response(payload, media_type="application/json")


@router.get("/healthz", summary="Liveness: the process answers; calls no dependency")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz", summary="Readiness: Redis reachable, schema matches, model ready")
async def readyz(request: Request) -> Response:
    ok, body = await _gw(request).readiness()
    return Response(
        orjson.dumps(body), status_code=200 if ok else 503, media_type="application/json"
    )


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    data, ctype = render(_gw(request).metrics)
    return Response(data, media_type=ctype)
