"""The load-test tooling runs end to end: the benchmark on a tiny ladder, locust briefly.

No timing asserts: the numbers depend on the machine. These check that the harness
starts the whole stack, drives every scenario, scrapes the gateway's histograms and
writes its report, and that locust's exit code reflects the targets.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.procs import PYTHON, ROOT, GatewayServer

LOCUST = str(Path(PYTHON).with_name("locust"))


def test_benchmark_completes_on_a_tiny_ladder(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [PYTHON, "-m", "loadtests.bench", "--quick", "--rates", "20,40", "--duration", "0.5",
         "--baseline-ref", "HEAD", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    names = {s["name"] for s in data["scenarios"]}
    assert names == {
        "gateway", "gateway-before", "naive", "triton-direct", "embedded", "gateway-fp32",
        "gateway-breaker-tuned", "fallback",
    }  # fmt: skip
    by = {s["name"]: s for s in data["scenarios"]}
    for s in data["scenarios"]:
        assert s["steps"], s["name"]
        step = s["steps"][0]
        assert step["ok"] > 0 and step["p99_ms"] is not None, s["name"]
        assert {"generator", "others"} <= set(step["cpu_cores"]), s["name"]
    # The gateway's own stage histograms were read, and the fallback scenario fell back.
    assert by["gateway"]["steps"][0]["stages"]["features"]["count"] > 0
    assert by["fallback"]["steps"][0]["fallback_rate"] > 0.5
    md = (out / "benchmark.md").read_text()
    assert "## Targets" in md and "latency_vs_throughput.png" in md
    assert (out / "latency_vs_throughput.png").stat().st_size > 0


def _locust(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOCUST, "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless", "-H", url,
         "-u", "4", "-r", "4", "-t", "3s", "--only-summary", "--loglevel", "WARNING", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.fixture
def embedded_gateway(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    return gateway_factory({"GATEWAY_LOG_LEVEL": "WARNING"})


def test_locust_exit_code_reflects_targets(embedded_gateway: GatewayServer) -> None:
    met = _locust(
        embedded_gateway.url, "--p99-ms", "60000", "--max-error-rate", "1",
        "--max-fallback-rate", "1",
    )  # fmt: skip
    assert met.returncode == 0, met.stderr[-3000:]
    assert "all targets met" in met.stderr
    missed = _locust(embedded_gateway.url, "--p99-ms", "0.001")
    assert missed.returncode == 1, missed.stderr[-3000:]
    assert "MISSED (P99" in missed.stderr


def test_locust_targets_from_the_environment(embedded_gateway: GatewayServer) -> None:
    import os

    env = dict(os.environ, LOCUST_P99_MS="0.001")
    proc = subprocess.run(
        [LOCUST, "-f", str(ROOT / "loadtests" / "locustfile.py"), "--headless",
         "-H", embedded_gateway.url, "-u", "2", "-r", "2", "-t", "2s", "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "P99" in proc.stderr and "> 0.001 ms" in proc.stderr
