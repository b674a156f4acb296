"""Unit tests for the adaptive in-flight limit (pure logic, no clock, no I/O)."""

from __future__ import annotations

from gateway.policy.admission import AdaptiveLimit


class Feed:
    """Drives an AdaptiveLimit with 10 ms samples on a fake clock (100 ms windows)."""

    def __init__(self, lim: AdaptiveLimit) -> None:
        self.lim = lim
        self.t = 0.0

    def window(self, lag: float, busy: float, latency: float | None, samples: int = 10) -> None:
        for _ in range(samples):
            self.t += 0.010
            if latency is not None:
                self.lim.on_done(latency)
            self.lim.on_sample(self.t, lag, busy)


def test_sheds_at_the_limit_and_releases() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=2, initial=3)
    assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]
    lim.release()
    assert lim.try_acquire()


def test_a_busy_loop_with_slow_requests_shrinks_the_limit_to_the_floor() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32)
    f = Feed(lim)
    for _ in range(30):
        f.window(lag=0.001, busy=0.97, latency=0.025)
    assert lim.limit == 4


def test_starved_loop_shrinks_it_too() -> None:
    """Other processes take the CPU: the loop thread is barely scheduled (low CPU use),
    but every timer fires late."""
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32)
    f = Feed(lim)
    for _ in range(5):
        f.window(lag=0.020, busy=0.3, latency=None)
    assert lim.limit <= 32 * 0.8**4 + 1e-9  # four decisions in fifty samples


def test_a_slow_dependency_is_not_overload() -> None:
    """Every request waits 30 ms on Triton: slow, but the loop idles. No shedding."""
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32)
    f = Feed(lim)
    for _ in range(30):
        f.window(lag=0.0005, busy=0.2, latency=0.030)
    assert lim.limit == 32


def test_a_busy_loop_serving_fast_requests_is_just_at_capacity() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32)
    f = Feed(lim)
    for _ in range(30):
        f.window(lag=0.001, busy=0.95, latency=0.004)
    assert lim.limit == 32


def test_grows_while_the_limit_binds_and_never_past_the_ceiling() -> None:
    lim = AdaptiveLimit(ceiling=40, floor=4, initial=10)
    f = Feed(lim)
    for _ in range(5):
        f.window(0.0, 0.1, 0.003)
    assert lim.limit == 10  # idle: no reason to grow
    for _ in range(100):
        while lim.try_acquire():
            pass
        f.window(0.0, 0.5, 0.003)
    assert lim.limit == 40


def test_bursts_never_shrink_it() -> None:
    """Locust-style bursts: the loop is busy ~25 ms serving 20 requests, then idles."""
    lim = AdaptiveLimit(ceiling=256, floor=4, initial=32)
    for k in range(100 * 10):  # 100 bursts of 100 ms, 10 ms samples
        t = k * 0.010
        in_burst = k % 10 < 3
        lim.on_done(0.020 if in_burst else 0.004)
        lim.on_sample(t, 0.012 if in_burst else 0.0002, 1.0 if in_burst else 0.05)
    assert lim.limit >= 32


def test_recovers_to_its_initial_value_after_overload() -> None:
    lim = AdaptiveLimit(ceiling=256, floor=4, initial=32)
    f = Feed(lim)
    for _ in range(20):
        f.window(0.030, 1.0, 0.040)
    assert lim.limit == 4
    for _ in range(30):  # 3 s calm, nothing binding
        f.window(0.0, 0.1, 0.003)
    assert lim.limit == 32


def test_static_ceiling_still_applies() -> None:
    lim = AdaptiveLimit(ceiling=2)
    assert [lim.try_acquire() for _ in range(3)] == [True, True, False]


def test_lag_history_answers_since_when() -> None:
    from gateway.policy.admission import LagMonitor

    seen: list[float] = []
    m = LagMonitor(lambda _now, lag, _busy: seen.append(lag), interval_s=0.010)
    m.sample(0.000, 0.010)  # on time
    m.sample(0.010, 0.032)  # 12 ms late
    m.sample(0.032, 0.043)  # 1 ms late
    assert abs(m.max_lag_since(0.0) - 0.012) < 1e-9
    assert abs(m.max_lag_since(0.033) - 0.001) < 1e-9
    assert m.max_lag_since(0.050) == 0.0
    assert len(seen) == 3


def test_waiters_get_freed_slots_newest_first_and_time_out() -> None:
    import asyncio

    async def go() -> None:
        lim = AdaptiveLimit(ceiling=2, floor=1, initial=2)  # at most 2 in flight, 2 waiting
        assert await lim.acquire(0.1) and await lim.acquire(0.1)
        order: list[str] = []

        async def wait(name: str) -> None:
            ok = await lim.acquire(0.5)
            order.append(f"{name}:{ok}")

        old = asyncio.ensure_future(wait("old"))
        await asyncio.sleep(0.001)
        new = asyncio.ensure_future(wait("new"))
        await asyncio.sleep(0.001)
        assert lim.waiting == 2 and lim.full()  # the backlog is full...
        assert not await lim.acquire(0.5)  # ...so a third is refused at once
        lim.release()  # the slot goes to the newest waiter
        await new
        assert order == ["new:True"] and lim.inflight == 2
        lim.release()
        await old
        assert order == ["new:True", "old:True"]
        assert lim.inflight == 2 and lim.waiting == 0
        t0 = asyncio.get_running_loop().time()
        assert not await lim.acquire(0.010)  # nobody releases: refused after the wait
        assert 0.010 <= asyncio.get_running_loop().time() - t0 < 0.050
        assert lim.waiting == 0 and lim.inflight == 2

        # A waiter whose request is cancelled leaves no slot behind.
        gone = asyncio.ensure_future(lim.acquire(1.0))
        await asyncio.sleep(0.001)
        gone.cancel()
        await asyncio.sleep(0.001)
        lim.release()
        assert lim.inflight == 1

    asyncio.run(go())


def test_full_means_limit_and_backlog_both_full() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=1, initial=2)
    assert lim.try_acquire() and lim.try_acquire()
    assert not lim.full()  # more may still wait
    assert lim.full(can_wait=False)
