"""One circuit breaker per dependency, opened by its failure *rate*, not a run of failures.

Semantics (resilience4j's time-based sliding window, Hystrix's error-percentage rule):

* **Closed.** Every call the dependency really had a chance to answer is recorded as a
  success or a failure in a sliding window of ``window_s`` seconds (``_BUCKETS`` buckets).
  The breaker opens when the window holds at least ``min_calls`` calls and at least
  ``failure_rate`` of them failed (defaults: 50 % of at least 20 calls in 10 s). The
  call whose failure trips it keeps its own error (its fallback reason is the real one).
* **Not every failed call is the dependency's failure.** The caller decides, and passes
  :attr:`Outcome.IGNORED` for calls that must not count either way: a timeout caused by
  the client's tight deadline or by our own event loop lagging, a cancelled call (client
  gone). See ``pipeline.GuardedCall`` for the rules.
* **Open.** Every call gets :class:`CircuitOpen` at once, without touching the
  dependency, for ``open_s`` seconds.
* **Half-open.** Then at most ``half_open_probes`` calls go through as probes (the
  caller gives them one attempt, no retries); everyone else still gets ``CircuitOpen``
  at once. One failed probe re-opens it for another ``open_s``; ``half_open_probes``
  successful probes close it with an empty window. An ignored probe frees its slot.
* Every state change happens once and is reported once to ``on_state_changed`` (the
  metrics gauge and a log line). An outcome is only applied to the state it was admitted
  in (a call admitted while closed that ends after the breaker opened changes nothing).

Why not pybreaker (used before): it counts *consecutive* failures (``fail_max``) with
no window, minimum call count or rate; in half-open it lets every concurrent call
through; and it rebuilds its state object on each call from a storage string, which
under asyncio concurrency logged 120 ``open -> open`` and 75 ``closed -> closed``
transitions in short runs. Carrying rate semantics on top of it would mean replacing
its counters, its half-open state and its transition logic: all of it. This is pure
logic, no I/O and no threads (one event loop per process), with an injected clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum

from gateway.errors import CircuitOpen

Clock = Callable[[], float]

# The window slides in steps of window_s / _BUCKETS (1 s for the default 10 s), as in
# the retry budget.
_BUCKETS = 10


class BreakerState(IntEnum):
    """Gauge values: 0 closed, 1 half-open, 2 open."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class Outcome(Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"  # not the dependency's doing: counts neither way


StateHook = Callable[[str, BreakerState, BreakerState], None]


@dataclass(frozen=True)
class BreakerConfig:
    """A breaker's thresholds; one per dependency, from settings."""

    failure_rate: float = 0.5
    min_calls: int = 20
    window_s: float = 10.0
    open_s: float = 2.0
    half_open_probes: int = 3

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if self.min_calls < 1 or self.half_open_probes < 1:
            raise ValueError("min_calls and half_open_probes must be at least 1")
        if self.window_s <= 0 or self.open_s <= 0:
            raise ValueError("window_s and open_s must be positive")


@dataclass(frozen=True)
class Permit:
    """What :meth:`Breaker.acquire` hands out; give it back with :meth:`Breaker.record`."""

    generation: int
    probe: bool


class Breaker:
    """A dependency's breaker: ``permit = acquire()``, call, ``record(permit, outcome)``."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        on_state_changed: StateHook | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.name = name
        self.config = config or BreakerConfig()
        self._hook = on_state_changed
        self._clock = clock
        self._state = BreakerState.CLOSED
        # Bumped on every state change: outcomes of permits from an earlier state are dropped.
        self._generation = 0
        self._opened_at = 0.0
        self._step = self.config.window_s / _BUCKETS
        self._calls = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._epoch = [-1] * _BUCKETS
        self._probes_out = 0  # probes admitted and not yet recorded
        self._probe_successes = 0
        self.transitions = 0  # state changes so far (tests, logs)

    # -- state -------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        return self._state

    def _set(self, new: BreakerState) -> None:
        old = self._state
        if new is old:
            return
        self._state = new
        self._generation += 1
        self.transitions += 1
        if new is BreakerState.OPEN:
            self._opened_at = self._clock()
        if new is BreakerState.HALF_OPEN:
            self._probes_out = 0
            self._probe_successes = 0
        if new is BreakerState.CLOSED:
            self._calls = [0] * _BUCKETS
            self._failures = [0] * _BUCKETS
            self._epoch = [-1] * _BUCKETS
        if self._hook is not None:
            self._hook(self.name, old, new)

    # -- the window --------------------------------------------------------------------

    def _bucket(self) -> int:
        step = int(self._clock() // self._step)
        i = step % _BUCKETS
        if self._epoch[i] != step:
            self._epoch[i] = step
            self._calls[i] = 0
            self._failures[i] = 0
        return i

    def window(self) -> tuple[int, int]:
        """(calls, failures) recorded in the current window while closed."""
        now_step = int(self._clock() // self._step)
        calls = failures = 0
        for i in range(_BUCKETS):
            if now_step - self._epoch[i] < _BUCKETS:
                calls += self._calls[i]
                failures += self._failures[i]
        return calls, failures

    # -- calls -------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """Admit a call, or raise :class:`CircuitOpen` at once."""
        if self._state is BreakerState.OPEN:
            if self._clock() - self._opened_at < self.config.open_s:
                raise CircuitOpen(f"{self.name} circuit breaker is open")
            self._set(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            if self._probes_out + self._probe_successes >= self.config.half_open_probes:
                raise CircuitOpen(f"{self.name} circuit breaker is half-open, probes in flight")
            self._probes_out += 1
            return Permit(self._generation, probe=True)
        return Permit(self._generation, probe=False)

    def record(self, permit: Permit, outcome: Outcome) -> None:
        """The admitted call's outcome."""
        if permit.generation != self._generation:
            return  # admitted in a state that has since ended
        if permit.probe:
            self._probes_out -= 1
            if outcome is Outcome.FAILURE:
                self._set(BreakerState.OPEN)
            elif outcome is Outcome.SUCCESS:
                self._probe_successes += 1
                if self._probe_successes >= self.config.half_open_probes:
                    self._set(BreakerState.CLOSED)
            return
        if outcome is Outcome.IGNORED:
            return
        i = self._bucket()
        self._calls[i] += 1
        if outcome is Outcome.FAILURE:
            self._failures[i] += 1
            calls, failures = self.window()
            cfg = self.config
            if calls >= cfg.min_calls and failures >= cfg.failure_rate * calls:
                self._set(BreakerState.OPEN)
