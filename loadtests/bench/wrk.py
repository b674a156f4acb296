"""Closed-loop load with ``wrk`` (Debian's wrk 4.1): :func:`run_wrk` -> :class:`WrkResult`.

wrk keeps ``connections`` keep-alive connections busy: each sends its next request as
soon as the previous answer is in (closed loop). Throughput at a given concurrency is
what it measures well; its latency is not an open-loop latency (see the limits below).

The request bodies cycle through a prebuilt list, one per line of a file that a small
Lua script reads in ``init`` and formats once (``wrk.format``), so ``request()`` only
returns the next prebuilt string: wrk's own docs call per-request formatting expensive.
No ``response()`` hook: with one, wrk hands every response to Lua, which costs it CPU
on the machine it measures; wrk then counts but does not read bodies, so a fallback
answer (a 200) is not visible here: read the gateway's ``gateway_fallback_total``
around the run instead.

wrk's limits, which every report of these numbers should carry:

- Closed loop: when the server stalls, wrk stops sending, so a stall shows up as a few
  slow samples instead of in every request that would have arrived (coordinated
  omission). P99 here is the P99 of requests *sent*, from the moment each was written.
- Latency percentiles are wrk's, at microsecond resolution; requests over ``--timeout``
  (2 s here) are counted as timeouts and left out of the distribution.
- Non-2xx: wrk counts responses with status > 399 (``errors.status``); the servers
  measured here send no 1xx or 3xx, so requests minus that is the 2xx goodput.
- ``-d`` takes whole seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Requests slower than this are wrk timeouts (the gateway's own total budget is 50 ms,
# its shed path answers at once; 2 s is far past either, as in loadgen.py).
TIMEOUT_S = 2

_LUA = r"""
local reqs, n, i = {}, 0, 0
local threads = 0

-- Runs in wrk's main Lua state, once per thread before it starts: each thread starts
-- at a different place in the list, not all on the same request.
function setup(thread)
  threads = threads + 1
  thread:set("offset", threads * 997)
end

function init(args)
  local headers = {["Content-Type"] = "application/json"}
  for line in io.lines(args[1]) do
    n = n + 1
    reqs[n] = wrk.format("POST", nil, headers, line)
  end
  i = (offset or 0) % n
end

function request()
  i = i % n + 1
  return reqs[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, ' ..
    '"read": %d, "write": %d, "status": %d, "timeout": %d, "mean_us": %.1f, ' ..
    '"max_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency.mean, latency.max, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end
"""


class WrkError(RuntimeError):
    """wrk could not run or did not report."""


@dataclass
class WrkResult:
    """One wrk run. Latencies in milliseconds, from wrk's own distribution."""

    connections: int
    threads: int
    seconds: float  # as wrk measured the run
    requests: int  # completed responses, any status
    non_2xx: int  # responses with status > 399
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout
    mean_ms: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0

    @property
    def rps(self) -> float:
        """All completed responses per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def goodput(self) -> float:
        """2xx responses per second."""
        return (self.requests - self.non_2xx) / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"rps": self.rps, "goodput_rps": self.goodput}


def _parse(stdout: str, connections: int, threads: int) -> WrkResult:
    line = next((ln for ln in stdout.splitlines() if ln.startswith("WRK_RESULT ")), None)
    if line is None:
        raise WrkError(f"wrk printed no result: {stdout[-500:]!r}")
    d = json.loads(line[len("WRK_RESULT ") :])
    return WrkResult(
        connections=connections,
        threads=threads,
        seconds=d["duration_us"] / 1e6,
        requests=d["requests"],
        non_2xx=d["status"],
        socket_errors={k: d[k] for k in ("connect", "read", "write", "timeout")},
        mean_ms=d["mean_us"] / 1e3,
        p50_ms=d["p50_us"] / 1e3,
        p90_ms=d["p90_us"] / 1e3,
        p99_ms=d["p99_us"] / 1e3,
        p999_ms=d["p999_us"] / 1e3,
        max_ms=d["max_us"] / 1e3,
    )


def run_wrk(
    url: str,
    bodies: Sequence[bytes],
    connections: int,
    seconds: int,
    threads: int = 1,
    timeout_s: int = TIMEOUT_S,
) -> WrkResult:
    """POST ``bodies`` (JSON, cycled) to ``url`` over ``connections`` connections for
    ``seconds`` whole seconds with ``threads`` wrk threads; wrk's numbers back.

    Raises :class:`WrkError` when wrk is missing, fails or prints no result; the run is
    bounded by ``seconds`` plus a margin, and wrk never outlives this call.
    """
    binary = shutil.which("wrk")
    if binary is None:
        raise WrkError("wrk is not installed (Debian package wrk; ./scripts/test installs it)")
    if connections < 1 or seconds < 1 or threads < 1:
        raise WrkError("connections, seconds and threads must each be at least 1")
    if not bodies:
        raise WrkError("no request bodies")
    threads = min(threads, connections)  # wrk refuses more threads than connections
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        body_file = Path(tmp) / "bodies.txt"
        with body_file.open("wb") as f:
            for b in bodies:
                if b"\n" in b:
                    raise WrkError("a request body contains a newline (one body per line)")
                f.write(b + b"\n")
        script = Path(tmp) / "bodies.lua"
        script.write_text(_LUA)
        cmd = [
            binary, "-c", str(connections), "-t", str(threads), "-d", f"{seconds}s",
            "--timeout", f"{timeout_s}s", "-s", str(script), url, "--", str(body_file),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 30
            )
        except subprocess.TimeoutExpired as exc:
            raise WrkError(f"wrk ran past {seconds} s + margin") from exc
    if proc.returncode != 0:
        raise WrkError(f"wrk exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return _parse(proc.stdout, connections, threads)
