"""The running gateway: backends, pipeline, metrics and readiness, built from settings.

Clients are created in :meth:`Gateway.start`, inside the app's lifespan, on the
running event loop, and reused for every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gateway.config import Settings
from gateway.errors import GatewayError, Overloaded
from gateway.features.base import FeatureStore
from gateway.inference.base import InferenceBackend
from gateway.metrics import Metrics
from gateway.pipeline import Pipeline, build_guarded_calls
from gateway.policy.admission import AdaptiveLimit, LagMonitor
from gateway.policy.breaker import BreakerState
from gateway.policy.budget import BudgetPolicy

log = logging.getLogger("gateway")

# Readiness probes must answer well inside a kubelet's default 1 s probe timeout.
READINESS_TIMEOUT_S = 0.5


def build_store(settings: Settings) -> FeatureStore:
    if settings.redis_url:
        from gateway.features.redis_store import RedisFeatureStore

        return RedisFeatureStore(
            settings.redis_url,
            connect_timeout_s=settings.redis_connect_timeout_ms / 1e3,
            socket_timeout_s=settings.redis_socket_timeout_ms / 1e3,
            max_connections=settings.redis_max_connections,
            cluster=settings.redis_cluster,
        )
    from gateway.features.memory import InMemoryFeatureStore
    from gateway.synth import make_world

    world = make_world(settings.embedded_users, settings.embedded_items, settings.embedded_seed)
    return InMemoryFeatureStore(world)


def build_backend(settings: Settings) -> InferenceBackend:
    if settings.triton_url:
        from gateway.inference.triton import TritonBackend

        return TritonBackend(settings.triton_url, settings.model_name, settings.model_version)
    from gateway.inference.embedded import EmbeddedBackend
    from gateway.modelbuild import CPU_MODEL_FILE
    from gateway.paths import default_model_repository
    from gateway.triton_local.server import load_repository

    repo = settings.model_repository or default_model_repository()
    cfg: Any = load_repository(repo).get(settings.model_name)
    if cfg is None:
        raise GatewayError(f"model {settings.model_name!r} not found in {repo}")
    version_dir = repo / settings.model_name / (settings.model_version or "1")
    path = version_dir / CPU_MODEL_FILE
    if not path.is_file():
        path = version_dir / "model.onnx"
    # Same semantics as the model's Triton dynamic batcher.
    delay_us = cfg.dynamic_batching.max_queue_delay_microseconds
    return EmbeddedBackend(path, settings.model_name, cfg.max_batch_size, delay_us / 1e6)


class Gateway:
    """Everything a request needs, created once per process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.budget_policy = BudgetPolicy.from_ms(
            settings.budget_total_ms,
            features=settings.budget_features_ms,
            inference=settings.budget_inference_ms,
            postprocess=settings.budget_postprocess_ms,
        )
        # Adaptive in-flight limit under the GATEWAY_MAX_INFLIGHT ceiling; see
        # policy/admission.py for why it follows event-loop lag rather than latency.
        self.admission = AdaptiveLimit(settings.max_inflight)
        self._lag_monitor = LagMonitor(self.admission.on_lag)
        self.shutting_down = False
        self._store: FeatureStore | None = None
        self._backend: InferenceBackend | None = None
        self._pipeline: Pipeline | None = None
        self._observe = {
            o: self.metrics.request_duration.labels(o).observe
            for o in ("model", "fallback", "error")
        }

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "gateway not started"
        return self._pipeline

    async def start(self) -> None:
        store = build_store(self.settings)
        backend = build_backend(self.settings)
        await backend.start()
        features_call, inference_call = build_guarded_calls(
            self.settings, self.metrics, store.name, backend.name, self._on_breaker
        )
        self._store, self._backend = store, backend
        self._pipeline = Pipeline(store, backend, features_call, inference_call, self.metrics)
        self._lag_monitor.start()
        log.info(
            "gateway started: features from %s, inference by %s (model %s version %s)%s",
            store.name,
            backend.name,
            backend.model_name,
            backend.model_version or "latest",
            " [embedded default]" if self.settings.embedded else "",
        )

    async def stop(self) -> None:
        await self._lag_monitor.stop()
        if self._store is not None:
            await self._store.close()
        if self._backend is not None:
            await self._backend.close()

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.metrics.circuit_state.labels(name).set(int(new))
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", name, old.name.lower(), new.name.lower())

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Admission control: within the adaptive in-flight limit, else 503 at once.

        ``Retry-After: 1``: the limit adapts within tens of milliseconds, so a second is
        long enough for the overload to have been absorbed or for the client's retry to
        find another replica, and short enough not to strand its caller.
        """
        if not self.admission.try_acquire():
            self.metrics.shed.inc()
            raise Overloaded(retry_after_s=1)
        self.metrics.inflight.inc()
        try:
            yield
        finally:
            self.admission.release()
            self.metrics.inflight.dec()

    def observe(self, t0: float, outcome: str) -> None:
        self._observe[outcome](time.perf_counter() - t0)

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready?, body). Checks the feature store and the model, concurrently."""
        if self.shutting_down:
            return False, {"status": "not_ready", "reason": "shutting down"}
        if self._store is None or self._backend is None:
            return False, {"status": "not_ready", "reason": "starting"}
        checks = {"features": self._store.check(), "model": self._backend.ready()}
        results = await asyncio.gather(
            *(asyncio.wait_for(c, READINESS_TIMEOUT_S) for c in checks.values()),
            return_exceptions=True,
        )
        failed = {
            name: (str(r) or type(r).__name__)
            for name, r in zip(checks, results, strict=True)
            if isinstance(r, BaseException)
        }
        body: dict[str, Any] = {
            "features": self._store.name,
            "inference": self._backend.name,
            "model": {"name": self._backend.model_name, "version": self._backend.model_version},
        }
        if failed:
            body.update(
                status="not_ready", reason="; ".join(f"{k}: {v}" for k, v in failed.items())
            )
            return False, body
        body["status"] = "ready"
        return True, body
