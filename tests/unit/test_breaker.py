import asyncio
import time

import pytest

from gateway.errors import CircuitOpen, InferenceTimeout, InferenceUnavailable
from gateway.policy.breaker import Breaker, BreakerState


def _fail(b: Breaker, exc: Exception) -> None:
    with pytest.raises(type(exc)), b.guard():
        raise exc


def test_opens_after_consecutive_failures_and_trip_keeps_its_own_error() -> None:
    changes: list = []
    b = Breaker(
        "triton", fail_max=3, reset_timeout_s=60, on_state_changed=lambda *a: changes.append(a)
    )
    _fail(b, InferenceUnavailable("down"))
    _fail(b, InferenceUnavailable("down"))
    assert b.state is BreakerState.CLOSED
    _fail(b, InferenceTimeout("slow"))  # the tripping call sees its own error
    assert b.state is BreakerState.OPEN
    assert changes[-1] == ("triton", BreakerState.CLOSED, BreakerState.OPEN)
    ran = []
    with pytest.raises(CircuitOpen), b.guard():
        ran.append(1)
    assert ran == []  # nothing was attempted while open


def test_success_resets_the_consecutive_count() -> None:
    b = Breaker("redis", fail_max=2, reset_timeout_s=60)
    _fail(b, InferenceUnavailable("x"))
    with b.guard():
        pass
    _fail(b, InferenceUnavailable("x"))
    assert b.state is BreakerState.CLOSED


def test_half_open_then_close_or_reopen() -> None:
    changes: list = []
    b = Breaker(
        "triton", fail_max=1, reset_timeout_s=0.05, on_state_changed=lambda *a: changes.append(a[2])
    )
    _fail(b, InferenceUnavailable("x"))
    assert b.state is BreakerState.OPEN
    time.sleep(0.07)
    _fail(b, InferenceUnavailable("x"))  # trial call fails -> open again
    assert b.state is BreakerState.OPEN
    time.sleep(0.07)
    with b.guard():
        pass  # trial succeeds -> closed
    assert b.state is BreakerState.CLOSED
    assert changes == [
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.OPEN,
        BreakerState.HALF_OPEN,
        BreakerState.CLOSED,
    ]


def test_cancellation_is_not_a_failure() -> None:
    b = Breaker("triton", fail_max=1, reset_timeout_s=60)

    async def main() -> None:
        async def call() -> None:
            with b.guard():
                await asyncio.sleep(10)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert b.state is BreakerState.CLOSED


def test_timeout_outside_the_guard_counts_as_failure() -> None:
    """asyncio.timeout inside the guard: the breaker sees TimeoutError, not CancelledError."""
    b = Breaker("triton", fail_max=1, reset_timeout_s=60)

    async def main() -> None:
        with b.guard():
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)

    with pytest.raises(TimeoutError):
        asyncio.run(main())
    assert b.state is BreakerState.OPEN
