"""A dependency call under its breaker, the stage deadline and the retry policy.

::

    GuardedCall.run(fn, budget, stage)
      ├─ too little time left for the stage?  → StageSkipped (reason "timeout"), no call
      ├─ breaker.acquire()                    → CircuitOpen at once while open
      ├─ asyncio.timeout(min(stage limit, remaining total))
      │    └─ retry policy (tenacity; a half-open probe gets one attempt)
      │         └─ fn(time left)              → Redis MGET / Triton ModelInfer
      └─ breaker.record(outcome)

**Only the dependency's own failures count against it.** An error the dependency
returned (connection refused, UNAVAILABLE, a model error, non-finite scores) is a
failure. A timeout is a failure only when

* the call had at least ``min_budget_share`` of the stage's configured budget: a call
  squeezed by the client's ``X-Request-Timeout-Ms`` (or by time the client spent
  sending its body) timing out is the client's deadline at work; and
* our event loop lagged less than ``max_loop_lag_s`` while the call ran: when this
  process is overloaded, the answer may have been sitting unread in a socket.

Other timeouts are ignored by the breaker and counted in
``gateway_uncounted_timeouts_total{dependency, cause}`` (``client_deadline`` or
``loop_lag``). A call cancelled because the client went away counts neither way.
Retries sit inside the stage's deadline, in this one layer (redis-py's own are off).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from gateway.errors import DependencyError, StageSkipped
from gateway.policy.breaker import Breaker, Outcome
from gateway.policy.budget import Budget
from gateway.policy.retry import RetryPolicy

T = TypeVar("T")
Clock = Callable[[], float]


@dataclass(frozen=True)
class Attribution:
    """When a timeout is the dependency's fault (see the module docstring)."""

    min_attempt_s: float = 0.001
    min_budget_share: float = 0.5
    max_loop_lag_s: float = 0.005


def _no_lag(_since: float) -> float:
    return 0.0


class GuardedCall:
    """One dependency's calls: its breaker, retry policy and timeout attribution."""

    def __init__(
        self,
        dependency: str,
        breaker: Breaker,
        retry: RetryPolicy,
        timeout_error: type[DependencyError],
        attribution: Attribution | None = None,
        loop_lag_since: Callable[[float], float] = _no_lag,
        on_uncounted: Callable[[str], None] | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.dependency = dependency
        self.breaker = breaker
        self.retry = retry
        self._timeout_error = timeout_error
        self.attribution = attribution or Attribution()
        self._lag_since = loop_lag_since
        self._on_uncounted = on_uncounted
        self._clock = clock

    async def run(self, fn: Callable[[float], Awaitable[T]], budget: Budget, stage: str) -> T:
        """Call ``fn(time_left_s)`` until it succeeds, fails for good, or time runs out.

        Raises ``StageSkipped`` (nothing sent), ``CircuitOpen`` (nothing sent) or the
        dependency's ``DependencyError``.
        """
        timeout_s = budget.stage_timeout(stage)
        if timeout_s < self.attribution.min_attempt_s:
            raise StageSkipped(
                f"{stage}: {timeout_s * 1e3:.2f} ms left, under the "
                f"{self.attribution.min_attempt_s * 1e3:.2f} ms minimum; not attempted"
            )
        permit = self.breaker.acquire()
        # A half-open breaker's probe gets one attempt and no retries, so a user request
        # pays for at most one failed call.
        attempts = 1 if permit.probe else None
        start = self._clock()
        deadline = start + timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                result = await self.retry.call(
                    lambda: fn(max(1e-4, deadline - self._clock())), deadline, attempts
                )
        except TimeoutError as exc:
            self.breaker.record(permit, self._timeout_outcome(start, deadline, budget, stage))
            raise self._timeout_error(
                f"{self.dependency} did not answer within {timeout_s * 1e3:.1f} ms"
            ) from exc
        except DependencyError as exc:
            outcome = (
                self._timeout_outcome(start, deadline, budget, stage)
                if exc.timeout
                else Outcome.FAILURE
            )
            self.breaker.record(permit, outcome)
            raise
        except BaseException:
            # Cancelled (the client went away, shutdown) or a bug of ours: not the
            # dependency's doing either way.
            self.breaker.record(permit, Outcome.IGNORED)
            raise
        self.breaker.record(permit, Outcome.SUCCESS)
        return result

    def _timeout_outcome(
        self, start: float, deadline: float, budget: Budget, stage: str
    ) -> Outcome:
        """A timeout: the dependency's failure, or excused (and counted as such)."""
        a = self.attribution
        given = deadline - start
        # What the stage gets when nobody squeezes it: its own limit inside the configured
        # total (not the total a client's header tightened).
        policy = budget.policy
        full = min(policy.stage_s[stage], policy.total_s)
        if given < a.min_budget_share * full:
            cause = "client_deadline"
        else:
            # Our own timer firing late is lag too: the sampler may not have run yet.
            lag = max(self._lag_since(start), self._clock() - deadline)
            if lag < a.max_loop_lag_s:
                return Outcome.FAILURE
            cause = "loop_lag"
        if self._on_uncounted is not None:
            self._on_uncounted(cause)
        return Outcome.IGNORED
