"""Prometheus metrics (prometheus-client). Low-cardinality labels only: never a user,
item or request id.

With several uvicorn workers ``gateway serve`` sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start; each worker then writes its samples to memory-mapped
files there and ``/metrics`` merges all workers' files (prometheus-client's
multiprocess mode), so one scrape sees every worker.
"""

from __future__ import annotations

import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp

# Latency buckets, seconds: 0.5 ms steps up to 5 ms (a P99 on this gateway sits there),
# then coarser up to 1 s, so a P99 reads at millisecond resolution.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.0045, 0.005,
    0.006, 0.007, 0.008, 0.009, 0.010, 0.0125, 0.015, 0.0175, 0.020, 0.025, 0.030,
    0.040, 0.050, 0.060, 0.075, 0.100, 0.150, 0.250, 0.500, 1.0,
)  # fmt: skip
# Items per request: powers of two-ish up to the 500 default cap and the 10k hard cap.
ITEM_BUCKETS = (1, 5, 10, 20, 50, 100, 200, 300, 500, 1000, 10_000)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# How a /predict ended (the ``outcome`` label of gateway_request_duration_seconds).
OUTCOMES = ("model", "fallback", "shed", "client_error", "error", "disconnected")


class Metrics:
    """Every metric the gateway exports, registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_duration = Histogram(
            "gateway_request_duration_seconds",
            "End-to-end /predict latency, from the request's arrival to the last byte of "
            "the answer, by outcome: model, fallback, shed (503 from admission control), "
            "client_error (4xx), error (5xx), disconnected (the client left first).",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "gateway_stage_duration_seconds",
            "Latency of one pipeline stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fallback = Counter(
            "gateway_fallback_total",
            "Requests answered by the fallback, by reason.",
            ["reason"],
            registry=r,
        )
        self.retries = Counter(
            "gateway_retries_total", "Retry attempts, by dependency.", ["dependency"], registry=r
        )
        self.retry_budget_exhausted = Counter(
            "gateway_retry_budget_exhausted_total",
            "Retries refused because the retry budget was spent.",
            ["dependency"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "gateway_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ["dependency"],
            registry=r,
            # livemax: a dead worker's last state must not stick (plain max kept it).
            multiprocess_mode="livemax",
        )
        self.uncounted_timeouts = Counter(
            "gateway_uncounted_timeouts_total",
            "Dependency timeouts not charged to its breaker, by cause: client_deadline "
            "(the call had under the set share of its stage budget) or loop_lag (this "
            "process's event loop lagged meanwhile).",
            ["dependency", "cause"],
            registry=r,
        )
        self.dependency_up = Gauge(
            "gateway_dependency_up",
            "Whether the last background check of a dependency passed (1) or not (0).",
            ["dependency"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.model_info = Gauge(
            "gateway_model_info",
            "The model version this gateway serves (value 1), refreshed by the health check.",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.admission_limit = Gauge(
            "gateway_admission_limit",
            "The adaptive in-flight limit (summed over workers).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.loop_lag = Gauge(
            "gateway_event_loop_lag_seconds",
            "Event-loop lag, smoothed as admission control sees it (worst worker).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.inflight = Gauge(
            "gateway_inflight_requests",
            "Requests being processed now.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.missing_features = Counter(
            "gateway_missing_features_total",
            "Entities served on schema defaults (unknown or unusable), by entity.",
            ["entity"],
            registry=r,
        )
        self.corrupt_features = Counter(
            "gateway_corrupt_features_total",
            "Stored feature values that could not be decoded (wrong length, NaN).",
            registry=r,
        )
        self.items_per_request = Histogram(
            "gateway_items_per_request",
            "Items scored per request.",
            buckets=ITEM_BUCKETS,
            registry=r,
        )
        self.shed = Counter(
            "gateway_shed_total", "Requests refused by admission control (503).", registry=r
        )
        # -- drift (drift.py, docs/drift.md): bin counts of the rows the model scored and
        # the training shares of the same bins; Prometheus computes PSI from the two.
        # Columns x bins: 25 x at most 10 per model version.
        self.drift_bin_rows = Counter(
            "gateway_drift_bin_rows",
            "Rows the model scored, by input column (or 'score') and reference bin.",
            ["model", "version", "column", "bin"],
            registry=r,
        )
        self.drift_reference_share = Gauge(
            "gateway_drift_reference_share",
            "Share of the training rows in each bin (the model version's drift profile).",
            ["model", "version", "column", "bin"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.drift_counting_since = Gauge(
            "gateway_drift_counting_since_timestamp_seconds",
            "Unix time this model version's drift counts began (earliest live worker).",
            ["model", "version"],
            registry=r,
            multiprocess_mode="livemin",
        )
        # -- freshness of the served feature set (the Redis source: loader.py records
        # when a set was written; the Feast source has gateway_feature_age_seconds).
        self.feature_set_age = Gauge(
            "gateway_feature_set_age_seconds",
            "Age of the feature set this gateway serves: now minus when it was written "
            "(refreshed by the health check; the oldest over live workers).",
            ["source"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.feature_max_age = Gauge(
            "gateway_feature_max_age_seconds",
            "GATEWAY_FEATURE_MAX_AGE_S: features older than this are stale (alert).",
            registry=r,
            multiprocess_mode="livemax",
        )
        # -- model rollouts (gateway/rollout/) --------------------------------------------
        self.variant_requests = Counter(
            "gateway_variant_requests_total",
            "Model calls during a rollout, by variant (primary, candidate) and result (ok, "
            "failed: an error, a timeout, non-finite scores or the candidate's open breaker).",
            ["variant", "result"],
            registry=r,
        )
        self.variant_inference = Histogram(
            "gateway_variant_inference_seconds",
            "Inference latency of answered model calls during a rollout, by variant.",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rollout_weight = Gauge(
            "gateway_rollout_weight",
            "Percent of users assigned to the candidate (0 when no canary runs).",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_state = Gauge(
            "gateway_rollout_state",
            "The rollout's state: 1 for the current one of idle, running, rolled_back, promoted.",
            ["state"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.rollout_decisions = Counter(
            "gateway_rollout_decisions_total",
            "Rollout decisions taken by this gateway's decision-maker, by action (advance, "
            "promote, rollback) and reason (step_passed, last_step_passed, failure_rate, "
            "latency).",
            ["action", "reason"],
            registry=r,
        )
        self.shadow = Counter(
            "gateway_shadow_total",
            "Shadowed predictions by outcome: compared, failed (the candidate's call failed), "
            "dropped (over the shadow bound or the worker was busy; never sent).",
            ["outcome"],
            registry=r,
        )
        self.shadow_score_diff = Histogram(
            "gateway_shadow_score_diff",
            "Mean absolute difference between the candidate's and the primary's scores of "
            "one shadowed request.",
            # Scores are click probabilities in [0, 1]: 0.001 to 0.5, roughly x2 apart.
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            registry=r,
        )
        self.shadow_rank_correlation = Histogram(
            "gateway_shadow_rank_correlation",
            "Spearman rank correlation between the candidate's and the primary's scores of "
            "one shadowed request (2 items or more).",
            buckets=(-0.5, 0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0),
            registry=r,
        )
        # Every decision series exists from the start at 0, so increase() sees the first
        # rollback (GatewayRolloutRolledBack).
        for action, reason in (
            ("advance", "step_passed"),
            ("promote", "last_step_passed"),
            ("rollback", "failure_rate"),
            ("rollback", "latency"),
        ):
            self.rollout_decisions.labels(action, reason)
        for stage in ("features", "inference", "postprocess"):
            self.stage_duration.labels(stage)
        for outcome in OUTCOMES:
            self.request_duration.labels(outcome)


_LIVE_FILE = re.compile(r"^gauge_live\w+?_(\d+)\.db$")


def forget_dead_workers(path: str) -> list[int]:
    """Drop the ``live*`` gauge files of worker processes that no longer exist.

    prometheus-client counts a ``live*`` gauge only for processes not yet passed to
    ``mark_process_dead``; gunicorn calls it from a ``child_exit`` hook, uvicorn has no
    such hook. So the scrape does it: a worker that died (and was replaced by uvicorn's
    supervisor) would otherwise keep its last breaker state and in-flight count forever.
    """
    dead = set()
    for name in os.listdir(path):
        m = _LIVE_FILE.match(name)
        if m and not _alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in dead:
        prom_mp.mark_process_dead(pid, path)
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render(metrics: Metrics) -> tuple[bytes, str]:
    """The /metrics body: this process's registry, or every worker's in multiprocess mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        forget_dead_workers(path)
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(metrics.registry), CONTENT_TYPE_LATEST
