"""Arrival processes for the open-loop generator: when each request of a step is due.

- ``constant``: request ``k`` at ``k / rate``, evenly spread.
- ``poisson``: independent arrivals at the same mean rate; inter-arrival times are
  exponential, drawn from a seeded generator so a step's schedule is reproducible.
- ``burst``: ``N`` requests at the same instant every ``T`` seconds (mean rate
  ``N / T``): the shape of closed-loop clients started together and paced by a
  timer, e.g. locust users spawned at once with ``constant_throughput``.

A burst step is fixed by two of (rate, burst size, burst interval); the third is
derived (:func:`burst_shape`). Everything here is pure and deterministic: the
schedule of a step depends only on its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

KINDS = ("constant", "poisson", "burst")
# The burst size when a ladder of rates runs in burst mode and no size is given:
# locust's 20 users spawned together (docs/benchmark.md's locust command).
DEFAULT_BURST_SIZE = 20


@dataclass(frozen=True)
class Arrivals:
    """An arrival process, before a rate is chosen: the ``--arrivals`` options."""

    kind: str = "constant"
    burst_size: int | None = None  # burst mode: requests per burst
    burst_interval_s: float | None = None  # burst mode: seconds between bursts
    seed: int = 1  # poisson mode

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            kinds = ", ".join(KINDS)
            raise ValueError(f"arrival process must be one of {kinds}, not {self.kind!r}")
        if self.burst_size is not None and self.burst_size < 1:
            raise ValueError(f"burst size must be at least 1, not {self.burst_size}")
        if self.burst_interval_s is not None and self.burst_interval_s <= 0:
            raise ValueError(f"burst interval must be positive, not {self.burst_interval_s}")

    @property
    def fixed_rate(self) -> float | None:
        """The one rate a burst process with both size and interval given implies."""
        if self.kind == "burst" and self.burst_size and self.burst_interval_s:
            return self.burst_size / self.burst_interval_s
        return None

    def at(self, rate: float) -> Step:
        """The arrival process of one step at mean ``rate`` requests/s."""
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        if self.kind != "burst":
            return Step(self.kind, rate, seed=self.seed)
        size, interval = burst_shape(rate, self.burst_size, self.burst_interval_s)
        return Step("burst", size / interval, size, interval, self.seed)

    def describe(self) -> str:
        if self.kind != "burst":
            return self.kind
        size, interval = self.burst_size, self.burst_interval_s
        if size is not None and interval is not None:
            return f"burst of {size} every {interval * 1e3:g} ms"
        if interval is not None:
            return f"burst every {interval * 1e3:g} ms, size = rate x interval"
        return f"burst of {size or DEFAULT_BURST_SIZE}, interval = size / rate"


def burst_shape(rate: float, size: int | None, interval_s: float | None) -> tuple[int, float]:
    """(burst size, interval) for a mean ``rate``, from whichever of the two is given.

    - size and interval both given: they fix the rate (``rate`` is ignored).
    - size given (or neither: :data:`DEFAULT_BURST_SIZE`): interval = size / rate.
    - interval given: size = round(rate x interval), at least 1; the step's real rate
      is then size / interval.
    """
    if size is not None and interval_s is not None:
        return size, interval_s
    if interval_s is not None:
        return max(1, round(rate * interval_s)), interval_s
    size = size or DEFAULT_BURST_SIZE
    return size, size / rate


@dataclass(frozen=True)
class Step:
    """The arrival process of one step, at a concrete mean rate."""

    kind: str
    rate: float  # mean requests/s
    burst_size: int = 1
    burst_interval_s: float = 0.0
    seed: int = 1

    def schedule(self, duration_s: float) -> np.ndarray:
        """Send times, seconds from the step's start, ascending; never empty."""
        if self.kind == "constant":
            n = max(1, int(self.rate * duration_s))
            return np.arange(n, dtype=np.float64) / self.rate
        if self.kind == "poisson":
            return poisson_times(self.rate, duration_s, self.seed)
        return burst_times(self.burst_size, self.burst_interval_s, duration_s)

    def span_s(self, n: int, duration_s: float) -> float:
        """The time a schedule of ``n`` requests stands for: ``n / rate`` for the regular
        processes (a burst step of K bursts covers K intervals, though its last burst
        starts at (K-1) intervals), the step's duration for Poisson."""
        return duration_s if self.kind == "poisson" else n / self.rate

    def label(self) -> str:
        if self.kind == "burst":
            return f"burst {self.burst_size} / {self.burst_interval_s * 1e3:g} ms"
        return self.kind

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"process": self.kind, "rate": self.rate}
        if self.kind == "burst":
            out["burst_size"] = self.burst_size
            out["burst_interval_ms"] = self.burst_interval_s * 1e3
        if self.kind == "poisson":
            out["seed"] = self.seed
        return out


def poisson_times(rate: float, duration_s: float, seed: int) -> np.ndarray:
    """Arrival times of a Poisson process of ``rate`` on ``[0, duration_s)``.

    The seed and the rate together pick the random stream, so every step of a ladder
    has its own schedule and a rerun gets the same one.
    """
    rng = np.random.default_rng([seed, int(round(rate * 1000))])
    expected = rate * duration_s
    # Draw enough gaps to pass the end with near certainty (mean + 10 sd + 10), then
    # keep those inside the step; top up in the unlikely case it fell short.
    n = int(expected + 10 * np.sqrt(expected) + 10)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    while times[-1] < duration_s:
        more = np.cumsum(rng.exponential(1.0 / rate, n)) + times[-1]
        times = np.concatenate([times, more])
    times = times[times < duration_s]
    # A step always sends something: a very low rate may draw no arrival at all.
    return times if len(times) else np.zeros(1)


def burst_times(size: int, interval_s: float, duration_s: float) -> np.ndarray:
    """``size`` arrivals at each ``k * interval_s`` for the bursts that fit in the step
    (at least one)."""
    bursts = max(1, int(duration_s / interval_s + 1e-9))
    return np.repeat(np.arange(bursts, dtype=np.float64) * interval_s, size)
