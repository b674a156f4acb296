"""The rate-based breaker: pure logic with an injected clock."""

import pytest

from gateway.errors import CircuitOpen
from gateway.policy.breaker import Breaker, BreakerConfig, BreakerState, Outcome

S, F, IGN = Outcome.SUCCESS, Outcome.FAILURE, Outcome.IGNORED


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(**kw) -> tuple[Breaker, Clock, list]:
    clock = Clock()
    changes: list = []
    cfg = BreakerConfig(**{"min_calls": 10, "failure_rate": 0.5, "window_s": 10.0,
                           "open_s": 2.0, "half_open_probes": 2, **kw})  # fmt: skip
    b = Breaker("triton", cfg, on_state_changed=lambda *a: changes.append(a), clock=clock)
    return b, clock, changes


def call(b: Breaker, outcome: Outcome) -> None:
    b.record(b.acquire(), outcome)


def test_no_rate_judged_below_the_minimum_number_of_calls() -> None:
    b, _, _ = make()
    for _ in range(9):
        call(b, F)
    assert b.state is BreakerState.CLOSED  # 9 of 9 failed, but only 9 calls


def test_opens_at_the_failure_rate_over_the_minimum_calls() -> None:
    b, _, changes = make()
    for _ in range(6):
        call(b, S)
    for _ in range(5):
        call(b, F)  # 5 of 11: 45 %
    assert b.state is BreakerState.CLOSED
    call(b, F)  # 6 of 12: 50 %
    assert b.state is BreakerState.OPEN
    assert changes == [("triton", BreakerState.CLOSED, BreakerState.OPEN)]
    with pytest.raises(CircuitOpen):
        b.acquire()


def test_a_run_of_failures_in_healthy_traffic_does_not_open_it() -> None:
    """The old breaker opened on 5 consecutive failures; a burst of timeouts among
    hundreds of good calls is 5 %, not an outage."""
    b, _, _ = make(min_calls=20)
    for _ in range(100):
        call(b, S)
    for _ in range(8):
        call(b, F)
    assert b.state is BreakerState.CLOSED


def test_ignored_outcomes_count_neither_way() -> None:
    b, _, _ = make()
    for _ in range(50):
        call(b, IGN)
    assert b.window() == (0, 0)
    for _ in range(10):
        call(b, F)
    assert b.state is BreakerState.OPEN


def test_old_calls_leave_the_window() -> None:
    b, clock, _ = make()
    for _ in range(9):
        call(b, F)
    clock.t += 10.5  # all 9 are older than the 10 s window
    for _ in range(9):
        call(b, S)
    call(b, F)
    assert b.window() == (10, 1)
    assert b.state is BreakerState.CLOSED


def test_half_open_admits_a_bounded_number_of_probes() -> None:
    b, clock, changes = make(half_open_probes=2)
    for _ in range(10):
        call(b, F)
    clock.t += 1.9
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.t += 0.2
    p1 = b.acquire()
    p2 = b.acquire()
    assert p1.probe and p2.probe and b.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpen):  # everyone else: at once
        b.acquire()
    b.record(p1, S)
    with pytest.raises(CircuitOpen):  # one probe done, one in flight: still 2 in total
        b.acquire()
    b.record(p2, S)
    assert b.state is BreakerState.CLOSED
    assert b.window() == (0, 0)  # closed with an empty window
    assert [c[2] for c in changes] == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_a_failed_probe_reopens_for_another_period() -> None:
    b, clock, _ = make()
    for _ in range(10):
        call(b, F)
    clock.t += 2.1
    p = b.acquire()
    b.record(p, F)
    assert b.state is BreakerState.OPEN
    clock.t += 1.0
    with pytest.raises(CircuitOpen):
        b.acquire()
    clock.t += 1.1
    assert b.acquire().probe


def test_an_ignored_probe_frees_its_slot() -> None:
    b, clock, _ = make(half_open_probes=1)
    for _ in range(10):
        call(b, F)
    clock.t += 2.1
    p = b.acquire()
    with pytest.raises(CircuitOpen):
        b.acquire()
    b.record(p, IGN)
    assert b.state is BreakerState.HALF_OPEN
    b.record(b.acquire(), S)
    assert b.state is BreakerState.CLOSED


def test_each_state_change_happens_and_is_reported_once() -> None:
    """Concurrent calls: many admitted while closed, all failing after it opened."""
    b, clock, changes = make()
    permits = [b.acquire() for _ in range(40)]  # 40 calls in flight at once
    for p in permits:
        b.record(p, F)
    assert b.state is BreakerState.OPEN
    assert len(changes) == 1 and b.transitions == 1
    clock.t += 2.1
    probes = [b.acquire(), b.acquire()]
    late = [b.record(p, F) for p in permits]  # stale outcomes of the closed period
    assert late and b.state is BreakerState.HALF_OPEN
    for p in probes:
        b.record(p, S)
    assert [c[1:] for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_config_is_checked() -> None:
    with pytest.raises(ValueError):
        BreakerConfig(failure_rate=0)
    with pytest.raises(ValueError):
        BreakerConfig(min_calls=0)
