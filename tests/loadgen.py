"""Bounded loopback load for the resilience tests, and the per-scenario results file.

Results: a test calls :func:`record` with its scenario's row; the row is held until the
test's call phase ends and written only if it passed (``settle``, called from the
``pytest_runtest_makereport`` hook in conftest.py). They go to
``$GATEWAY_RESULTS_DIR/resilience-results.json`` (default ``<repo>/.results/``, ignored
by git), never into tracked files: ``scripts/resilience_table.py FILE`` turns a results
file into the docs' tables.

A minimal HTTP/1.1 keep-alive client on asyncio streams (no httpx: its per-request CPU
cost is several times the gateway's on this 2-core machine, and it would be the
bottleneck). :class:`Load` runs it in a thread with its own event loop, so the test's
main thread can inject faults (kill Triton, pause Redis) while requests flow; every
loop is bounded by a request count and a wall-clock limit.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
RESULTS_NAME = "resilience-results.json"


def results_path() -> Path:
    """Where passing scenarios' rows go: ``$GATEWAY_RESULTS_DIR`` or ``<repo>/.results``."""
    return Path(os.environ.get("GATEWAY_RESULTS_DIR") or ROOT / ".results") / RESULTS_NAME


@dataclass
class Rec:
    """One request: when it was sent (s since the load started), how it ended."""

    t: float
    latency: float
    status: int
    reason: str | None = None  # fallback.reason on a 200, None when the model answered
    retry_after: str | None = None
    message: str | None = None  # error body's message on a non-200
    server_ms: float | None = None  # the gateway's own timings_ms.total


def body(user: int, items: int, offset: int = 0) -> bytes:
    """A /predict body for a generated user and ``items`` generated items."""
    ids = [f"i{(offset + k) % 5000}" for k in range(items)]
    return orjson.dumps({"user_id": f"u{user % 10000}", "item_ids": ids})


async def http(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    method: str,
    path: str,
    payload: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a keep-alive connection; returns (status, headers, body)."""
    head = [f"{method} {path} HTTP/1.1", "Host: gw", f"Content-Length: {len(payload)}"]
    if payload:
        head.append("Content-Type: application/json")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            hdrs[k.strip().lower()] = v.strip()
    data = await reader.readexactly(int(hdrs.get("content-length", "0")))
    return status, hdrs, data


class Load:
    """Steady load: ``rate`` requests/s over ``conns`` connections (``rate=None``: each
    connection sends its next request as soon as the last is answered)."""

    def __init__(
        self,
        port: int,
        rate: float | None = 100.0,
        conns: int = 4,
        items: int = 20,
        max_requests: int = 20_000,
        max_seconds: float = 30.0,
        headers: dict[str, str] | None = None,
        make_body: Callable[[int], bytes] | None = None,
        nice: int = 0,
    ) -> None:
        self.port = port
        self.nice = nice
        self.rate = rate
        self.conns = conns
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.headers = headers
        if make_body is None:
            # Prebuilt bodies: building JSON per request would cost the client more CPU
            # than the gateway spends shedding one.
            pool = [body(n * 7919, items, n * 31) for n in range(64)]
            make_body = lambda n: pool[n % 64]  # noqa: E731
        self.make_body = make_body
        self.recs: list[Rec] = []
        self.errors: list[str] = []  # connection-level failures (a dropped request)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = 0.0
        self._sent = 0
        self._gc_was_enabled = True

    def now(self) -> float:
        """Seconds since the load started (the clock of ``Rec.t``)."""
        return time.perf_counter() - self.t0

    async def _worker(self, k: int) -> None:
        reader = writer = None
        i = 0
        while not self._stop.is_set() and self._sent < self.max_requests:
            if self.now() > self.max_seconds:
                return
            if self.rate is not None:
                due = (i * self.conns + k) / self.rate
                i += 1
                if due > self.now():
                    await asyncio.sleep(due - self.now())
            n = self._sent
            self._sent += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                assert reader is not None
                t = self.now()
                status, hdrs, data = await asyncio.wait_for(
                    http(reader, writer, "POST", "/predict", self.make_body(n), self.headers), 10
                )
                lat = self.now() - t
            except Exception as exc:  # noqa: BLE001 - any failure is a dropped request
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            rec = Rec(t, lat, status, retry_after=hdrs.get("retry-after"))
            if status == 200 and b'"fallback":null' in data:
                rec.server_ms = float(data.rsplit(b'"total":', 1)[1].split(b"}", 1)[0])
            elif status == 200:
                doc = orjson.loads(data)
                fb = doc["fallback"]
                rec.reason = fb["reason"] if fb else None
                rec.server_ms = doc["timings_ms"]["total"]
            else:
                try:
                    rec.message = orjson.loads(data).get("message")
                except orjson.JSONDecodeError:
                    rec.message = data[:200].decode("latin-1")
            self.recs.append(rec)
            if hdrs.get("connection") == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    async def _main(self) -> None:
        await asyncio.gather(*(self._worker(k) for k in range(self.conns)))

    def start(self) -> Load:
        # A full collection of the test process's heap (pytest, numpy, ...) takes tens of
        # milliseconds and would show up as request latency: no GC while measuring.
        self._gc_was_enabled = gc.isenabled()
        gc.disable()
        self.t0 = time.perf_counter()

        def run() -> None:
            if self.nice:
                os.nice(self.nice)  # Linux: this thread only
            uvloop.run(self._main())

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> Load:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(30)
        if self._gc_was_enabled:
            gc.enable()
        assert not self._thread.is_alive(), "load generator did not stop"
        return self

    def run_for(self, seconds: float) -> Load:
        self.start()
        time.sleep(seconds)
        return self.stop()


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.99 * len(s)) - 1)]


def summarize(recs: list[Rec], dropped: int = 0) -> dict:
    """The docs table's row for one scenario."""
    lat = [r.latency for r in recs]
    return {
        "sent": len(recs) + dropped,
        "model": sum(r.status == 200 and r.reason is None for r in recs),
        "fallback": sum(r.status == 200 and r.reason is not None for r in recs),
        "shed": sum(r.status == 503 and r.retry_after is not None for r in recs),
        "5xx": sum(r.status >= 500 and not (r.status == 503 and r.retry_after) for r in recs)
        + dropped,
        "p99_ms": round(p99(lat) * 1e3, 2),
        "max_ms": round(max(lat, default=0.0) * 1e3, 2),
    }


_lock = threading.Lock()
_pending: dict[str, dict] = {}


def record(scenario: str, row: dict) -> None:
    """Hold one scenario's row; it is written when the running test passes (``settle``)."""
    with _lock:
        _pending[scenario] = {**row, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def settle(passed: bool) -> None:
    """End of a test's call phase: merge its held rows into the results file if it
    passed, drop them if not (a failed run's numbers never reach a table)."""
    with _lock:
        rows = dict(_pending)
        _pending.clear()
    if not rows or not passed or os.environ.get("GATEWAY_RESULTS_OFF"):
        return
    path = results_path()
    with _lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(path.read_text()) if path.exists() else {}
        data.setdefault("scenarios", {}).update(rows)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        tmp.replace(path)  # a reader never sees half a file
