"""Deadline budgets: one total deadline per request, a limit per stage inside it.

A :class:`Budget` is created once the request's body has been read. Each stage asks it
for :meth:`Budget.stage_timeout` — the smaller of the stage's own limit and what is left
of the total — and runs under ``asyncio.timeout`` of that. What remains travels
downstream (Triton's per-request timeout, the gRPC deadline).

**The budget clock.** The total budget (``GATEWAY_BUDGET_TOTAL_MS``) is the gateway's
own time: it starts when the whole body has arrived, so time a client spends uploading
never eats the stages' time. A client's ``X-Request-Timeout-Ms`` is that client's
deadline and is measured from the request's *arrival* (its headers): a client that
sends its body late spends its own deadline, and its stages get less time, whose
timeouts are then not charged to Redis or Triton (``policy/guard.py``). Either way a
client that sends late can hurt only its own request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Clock = Callable[[], float]

STAGES = ("features", "inference", "postprocess")


@dataclass(frozen=True)
class BudgetPolicy:
    """The configured limits, in seconds. Built once from settings."""

    total_s: float
    stage_s: Mapping[str, float]

    @classmethod
    def from_ms(cls, total_ms: float, **stage_ms: float) -> BudgetPolicy:
        unknown = set(stage_ms) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stages: {sorted(unknown)}")
        return cls(total_ms / 1e3, {k: v / 1e3 for k, v in stage_ms.items()})

    def start(
        self,
        header_timeout_ms: float | None = None,
        arrival: float | None = None,
        clock: Clock = time.perf_counter,
    ) -> Budget:
        """Start a request's budget now (its body has been read).

        A client's timeout header only ever tightens it, counted from ``arrival`` (the
        clock time its headers arrived; now if not given).
        """
        now = clock()
        total = self.total_s
        if header_timeout_ms is not None:
            spent = 0.0 if arrival is None else now - arrival
            total = min(total, header_timeout_ms / 1e3 - spent)
        return Budget(self, max(0.0, total), now, clock)


class Budget:
    """One request's deadline and the time left in it."""

    __slots__ = ("policy", "total_s", "started", "_clock")

    def __init__(self, policy: BudgetPolicy, total_s: float, started: float, clock: Clock) -> None:
        self.policy = policy
        self.total_s = total_s
        self.started = started
        self._clock = clock

    @property
    def deadline(self) -> float:
        return self.started + self.total_s

    def elapsed(self) -> float:
        return self._clock() - self.started

    def remaining(self) -> float:
        """Seconds left of the total; never negative."""
        return max(0.0, self.deadline - self._clock())

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def stage_timeout(self, stage: str) -> float:
        """The time a stage may take from now: min(its own limit, what is left)."""
        return min(self.policy.stage_s[stage], self.remaining())
