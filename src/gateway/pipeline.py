"""The request path: features → inference → postprocess, with the fallback beside them.

::

    budget ─┬─ features   (one Redis round trip)      breaker + retries, asyncio.timeout
            ├─ inference  (one Triton request)        breaker + retries, asyncio.timeout
            ├─ postprocess (scores → response rows)
            └─ fallback   (rule-based, on whatever features arrived) when a stage fails

During a canary (gateway/rollout/) a user assigned to the candidate is scored by the
candidate version first, under its own breaker and its own share of the inference stage;
if it fails, the primary scores the request with the time left, and only if that fails
too does the rule-based fallback answer. The candidate can never open the primary's
breaker. In shadow mode the candidate scores a copy of the work off the request path
(rollout/shadow.py, an observer).

Each dependency call runs inside a :class:`~gateway.policy.guard.GuardedCall`: the
breaker outside, then ``asyncio.timeout(min(stage budget, remaining total))``, then the
retry loop, so retries sit inside the stage's deadline and in exactly one layer. A
stage with too little time left is not attempted. Stage latency is observed only for
stages that called their dependency.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.config import Settings
from gateway.errors import (
    CircuitOpen,
    FeatureStoreError,
    FeatureStoreTimeout,
    InferenceError,
    InferenceTimeout,
    StageSkipped,
)
from gateway.fallback import FallbackScorer
from gateway.features.base import FeatureBatch, FeatureStore
from gateway.inference.base import InferenceBackend
from gateway.metrics import Metrics
from gateway.names import FallbackReason, Stage
from gateway.observe import Fallback, MetricsObserver, Observer, Prediction
from gateway.policy.breaker import Breaker, BreakerConfig
from gateway.policy.budget import Budget
from gateway.policy.guard import Attribution, GuardedCall
from gateway.policy.retry import RetryBudget, RetryPolicy
from gateway.rollout.runtime import RolloutRuntime
from gateway.rollout.state import Variant
from gateway.schema import SCHEMA, FeatureSchema

log = logging.getLogger("gateway.pipeline")


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
    fallback: Fallback | None
    missing_user: bool
    missing_items: int
    timings_ms: dict[str, float]
    variant: Variant = Variant.PRIMARY  # the arm that answered


class Pipeline:
    """Runs one /predict; owns the two guarded dependencies and the fallback scorer.

    Every finished prediction goes to ``observers`` (observe.py): metrics today, and
    whatever else subscribes, without touching this code.
    """

    def __init__(
        self,
        store: FeatureStore,
        backend: InferenceBackend,
        features_call: GuardedCall,
        inference_call: GuardedCall,
        metrics: Metrics,
        schema: FeatureSchema = SCHEMA,
        observers: list[Observer] | None = None,
    ) -> None:
        self.store = store
        self.backend = backend
        self.features_call = features_call
        self.inference_call = inference_call
        self.metrics = metrics
        self.schema = schema
        self.fallback = FallbackScorer(schema)
        self.observers: list[Observer] = (
            observers if observers is not None else [MetricsObserver(metrics)]
        )
        # Set by the gateway's health check when the store holds another feature schema:
        # its vectors would be read with the wrong layout, so none are read.
        self.features_blocked: str | None = None
        # Set by the health check while the model's signature differs from the schema.
        self.inference_blocked: str | None = None
        # The rollout this worker follows (set by the gateway at start), or None.
        self.rollout: RolloutRuntime | None = None

    async def _features(
        self, req: PredictInput, budget: Budget
    ) -> tuple[FeatureBatch | None, Fallback | None, bool]:
        """(batch, fallback, whether Redis was called)."""
        if self.features_blocked is not None:
            return None, _FEATURES_UNAVAILABLE, False
        try:
            batch = await self.features_call.run(
                lambda _left: self.store.fetch(req.user_id, req.item_ids), budget, Stage.FEATURES
            )
            return batch, None, True
        except StageSkipped:
            return None, Fallback(FallbackReason.TIMEOUT, Stage.FEATURES), False
        except CircuitOpen:
            return None, Fallback(FallbackReason.CIRCUIT_OPEN, Stage.FEATURES), False
        except FeatureStoreError as exc:
            log.debug("features failed: %s", exc)
            return None, _FEATURES_UNAVAILABLE, True

    async def _score(
        self, matrix: np.ndarray, left_s: float, version: str | None = None
    ) -> np.ndarray:
        scores = await self.backend.infer(matrix, left_s, version)
        if not np.isfinite(scores).all():
            # The model's failure (counted against its breaker), not a transport one.
            raise InferenceError("the model returned non-finite scores")
        return scores

    async def _candidate(
        self, rollout: RolloutRuntime, matrix: np.ndarray, budget: Budget
    ) -> np.ndarray | None:
        """The candidate's scores, or None (counted as its failure) for the primary to try."""
        version = rollout.candidate_version
        if version is None:
            return None
        t0 = time.perf_counter()
        try:
            scores = await rollout.candidate_call.run(
                lambda left: self._score(matrix, left, version),
                rollout.candidate_budget(budget),
                Stage.INFERENCE,
            )
        except StageSkipped:
            return None  # no time to ask: not the candidate's failure
        except (CircuitOpen, InferenceError) as exc:
            log.debug("candidate %s failed: %s", version, exc)
            rollout.count(Variant.CANDIDATE, True, None)
            return None
        rollout.count(Variant.CANDIDATE, False, time.perf_counter() - t0)
        return scores

    async def _inference(
        self, matrix: np.ndarray, budget: Budget, version: str | None = None
    ) -> tuple[np.ndarray | None, Fallback | None, bool]:
        """(scores, fallback, whether the model was called)."""
        try:
            scores = await self.inference_call.run(
                lambda left: self._score(matrix, left, version), budget, Stage.INFERENCE
            )
        except StageSkipped:
            return None, Fallback(FallbackReason.TIMEOUT, Stage.INFERENCE), False
        except CircuitOpen:
            return None, Fallback(FallbackReason.CIRCUIT_OPEN, Stage.INFERENCE), False
        except InferenceError as exc:
            log.debug("inference failed: %s", exc)
            return None, Fallback(FallbackReason(exc.reason), Stage.INFERENCE), True
        return scores, None, True

    async def predict(self, req: PredictInput, budget: Budget) -> PredictResult:
        """Score ``req`` inside ``budget``; always returns (the fallback answers failures)."""
        n = len(req.item_ids)
        schema = self.schema
        t0 = time.perf_counter()
        batch, fallback, features_called = await self._features(req, budget)
        t1 = time.perf_counter()
        corrupt = 0
        if batch is None:
            user = schema.user.default_vector()
            items = np.broadcast_to(schema.item.default_vector(), (n, schema.item.width))
            missing_user, missing_items = True, n
        else:
            user, items = batch.user, batch.items
            missing_user, missing_items, corrupt = (
                batch.user_missing,
                batch.items_missing,
                batch.corrupt,
            )
        matrix = schema.assemble(user, items, schema.encode_context(req.context))

        scores: np.ndarray | None = None
        inference_called = False
        rollout = self.rollout
        variant = Variant.PRIMARY
        version = self.backend.model_version
        primary_version: str | None = None
        t_inf = time.perf_counter()
        if fallback is None and self.inference_blocked is not None:
            fallback = _MODEL_MISMATCH
        elif fallback is None:
            if rollout is not None:
                primary_version = rollout.primary_version
                if rollout.assign(req.user_id) is Variant.CANDIDATE:
                    scores = await self._candidate(rollout, matrix, budget)
                    if scores is not None:
                        variant, inference_called = Variant.CANDIDATE, True
                        version = rollout.candidate_version or version
            if scores is None:
                t_p = time.perf_counter()
                scores, fallback, called = await self._inference(matrix, budget, primary_version)
                inference_called = inference_called or called
                if rollout is not None and called:
                    rollout.count(
                        Variant.PRIMARY,
                        fallback is not None,
                        None if fallback is not None else time.perf_counter() - t_p,
                    )
        if primary_version and variant is Variant.PRIMARY:
            version = primary_version
        t2 = time.perf_counter()
        if scores is None:
            assert fallback is not None  # no scores only ever comes with a reason
            scores = self.fallback.score(matrix)

        rows = [
            {"item_id": i, "score": s}
            for i, s in zip(
                req.item_ids, np.round(scores.astype(np.float64), 6).tolist(), strict=True
            )
        ]
        t3 = time.perf_counter()
        backend = self.backend
        prediction = Prediction(
            user_id=req.user_id,
            n_items=n,
            matrix=matrix,
            scores=scores,
            model_name=backend.model_name,
            model_version=version,
            fallback=fallback,
            missing_user=missing_user,
            missing_items=missing_items,
            corrupt=corrupt,
            features_s=t1 - t0 if features_called else None,
            inference_s=t2 - t_inf if inference_called else None,
            postprocess_s=t3 - t2,
        )
        for observe in self.observers:
            observe(prediction)
        return PredictResult(
            request_id=req.request_id,
            model_name=backend.model_name,
            model_version=version,
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
            variant=variant,
        )


_FEATURES_UNAVAILABLE = Fallback(FallbackReason.FEATURES_UNAVAILABLE, Stage.FEATURES)
_MODEL_MISMATCH = Fallback(FallbackReason.INFERENCE_ERROR, Stage.INFERENCE)


def build_guarded_calls(
    settings: Settings,
    metrics: Metrics,
    features_dep: str,
    inference_dep: str,
    on_state_changed: Callable[[str, Any, Any], None],
    loop_lag_since: Callable[[float], float],
) -> tuple[GuardedCall, GuardedCall]:
    """The features and inference GuardedCalls from settings, wired to metrics."""
    attribution = Attribution(
        min_attempt_s=settings.budget_min_attempt_ms / 1e3,
        min_budget_share=settings.breaker_min_budget_share,
        max_loop_lag_s=settings.breaker_max_loop_lag_ms / 1e3,
    )
    breaker_config = BreakerConfig(
        failure_rate=settings.breaker_failure_rate,
        min_calls=settings.breaker_min_calls,
        window_s=settings.breaker_window_s,
        open_s=settings.breaker_reset_timeout_s,
        half_open_probes=settings.breaker_half_open_probes,
    )
    calls = []
    for dep, timeout_error in (
        (features_dep, FeatureStoreTimeout),
        (inference_dep, InferenceTimeout),
    ):
        breaker = Breaker(dep, breaker_config, on_state_changed=on_state_changed)
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
        uncounted = {
            cause: metrics.uncounted_timeouts.labels(dep, cause).inc
            for cause in ("client_deadline", "loop_lag")
        }
        calls.append(
            GuardedCall(
                dep,
                breaker,
                retry,
                timeout_error,
                attribution,
                loop_lag_since=loop_lag_since,
                on_uncounted=lambda cause, inc=uncounted: inc[cause](),  # type: ignore[misc]
            )
        )
    return calls[0], calls[1]


def build_candidate_call(
    settings: Settings,
    metrics: Metrics,
    inference_dep: str,
    on_state_changed: Callable[[str, Any, Any], None],
    loop_lag_since: Callable[[float], float],
) -> GuardedCall:
    """A rollout candidate's GuardedCall: its own breaker (``{dep}-candidate``), so its
    failures never open the primary's, and one attempt (a failing candidate hands the
    request to the primary at once instead of retrying)."""
    name = f"{inference_dep}-candidate"
    breaker = Breaker(
        name,
        BreakerConfig(
            failure_rate=settings.breaker_failure_rate,
            min_calls=settings.breaker_min_calls,
            window_s=settings.breaker_window_s,
            open_s=settings.breaker_reset_timeout_s,
            half_open_probes=settings.breaker_half_open_probes,
        ),
        on_state_changed=on_state_changed,
    )
    metrics.circuit_state.labels(name).set(0)
    retry = RetryPolicy(
        RetryBudget(0.0, 0.0, settings.retry_budget_window_s),
        max_attempts=1,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
    )
    return GuardedCall(
        name,
        breaker,
        retry,
        InferenceTimeout,
        Attribution(
            min_attempt_s=settings.budget_min_attempt_ms / 1e3,
            min_budget_share=settings.breaker_min_budget_share,
            max_loop_lag_s=settings.breaker_max_loop_lag_ms / 1e3,
        ),
        loop_lag_since=loop_lag_since,
    )
