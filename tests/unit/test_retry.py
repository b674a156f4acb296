import asyncio

import pytest

from gateway.errors import FeatureStoreTimeout, FeatureStoreUnavailable
from gateway.policy.retry import RetryBudget, RetryPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_floor_then_ratio() -> None:
    clock = Clock()
    b = RetryBudget(ratio=0.1, min_per_s=1.0, window_s=10.0, clock=clock)  # floor 10
    for _ in range(100):
        b.record_request()
    granted = sum(b.try_acquire() for _ in range(50))
    assert granted == 20  # 10 floor + 10% of 100
    assert b.counts() == (100, 20)


def test_window_slides() -> None:
    clock = Clock()
    b = RetryBudget(ratio=0.0, min_per_s=0.5, window_s=10.0, clock=clock)  # floor 5
    assert sum(b.try_acquire() for _ in range(10)) == 5
    clock.t = 5.0
    assert not b.try_acquire()  # still inside the window
    clock.t = 10.5  # the first bucket (t in [0, 1)) has left the window
    assert sum(b.try_acquire() for _ in range(10)) == 5
    clock.t = 100.0
    assert b.counts() == (0, 0)


def test_old_requests_stop_counting() -> None:
    clock = Clock()
    b = RetryBudget(ratio=0.5, min_per_s=0.0, window_s=10.0, clock=clock)
    for _ in range(10):
        b.record_request()
    clock.t = 30.0
    assert not b.try_acquire()


def _policy(budget: RetryBudget, attempts: int = 3, events: list | None = None) -> RetryPolicy:
    events = events if events is not None else []
    return RetryPolicy(
        budget,
        attempts,
        backoff_base_s=0.0,
        backoff_max_s=0.0,
        on_retry=lambda: events.append("retry"),
        on_exhausted=lambda: events.append("exhausted"),
    )


def test_transient_errors_are_retried_until_success() -> None:
    budget = RetryBudget(0.1, 10.0, 10.0)
    calls = []

    async def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise FeatureStoreUnavailable("refused")
        return "ok"

    events: list = []
    out = asyncio.run(_policy(budget, 3, events).call(flaky, deadline=float("inf")))
    assert out == "ok" and len(calls) == 3 and events == ["retry", "retry"]


def test_timeouts_are_not_retried() -> None:
    calls = []

    async def slow() -> None:
        calls.append(1)
        raise FeatureStoreTimeout("slow")

    with pytest.raises(FeatureStoreTimeout):
        asyncio.run(_policy(RetryBudget(1.0, 10.0, 10.0)).call(slow, deadline=float("inf")))
    assert len(calls) == 1


def test_no_retry_past_the_deadline() -> None:
    calls = []

    async def down() -> None:
        calls.append(1)
        raise FeatureStoreUnavailable("refused")

    with pytest.raises(FeatureStoreUnavailable):
        asyncio.run(_policy(RetryBudget(1.0, 10.0, 10.0)).call(down, deadline=0.0))
    assert len(calls) == 1


def test_exhausted_budget_stops_retries() -> None:
    budget = RetryBudget(0.0, 0.0, 10.0)
    events: list = []

    async def down() -> None:
        raise FeatureStoreUnavailable("refused")

    with pytest.raises(FeatureStoreUnavailable):
        asyncio.run(_policy(budget, 3, events).call(down, deadline=float("inf")))
    assert events == ["exhausted"]


def test_a_success_takes_one_call_and_no_retry_token() -> None:
    budget = RetryBudget(0.0, 0.0, 10.0)
    events: list = []

    async def ok() -> int:
        return 7

    assert asyncio.run(_policy(budget, 3, events).call(ok, deadline=float("inf"))) == 7
    assert events == [] and budget.counts() == (1, 0)


def test_max_attempts_override_disables_retries() -> None:
    calls = []

    async def down() -> None:
        calls.append(1)
        raise FeatureStoreUnavailable("refused")

    with pytest.raises(FeatureStoreUnavailable):
        asyncio.run(
            _policy(RetryBudget(1.0, 10.0, 10.0), 3).call(down, float("inf"), max_attempts=1)
        )
    assert len(calls) == 1
