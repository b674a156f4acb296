"""The request path: features → inference → postprocess, with the fallback beside them.

::

    budget ─┬─ features   (one Redis round trip)      breaker + retries, asyncio.timeout
            ├─ inference  (one Triton request)        breaker + retries, asyncio.timeout
            ├─ postprocess (scores → response rows)
            └─ fallback   (rule-based, on whatever features arrived) when a stage fails

Each dependency call runs inside :class:`GuardedCall`: the breaker outside, then
``asyncio.timeout(min(stage budget, remaining total))``, then the retry loop, so
retries sit inside the stage's deadline and in exactly one layer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gateway.config import Settings
from gateway.errors import (
    CircuitOpen,
    DependencyError,
    FeatureStoreError,
    FeatureStoreTimeout,
    InferenceError,
    InferenceTimeout,
)
from gateway.fallback import FallbackScorer
from gateway.features.base import FeatureBatch, FeatureStore
from gateway.inference.base import InferenceBackend
from gateway.metrics import Metrics
from gateway.policy.breaker import Breaker, BreakerState
from gateway.policy.budget import Budget
from gateway.policy.retry import RetryBudget, RetryPolicy
from gateway.schema import SCHEMA, FeatureSchema

log = logging.getLogger("gateway.pipeline")
T = TypeVar("T")


class GuardedCall:
    """A dependency call under its breaker, the stage deadline and the retry policy."""

    def __init__(
        self,
        dependency: str,
        breaker: Breaker,
        retry: RetryPolicy,
        timeout_error: type[DependencyError],
    ) -> None:
        self.dependency = dependency
        self.breaker = breaker
        self.retry = retry
        self._timeout_error = timeout_error

    async def run(self, fn: Callable[[float], Awaitable[T]], timeout_s: float) -> T:
        """Call ``fn(time_left_s)`` until it succeeds, fails for good, or time runs out."""
        deadline = time.perf_counter() + timeout_s
        with self.breaker.guard():
            # A half-open breaker's trial call is a probe: one attempt, no retries, so a
            # user request pays at most one failed call for it.
            attempts = 1 if self.breaker.state is BreakerState.HALF_OPEN else None
            try:
                async with asyncio.timeout(timeout_s):
                    return await self.retry.call(
                        lambda: fn(max(1e-4, deadline - time.perf_counter())), deadline, attempts
                    )
            except TimeoutError as exc:
                raise self._timeout_error(
                    f"{self.dependency} did not answer within {timeout_s * 1e3:.1f} ms"
                ) from exc


@dataclass
class PredictInput:
    """A validated request."""

    request_id: str
    user_id: str
    item_ids: list[str]
    context: Mapping[str, Any] | None


@dataclass
class PredictResult:
    """What the HTTP layer renders."""

    request_id: str
    model_name: str
    model_version: str
    rows: list[dict[str, Any]]
    fallback: dict[str, str] | None
    missing_user: bool
    missing_items: int
    timings_ms: dict[str, float]


class Pipeline:
    """Runs one /predict; owns the two guarded dependencies and the fallback scorer."""

    def __init__(
        self,
        store: FeatureStore,
        backend: InferenceBackend,
        features_call: GuardedCall,
        inference_call: GuardedCall,
        metrics: Metrics,
        schema: FeatureSchema = SCHEMA,
    ) -> None:
        self.store = store
        self.backend = backend
        self.features_call = features_call
        self.inference_call = inference_call
        self.metrics = metrics
        self.schema = schema
        self.fallback = FallbackScorer(schema)
        m = metrics
        self._obs_features = m.stage_duration.labels("features").observe
        self._obs_inference = m.stage_duration.labels("inference").observe
        self._obs_post = m.stage_duration.labels("postprocess").observe

    async def _features(
        self, req: PredictInput, budget: Budget
    ) -> tuple[FeatureBatch | None, dict[str, str] | None]:
        try:
            batch = await self.features_call.run(
                lambda _left: self.store.fetch(req.user_id, req.item_ids),
                budget.stage_timeout("features"),
            )
            return batch, None
        except CircuitOpen:
            return None, {"reason": "circuit_open", "stage": "features"}
        except FeatureStoreError as exc:
            log.debug("features failed: %s", exc)
            return None, {"reason": "features_unavailable", "stage": "features"}

    async def _inference(
        self, matrix: np.ndarray, budget: Budget
    ) -> tuple[np.ndarray | None, dict[str, str] | None]:
        timeout = budget.stage_timeout("inference")
        if timeout <= 0:
            return None, {"reason": "timeout", "stage": "inference"}
        try:
            scores = await self.inference_call.run(
                lambda left: self.backend.infer(matrix, left), timeout
            )
        except CircuitOpen:
            return None, {"reason": "circuit_open", "stage": "inference"}
        except InferenceError as exc:
            log.debug("inference failed: %s", exc)
            return None, {"reason": exc.reason, "stage": "inference"}
        if not np.isfinite(scores).all():
            return None, {"reason": "inference_error", "stage": "inference"}
        return scores, None

    async def predict(self, req: PredictInput, budget: Budget) -> PredictResult:
        """Score ``req`` inside ``budget``; always returns (the fallback answers failures)."""
        n = len(req.item_ids)
        schema = self.schema
        t0 = time.perf_counter()
        batch, fallback = await self._features(req, budget)
        t1 = time.perf_counter()
        if batch is None:
            user = schema.user.default_vector()
            items = np.broadcast_to(schema.item.default_vector(), (n, schema.item.width))
            missing_user, missing_items = True, n
        else:
            user, items = batch.user, batch.items
            missing_user, missing_items = batch.user_missing, batch.items_missing
            if batch.corrupt:
                self.metrics.corrupt_features.inc(batch.corrupt)
        matrix = schema.assemble(user, items, schema.encode_context(req.context))

        scores: np.ndarray | None = None
        t_inf = time.perf_counter()
        if fallback is None:
            scores, fallback = await self._inference(matrix, budget)
        t2 = time.perf_counter()
        if scores is None:
            assert fallback is not None  # no scores only ever comes with a reason
            scores = self.fallback.score(matrix)
            self.metrics.fallback.labels(fallback["reason"]).inc()

        rows = [
            {"item_id": i, "score": s}
            for i, s in zip(
                req.item_ids, np.round(scores.astype(np.float64), 6).tolist(), strict=True
            )
        ]
        t3 = time.perf_counter()

        self._obs_features(t1 - t0)
        if fallback is None or fallback["stage"] == "inference":
            self._obs_inference(t2 - t_inf)
        self._obs_post(t3 - t2)
        if missing_user:
            self.metrics.missing_features.labels("user").inc()
        if missing_items:
            self.metrics.missing_features.labels("item").inc(missing_items)
        self.metrics.items_per_request.observe(n)
        return PredictResult(
            request_id=req.request_id,
            model_name=self.backend.model_name,
            model_version=self.backend.model_version,
            rows=rows,
            fallback=fallback,
            missing_user=missing_user,
            missing_items=missing_items,
            timings_ms={
                "features": round((t1 - t0) * 1e3, 3),
                "inference": round((t2 - t_inf) * 1e3, 3),
                "postprocess": round((t3 - t2) * 1e3, 3),
                "total": round(budget.elapsed() * 1e3, 3),
            },
        )


def build_guarded_calls(
    settings: Settings,
    metrics: Metrics,
    features_dep: str,
    inference_dep: str,
    on_state_changed: Callable[[str, Any, Any], None],
) -> tuple[GuardedCall, GuardedCall]:
    """The features and inference GuardedCalls from settings, wired to metrics."""
    calls = []
    for dep, timeout_error in (
        (features_dep, FeatureStoreTimeout),
        (inference_dep, InferenceTimeout),
    ):
        breaker = Breaker(
            dep,
            fail_max=settings.breaker_fail_max,
            reset_timeout_s=settings.breaker_reset_timeout_s,
            success_threshold=settings.breaker_success_threshold,
            on_state_changed=on_state_changed,
        )
        metrics.circuit_state.labels(dep).set(0)
        budget = RetryBudget(
            settings.retry_budget_ratio,
            settings.retry_budget_min_per_s,
            settings.retry_budget_window_s,
        )
        retry = RetryPolicy(
            budget,
            max_attempts=settings.retry_max_attempts,
            backoff_base_s=settings.retry_backoff_base_ms / 1e3,
            backoff_max_s=settings.retry_backoff_max_ms / 1e3,
            on_retry=metrics.retries.labels(dep).inc,
            on_exhausted=metrics.retry_budget_exhausted.labels(dep).inc,
        )
        calls.append(GuardedCall(dep, breaker, retry, timeout_error))
    return calls[0], calls[1]
