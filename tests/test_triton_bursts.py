"""Bursts of simultaneous requests are served by the local Triton, none held in its queue.

The committed model configs once made Triton's dynamic batcher strand requests that
queued while both instances were busy: they waited for the next burst (or 500 ms) and
were then dropped (see the comments in model_repository/ctr/config.pbtxt and
loadtests/results/triton-burst.md). This runs the same bursts through the gateway's own
Triton client (``loadtests.triton_burst``) and counts what Triton failed.
"""

from __future__ import annotations

import asyncio
import subprocess

from loadtests.triton_burst import Load, RunResult, describe, run_bursts

from tests.procs import PYTHON, ROOT, TritonServer

# 30 bursts of 20 requests every 100 ms (the reported traffic shape), 10-200 rows each.
# The deadline is 80 ms, not the gateway's 30: served requests take 8-12 ms at P99 here,
# but this machine is shared and a neighbour's load has pushed a burst past 40 ms; a
# request stranded by the old configs still misses it, as it waits ~95 ms for the next
# burst.
LOAD = Load(bursts=30, size=20, interval_ms=100, min_rows=10, max_rows=200, timeout_ms=80, seed=11)
# Served requests' P99: 5x what this machine measures alone, for that noise.
OK_P99_MS = 60.0


def _run(triton: TritonServer) -> RunResult:
    return asyncio.run(
        run_bursts(triton.grpc_url, triton.metrics_url, "ctr", LOAD, "test", progress=False)
    )


def test_bursts_are_served_without_queue_drops(triton: TritonServer) -> None:
    r = _run(triton)
    requests = LOAD.bursts * LOAD.size
    assert r.dropped == 0, describe(r)
    assert r.outcomes == {"ok": requests}, describe(r)
    assert r.triton["success"] == requests, describe(r)
    assert r.ok_latency_ms["p99"] is not None and r.ok_latency_ms["p99"] < OK_P99_MS, describe(r)


def test_burst_tool_cli_reports_and_rejects_bad_input(triton: TritonServer, tmp_path) -> None:
    out = tmp_path / "bursts.json"
    proc = subprocess.run(
        [PYTHON, "-m", "loadtests.triton_burst", "--grpc", triton.grpc_url,
         "--metrics", triton.metrics_url, "--bursts", "3", "--size", "4", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "12 requests, dropped by Triton 0" in proc.stdout, proc.stdout
    assert '"requests": 12' in out.read_text()

    bad = subprocess.run(
        [PYTHON, "-m", "loadtests.triton_burst", "--grpc", triton.grpc_url,
         "--min-rows", "50", "--max-rows", "10"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--min-rows must not exceed --max-rows" in bad.stderr
    assert "Traceback" not in bad.stderr
