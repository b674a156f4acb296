"""Retries inside a stage's deadline, under a retry budget (tenacity does the retrying).

Rules:

* Only transient errors are retried (``DependencyError.transient``: connection refused
  or reset, Triton UNAVAILABLE). A timeout is not retried: the stage's time is gone.
* Full-jitter exponential backoff (``wait_random_exponential``, AWS's "full jitter").
* Another attempt starts only while the stage's remaining time fits the backoff plus
  an attempt as long as the last one.
* The :class:`RetryBudget` must grant a token: retries may be at most ``ratio`` of the
  requests seen in a sliding window, plus a floor of ``min_per_s`` retries per second
  (Finagle's RetryBudget, Envoy's retry budget). During an outage retries therefore
  add at most ``ratio`` to the load instead of multiplying it.

This is the only retry layer: redis-py's own retries are switched off.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from gateway.errors import DependencyError

Clock = Callable[[], float]
T = TypeVar("T")

# Buckets per window: the window slides in steps of window/10 (1 s for the default 10 s).
_BUCKETS = 10


class RetryBudget:
    """Sliding-window budget: retries <= floor + ratio * requests over the window.

    A ring of ``_BUCKETS`` counters, each covering ``window_s / _BUCKETS`` seconds; the
    clock is injected so unit tests are deterministic. Written here because neither
    tenacity nor pybreaker has a retry budget; the arithmetic is a dozen lines.
    """

    def __init__(
        self, ratio: float, min_per_s: float, window_s: float, clock: Clock = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.floor = min_per_s * window_s
        self.window_s = window_s
        self._step = window_s / _BUCKETS
        self._clock = clock
        self._requests = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._epoch = [-1] * _BUCKETS  # which step each bucket currently holds

    def _bucket(self) -> int:
        step = int(self._clock() // self._step)
        i = step % _BUCKETS
        if self._epoch[i] != step:
            self._epoch[i] = step
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def _window(self) -> tuple[int, int]:
        now_step = int(self._clock() // self._step)
        req = ret = 0
        for i in range(_BUCKETS):
            if now_step - self._epoch[i] < _BUCKETS:
                req += self._requests[i]
                ret += self._retries[i]
        return req, ret

    def record_request(self) -> None:
        """Count one first attempt."""
        self._requests[self._bucket()] += 1

    def try_acquire(self) -> bool:
        """Take a retry token if the budget allows; return whether it did."""
        i = self._bucket()
        requests, retries = self._window()
        if retries + 1 > self.floor + self.ratio * requests:
            return False
        self._retries[i] += 1
        return True

    def counts(self) -> tuple[int, int]:
        """(requests, retries) in the current window."""
        return self._window()


class RetryPolicy:
    """How one dependency is retried: attempts, backoff and the shared budget."""

    def __init__(
        self,
        budget: RetryBudget,
        max_attempts: int,
        backoff_base_s: float,
        backoff_max_s: float,
        on_retry: Callable[[], None] | None = None,
        on_exhausted: Callable[[], None] | None = None,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.budget = budget
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._on_retry = on_retry
        self._on_exhausted = on_exhausted
        self._clock = clock

    async def call(
        self, fn: Callable[[], Awaitable[T]], deadline: float, max_attempts: int | None = None
    ) -> T:
        """Run ``fn`` with retries, none of which may start past ``deadline`` (clock time).

        The first attempt is a plain call: tenacity's machinery (about 5 % of a request's
        CPU in the benchmark's profile) is built only once a transient error happened.
        """
        self.budget.record_request()
        attempts = self.max_attempts if max_attempts is None else max_attempts
        t0 = self._clock()
        try:
            return await fn()
        except DependencyError as exc:
            if not exc.transient or attempts <= 1:
                raise
            first_error: DependencyError | None = exc
        last_attempt = [self._clock() - t0]

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number >= attempts:
                return True
            # Fit the backoff and another attempt as long as the last one in the deadline.
            needed = (state.upcoming_sleep or 0.0) + last_attempt[0]
            if self._clock() + needed >= deadline:
                return True
            if not self.budget.try_acquire():
                if self._on_exhausted:
                    self._on_exhausted()
                return True
            if self._on_retry:
                self._on_retry()
            return False

        async def attempt() -> T:
            nonlocal first_error
            if first_error is not None:
                # Replay the first failure so tenacity decides on it like on any other.
                err, first_error = first_error, None
                raise err
            t1 = self._clock()
            try:
                return await fn()
            finally:
                last_attempt[0] = self._clock() - t1

        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_random_exponential(multiplier=self.backoff_base_s, max=self.backoff_max_s),
            stop=stop,
            reraise=True,
        )
        return await retrying(attempt)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, DependencyError) and exc.transient
