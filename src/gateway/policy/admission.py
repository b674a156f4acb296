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
  second, over ``BUSY_TARGET`` on average over a window) **and** the admitted requests
  took longer than ``LATENCY_TARGET_S`` on average. A slow dependency leaves the loop
  idle; a busy loop serving fast requests is simply working at capacity. A third sign,
  the minimum timer lag of a window over ``LAG_TARGET_S``, catches the loop thread not
  being scheduled at all (other processes took the CPU, so its CPU use *falls*).
* **Where to go, by Little's law**: with a standing queue the limit goes straight to
  ``throughput x LATENCY_TARGET_S`` (the concurrency at which this window's throughput
  would have had the target latency; Netflix's gradient limiter, in one step), never
  up; otherwise it grows by one per window while it binds (the peak in flight reached
  it), and back towards its initial value when it does not. On this machine that finds
  ~15 at 3x capacity, where 16 closed-loop connections are the knee.
* **A burst is not overload** (CoDel, Nichols and Jacobson 2012): twenty requests
  arriving together keep the loop busy for the ~25 ms it takes to serve them, then it
  idles. Decisions are per ``WINDOW_S`` window (100 ms, longer than a burst takes to
  serve), on the window's averages: a burst does not make a whole window busy. (A
  limiter on smoothed per-sample lag ratcheted down at every burst and, under
  locust-style bursts, ended at the floor, shedding healthy traffic.)
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
# Loop-thread CPU share (window average) that counts as busy: at capacity (16
# closed-loop connections) it was ~91 %; a loop waiting on a slow dependency, or
# serving a burst and then idling, sits far below.
BUSY_TARGET = 0.80
# Mean time from admission to answer that a busy loop should keep: two fifths of the
# 50 ms budget, leaving the rest for a wait in the backlog. Unloaded, requests take 2-5
# ms here; at the knee (16 closed-loop connections) ~10 ms. At 3x capacity, 10 ms held
# the limit at ~10 and the loop idle 10 % of the time (76 % goodput); 20 ms: 81 %.
LATENCY_TARGET_S = 0.020
# Waiters past their wait are refused by one sweep every 2 ms, not a timer each.
SWEEP_S = 0.002
# When the loop is starved (timer lag), there is no throughput to size the limit by.
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
        self._min_lag = float("inf")
        self._busy_sum = self._latency_sum = 0.0
        self._samples = self._done = 0
        self._peak = 0
        # Waiters may hold a parsed body each: as many as the ceiling admits at most.
        self.max_waiting = ceiling
        self._waiters: deque[tuple[float, asyncio.Future[bool]]] = deque()
        self._sweep: asyncio.TimerHandle | None = None

    # -- the limit ---------------------------------------------------------------------

    def on_sample(self, now: float, lag_s: float, busy: float) -> None:
        """A loop sample: timer lag and the loop thread's CPU share since the last one."""
        self.lag_s += SMOOTHING * (lag_s - self.lag_s)
        self._min_lag = min(self._min_lag, lag_s)
        self._busy_sum += busy
        self._samples += 1
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.window_s:
            self._decide(now - self._window_start)
            self._window_start = now

    def on_done(self, latency_s: float) -> None:
        """An admitted request finished, ``latency_s`` after it was admitted."""
        self._done += 1
        self._latency_sum += latency_s

    def standing_queue(self) -> bool:
        """Whether the current window shows a standing queue (see the module docstring)."""
        if self._samples and self._min_lag > self.lag_target_s:
            return True
        busy = self._busy_sum / self._samples if self._samples else 0.0
        latency = self._latency_sum / self._done if self._done else 0.0
        return busy > self.busy_target and latency > self.latency_target_s

    def _decide(self, elapsed_s: float) -> None:
        self.decisions += 1
        if self.standing_queue():
            target = self._done / elapsed_s * self.latency_target_s
            cut = self.limit * DECREASE if self._min_lag > self.lag_target_s else target
            self.limit = max(float(self.floor), min(self.limit, cut))
        elif self._peak >= int(self.limit) - 1 or self.limit < self.initial:
            self.limit = min(float(self.ceiling), self.limit + 1.0)
        self._min_lag = float("inf")
        self._busy_sum = self._latency_sum = 0.0
        self._samples = self._done = 0
        self._peak = self.inflight

    # -- admission ---------------------------------------------------------------------

    def full(self, can_wait: bool = True) -> bool:
        """Whether a request arriving now would be shed at once: the limit is reached and,
        if it ``can_wait``, the backlog of waiters is full too."""
        return self.inflight >= int(self.limit) and (
            not can_wait or len(self._waiters) >= self.max_waiting
        )

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
        """Admit one request, waiting up to ``wait_s`` (LIFO) for a slot; False: shed.

        A waiter is a future in a deque, nothing more: no timer of its own. One sweep
        timer expires the oldest waiters (the deque is in arrival order), so parking and
        refusing a request costs a few microseconds, which matters when most arrivals
        are refused.
        """
        if self.try_acquire():
            return True
        if wait_s <= 0 or len(self._waiters) >= self.max_waiting:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiters.append((loop.time() + wait_s, fut))
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._expire, loop)
        return await fut  # cancelled with its request: release() and _expire skip it

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        waiters = self._waiters
        while waiters and waiters[0][0] <= now:
            fut = waiters.popleft()[1]
            if not fut.done():
                fut.set_result(False)
        self._sweep = loop.call_later(SWEEP_S, self._expire, loop) if waiters else None

    def release(self) -> None:
        """Give the slot to the newest waiter, or back."""
        while self._waiters and self.inflight <= int(self.limit):
            fut = self._waiters.pop()[1]
            if not fut.done():
                fut.set_result(True)  # the slot passes on: in flight stays the same
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
