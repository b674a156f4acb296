"""One place that observes a prediction: the pipeline hands each finished /predict, as a
:class:`Prediction`, to every subscribed observer (metrics; drift counting, drift.py,
which the gateway subscribes at start; later rollout accounting, shadow comparison) so
none of them touches the request path.

Observers run inline, after the answer is computed and before it is sent: each must be
cheap (microseconds, no I/O, no await). Anything slow copies what it needs and runs off
the request path, bounded, on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gateway.metrics import Metrics
from gateway.names import FallbackReason, Stage


class Fallback(NamedTuple):
    """Why and where the fallback answered; rendered as ``{"reason", "stage"}``."""

    reason: FallbackReason
    stage: Stage

    def as_dict(self) -> dict[str, str]:
        return {"reason": str(self.reason), "stage": str(self.stage)}


@dataclass(frozen=True, slots=True)
class Prediction:
    """What one /predict computed."""

    user_id: str
    n_items: int
    matrix: np.ndarray  # the assembled model input, (n_items, width), float32
    scores: np.ndarray  # what was answered: the model's, or the fallback's
    model_name: str
    model_version: str  # the version that answered; the primary's when the fallback did
    fallback: Fallback | None
    missing_user: bool
    missing_items: int
    corrupt: int
    # Seconds per stage; None for a stage that did not call its dependency (skipped,
    # breaker open, store blocked).
    features_s: float | None
    inference_s: float | None
    postprocess_s: float


Observer = Callable[[Prediction], None]


class MetricsObserver:
    """Stage latencies, fallbacks by reason, missing and corrupt features, items."""

    def __init__(self, metrics: Metrics) -> None:
        m = metrics
        self._features = m.stage_duration.labels(str(Stage.FEATURES)).observe
        self._inference = m.stage_duration.labels(str(Stage.INFERENCE)).observe
        self._post = m.stage_duration.labels(str(Stage.POSTPROCESS)).observe
        self._fallback = {r: m.fallback.labels(str(r)).inc for r in FallbackReason}
        self._missing_user = m.missing_features.labels("user").inc
        self._missing_items = m.missing_features.labels("item").inc
        self._corrupt = m.corrupt_features.inc
        self._items = m.items_per_request.observe

    def __call__(self, p: Prediction) -> None:
        # Only stages that called their dependency are observed: a skipped stage or an
        # open breaker would otherwise add near-zero samples and pull its quantiles down.
        if p.features_s is not None:
            self._features(p.features_s)
        if p.inference_s is not None:
            self._inference(p.inference_s)
        self._post(p.postprocess_s)
        if p.fallback is not None:
            self._fallback[p.fallback.reason]()
        if p.missing_user:
            self._missing_user()
        if p.missing_items:
            self._missing_items(p.missing_items)
        if p.corrupt:
            self._corrupt(p.corrupt)
        self._items(p.n_items)
