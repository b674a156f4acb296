"""An open-loop HTTP/1.1 load generator on raw asyncio streams.

Open loop: every request has a *scheduled* send time fixed before the step starts by
its arrival process (``arrivals.py``: constant, Poisson or bursts), whatever happened
to the ones before it, and its latency is measured from that scheduled time, not from
when a connection was free to send it. A closed-loop tool (wrk, locust, hey) waits
for an answer before sending the next request, so when the server stalls it stops
sending and the stall shows up in one sample instead of in every request that
should have been sent meanwhile: coordinated omission. Here a stall keeps requests
queueing at the generator, and their waiting time counts.

Why raw asyncio streams on uvloop and not httpx or aiohttp: every request body is
encoded once before the run, and each request costs one ``write`` and two reads
(headers, then exactly Content-Length bytes) of keep-alive HTTP/1.1; a client library
adds per-request objects (headers, cookies, URL parsing) that cost tens of
microseconds of CPU each, on a 2-core box where every microsecond the generator
spends is taken from what it measures. wrk2 (the open-loop wrk) is not packaged in
Debian; ``wrk`` is closed loop. The benchmark reports this process's CPU time next
to the servers' so its cost is visible.

Connections: each of ``connections`` workers holds one keep-alive connection and sends
one request at a time on it. A burst of N therefore needs N idle connections to go out
at once; requests that find none wait in the generator's queue (FIFO) for the next
free connection. That wait still counts in their latency (it runs from the scheduled
time), shows as *send lag*, and each such request is counted in ``conn_waits``, so a
generator short of connections is visible in the report, not silently turned into a
slower arrival process.

Every run is bounded: the schedule's length (``rate * duration`` requests on average)
and a drain deadline after the step's end; nothing outlives ``run_step``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from loadtests.bench.arrivals import Step

# A request that has not answered after this long is an error (the gateway's own total
# budget is 50 ms; two seconds is far past anything the gateway should ever take).
REQUEST_TIMEOUT_S = 2.0
# How long after the last scheduled send the step waits for stragglers.
DRAIN_S = 3.0


@dataclass
class Sample:
    """One answered (or failed) request."""

    latency_s: float  # from its scheduled send time to its last response byte
    ok: bool
    fallback: bool = False
    server_ms: tuple[float, float, float, float] | None = None  # features, inference, post, total
    # From its scheduled time to the moment it was written: the generator's own lag
    # (timer granularity, about 1 ms on an event loop) plus waiting for a free connection.
    send_lag_s: float = 0.0
    error: str = ""  # why it failed: "HTTP 503", "TimeoutError", ...


@dataclass
class StepResult:
    """Everything one rate step measured."""

    rate: float
    duration_s: float
    scheduled: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    unsent: int = 0  # scheduled but never sent before the drain deadline
    arrivals: Step | None = None
    # Requests released when no connection was idle: they queued in the generator.
    conn_waits: int = 0
    span_s: float = 0.0  # the time the schedule stands for (see Step.span_s)

    @property
    def achieved_rps(self) -> float:
        """Answered requests per second, over the schedule's span or the wall time it
        took, whichever is longer (a burst step ends with a burst, not after its gap)."""
        ok = sum(s.ok for s in self.samples)
        span = max(self.wall_s, self.span_s)
        return ok / span if span else 0.0

    @property
    def errors(self) -> int:
        return sum(not s.ok for s in self.samples) + self.unsent


Classify = Callable[[int, bytes], Sample]


def classify_gateway(status: int, body: bytes) -> Sample:
    """A /predict answer: ok when 200; fallback flag and the server's own stage timings."""
    if status != 200:
        return Sample(0.0, False, error=f"HTTP {status}")
    fallback = b'"fallback":null' not in body
    server_ms = None
    k = body.rfind(b'"timings_ms":')
    if k >= 0:
        t = orjson.loads(body[k + 13 : -1])
        server_ms = (t["features"], t["inference"], t["postprocess"], t["total"])
    return Sample(0.0, True, fallback, server_ms)


def classify_status(status: int, body: bytes) -> Sample:
    """Any other endpoint: ok when 200."""
    return Sample(0.0, status == 200, error="" if status == 200 else f"HTTP {status}")


def build_requests(
    host: str, port: int, path: str, bodies: Sequence[bytes], extra_headers: dict[str, str]
) -> list[bytes]:
    """Encode every request once, before the clock starts."""
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    for k, v in extra_headers.items():
        head += f"{k}: {v}\r\n"
    return [(head + f"Content-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    # At a line start: Triton's binary responses also carry Inference-Header-Content-Length.
    k = lower.find(b"\r\ncontent-length:")
    if k < 0:
        raise ValueError("response without Content-Length")
    end = lower.find(b"\r\n", k + 2)
    body = await reader.readexactly(int(lower[k + 17 : end]))
    return status, body


async def run_step(
    host: str,
    port: int,
    requests: Sequence[bytes],
    rate: float,
    duration_s: float,
    connections: int,
    classify: Classify = classify_gateway,
    arrivals: Step | None = None,
) -> StepResult:
    """Send one step's requests on schedule over ``connections`` keep-alive connections,
    cycling through ``requests``; return every sample.

    The schedule comes from ``arrivals`` (default: constant at ``rate``; when given, its
    own rate is the step's)."""
    step = arrivals or Step("constant", rate)
    offsets = step.schedule(duration_s).tolist()
    n = len(offsets)
    result = StepResult(step.rate, duration_s, n, arrivals=step, span_s=step.span_s(n, duration_s))
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    samples = result.samples
    perf = time.perf_counter
    counter = iter(range(1 << 62))
    idle = 0  # workers waiting on the queue (each with its connection free)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection(host, port), REQUEST_TIMEOUT_S)

    async def worker() -> None:
        nonlocal idle
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        while True:
            idle += 1
            sched = await queue.get()
            idle -= 1
            if sched is None:
                break
            sent = perf()
            req = requests[next(counter) % len(requests)]
            try:
                if conn is None:
                    conn = await connect()
                reader, writer = conn
                sent = perf()
                writer.write(req)
                status, body = await asyncio.wait_for(_read_response(reader), REQUEST_TIMEOUT_S)
                sample = classify(status, body)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                sample = Sample(0.0, False, error=type(exc).__name__)
                if conn is not None:
                    conn[1].close()
                conn = None
            sample.latency_s = perf() - sched
            sample.send_lag_s = sent - sched
            samples.append(sample)
        if conn is not None:
            conn[1].close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    await asyncio.sleep(0)  # let every worker reach the queue before the clock starts
    t_start = perf() + 0.01
    k = 0
    while k < n:
        now = perf()
        # Release every request whose time has come (the event loop wakes up about once
        # a millisecond; latency still counts from each request's own scheduled time).
        # A burst is released here in one go, all its requests with the same time.
        while k < n and t_start + offsets[k] <= now:
            queue.put_nowait(t_start + offsets[k])
            # A released request sits in the queue until a worker takes it; more queued
            # than idle workers means this one has no free connection.
            if queue.qsize() > idle:
                result.conn_waits += 1
            k += 1
        if k < n:
            await asyncio.sleep(max(0.0, t_start + offsets[k] - perf()))
    for _ in workers:
        queue.put_nowait(None)
    _, pending = await asyncio.wait(workers, timeout=t_start + duration_s + DRAIN_S - perf())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    result.unsent = n - len(samples)
    result.wall_s = perf() - t_start
    return result
