"""The load-test tooling runs end to end: the benchmark on a tiny ladder (every arrival
process), the wrk comparison on one-second runs, wrk itself, locust briefly.

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
from loadtests.bench.workload import Workload
from loadtests.bench.wrk import WrkError, run_wrk

from tests.procs import PYTHON, ROOT, GatewayServer

LOCUST = str(Path(PYTHON).with_name("locust"))


def _bench(*args: str, module: str = "loadtests.bench") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=240
    )


def test_benchmark_completes_on_a_tiny_ladder(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _bench(
        "--quick", "--rates", "20,40", "--duration", "0.5", "--baseline-ref", "HEAD",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    names = {s["name"] for s in data["scenarios"]}
    assert names == {
        "gateway", "gateway-before", "naive", "triton-direct", "embedded", "gateway-fp32",
        "fallback", "gateway-poisson", "gateway-burst",
        "gateway-locust", "gateway-http",
    }  # fmt: skip
    by = {s["name"]: s for s in data["scenarios"]}
    for s in data["scenarios"]:
        assert s["steps"], s["name"]
        step = s["steps"][0]
        assert step["ok"] > 0 and step["p99_ms"] is not None, s["name"]
        assert {"generator", "others"} <= set(step["cpu_cores"]), s["name"]
        assert step["arrivals"]["process"] in {"constant", "poisson", "burst"}, s["name"]
    # The gateway's own stage histograms were read, and the fallback scenario fell back.
    assert by["gateway"]["steps"][0]["stages"]["features"]["count"] > 0
    assert by["gateway-http"]["steps"][0]["fallback_rate"] < 0.5  # the HTTP transport answers
    assert by["fallback"]["steps"][0]["fallback_rate"] > 0.5
    # Each step names its arrival process; bursts keep 20 per burst, the interval follows
    # the rate (20 / 20/s = 1 s, 20 / 40/s = 0.5 s).
    assert [r["arrivals"]["process"] for r in by["gateway"]["steps"]] == ["constant"] * 2
    assert by["gateway-poisson"]["steps"][0]["arrivals"]["process"] == "poisson"
    bursts = [r["arrivals"] for r in by["gateway-burst"]["steps"]]
    assert [(b["burst_size"], b["burst_interval_ms"]) for b in bursts] == [(20, 1000), (20, 500)]
    assert by["gateway-locust"]["items"] == [10, 200]
    md = (out / "benchmark.md").read_text()
    assert "## Targets" in md and "latency_vs_throughput.png" in md
    assert "## The same gateway under different arrival processes" in md
    assert "| 40 | burst 20/500ms |" in md
    assert (out / "latency_vs_throughput.png").stat().st_size > 0


def test_benchmark_fixed_bursts_on_the_minimal_apps(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _bench(
        "--quick", "--arrivals", "burst", "--burst-size", "8", "--burst-interval-ms", "250",
        "--duration", "0.5", "--scenarios", "gateway-cpu,minimal-cpu,minimal-triton",
        "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    names = {s["name"] for s in data["scenarios"]}
    assert names == {"gateway-cpu", "minimal-cpu", "minimal-triton"}
    for s in data["scenarios"]:
        # Size and interval fix the rate: one step at 8 / 0.25 s = 32/s, two bursts.
        assert [r["arrivals"] for r in s["steps"]] == [
            {"process": "burst", "rate": 32.0, "burst_size": 8, "burst_interval_ms": 250.0}
        ], s["name"]
        step = s["steps"][0]
        assert step["scheduled"] == 16 and step["ok"] == 16, s["name"]
        assert step["fallback_rate"] == 0 and step["conn_waits"] == 0, s["name"]
    md = (out / "benchmark.md").read_text()
    assert "--arrivals burst --burst-size 8 --burst-interval-ms 250" in md


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--burst-size", "5"], "--burst-size and --burst-interval-ms need --arrivals burst"),
        (["--arrivals", "burst", "--burst-size", "80"], "bursts of 80 need at least as many"),
        (["--arrivals", "burst", "--burst-size", "20", "--burst-interval-ms", "100",
          "--rates", "10"], "give two of --rates, --burst-size, --burst-interval-ms"),
        (["--arrivals", "poisson", "--connections", "0"], "--connections must be at least 1"),
        (["--arrivals", "bursty"], "invalid choice"),
    ],
)  # fmt: skip
def test_benchmark_rejects_bad_arrival_options_in_one_line(args: list[str], message: str) -> None:
    proc = _bench(*args)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_compare_interleaves_both_pairs_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = _bench(
        "--connections", "1,2", "--seconds", "1", "--rounds", "2", "--quiet-wait", "0",
        "--profile-seconds", "1", "--profile-connections", "2", "--out", str(out),
        "--pairs", "triton-http,cpu", module="loadtests.bench.compare",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "compare.json").read_text())
    assert [(s["pair"], s["connections"]) for s in data["summaries"]] == [
        ("triton-http", 1), ("cpu", 1), ("triton-http", 2), ("cpu", 2),
    ]  # fmt: skip
    for s in data["summaries"]:
        assert s["a_stats"]["requests"] > 0 and s["b_stats"]["requests"] > 0, s
        assert s["ratio"]["goodput_rps"]["median"] > 0, s
        # Read from the gateway's gateway_fallback_total (a stall on this shared box may
        # time out a request or two); the minimal apps have no fallback.
        assert 0 <= s["a_stats"]["fallback_share"] < 0.5, s
        assert s["b_stats"]["fallbacks"] == 0, s
    # A/B, then B/A: the order alternates from round to round.
    orders = [r["order"] for r in data["rounds"]["triton-http"]["1"]]
    assert orders == [
        ["gateway-http", "minimal-triton-http"], ["minimal-triton-http", "gateway-http"]
    ]  # fmt: skip
    assert set(data["profiles"]) == {
        "gateway-http", "minimal-triton-http", "gateway-cpu", "minimal-cpu"
    }  # fmt: skip
    assert all(p["samples"] > 0 for p in data["profiles"].values())
    assert set(data["extra_cost"]) == {"triton-http", "cpu"}
    md = (out / "compare.md").read_text()
    assert "## Gateway / minimal, same run" in md
    assert "## Where the gateway's extra CPU goes" in md


def test_run_wrk_counts_goodput_and_non_2xx(embedded_gateway: GatewayServer) -> None:
    good = Workload(seed=1).bodies(20, 5)
    res = run_wrk(embedded_gateway.url + "/predict", good, connections=2, seconds=1)
    assert res.requests > 0 and res.non_2xx == 0
    assert res.goodput == res.rps > 0 and 0 < res.p50_ms <= res.p99_ms
    # A body the gateway refuses (422): every response is counted, none is goodput.
    bad = run_wrk(embedded_gateway.url + "/predict", [b'{"user_id": ""}'], 2, 1)
    assert bad.requests > 0 and bad.non_2xx == bad.requests and bad.goodput == 0
    with pytest.raises(WrkError, match="at least 1"):
        run_wrk(embedded_gateway.url + "/predict", good, connections=0, seconds=1)


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
