"""Unit tests for the adaptive in-flight limit (pure logic, no clock, no I/O)."""

from __future__ import annotations

from gateway.policy.admission import AdaptiveLimit


def test_sheds_at_the_limit_and_releases() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=2, initial=3)
    assert [lim.try_acquire() for _ in range(4)] == [True, True, True, False]
    lim.release()
    assert lim.try_acquire()


def test_standing_lag_shrinks_the_limit_down_to_the_floor() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32, lag_target_s=0.005)
    for _ in range(200):
        lim.on_lag(0.050)
    assert lim.limit == 4


def test_grows_while_the_limit_binds_and_never_past_the_ceiling() -> None:
    lim = AdaptiveLimit(ceiling=40, floor=4, initial=10, lag_target_s=0.005)
    for _ in range(50):
        lim.on_lag(0.0)
    assert lim.limit == 10  # idle: no reason to grow
    for _ in range(10):
        lim.try_acquire()
    for _ in range(100):
        lim.on_lag(0.0)
        while lim.try_acquire():
            pass
    assert lim.limit == 40


def test_bursts_never_shrink_it() -> None:
    """Locust-style bursts: the loop lags ~25 ms while serving 20 requests, then idles.
    The smoothed-lag limiter this replaced ratcheted down to the floor here."""
    lim = AdaptiveLimit(ceiling=256, floor=4, initial=32, lag_target_s=0.005)
    for _ in range(100):  # 100 bursts, one lagged sample in every ten
        lim.on_lag(0.025)
        for _ in range(9):
            lim.on_lag(0.0002)
    assert lim.limit >= 32


def test_recovers_to_its_initial_value_after_overload() -> None:
    lim = AdaptiveLimit(ceiling=256, floor=4, initial=32, lag_target_s=0.005)
    for _ in range(100):
        lim.on_lag(0.030)
    assert lim.limit == 4
    for _ in range(40):  # 400 ms calm, nothing binding
        lim.on_lag(0.0)
    assert lim.limit == 32


def test_one_gc_pause_does_not_shed() -> None:
    lim = AdaptiveLimit(ceiling=100, floor=4, initial=32, lag_target_s=0.005)
    for _ in range(9):
        lim.on_lag(0.0)
    lim.on_lag(0.030)  # one 30 ms stall
    assert lim.limit == 32


def test_static_ceiling_still_applies() -> None:
    lim = AdaptiveLimit(ceiling=2)
    assert [lim.try_acquire() for _ in range(3)] == [True, True, False]


def test_lag_history_answers_since_when() -> None:
    from gateway.policy.admission import LagMonitor

    seen: list[float] = []
    m = LagMonitor(seen.append, interval_s=0.010)
    m.sample(0.000, 0.010)  # on time
    m.sample(0.010, 0.032)  # 12 ms late
    m.sample(0.032, 0.043)  # 1 ms late
    assert abs(m.max_lag_since(0.0) - 0.012) < 1e-9
    assert abs(m.max_lag_since(0.033) - 0.001) < 1e-9
    assert m.max_lag_since(0.050) == 0.0
    assert len(seen) == 3
