"""Admission control: an adaptive limit on requests in flight, driven by event-loop lag.

Why adaptive, and why this signal:

* A static in-flight cap is right for one machine and one request size only. By
  Little's law the useful concurrency is throughput x latency target; on two shared
  cores at 20 items a request that is ~25, while ``GATEWAY_MAX_INFLIGHT`` defaults to
  256. At 256 in flight every request waits behind ~250 others for the one event loop
  and all of them miss the 50 ms deadline together: the failure admission control
  exists to prevent.
* Gradient and Vegas limiters (Netflix concurrency-limits) infer queueing from request
  latency rising above its minimum. Here request latency also rises when a dependency
  slows down (Triton at its 30 ms budget, Redis paused), and that is not overload of
  this process: the breakers, deadlines and the fallback handle it, and shedding then
  would turn degraded-but-answered requests into 503s. What overloads *this* process is
  its one event loop running out of CPU, and that shows directly as loop lag: a timer
  set for ``interval`` fires late.
* **A burst is not overload** (CoDel's insight, Nichols and Jacobson 2012): twenty
  requests arriving together make the loop lag for the ~25 ms it takes to serve them,
  then it is idle again; a *standing* queue keeps it lagging. So the limiter looks at the
  *minimum* lag over the last ``STANDING_WINDOW`` samples (100 ms, longer than a burst
  takes to serve): above ``lag_target`` a standing queue has formed, and the limit
  shrinks multiplicatively (x0.9 per sample); otherwise it grows additively (+1 per
  sample) while it binds, and back towards its initial value when it does not. (The
  smoothed lag it used before ratcheted the limit down a little at every burst and
  never grew it back without saturation: under locust-style bursts it ended at the
  floor and shed healthy traffic.) AIMD converges to the concurrency the loop can
  serve without a standing queue, and recovers within a second.
* ``GATEWAY_MAX_INFLIGHT`` stays the hard ceiling (an operator's static cap still
  works); the floor keeps a few requests flowing so the lag signal never starves.

Shedding costs one comparison and a 503 with ``Retry-After``, rendered without touching
a dependency, so a shed request is answered in well under a millisecond of work.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

Clock = Callable[[], float]

# Lag samples: one timer every 10 ms costs ~100 wakeups/s, a few tenths of a percent of
# a core, and reacts within tens of milliseconds.
LAG_INTERVAL_S = 0.010
# 5 ms of loop lag = a tenth of the default 50 ms budget spent waiting for the CPU, while
# the requests themselves need ~2-10 ms: past that, deadlines start to be missed.
LAG_TARGET_S = 0.005
# Lag samples kept for :meth:`LagMonitor.max_lag_since`: 1 s at the 10 ms interval, longer
# than any stage budget.
LAG_HISTORY = 100
# Standing lag = the minimum of the last 10 samples (100 ms): a burst, a GC pause or a
# slow request raises single samples, only a standing queue raises all of them.
STANDING_WINDOW = 10
# The exported lag is smoothed over ~4 samples (40 ms), for dashboards.
SMOOTHING = 0.25
DECREASE = 0.9
FLOOR = 4
# Start where Little's law puts this machine (see above); the AIMD finds the rest.
INITIAL = 32


class AdaptiveLimit:
    """The in-flight limit; pure logic (no I/O), fed lag samples by :class:`LagMonitor`."""

    def __init__(
        self,
        ceiling: int,
        floor: int = FLOOR,
        initial: int = INITIAL,
        lag_target_s: float = LAG_TARGET_S,
    ) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.initial = float(max(self.floor, min(initial, ceiling)))
        self.limit = self.initial
        self.lag_target_s = lag_target_s
        self.inflight = 0
        self.lag_s = 0.0  # smoothed, for dashboards
        self._recent: deque[float] = deque(maxlen=STANDING_WINDOW)

    def full(self) -> bool:
        """Whether a request arriving now would be shed."""
        return self.inflight >= int(self.limit)

    def try_acquire(self) -> bool:
        """Admit one request if the limit allows; the caller must :meth:`release` it."""
        if self.full():
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        self.inflight -= 1

    @property
    def standing_lag_s(self) -> float:
        """The lag every recent sample had: a standing queue of runnable work."""
        return min(self._recent, default=0.0)

    def on_lag(self, lag_s: float) -> None:
        """One lag sample: shrink on a standing queue, grow while the limit binds."""
        self.lag_s += SMOOTHING * (lag_s - self.lag_s)
        self._recent.append(lag_s)
        if self.standing_lag_s > self.lag_target_s:
            self.limit = max(float(self.floor), self.limit * DECREASE)
        elif self.inflight >= int(self.limit) - 1 or self.limit < self.initial:
            self.limit = min(float(self.ceiling), self.limit + 1.0)


class LagMonitor:
    """Measures event-loop lag every ``interval`` and feeds it to ``sink``.

    Keeps the last second of samples, so a dependency call that timed out can ask how
    much the loop lagged while it ran (:meth:`max_lag_since`): a timeout that our own
    busy loop caused is not the dependency's failure.
    """

    def __init__(
        self,
        sink: Callable[[float], None],
        interval_s: float = LAG_INTERVAL_S,
        clock: Clock = time.perf_counter,
    ) -> None:
        self._sink = sink
        self._interval = interval_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.last_lag_s = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=LAG_HISTORY)

    def sample(self, t0: float, now: float) -> None:
        """One sample: a timer set at ``t0`` for ``interval`` fired at ``now``."""
        self.last_lag_s = max(0.0, now - t0 - self._interval)
        self._recent.append((now, self.last_lag_s))
        self._sink(self.last_lag_s)

    def max_lag_since(self, t: float) -> float:
        """The largest lag among samples taken at or after clock time ``t``.

        A sample taken at ``now`` measures a stall that may have begun up to one
        interval before ``t``; counting it is the cautious side (the stall overlapped).
        """
        worst = 0.0
        for at, lag in reversed(self._recent):
            if at < t:
                break
            worst = max(worst, lag)
        return worst

    async def _run(self) -> None:
        while True:
            t0 = self._clock()
            await asyncio.sleep(self._interval)
            self.sample(t0, self._clock())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lag-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
