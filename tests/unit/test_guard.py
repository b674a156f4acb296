"""Which failures count against a dependency (policy/guard.py), with real asyncio timing
against a fake slow dependency, tiny budgets and an injected loop-lag probe."""

import asyncio

import pytest

from gateway.errors import (
    CircuitOpen,
    InferenceError,
    InferenceTimeout,
    InferenceUnavailable,
    StageSkipped,
)
from gateway.policy.breaker import Breaker, BreakerConfig, BreakerState
from gateway.policy.budget import BudgetPolicy
from gateway.policy.guard import Attribution, GuardedCall
from gateway.policy.retry import RetryBudget, RetryPolicy

POLICY = BudgetPolicy.from_ms(50, features=15, inference=30, postprocess=5)


def guarded(lag: float = 0.0, min_calls: int = 3) -> tuple[GuardedCall, list[str]]:
    uncounted: list[str] = []
    breaker = Breaker("triton", BreakerConfig(min_calls=min_calls, failure_rate=0.5))
    retry = RetryPolicy(RetryBudget(0.1, 1.0, 10.0), 2, 0.0, 0.0)
    call = GuardedCall(
        "triton",
        breaker,
        retry,
        InferenceTimeout,
        Attribution(min_attempt_s=0.001, min_budget_share=0.5, max_loop_lag_s=0.005),
        loop_lag_since=lambda _t: lag,
        on_uncounted=uncounted.append,
    )
    return call, uncounted


async def slow(_left: float) -> None:
    await asyncio.sleep(1.0)


async def fine(_left: float) -> str:
    return "ok"


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_timeouts_with_the_full_stage_budget_open_the_breaker() -> None:
    call, uncounted = guarded()

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(InferenceTimeout):
                # 30 ms inference budget: scaled down to keep the test fast would change
                # the share; use the real one once per call.
                await call.run(slow, POLICY.start(), "inference")

    run(go())
    assert call.breaker.state is BreakerState.OPEN
    assert uncounted == []


def test_timeouts_under_a_tiny_client_deadline_never_count() -> None:
    call, uncounted = guarded()

    async def go() -> None:
        for ms in (0.05, 1.0, 2.0) * 15:
            budget = POLICY.start(header_timeout_ms=ms)
            with pytest.raises((InferenceTimeout, StageSkipped)):
                await call.run(slow, budget, "inference")
        # the next normal request still goes through
        assert await call.run(fine, POLICY.start(), "inference") == "ok"

    run(go())
    assert call.breaker.state is BreakerState.CLOSED
    assert call.breaker.window() == (1, 0)
    assert uncounted and set(uncounted) == {"client_deadline"}


def test_a_stage_with_too_little_time_is_not_attempted() -> None:
    call, _ = guarded()
    attempted = []

    async def record(_left: float) -> None:
        attempted.append(1)

    async def go() -> None:
        with pytest.raises(StageSkipped):
            await call.run(record, POLICY.start(header_timeout_ms=0.5), "inference")

    run(go())
    assert attempted == []


def test_timeouts_while_our_loop_lags_never_count() -> None:
    call, uncounted = guarded(lag=0.012)

    async def go() -> None:
        for _ in range(5):
            with pytest.raises(InferenceTimeout):
                await call.run(slow, POLICY.start(), "inference")

    run(go())
    assert call.breaker.state is BreakerState.CLOSED
    assert uncounted == ["loop_lag"] * 5


def test_a_blocked_loop_is_seen_by_the_late_timer_itself() -> None:
    """No lag sample yet, but the timeout fired 20 ms late: our fault, not Triton's."""
    call, uncounted = guarded(lag=0.0)
    import time

    async def hog(_left: float) -> None:
        await asyncio.sleep(0)
        time.sleep(0.050)  # noqa: ASYNC251 - blocks the loop past the 30 ms deadline, on purpose
        await asyncio.sleep(1.0)

    async def go() -> None:
        with pytest.raises(InferenceTimeout):
            await call.run(hog, POLICY.start(), "inference")

    run(go())
    assert uncounted == ["loop_lag"]


def test_errors_from_the_dependency_always_count() -> None:
    call, _ = guarded()

    async def broken(_left: float) -> None:
        raise InferenceError("model error")

    async def refused(_left: float) -> None:
        raise InferenceUnavailable("connection refused")

    async def go() -> None:
        for fn in (broken, refused, broken):
            # under a tight client deadline too: an error is not a timeout
            with pytest.raises(InferenceError):
                await call.run(fn, POLICY.start(header_timeout_ms=5), "inference")
        with pytest.raises(CircuitOpen):
            await call.run(fine, POLICY.start(), "inference")

    run(go())


def test_cancelled_calls_count_neither_way_and_free_a_probe() -> None:
    call, _ = guarded()

    async def go() -> None:
        task = asyncio.ensure_future(call.run(slow, POLICY.start(), "inference"))
        await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(go())
    assert call.breaker.window() == (0, 0)
