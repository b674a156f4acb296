"""Shadow mode: the candidate scores the same assembled matrix, off the request path.

A :class:`ShadowObserver` subscribes to finished predictions (observe.py). For each one
the primary's model answered while a shadow rollout runs, it starts an asyncio task that
sends the very matrix the primary scored (no second feature fetch) to the candidate and
compares the two score vectors. The response never waits for it.

Bounded, and the first thing dropped under load (``gateway_shadow_total{outcome}``):
at most ``max_inflight`` shadow calls per worker, and none while the worker is busy
(its in-flight requests over half its admission limit, or event-loop lag over 2 ms):
a shadow call may cost the primary nothing that matters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import numpy as np

from gateway.errors import DependencyError
from gateway.inference.base import InferenceBackend
from gateway.metrics import Metrics
from gateway.names import Stage
from gateway.observe import Prediction
from gateway.rollout.runtime import RolloutRuntime
from gateway.rollout.state import Variant

log = logging.getLogger("gateway.rollout")


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation of two score vectors (ties broken by position);
    None under 2 items. Written here: scipy is not a dependency for one formula."""
    n = len(a)
    if n < 2:
        return None
    ra = np.empty(n)
    rb = np.empty(n)
    ra[np.argsort(a, kind="stable")] = np.arange(n)
    rb[np.argsort(b, kind="stable")] = np.arange(n)
    d = ra - rb
    return float(1.0 - 6.0 * float(d @ d) / (n * (n * n - 1)))


class ShadowObserver:
    """Schedules one bounded shadow call per eligible prediction (module docstring)."""

    def __init__(
        self,
        rollout: RolloutRuntime,
        backend: InferenceBackend,
        metrics: Metrics,
        max_inflight: int,
        busy: Callable[[], bool],
    ) -> None:
        self.rollout = rollout
        self.backend = backend
        self.max_inflight = max_inflight
        self.busy = busy
        self.inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        m = metrics
        self._outcome = {o: m.shadow.labels(o).inc for o in ("compared", "failed", "dropped")}
        self._diff = m.shadow_score_diff.observe
        self._rank = m.shadow_rank_correlation.observe

    def __call__(self, p: Prediction) -> None:
        r = self.rollout
        if not r.shadowing or p.fallback is not None:
            return
        if self.inflight >= self.max_inflight or self.busy():
            self._outcome["dropped"]()
            return
        version = r.candidate_version
        if version is None:
            return
        self.inflight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(p.matrix, p.scores, version))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, matrix: np.ndarray, primary: np.ndarray, version: str) -> None:
        r = self.rollout
        try:
            budget = r.shadow_budget()
            t0 = time.perf_counter()
            try:
                scores = await r.candidate_call.run(
                    lambda left: _score(self.backend, matrix, left, version),
                    budget,
                    Stage.INFERENCE,
                )
            except DependencyError as exc:
                log.debug("shadow call failed: %s", exc)
                r.count(Variant.CANDIDATE, True, None)
                self._outcome["failed"]()
                return
            r.count(Variant.CANDIDATE, False, time.perf_counter() - t0)
            self._diff(float(np.mean(np.abs(scores.astype(np.float64) - primary))))
            rho = spearman(primary, scores)
            if rho is not None:
                self._rank(rho)
            self._outcome["compared"]()
        finally:
            self.inflight -= 1

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _score(
    backend: InferenceBackend, matrix: np.ndarray, left_s: float, version: str
) -> np.ndarray:
    from gateway.errors import InferenceError

    scores = await backend.infer(matrix, left_s, version)
    if not np.isfinite(scores).all():
        raise InferenceError("the candidate returned non-finite scores")
    return scores
