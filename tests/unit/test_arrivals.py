"""The benchmark's arrival processes (pure schedules) and how the generator sends a burst."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from loadtests.bench import loadgen
from loadtests.bench.arrivals import DEFAULT_BURST_SIZE, Arrivals, Step, burst_shape


def test_constant_spreads_requests_evenly() -> None:
    t = Step("constant", 200.0).schedule(5.0)
    assert len(t) == 1000
    assert np.allclose(np.diff(t), 1 / 200)
    assert t[0] == 0.0


def test_poisson_keeps_the_mean_rate_and_exponential_gaps() -> None:
    rate, duration = 500.0, 60.0
    t = Step("poisson", rate, seed=3).schedule(duration)
    # 30,000 expected arrivals: the count's standard deviation is sqrt(30,000) ~ 0.6 %,
    # so 3 % is five standard deviations.
    assert len(t) == pytest.approx(rate * duration, rel=0.03)
    assert np.all(np.diff(t) >= 0) and t[-1] < duration
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # Exponential gaps: standard deviation equal to the mean (coefficient of variation 1);
    # even spacing would give 0, bursts far more than 1.
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


def test_poisson_is_reproducible_for_a_seed_and_differs_across_seeds_and_rates() -> None:
    a = Step("poisson", 100.0, seed=1).schedule(5.0)
    b = Step("poisson", 100.0, seed=1).schedule(5.0)
    c = Step("poisson", 100.0, seed=2).schedule(5.0)
    d = Step("poisson", 101.0, seed=1).schedule(5.0)
    assert np.array_equal(a, b)
    assert not np.array_equal(a[:50], c[:50])
    assert not np.array_equal(a[:50], d[:50])


def test_poisson_at_a_tiny_rate_still_sends_one_request() -> None:
    assert len(Step("poisson", 0.001, seed=1).schedule(1.0)) >= 1


def test_burst_puts_exactly_n_requests_at_each_multiple_of_the_interval() -> None:
    t = Step("burst", 200.0, burst_size=20, burst_interval_s=0.1).schedule(5.0)
    times, counts = np.unique(t, return_counts=True)
    assert np.allclose(times, np.arange(50) * 0.1)
    assert counts.tolist() == [20] * 50
    assert len(t) == 1000  # the mean rate: 20 / 0.1 s = 200/s over 5 s


def test_burst_sends_at_least_one_burst_when_the_step_is_shorter_than_the_interval() -> None:
    t = Step("burst", 10.0, burst_size=20, burst_interval_s=2.0).schedule(0.5)
    assert t.tolist() == [0.0] * 20


def test_burst_shape_derives_the_third_of_rate_size_interval() -> None:
    assert burst_shape(200.0, 20, None) == (20, pytest.approx(0.1))
    assert burst_shape(400.0, None, 0.1) == (40, 0.1)
    assert burst_shape(999.0, 20, 0.1) == (20, 0.1)  # both given: the rate follows
    assert burst_shape(100.0, None, None) == (DEFAULT_BURST_SIZE, pytest.approx(0.2))
    assert burst_shape(1.0, None, 0.1) == (1, 0.1)  # never a burst of zero


def test_arrivals_at_a_rate_and_the_fixed_burst_rate() -> None:
    step = Arrivals("burst", burst_size=20).at(400.0)
    assert (step.burst_size, step.burst_interval_s, step.rate) == (20, 0.05, 400.0)
    fixed = Arrivals("burst", burst_size=20, burst_interval_s=0.1)
    assert fixed.fixed_rate == pytest.approx(200.0)
    assert fixed.at(50.0).rate == pytest.approx(200.0)
    # Interval given: the size is rounded, and the step's rate is what that size gives.
    assert Arrivals("burst", burst_interval_s=0.1).at(333.0).rate == pytest.approx(330.0)
    assert Arrivals("poisson").fixed_rate is None
    assert Arrivals("burst", burst_size=20).at(400.0).as_dict() == {
        "process": "burst",
        "rate": 400.0,
        "burst_size": 20,
        "burst_interval_ms": 50.0,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "uniform"}, "must be one of constant, poisson, burst"),
        ({"kind": "burst", "burst_size": 0}, "burst size must be at least 1"),
        ({"kind": "burst", "burst_interval_s": 0.0}, "burst interval must be positive"),
    ],
)
def test_bad_arrival_options_are_one_line_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Arrivals(**kwargs)


# -- the generator sending a burst, against a real (in-test) HTTP server on loopback ---

ANSWER_DELAY_S = 0.05


async def _slow_server() -> asyncio.Server:
    """Answers every request on a connection after ANSWER_DELAY_S, one at a time."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(ANSWER_DELAY_S)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def _burst(connections: int) -> loadgen.StepResult:
    server = await _slow_server()
    port = server.sockets[0].getsockname()[1]
    reqs = loadgen.build_requests("127.0.0.1", port, "/x", [b"{}"], {})
    step = Arrivals("burst", burst_size=10, burst_interval_s=1.0).at(10.0)
    try:
        return await loadgen.run_step(
            "127.0.0.1", port, reqs, 10.0, 0.5, connections, loadgen.classify_status, step
        )
    finally:
        server.close()
        await server.wait_closed()


def test_a_burst_with_enough_connections_goes_out_at_once() -> None:
    res = asyncio.run(_burst(connections=10))
    assert res.scheduled == 10 and all(s.ok for s in res.samples) and len(res.samples) == 10
    assert res.conn_waits == 0
    assert res.arrivals is not None and res.arrivals.kind == "burst"


def test_a_burst_short_of_connections_queues_and_the_wait_counts_in_latency() -> None:
    res = asyncio.run(_burst(connections=4))
    assert len(res.samples) == 10 and all(s.ok for s in res.samples)
    # 4 go out at once; the other 6 wait for a connection to come free.
    assert res.conn_waits == 6
    # The last two go out in the third round on their connections: their latency, from
    # the burst's scheduled time, spans three answers.
    slowest = sorted(s.latency_s for s in res.samples)[-2:]
    assert min(slowest) >= 3 * ANSWER_DELAY_S
