"""The FastAPI routes: liveness, readiness, metrics, drift, the rollout. /predict is
api/predict.py."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.schemas import DriftResponse, RolloutView
from gateway.metrics import render
from gateway.runtime import Gateway

router = APIRouter()


def _gw(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


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


@router.get(
    "/drift",
    summary="Drift on this pod: PSI per model input column and of the scores, against "
    "the served model version's training profile",
    response_model=DriftResponse,
)
async def drift(request: Request) -> Response:
    return Response(orjson.dumps(_gw(request).drift.report()), media_type="application/json")


@router.get(
    "/rollout",
    summary="The model rollout this worker follows (read-only; `gateway rollout` changes it)",
    response_model=RolloutView,
)
async def rollout(request: Request) -> Response:
    gw = _gw(request)
    r = gw.rollout
    body = r.view() if r is not None else {}
    return Response(orjson.dumps(body), media_type="application/json")
