"""One circuit breaker per dependency, on pybreaker, with these semantics:

* The breaker wraps a whole stage call — every retry attempt inside the stage's
  deadline — so one failed stage is one failure. It sits *outside* the stage's
  ``asyncio.timeout``: the breaker sees ``TimeoutError``/our ``DependencyError``,
  never the cancellation that ``asyncio.timeout`` uses internally.
* Failures: every ``DependencyError`` (timeouts included: a dependency that does not
  answer in time is failing) and ``TimeoutError``. ``asyncio.CancelledError`` (client
  gone, shutdown) is excluded; pybreaker then treats the call as a non-failure, so it
  resets the consecutive-failure count — acceptable for an event this rare.
* ``fail_max`` consecutive failures open it. The call that trips it still gets its own
  error (``throw_new_error_on_trip=False``), so its fallback reason is the real one;
  calls after it get :class:`CircuitOpen` at once, without touching the dependency.
* After ``reset_timeout`` the next call finds it half-open and goes through (pybreaker
  lets every concurrent call through in half-open); one failure re-opens it,
  ``success_threshold`` successes close it.
* State changes feed ``on_state_changed`` (the metrics gauge and a log line).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import IntEnum

import pybreaker

from gateway.errors import CircuitOpen, RequestError


class BreakerState(IntEnum):
    """Gauge values: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


_STATES = {
    pybreaker.STATE_CLOSED: BreakerState.CLOSED,
    pybreaker.STATE_HALF_OPEN: BreakerState.HALF_OPEN,
    pybreaker.STATE_OPEN: BreakerState.OPEN,
}

StateHook = Callable[[str, BreakerState, BreakerState], None]


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, name: str, hook: StateHook | None) -> None:
        self._name = name
        self._hook = hook

    def state_change(self, cb, old_state, new_state) -> None:
        if self._hook is not None:
            old = _STATES[old_state.name] if old_state is not None else BreakerState.CLOSED
            self._hook(self._name, old, _STATES[new_state.name])


class Breaker:
    """A dependency's breaker; use ``with breaker.guard(): await ...``."""

    def __init__(
        self,
        name: str,
        fail_max: int,
        reset_timeout_s: float,
        success_threshold: int = 1,
        on_state_changed: StateHook | None = None,
    ) -> None:
        self.name = name
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            success_threshold=success_threshold,
            exclude=[asyncio.CancelledError, RequestError],
            listeners=[_Listener(name, on_state_changed)],
            throw_new_error_on_trip=False,
            name=name,
        )

    @property
    def state(self) -> BreakerState:
        return _STATES[self._cb.current_state]

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the body under the breaker; raise CircuitOpen at once while it is open."""
        try:
            with self._cb.calling():
                yield
        except pybreaker.CircuitBreakerError as exc:
            raise CircuitOpen(f"{self.name} circuit breaker is open") from exc
