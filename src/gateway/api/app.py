"""The app factory: settings in, the ASGI app out; clients are made in its lifespan."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.types import Receive, Scope, Send

from gateway.api import errors
from gateway.api.predict import PredictEndpoint, openapi_path
from gateway.api.routes import router
from gateway.api.schemas import request_model
from gateway.config import Settings, load_settings
from gateway.runtime import Gateway

log = logging.getLogger("gateway")


class GatewayApp:
    """The ASGI app uvicorn runs: /predict to :class:`PredictEndpoint`, the rest (health,
    readiness, metrics, docs, lifespan) to FastAPI. See api/predict.py for why."""

    def __init__(self, fastapi: FastAPI, predict: PredictEndpoint) -> None:
        self.fastapi = fastapi
        self.predict = predict

    @property
    def state(self) -> Any:
        return self.fastapi.state

    def openapi(self) -> dict[str, Any]:
        return self.fastapi.openapi()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            await self.predict(scope, receive, send)
        else:
            await self.fastapi(scope, receive, send)


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


def create_app(settings: Settings | None = None, gateway: Gateway | None = None) -> GatewayApp:
    """Build the app. ``settings`` default to the ``GATEWAY_*`` environment; ``gateway``
    to one built from them (tests pass one with fake backends)."""
    settings = settings or load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    gateway = gateway or Gateway(settings)

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
    errors.install(app)

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        openapi_path(schema)
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
    return GatewayApp(app, PredictEndpoint(gateway))
