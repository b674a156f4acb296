"""The app factory: settings in, a FastAPI app out; clients are made in its lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.api import errors
from gateway.api.routes import ARRIVAL_KEY, OUTCOME_KEY, router
from gateway.api.schemas import request_model
from gateway.config import Settings, load_settings
from gateway.runtime import Gateway

log = logging.getLogger("gateway")

# The 503 a shed request gets, rendered once: same body and headers as the Overloaded
# handler in api/errors.py.
_SHED_BODY = orjson.dumps(
    {"error": "overloaded", "message": "too many requests in flight", "detail": []}
)
_SHED_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_SHED_BODY)).encode()),
    (b"retry-after", b"1"),
]


class PredictMiddleware:
    """/predict's outer layer: arrival time, the shed fast path, end-to-end accounting.

    * Stamps the request's arrival (the start of a client deadline; ``policy/budget.py``).
    * Answers 503 before routing when admission control is full. Shedding must cost far
      less than serving, or at 3x capacity the loop spends itself on refusals: through
      FastAPI's routing and exception handlers a 503 costs about as much CPU as a small
      /predict. Here it is one comparison and two ASGI messages. The route's
      ``Gateway.admit()`` stays the authority (it takes the slot).
    * Observes ``gateway_request_duration_seconds`` for every request, whatever the
      outcome: model, fallback, shed, client_error, error (5xx, exceptions included),
      disconnected (the client left, or the request was cancelled).
    """

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict":
            await self.app(scope, receive, send)
            return
        gw = self.gateway
        arrival = time.perf_counter()
        if gw.admission.full():
            gw.metrics.shed.inc()
            await send({"type": "http.response.start", "status": 503, "headers": _SHED_HEADERS})
            await send({"type": "http.response.body", "body": _SHED_BODY})
            gw.observe(arrival, "shed")
            return
        state = scope.setdefault("state", {})
        state[ARRIVAL_KEY] = arrival
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        outcome = "error"
        try:
            await self.app(scope, receive, send_status)
            outcome = state.get(OUTCOME_KEY) or _outcome_of(status)
        except asyncio.CancelledError:
            outcome = "disconnected"
            raise
        finally:
            gw.observe(arrival, outcome)


def _outcome_of(status: int) -> str:
    if status == 503:
        return "shed"
    if 400 <= status < 500:
        return "client_error"
    return "error"


def _document_plain_endpoints(schema: dict[str, Any]) -> None:
    """Say what /metrics, /healthz and /readyz really answer (found by schemathesis:
    FastAPI documents every route as JSON, but /metrics is Prometheus text, and /readyz
    answers 503 with a JSON reason when a dependency is down)."""
    paths = schema.get("paths", {})
    metrics = paths.get("/metrics", {}).get("get")
    if metrics:
        metrics["responses"]["200"]["content"] = {
            "text/plain": {"schema": {"type": "string"}, "example": "# HELP ..."}
        }
    readyz = paths.get("/readyz", {}).get("get")
    if readyz:
        readyz["responses"]["503"] = {
            "description": "not ready: starting, or draining after SIGTERM (never because a "
            "dependency is down: the fallback answers then, and the body says so)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }


def _drain_on_sigterm(gateway: Gateway, drain_s: float) -> Callable[[], None]:
    """Graceful shutdown: on SIGTERM, readiness turns false at once, the gateway keeps
    serving for ``drain_s`` (long enough for the load balancer to see /readyz fail and
    stop sending), then uvicorn's own handler runs: it stops accepting, lets in-flight
    requests finish (``timeout_graceful_shutdown``) and runs the lifespan shutdown.

    Without the delay, uvicorn closes the listener on SIGTERM while Kubernetes still
    routes new connections here for a probe period: those are refused (dropped).
    A second SIGTERM, or SIGINT, skips the wait. Installed from the lifespan, i.e. after
    uvicorn's ``capture_signals`` put its handler in place; returns the undo.
    """
    if drain_s <= 0 or threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    if not callable(previous):
        return lambda: None
    uvicorn_exit = previous

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if gateway.shutting_down:  # the second one: no more waiting
            uvicorn_exit(sig, frame)
            return
        gateway.shutting_down = True
        log.warning("SIGTERM: not ready; draining for %.1f s before shutting down", drain_s)
        loop.call_soon_threadsafe(loop.call_later, drain_s, uvicorn_exit, sig, None)

    signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    return restore


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. ``settings`` default to the ``GATEWAY_*`` environment."""
    settings = settings or load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    gateway = Gateway(settings)

    drain_s = settings.drain_delay_s

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        restore = _drain_on_sigterm(gateway, drain_s)
        # Everything allocated so far (modules, clients, the schema) lives as long as the
        # process: move it out of the collector's reach, so a full collection walks only
        # request garbage. Without this, gen-2 collections of the import-time heap
        # showed up as 10-40 ms stalls in the fault tests' latencies.
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            restore()
            gateway.shutting_down = True
            await gateway.stop()

    app = FastAPI(
        title="inference gateway",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.include_router(router)
    app.add_middleware(PredictMiddleware, gateway=gateway)
    errors.install(app)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = request_model(settings.max_items).model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        comps.update(body.pop("$defs", {}))
        comps["PredictRequest"] = body
        _document_plain_endpoints(schema)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
