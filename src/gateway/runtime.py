"""The running gateway: backends, pipeline, metrics and readiness, built from settings.

Clients are created in :meth:`Gateway.start`, inside the app's lifespan, on the
running event loop, and reused for every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.config import Settings
from gateway.drift import DriftMonitor
from gateway.errors import ConfigError, GatewayError, InferenceError, Overloaded, SchemaMismatch
from gateway.features.base import FeatureStore
from gateway.inference.base import InferenceBackend, signature_mismatch
from gateway.metrics import OUTCOMES, Metrics
from gateway.pipeline import Pipeline, build_candidate_call, build_guarded_calls
from gateway.policy.admission import AdaptiveLimit, LagMonitor
from gateway.policy.breaker import BreakerState
from gateway.policy.budget import BudgetPolicy
from gateway.redisconn import RedisTLS
from gateway.schema import SCHEMA, FeatureSchema, load_schema

if TYPE_CHECKING:
    from gateway.rollout.runtime import RolloutRuntime
    from gateway.rollout.shadow import ShadowObserver

log = logging.getLogger("gateway")

# A background dependency check gives up after this: well inside the 2 s interval, and
# far longer than a healthy Redis GET or Triton model-ready call (~1 ms).
HEALTH_CHECK_TIMEOUT_S = 0.5
# The signature check at start may meet a Triton that is still starting its gRPC
# server; 2 s bounds the start's delay, and the health check asks again anyway.
SIGNATURE_CHECK_TIMEOUT_S = 2.0


def configured_schema(settings: Settings) -> FeatureSchema:
    """The schema ``GATEWAY_SCHEMA_FILE`` names, else the built-in one; SchemaError if bad."""
    return load_schema(settings.schema_file) if settings.schema_file else SCHEMA


def build_store(settings: Settings, schema: FeatureSchema = SCHEMA) -> FeatureStore:
    if settings.feature_source == "feast":
        from gateway.features.feast_store import FeastFeatureStore

        assert settings.feast_repo is not None  # the settings validator requires it
        return FeastFeatureStore.from_repo(
            settings.feast_repo,
            schema,
            redis_url=settings.redis_url,
            connect_timeout_s=settings.redis_connect_timeout_ms / 1e3,
            socket_timeout_s=settings.redis_socket_timeout_ms / 1e3,
            max_connections=settings.redis_max_connections,
            tls=RedisTLS.from_settings(settings),
        )
    if settings.redis_url:
        from gateway.features.redis_store import RedisFeatureStore

        return RedisFeatureStore(
            settings.redis_url,
            connect_timeout_s=settings.redis_connect_timeout_ms / 1e3,
            socket_timeout_s=settings.redis_socket_timeout_ms / 1e3,
            max_connections=settings.redis_max_connections,
            cluster=settings.redis_cluster,
            schema=schema,
            tls=RedisTLS.from_settings(settings),
        )
    from gateway.features.memory import InMemoryFeatureStore
    from gateway.synth import make_world

    if (schema.user.width, schema.item.width) != (SCHEMA.user.width, SCHEMA.item.width):
        raise ConfigError(
            f"the in-memory store holds generated data of the built-in schema's layout; "
            f"schema {schema.source} needs GATEWAY_REDIS_URL (features imported with "
            "`gateway features import`) or GATEWAY_FEATURE_SOURCE=feast"
        )
    world = make_world(settings.embedded_users, settings.embedded_items, settings.embedded_seed)
    return InMemoryFeatureStore(world, schema)


def build_backend(settings: Settings, schema: FeatureSchema = SCHEMA) -> InferenceBackend:
    url = settings.triton_url
    if url and url.startswith("http://"):
        from gateway.inference.triton_http import TritonHTTPBackend

        return TritonHTTPBackend(url, settings.model_name, settings.model_version, schema)
    if url:
        from gateway.inference.triton import TritonBackend

        return TritonBackend(
            url.removeprefix("grpc://"), settings.model_name, settings.model_version, schema
        )
    from gateway.inference.embedded import EmbeddedBackend, version_model_file
    from gateway.paths import default_model_repository
    from gateway.triton_local.server import load_repository

    repo = settings.model_repository or default_model_repository()
    cfg: Any = load_repository(repo).get(settings.model_name)
    if cfg is None:
        raise GatewayError(f"model {settings.model_name!r} not found in {repo}")
    version_dir = repo / settings.model_name / (settings.model_version or "1")
    path = version_model_file(version_dir)
    # Same semantics as the model's Triton dynamic batcher.
    delay_us = cfg.dynamic_batching.max_queue_delay_microseconds
    return EmbeddedBackend(
        path, settings.model_name, cfg.max_batch_size, delay_us / 1e6, schema=schema
    )


async def check_signature(backend: InferenceBackend, schema: FeatureSchema) -> str | None:
    """How the backend's model differs from the schema (one line), or None when it fits.

    Raises an ``InferenceError`` when the model server cannot be asked now.
    """
    sig = await backend.signature()
    return signature_mismatch(schema, sig, backend.model_name)


def preflight(settings: Settings) -> None:
    """What ``gateway serve`` checks before it starts serving; ConfigError (one line) if bad.

    The schema file and the feature source's configuration (a Feast repository and its
    registry) are read, and the model's signature is compared with the schema: a
    mismatch refuses to start. A model server that does not answer yet is no reason to
    refuse: the background health check compares the signature when it comes up, and
    the fallback answers until it fits.
    """
    schema = configured_schema(settings)
    if settings.feature_source == "feast":
        from gateway.features.feast_store import FeastLayout

        assert settings.feast_repo is not None
        FeastLayout.from_repo(settings.feast_repo, schema)

    async def model() -> None:
        backend = build_backend(settings, schema)
        try:
            await backend.start()
            try:
                mismatch = await asyncio.wait_for(
                    check_signature(backend, schema), SIGNATURE_CHECK_TIMEOUT_S
                )
            except (InferenceError, TimeoutError) as exc:
                log.warning(
                    "model signature not checked at start (%s); checked when the model is up",
                    exc or type(exc).__name__,
                )
                return
            if mismatch:
                raise ConfigError(mismatch)
        finally:
            await backend.close()

    asyncio.run(model())


def _profile_repository(settings: Settings) -> Path | None:
    """Where drift profiles are read: the model repository beside the gateway (the image
    ships it; GATEWAY_MODEL_REPOSITORY), or None when there is none (drift not counted)."""
    from gateway.errors import ModelRepositoryError
    from gateway.paths import default_model_repository

    try:
        return settings.model_repository or default_model_repository()
    except ModelRepositoryError:
        return None


class ModelMismatch(InferenceError):
    """The served model's signature differs from the schema (runtime.check_signature)."""


class Gateway:
    """Everything a request needs, created once per process.

    **Readiness means this process can answer**, from the model or from the fallback: it
    is false while starting (until the first dependency check has finished, or
    ``start_grace_s`` has passed) and while draining after SIGTERM, and never because a
    shared dependency is down. Were it otherwise, a Redis or Triton outage would take
    every gateway pod out of its Service at once, and clients would get connection
    errors instead of the fallback answers the gateway exists to give. Dependency health
    is checked in the background every ``health_interval_s``: it is in the ``/readyz``
    body, in ``gateway_dependency_up`` and in the alerts, and it refreshes the served
    model version (Triton may start after the gateway, or load a new version).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        store: FeatureStore | None = None,
        backend: InferenceBackend | None = None,
    ) -> None:
        """``store`` and ``backend`` default to those the settings name (tests pass fakes)."""
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
        self._lag_monitor = LagMonitor(self._on_lag)
        self._wait_s = settings.admission_wait_ms / 1e3
        self.can_wait = self._wait_s > 0
        self.shutting_down = False
        self._given = (store, backend)
        self._store: FeatureStore | None = None
        self._backend: InferenceBackend | None = None
        self._pipeline: Pipeline | None = None
        self.rollout: RolloutRuntime | None = None
        self._shadow: ShadowObserver | None = None
        self._health_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._first_check_done = False
        self.health: dict[str, str | None] = {}  # dependency -> None (ok) or the error
        self._model_label: tuple[str, str] | None = None
        self.schema: FeatureSchema = SCHEMA  # the configured one, from start()
        self._obs_outcome = {o: self.metrics.request_duration.labels(o).observe for o in OUTCOMES}
        self.drift = DriftMonitor(self.metrics, _profile_repository(settings),
                                  settings.drift_sample_rate)  # fmt: skip
        self.metrics.feature_max_age.set(settings.feature_max_age_s)

    @property
    def inflight(self) -> int:
        return self.admission.inflight

    @property
    def pipeline(self) -> Pipeline:
        assert self._pipeline is not None, "gateway not started"
        return self._pipeline

    async def start(self) -> None:
        schema = configured_schema(self.settings)
        self.schema = schema
        store = self._given[0] or build_store(self.settings, schema)
        backend = self._given[1] or build_backend(self.settings, schema)
        if self.settings.feature_source == "feast":
            from gateway.features.feast_store import FeastFeatureStore, age_observer

            if isinstance(store, FeastFeatureStore):
                store.observe_age = age_observer(self.metrics.registry)
        await backend.start()
        features_call, inference_call = build_guarded_calls(
            self.settings,
            self.metrics,
            store.name,
            backend.name,
            self._on_breaker,
            self._lag_monitor.max_lag_since,
        )
        self._store, self._backend = store, backend
        self._pipeline = Pipeline(
            store, backend, features_call, inference_call, self.metrics, schema
        )
        self._pipeline.observers.append(self.drift.observe)
        self.drift.start()
        await self._start_rollout(backend)
        self._lag_monitor.start()
        self._started_at = time.monotonic()
        self._health_task = asyncio.get_running_loop().create_task(
            self._health_loop(), name="dependency-health"
        )
        log.info(
            "gateway started: features from %s, inference by %s (model %s version %s)%s",
            store.name,
            backend.name,
            backend.model_name,
            backend.model_version or "latest",
            " [embedded default]" if self.settings.embedded else "",
        )

    async def _start_rollout(self, backend: InferenceBackend) -> None:
        """Follow the model's rollout: from Redis when there is one, else from settings."""
        from gateway.rollout.analysis import CanaryPolicy
        from gateway.rollout.runtime import RolloutRuntime, started
        from gateway.rollout.shadow import ShadowObserver
        from gateway.rollout.state import Mode, RolloutState, parse_steps
        from gateway.rollout.store import MemoryRolloutStore, RedisRolloutStore, RolloutStore

        s = self.settings
        store: RolloutStore
        if s.redis_url:
            if s.rollout_mode != "none":
                log.warning(
                    "GATEWAY_ROLLOUT_MODE is ignored with Redis: the rollout is the one in "
                    "Redis (gateway rollout start)"
                )
            store = RedisRolloutStore(s.redis_url, s.model_name, tls=RedisTLS.from_settings(s))
        else:
            initial = RolloutState()
            if s.rollout_mode != "none":
                initial = started(
                    initial,
                    time.time(),
                    s.model_version or backend.model_version,
                    s.rollout_candidate_version,
                    Mode(s.rollout_mode),
                    parse_steps(s.rollout_steps),
                    s.rollout_step_seconds,
                )
            store = MemoryRolloutStore(initial)
        rollout = RolloutRuntime(
            store,
            s.model_name,
            backend,
            lambda: build_candidate_call(
                s, self.metrics, backend.name, self._on_breaker, self._lag_monitor.max_lag_since
            ),
            self.metrics,
            CanaryPolicy(
                min_requests=s.rollout_min_requests,
                max_failure_rate=s.rollout_max_failure_rate,
                failure_margin=s.rollout_failure_margin,
                latency_ratio=s.rollout_latency_ratio,
                latency_slack_ms=s.rollout_latency_slack_ms,
            ),
            candidate_inference_s=s.rollout_candidate_inference_ms / 1e3,
            budget_total_s=s.budget_total_ms / 1e3,
            poll_s=s.rollout_poll_s,
            lease_ms=s.rollout_lease_ms,
            default_primary=s.model_version,
        )
        self.rollout = rollout
        self.pipeline.rollout = rollout
        self._shadow = ShadowObserver(
            rollout, backend, self.metrics, s.rollout_shadow_max_inflight, self._busy
        )
        self.pipeline.observers.append(self._shadow)
        await rollout.start()

    def _busy(self) -> bool:
        """Shed shadow work first: over half the in-flight limit, or a lagging loop
        (2 ms: well under the 5 ms at which admission control starts cutting)."""
        a = self.admission
        return a.inflight * 2 > a.limit or a.lag_s > 0.002

    async def stop(self) -> None:
        if self._shadow is not None:
            await self._shadow.close()
        if self.rollout is not None:
            await self.rollout.stop()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self._lag_monitor.stop()
        await self.drift.stop()
        if self._store is not None:
            await self._store.close()
        if self._backend is not None:
            await self._backend.close()

    def _on_breaker(self, name: str, old: BreakerState, new: BreakerState) -> None:
        self.metrics.circuit_state.labels(name).set(int(new))
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s", name, old.name.lower(), new.name.lower())

    def _on_lag(self, now: float, lag_s: float, busy: float) -> None:
        self.admission.on_sample(now, lag_s, busy)
        self.metrics.admission_limit.set(int(self.admission.limit))
        self.metrics.loop_lag.set(self.admission.lag_s)

    # -- admission and accounting ------------------------------------------------------

    async def admit(self) -> None:
        """Take an in-flight slot (waiting briefly, see policy/admission.py), or raise
        Overloaded: 503 with ``Retry-After``. The caller must :meth:`release` the slot.

        ``Retry-After: 1``: the limit adapts within tens of milliseconds, so a second is
        long enough for the overload to have been absorbed or for the client's retry to
        find another replica, and short enough not to strand its caller.
        """
        if not (self.admission.try_acquire() or await self.admission.acquire(self._wait_s)):
            self.metrics.shed.inc()
            raise Overloaded(retry_after_s=1)
        self.metrics.inflight.inc()

    def release(self, admitted_at: float) -> None:
        """Give back the slot of a request admitted at ``admitted_at`` (clock time)."""
        self.admission.on_done(time.perf_counter() - admitted_at)
        self.admission.release()
        self.metrics.inflight.dec()

    def observe(self, arrival: float, outcome: str) -> None:
        """One /predict's end-to-end duration, from its arrival, by how it ended."""
        self._obs_outcome[outcome](time.perf_counter() - arrival)

    # -- dependency health and readiness -----------------------------------------------

    async def check_dependencies(self) -> dict[str, str | None]:
        """Check Redis (reachable, our feature schema) and the model, concurrently."""
        assert self._store is not None and self._backend is not None
        checks = {"features": self._store.check(), "model": self._model_check()}
        results = await asyncio.gather(
            *(asyncio.wait_for(c, HEALTH_CHECK_TIMEOUT_S) for c in checks.values()),
            return_exceptions=True,
        )
        health: dict[str, str | None] = {}
        for name, r in zip(checks, results, strict=True):
            if isinstance(r, asyncio.CancelledError):
                raise r
            health[name] = (str(r) or type(r).__name__) if isinstance(r, BaseException) else None
        feature_error, model_error = results
        # A model whose signature differs from the schema would be sent the wrong tensor:
        # the pipeline does not call it (fallback) until it fits again.
        self.pipeline.inference_blocked = (
            health["model"] if isinstance(model_error, ModelMismatch) else None
        )
        # A store on another feature schema would be read with the wrong layout: the
        # pipeline reads nothing from it (fallback) until it matches again.
        self.pipeline.features_blocked = (
            health["features"] if isinstance(feature_error, SchemaMismatch) else None
        )
        for name, error in health.items():
            self.metrics.dependency_up.labels(name).set(0 if error else 1)
        self._refresh_model_label()
        self._refresh_feature_age()
        changed = {k: v for k, v in health.items() if self.health.get(k, "") != v}
        for name, error in changed.items():
            if error:
                log.warning("dependency %s: %s", name, error)
            elif name in self.health:
                log.info("dependency %s: ok again", name)
        self.health = health
        return health

    async def _model_check(self) -> None:
        """The model is ready and its signature fits the schema (else ModelMismatch)."""
        assert self._backend is not None
        await self._backend.ready()
        mismatch = await check_signature(self._backend, self.schema)
        if mismatch:
            raise ModelMismatch(mismatch)

    def _refresh_model_label(self) -> None:
        backend = self._backend
        assert backend is not None
        label = (backend.model_name, backend.model_version or "unknown")
        if label != self._model_label:
            if self._model_label is not None:
                self.metrics.model_info.remove(*self._model_label)
                log.info("serving model %s version %s", *label)
            self.metrics.model_info.labels(*label).set(1)
            self._model_label = label
        self.drift.on_model(backend.model_name, backend.model_version)

    def _refresh_feature_age(self) -> None:
        """The served feature set's age, where the store knows when it was written."""
        written_at = getattr(self._store, "written_at", None)
        if written_at is not None and self._store is not None:
            age = max(0.0, time.time() - written_at)
            self.metrics.feature_set_age.labels(self._store.name).set(age)

    async def warm_up(self) -> None:
        """One request's worth of work through both dependencies, before readiness: the
        first real request would otherwise pay for opening connections and first-call
        code paths inside its 15 ms features budget (seen as a features_unavailable
        right after start on a busy machine). Failures are fine: the checks report them.
        """
        assert self._store is not None and self._backend is not None
        schema = self.pipeline.schema
        matrix = schema.assemble(
            schema.user.default_vector(),
            schema.item.default_vector()[None, :],
            schema.encode_context(None),
        )
        results = await asyncio.gather(
            asyncio.wait_for(self._store.fetch("warm-up", ["warm-up"]), HEALTH_CHECK_TIMEOUT_S),
            asyncio.wait_for(
                self._backend.infer(matrix, HEALTH_CHECK_TIMEOUT_S), HEALTH_CHECK_TIMEOUT_S
            ),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, asyncio.CancelledError):
                raise r

    async def _health_loop(self) -> None:
        interval = self.settings.health_interval_s
        try:
            await self.warm_up()
        except Exception:  # noqa: BLE001 - warming up is best effort
            log.debug("warm-up failed", exc_info=True)
        while True:
            try:
                await self.check_dependencies()
            except Exception:  # noqa: BLE001 - a bug here must not stop the checks
                log.exception("dependency check failed")
            self._first_check_done = True
            await asyncio.sleep(interval)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready?, body): ready = this process can answer; dependencies only in the body."""
        body: dict[str, Any] = {}
        if self._store is not None and self._backend is not None:
            body.update(
                features=self._store.name,
                inference=self._backend.name,
                model={"name": self._backend.model_name, "version": self._backend.model_version},
                dependencies={
                    name: {"ok": error is None, **({"error": error} if error else {})}
                    for name, error in self.health.items()
                },
            )
        if self.shutting_down:
            return False, {**body, "status": "not_ready", "reason": "shutting down"}
        if self._store is None or not (
            self._first_check_done
            or time.monotonic() - self._started_at >= self.settings.start_grace_s
        ):
            return False, {**body, "status": "not_ready", "reason": "starting"}
        degraded = any(error is not None for error in self.health.values())
        # Ready either way: a degraded gateway answers from the fallback.
        return True, {**body, "status": "degraded" if degraded else "ready"}
