"""Admission control: an adaptive limit on requests in flight, and a short LIFO wait.

Why adaptive, and why these signals:

* A static in-flight cap is right for one machine and one request size only. By
  Little's law the useful concurrency is throughput x latency target: on this 2-core
  box ~16 (16 closed-loop connections: 1,500 requests/s, P99 17 ms), while
  ``GATEWAY_MAX_INFLIGHT`` defaults to 256. With 41 in flight at 3x capacity every
  request waited behind the others' steps for the one event loop, and 90 % of the
  admitted ones timed out a stage: the failure admission control exists to prevent.
* Gradient and Vegas limiters (Netflix concurrency-limits) infer queueing from request
  latency rising above its minimum. Latency alone also rises when a dependency slows
  down (Triton at its 30 ms budget, Redis paused), which is not overload of this
  process: the breakers, deadlines and the fallback handle it, and shedding then would
  turn degraded-but-answered requests into 503s. So a standing queue *here* needs two
  things at once: the loop thread is busy (its CPU use, ``time.thread_time`` per wall
  second, over ``BUSY_TARGET``) **and** even the fastest request of the window took
  longer than ``LATENCY_TARGET_S``. A slow dependency leaves the loop idle; a busy loop
  serving fast requests is simply working at capacity. A third sign, timer lag over
  ``LAG_TARGET_S``, catches the loop thread not being scheduled at all (other processes
  took the CPU, so its CPU use *falls*).
* **A burst is not overload** (CoDel, Nichols and Jacobson 2012): twenty requests
  arriving together keep the loop busy for the ~25 ms it takes to serve them, then it
  idles. Every signal is therefore a *minimum* over a ``WINDOW_S`` window (100 ms,
  longer than a burst takes to serve): only a standing queue raises all of a window.
  (A limiter on smoothed lag ratcheted down at every burst and, under locust-style
  bursts, ended at the floor, shedding healthy traffic.)
* AIMD, one decision per window: a standing queue multiplies the limit by
  ``DECREASE``; otherwise it grows by one while it binds (the peak in flight reached
  it), and back towards its initial value when it does not. It converges to the
  concurrency the loop serves without a standing queue, and recovers within seconds.
* ``GATEWAY_MAX_INFLIGHT`` stays the hard ceiling (an operator's static cap still
  works); the floor keeps a few requests flowing so the signals never starve.

**A short LIFO wait instead of an instant 503.** A request that finds the limit reached
waits up to ``GATEWAY_ADMISSION_WAIT_MS`` for a slot, newest first (Netflix
concurrency-limits' LIFO blocking limiter; Facebook's adaptive LIFO): a closed-loop
client that ignores ``Retry-After`` (wrk, a tight retry loop) would otherwise turn every
refusal into an instant resend, and the storm of 503s eats the CPU the admitted
requests and, on a shared box, the model server need (64 wrk connections against one
worker: 28,000 503s in 8 s, Triton starved into timeouts). Newest first, because the
oldest waiters are the likeliest to miss their deadline anyway. At most as many wait as
the limit admits; beyond that, and after the wait, the request is shed: 503 with
``Retry-After``, rendered without touching a dependency. The wait is inside the
request's budget (it starts when the body is in), so a request admitted late gets less
time for its stages, never more.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress

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
# One decision per 100 ms window: longer than a 20-request burst takes to serve here
# (~25 ms), short enough to react within a few hundred milliseconds. CoDel's interval.
WINDOW_S = 0.100
# Loop-thread CPU share that counts as busy: at capacity (16 closed-loop connections)
# it was ~91 %; a loop waiting on a slow dependency sits far below.
BUSY_TARGET = 0.80
# The fastest request of a window taking longer than this means every request queued:
# a fifth of the 50 ms budget; unloaded, requests take 2-5 ms here.
LATENCY_TARGET_S = 0.010
DECREASE = 0.8
FLOOR = 4
# Start where Little's law puts this machine (see above, with room for a 20-request
# burst); the AIMD finds the rest.
INITIAL = 32
# The exported lag is smoothed over ~4 samples (40 ms), for dashboards.
SMOOTHING = 0.25


class AdaptiveLimit:
    """The in-flight limit and its LIFO backlog. The limit is pure logic fed by
    :meth:`on_sample` (from :class:`LagMonitor`) and :meth:`on_done` (from each admitted
    request); the backlog parks waiters on the running event loop."""

    def __init__(
        self,
        ceiling: int,
        floor: int = FLOOR,
        initial: int = INITIAL,
        lag_target_s: float = LAG_TARGET_S,
        busy_target: float = BUSY_TARGET,
        latency_target_s: float = LATENCY_TARGET_S,
        window_s: float = WINDOW_S,
    ) -> None:
        self.ceiling = ceiling
        self.floor = min(floor, ceiling)
        self.initial = float(max(self.floor, min(initial, ceiling)))
        self.limit = self.initial
        self.lag_target_s = lag_target_s
        self.busy_target = busy_target
        self.latency_target_s = latency_target_s
        self.window_s = window_s
        self.inflight = 0
        self.lag_s = 0.0  # smoothed, for dashboards
        self.decisions = 0
        self._window_start: float | None = None
        self._min_lag = self._min_busy = self._min_latency = float("inf")
        self._peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    # -- the limit ---------------------------------------------------------------------

    def on_sample(self, now: float, lag_s: float, busy: float) -> None:
        """A loop sample: timer lag and the loop thread's CPU share since the last one."""
        self.lag_s += SMOOTHING * (lag_s - self.lag_s)
        self._min_lag = min(self._min_lag, lag_s)
        self._min_busy = min(self._min_busy, busy)
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.window_s:
            self._decide()
            self._window_start = now

    def on_done(self, latency_s: float) -> None:
        """An admitted request finished, ``latency_s`` after it was admitted."""
        if latency_s < self._min_latency:
            self._min_latency = latency_s

    def standing_queue(self) -> bool:
        """Whether the current window shows a standing queue (see the module docstring)."""
        if self._min_lag > self.lag_target_s:
            return True
        return self._min_busy > self.busy_target and self._min_latency > self.latency_target_s

    def _decide(self) -> None:
        self.decisions += 1
        if self.standing_queue():
            self.limit = max(float(self.floor), self.limit * DECREASE)
        elif self._peak >= int(self.limit) - 1 or self.limit < self.initial:
            self.limit = min(float(self.ceiling), self.limit + 1.0)
        self._min_lag = self._min_busy = self._min_latency = float("inf")
        self._peak = self.inflight

    # -- admission ---------------------------------------------------------------------

    def full(self, can_wait: bool = True) -> bool:
        """Whether a request arriving now would be shed at once: the limit is reached and,
        if it ``can_wait``, the backlog of waiters is full too."""
        limit = int(self.limit)
        return self.inflight >= limit and (not can_wait or len(self._waiters) >= limit)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Admit one request if the limit allows; the caller must :meth:`release` it."""
        if self.inflight >= int(self.limit):
            return False
        self.inflight += 1
        if self.inflight > self._peak:
            self._peak = self.inflight
        return True

    async def acquire(self, wait_s: float) -> bool:
        """Admit one request, waiting up to ``wait_s`` (LIFO) for a slot; False: shed."""
        if self.try_acquire():
            return True
        if wait_s <= 0 or len(self._waiters) >= int(self.limit):
            return False
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(wait_s):
                await fut
            return True
        except TimeoutError:
            # The slot may have been handed over just as the timer fired: then it is ours.
            return fut.done() and not fut.cancelled()
        finally:
            if not fut.done() or fut.cancelled():  # not handed a slot: leave the backlog
                fut.cancel()
                with suppress(ValueError):
                    self._waiters.remove(fut)

    def release(self) -> None:
        """Give the slot to the newest waiter, or back."""
        while self._waiters and self.inflight <= int(self.limit):
            fut = self._waiters.pop()
            if not fut.done():
                fut.set_result(None)  # the slot passes on: in flight stays the same
                return
        self.inflight -= 1


class LagMonitor:
    """Measures event-loop lag every ``interval`` and feeds it to ``sink``.

    Keeps the last second of samples, so a dependency call that timed out can ask how
    much the loop lagged while it ran (:meth:`max_lag_since`): a timeout that our own
    busy loop caused is not the dependency's failure.
    """

    def __init__(
        self,
        sink: Callable[[float, float, float], None],
        interval_s: float = LAG_INTERVAL_S,
        clock: Clock = time.perf_counter,
        cpu_clock: Clock = time.thread_time,
    ) -> None:
        self._sink = sink
        self._interval = interval_s
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._task: asyncio.Task[None] | None = None
        self.last_lag_s = 0.0
        self._recent: deque[tuple[float, float]] = deque(maxlen=LAG_HISTORY)

    def sample(self, t0: float, now: float, busy: float = 0.0) -> None:
        """One sample: a timer set at ``t0`` for ``interval`` fired at ``now``; the loop
        thread used ``busy`` of the CPU meanwhile."""
        self.last_lag_s = max(0.0, now - t0 - self._interval)
        self._recent.append((now, self.last_lag_s))
        self._sink(now, self.last_lag_s, busy)

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
        cpu0 = self._cpu_clock()
        while True:
            t0 = self._clock()
            await asyncio.sleep(self._interval)
            now, cpu = self._clock(), self._cpu_clock()
            self.sample(t0, now, min(1.0, (cpu - cpu0) / max(now - t0, 1e-6)))
            cpu0 = cpu

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
