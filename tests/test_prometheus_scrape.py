"""A real scrape: Debian's Prometheus on loopback scrapes a running gateway under load.

The P99 comes back through Prometheus's HTTP API with ``histogram_quantile(0.99, ...)``,
the way the recording rules and the dashboard compute it. With ``--workers 2`` one
scrape must see both workers (prometheus-client's multiprocess mode): the per-worker
sample files in PROMETHEUS_MULTIPROC_DIR each hold part of the requests, and the one
scraped total equals every request sent. prometheus-adapter's queries for the HPA
(deploy/k8s/prometheus-adapter/config.yaml) run against the same real scrape.

The shipped recording rules and alerts (deploy/prometheus/rules/) are evaluated by the
same real Prometheus over a real scrape: the answered-request P99, the fallback, shed
and error ratios, and GatewayDependencyDown firing for a gateway whose Redis is
unreachable. The test copy changes only how often rules run (1 s) and each alert's
``for`` (0 s); the shipped values are what ``promtool test rules`` checks
(tests/test_deploy.py).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prom_mp

from gateway.metrics import LATENCY_BUCKETS, OUTCOMES
from tests.procs import ROOT, GatewayServer, free_port, wait_http

# The scrape interval: short so a few seconds of load give several samples.
SCRAPE_INTERVAL_S = 1
# Load: bounded in time, loopback only, a few concurrent clients.
LOAD_SECONDS = 4.0
CLIENTS = 4


@dataclass
class Prometheus:
    """Debian's prometheus on a free loopback port, scraping ``targets`` every second."""

    workdir: Path
    targets: list[str]
    # Target labels, as the Prometheus Operator attaches them to a pod's series.
    labels: dict[str, str] = field(default_factory=dict)
    rule_files: list[Path] = field(default_factory=list)
    evaluation_interval: str = "15s"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log: BinaryIO | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (Debian package: prometheus)"
        config = self.workdir / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                        "evaluation_interval": self.evaluation_interval,
                    },
                    "rule_files": [str(p) for p in self.rule_files],
                    "scrape_configs": [
                        {
                            "job_name": "gateway",
                            "scrape_timeout": "900ms",
                            "static_configs": [{"targets": self.targets, "labels": self.labels}],
                        }
                    ],
                }
            )
        )
        self.log = open(self.workdir / "prometheus.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )  # fmt: skip
        wait_http(f"{self.url}/-/ready", 30, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        if self.log:
            self.log.close()

    def query(self, expr: str) -> list[dict]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def api(self, path: str) -> dict:
        """``/api/v1/<path>``'s data (rules, alerts)."""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return dict(body["data"])

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, ok: Callable[[float], bool], timeout: float = 20) -> float:
        """Poll ``expr`` until its single value satisfies ``ok``; return that value."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if value is not None and not math.isnan(value) and ok(value):
                return value
            time.sleep(0.2)
        raise AssertionError(f"{expr} never satisfied the condition in {timeout} s (last {value})")


@pytest.fixture
def prometheus_for(tmp_path) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(*targets: str, **kw) -> Prometheus:
        prom = Prometheus(tmp_path / f"prom-{len(started)}", list(targets), dict(POD_LABELS), **kw)
        prom.workdir.mkdir()
        started.append(prom)
        return prom.start()

    yield start
    for prom in started:
        prom.stop()


def run_load(base_url: str, seconds: float, clients: int, new_connections: bool) -> list[float]:
    """``clients`` threads POST /predict for ``seconds``; the client-side latencies.

    With ``new_connections`` every request opens its own connection, so the kernel hands
    them to whichever uvicorn worker accepts first.
    """
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker(n: int) -> None:
        mine = []
        client = httpx.Client(base_url=base_url, timeout=5)
        i = 0
        try:
            while time.monotonic() < deadline:
                body = {"user_id": f"u{(n * 7919 + i) % 10_000}",
                        "item_ids": [f"i{(i + k) % 5_000}" for k in range(50)]}  # fmt: skip
                t0 = time.perf_counter()
                if new_connections:
                    r = httpx.post(f"{base_url}/predict", json=body, timeout=5)
                else:
                    r = client.post("/predict", json=body)
                mine.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
                i += 1
        finally:
            client.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return latencies


def bucket_ceiling(seconds: float) -> float:
    """The smallest histogram bucket bound at or above ``seconds``."""
    return next((b for b in LATENCY_BUCKETS if b >= seconds), math.inf)


POD_LABELS = {"namespace": "gateway-test", "pod": "gateway-0"}
ADAPTER_CONFIG = ROOT / "deploy" / "k8s" / "prometheus-adapter" / "config.yaml"

P99 = (
    "histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket"
    '{job="gateway"}[1m])))'
)
COUNT = 'sum(gateway_request_duration_seconds_count{job="gateway"})'


def test_p99_read_back_through_prometheus(
    gateway_factory: Callable[..., GatewayServer], prometheus_for: Callable[..., Prometheus]
) -> None:
    """Under a short load, Prometheus holds the gateway's histogram; its P99 is the
    gateway's own view, so it is positive and no higher than the bucket bound above the
    P99 the clients saw (the server's clock starts later and stops earlier)."""
    gw = gateway_factory(ready=True)
    prom = prometheus_for(gw.url.removeprefix("http://"))
    prom.wait_for('up{job="gateway"}', lambda v: v == 1)
    prom.wait_for(COUNT, lambda v: v == 0)  # scraped once before any request

    p99_during: list[float] = []
    latencies: list[float] = []

    def load() -> None:
        latencies.extend(run_load(gw.url, LOAD_SECONDS, CLIENTS, new_connections=False))

    loader = threading.Thread(target=load)
    loader.start()
    # Read the P99 back while the load still runs.
    p99_during.append(prom.wait_for(P99, lambda v: v > 0, timeout=LOAD_SECONDS + 10))
    loader.join(LOAD_SECONDS + 40)
    assert latencies, "the load sent nothing"

    # Wait for a scrape after the load: then the scraped count is every request sent.
    sent = len(latencies)
    prom.wait_for(COUNT, lambda v: v == sent)
    p99 = prom.wait_for(P99, lambda v: v > 0)
    client_p99 = sorted(latencies)[int(0.99 * (sent - 1))]
    assert 0 < p99 <= bucket_ceiling(client_p99), (p99, client_p99)
    assert 0 < p99_during[0] < 1.0
    # Per-stage histograms are scraped too (the recording rules and panels use them).
    stages = {
        r["metric"]["stage"]
        for r in prom.query('gateway_stage_duration_seconds_count{job="gateway"} > 0')
    }
    assert stages == {"features", "inference", "postprocess"}

    # The HPA's per-pod metrics, computed by prometheus-adapter's own queries (the
    # rule config in deploy/k8s) over this real scrape: each gives this pod a value.
    for rule in yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]:
        series = rule["name"]["matches"].strip("^$")
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", ",".join(f'{k}="{v}"' for k, v in POD_LABELS.items()))
            .replace("<<.GroupBy>>", "pod")
        )
        result = prom.query(expr)
        assert [r["metric"] for r in result] == [{"pod": "gateway-0"}], (expr, result)
        if series.endswith("_count"):  # the request rate the HPA scales on
            assert float(result[0]["value"][1]) > 0, (expr, result)


def per_worker_counts(mp_dir: Path) -> dict[str, float]:
    """/predict count per worker pid, read from each worker's own histogram file."""
    counts = {}
    for path in mp_dir.glob("histogram_*.db"):
        pid = path.stem.removeprefix("histogram_")
        one = mp_dir / f"only-{pid}"
        one.mkdir()
        shutil.copy(path, one / path.name)
        registry = CollectorRegistry()
        prom_mp.MultiProcessCollector(registry, path=str(one))
        counts[pid] = sum(
            s.value
            for fam in registry.collect()
            for s in fam.samples
            if s.name == "gateway_request_duration_seconds_count"
        )
    return counts


def test_one_scrape_sees_both_workers(
    gateway_factory: Callable[..., GatewayServer],
    prometheus_for: Callable[..., Prometheus],
    tmp_path: Path,
) -> None:
    """``--workers 2``: requests land on both workers, and one scrape counts them all."""
    mp_dir = tmp_path / "multiproc"
    mp_dir.mkdir()
    gw = gateway_factory(env={"PROMETHEUS_MULTIPROC_DIR": str(mp_dir)}, workers=2, ready=True)
    prom = prometheus_for(gw.url.removeprefix("http://"))
    prom.wait_for(COUNT, lambda v: v == 0)
    latencies = run_load(gw.url, 3.0, CLIENTS, new_connections=True)
    sent = len(latencies)
    assert sent > 0
    prom.wait_for(COUNT, lambda v: v == sent)

    per_worker = per_worker_counts(mp_dir)
    served = {pid: n for pid, n in per_worker.items() if n > 0}
    assert len(served) == 2, f"requests per worker pid: {per_worker}"
    assert sum(served.values()) == sent
    assert prom.wait_for(P99, lambda v: v > 0) < 1.0


# ---- the shipped rules over a real scrape ----------------------------------------------

RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"
# Each direction of every Redis exchange of the healthy gateway is delayed this much by a
# fault proxy, so each of its answers takes at least 2 x 4 = 8 ms; still inside the
# 15 ms features budget, so the model answers.
REDIS_DELAY_MS = 4
# A bucket bound at or under 8 ms: histogram_quantile interpolates inside a bucket, so a
# quantile that lands among >= 8 ms requests reads at least the lower bound of theirs.
ANSWERED_FLOOR_S = 0.007
ANSWERED_PER_GATEWAY = 10
# Cheap 4xx (GET /predict: 405 before the body is read) 150 times as many as the answered
# requests: over every outcome the P99 would land among them, far under 7 ms.
CLIENT_ERRORS = 3_000


def rules_for_test(dest: Path) -> list[Path]:
    """The shipped rule files with only the cadence changed: every group evaluated each
    second and every alert firing at once (``for: 0s``)."""
    paths = []
    for path in sorted(RULES_DIR.glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        for group in doc["groups"]:
            group["interval"] = "1s"
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = "0s"
        out = dest / path.name
        out.write_text(yaml.safe_dump(doc, sort_keys=False))
        paths.append(out)
    return paths


def post_predict(url: str, n: int) -> tuple[float, dict]:
    body = {"user_id": f"u{n}", "item_ids": [f"i{(n + k) % 5_000}" for k in range(50)]}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/predict", json=body, timeout=5)
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    return took, r.json()


def send_client_errors(url: str, count: int) -> None:
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(count):
            assert client.get("/predict").status_code == 405


def test_shipped_rules_over_a_real_scrape(
    gateway_factory: Callable[..., GatewayServer],
    prometheus_for: Callable[..., Prometheus],
    redis_server,
    proxy_factory,
    tmp_path: Path,
) -> None:
    """Two gateways in one job: one on a slowed real Redis, one whose Redis is unreachable.
    A real Prometheus scrapes both and evaluates the shipped rules. Latency quantiles and
    the fallback ratio count answered requests only (the many fast 4xx beside them change
    neither); shed and error ratios are 0; GatewayDependencyDown fires for features, for
    half the job's pods, and not for the model; the pod with Redis down stays ready."""
    proxy = proxy_factory(redis_server.url.removeprefix("redis://").removesuffix("/0"))
    proxy.set("latency", ms=REDIS_DELAY_MS)
    healthy = gateway_factory(env={"GATEWAY_REDIS_URL": f"redis://{proxy.address}/0"}, ready=True)
    no_redis = gateway_factory(
        env={"GATEWAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}, ready=True
    )
    prom = prometheus_for(
        healthy.url.removeprefix("http://"),
        no_redis.url.removeprefix("http://"),
        rule_files=rules_for_test(tmp_path),
        evaluation_interval="1s",
    )
    prom.wait_for('count(up{job="gateway"} == 1)', lambda v: v == 2)
    # Scraped once before any request: every outcome's series of both, at zero.
    prom.wait_for(
        'count(gateway_request_duration_seconds_count{job="gateway"} == 0)',
        lambda v: v == 2 * len(OUTCOMES),
    )

    # The pod without Redis is ready (it answers from the fallback) and says why.
    ok, degraded = (httpx.get(f"{gw.url}/readyz", timeout=5) for gw in (healthy, no_redis))
    assert ok.status_code == 200 and ok.json()["status"] == "ready", ok.text
    assert degraded.status_code == 200, degraded.text
    body = degraded.json()
    assert body["status"] == "degraded" and body["dependencies"]["features"]["ok"] is False
    assert body["dependencies"]["model"]["ok"] is True

    errors = threading.Thread(target=send_client_errors, args=(healthy.url, CLIENT_ERRORS))
    errors.start()
    answered: list[float] = []
    fallbacks = 0
    # Spread over about two seconds: several scrapes see the counts grow.
    for n in range(ANSWERED_PER_GATEWAY):
        for gw in (healthy, no_redis):
            took, result = post_predict(gw.url, n)
            answered.append(took)
            fallbacks += result["fallback"] is not None
        time.sleep(0.2)
    errors.join(120)
    assert not errors.is_alive()
    sent = len(answered) + CLIENT_ERRORS
    prom.wait_for(COUNT, lambda v: v == sent)

    # Every rule evaluates without error (a PromQL matching error shows only at runtime).
    def rules_ok() -> list[str]:
        rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
        assert rules
        return [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules
                if r["health"] != "ok"]  # fmt: skip

    deadline = time.monotonic() + 10
    while rules_ok() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not rules_ok(), rules_ok()

    # The answered P99 lands among the healthy gateway's >= 8 ms answers, at most at the
    # bucket bound over the slowest answer a client saw; over every outcome it would not.
    p99 = prom.wait_for(
        'job:gateway_request_duration_seconds:p99_5m{job="gateway"}', lambda v: v > 0
    )
    assert ANSWERED_FLOOR_S <= p99 <= bucket_ceiling(max(answered)), (p99, max(answered))
    every_outcome = prom.wait_for(
        "histogram_quantile(0.99, sum by (job, le) "
        '(rate(gateway_request_duration_seconds_bucket{job="gateway"}[5m])))',
        lambda v: v > 0,
    )
    assert every_outcome < ANSWERED_FLOOR_S, (
        f"over every outcome the P99 is {every_outcome}: the 4xx did not dominate as "
        "planned, so this run cannot tell the answered P99 from the plain one"
    )

    # The fallback ratio is the clients' share of fallback answers (about half: every
    # answer of the gateway without Redis), not diluted by the 4xx (that would be < 1%).
    share = fallbacks / len(answered)
    assert share >= 0.5, share
    prom.wait_for(
        'job:gateway_fallback_ratio:rate5m{job="gateway"}', lambda v: abs(v - share) < 0.1
    )
    reasons = {
        r["metric"]["reason"]
        for r in prom.query('job_reason:gateway_fallback_ratio:rate5m{job="gateway"} > 0')
    }
    assert "features_unavailable" in reasons, reasons
    assert prom.wait_for('job:gateway_requests:rate5m{job="gateway"}', lambda v: v > 0) > 0
    for ratio in ("shed", "error"):
        prom.wait_for(f'job:gateway_{ratio}_ratio:rate5m{{job="gateway"}}', lambda v: v == 0)

    # The alerts: features down in one pod of two; the fallback ratio over 1%.
    def firing() -> list[dict]:
        return [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(
        a["labels"]["alertname"] == "GatewayDependencyDown" for a in firing()
    ):
        time.sleep(0.2)
    alerts = firing()
    down = [a for a in alerts if a["labels"]["alertname"] == "GatewayDependencyDown"]
    assert [a["labels"] for a in down] == [
        {"alertname": "GatewayDependencyDown", "job": "gateway", "dependency": "features",
         "severity": "critical"}
    ], alerts  # fmt: skip
    assert float(down[0]["value"]) == 0.5
    assert "down for 50% of the pods in job gateway" in down[0]["annotations"]["summary"]
    names = {a["labels"]["alertname"] for a in alerts}
    assert "GatewayFallbackRatioHigh" in names, alerts
    assert not names & {"GatewaySheddingSustained", "GatewayErrorRatioHigh"}, alerts
