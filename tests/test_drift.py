"""Drift and freshness end to end: real redis-server, the local Triton, two real
``gateway serve`` pods of 2 workers each, and a real Prometheus evaluating the shipped
drift rules (deploy/prometheus/rules/gateway-drift.yml).

Pod "steady" gets traffic drawn from the training distribution (users by activity,
items by popularity, hours by the diurnal curve, devices 60/30/10); pod "shifted" the
same users and items, every request at 3 a.m. on a tablet, and a
GATEWAY_FEATURE_MAX_AGE_S of 3 s, which the features loaded at the session's start
outgrow. Each pod is its own Prometheus job, so each gets its own fleet-wide PSI.

The test copy of the rules changes only the cadence: groups every second, alerts
without ``for``, and a 5-minute window instead of an hour (covering the whole test,
so the window's PSI is the PSI of every row sent). One stack for the module.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from gateway.drift import PROFILE_FILE, SCORE_COLUMN, Profile
from gateway.modelbuild import session
from gateway.schema import DEVICES, SCHEMA
from gateway.synth import DEVICE_P, HOUR_P, make_world
from tests.procs import MODEL_REPOSITORY, ROOT, GatewayServer, RedisServer, TritonServer, wait_http
from tests.test_prometheus_scrape import SCRAPE_INTERVAL_S, Prometheus
from tests.unit.test_drift import reference_counts, reference_psi

PROFILE = Profile.from_json((MODEL_REPOSITORY / "ctr" / "1" / "drift_profile.json").read_text())
INPUTS = SCHEMA.input_columns
SHIFTED_CONTEXT = {"hour": 3, "device": "tablet"}
CONTEXT_SHIFTED = {"context.hour_sin", "context.hour_cos"} | {
    f"context.device_{d}" for d in DEVICES
}
# 600 requests of 50 items per pod: with one user and one context per request, the user
# and context columns see 600 samples, and a PSI over ten bins of 600 samples from the
# training distribution sits near 9/600 = 0.015 (0.064 at most over five seeds of 400
# requests offline), well under 0.1.
REQUESTS = 600
ITEMS = 50
CLIENTS = 4
WINDOW = "5m"
MAX_AGE_S = 3


@dataclass
class JobsPrometheus(Prometheus):
    """The real Prometheus, one scrape job per pod (``jobs``: name -> host:port)."""

    jobs: dict[str, str] = field(default_factory=dict)

    def start(self) -> JobsPrometheus:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (Debian package: prometheus)"
        config = self.workdir / "prometheus.yml"
        config.write_text(
            json.dumps(
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                        "evaluation_interval": "1s",
                    },
                    "rule_files": [str(p) for p in self.rule_files],
                    "scrape_configs": [
                        {
                            "job_name": job,
                            "scrape_timeout": "900ms",
                            "static_configs": [{"targets": [target]}],
                        }
                        for job, target in self.jobs.items()
                    ],
                }
            )
        )
        self.log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )  # fmt: skip
        wait_http(f"{self.url}/-/ready", 30, self.proc)
        return self


def drift_rules_for_test(dest: Path) -> Path:
    """The shipped drift rules, evaluated every second, alerts without ``for``, and the
    hour window shortened to one that covers the whole test."""
    doc = yaml.safe_load((ROOT / "deploy/prometheus/rules/gateway-drift.yml").read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            rule["expr"] = rule["expr"].replace("[1h]", f"[{WINDOW}]")
            if "alert" in rule:
                rule["for"] = "0s"
    out = dest / "gateway-drift.yml"
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


@dataclass
class Sent:
    """What one pod was sent and answered, and the counts NumPy expects from it."""

    counts: np.ndarray
    rows: int = 0
    fallbacks: int = 0


def requests_for(shifted: bool, seed: int) -> list[dict[str, Any]]:
    world = make_world(10_000, 5_000, 7)  # the features the session's Redis holds
    rng = np.random.default_rng(seed)
    users = rng.choice(world.n_users, REQUESTS, p=world.user_weight)
    items = rng.choice(world.n_items, (REQUESTS, ITEMS), p=world.item_weight)
    hours = rng.choice(24, REQUESTS, p=HOUR_P)
    devices = rng.choice(len(DEVICES), REQUESTS, p=DEVICE_P)
    return [
        {
            "user_id": f"u{users[k]}",
            "item_ids": [f"i{i}" for i in items[k]],
            "context": SHIFTED_CONTEXT
            if shifted
            else {"hour": int(hours[k]), "device": DEVICES[devices[k]]},
        }
        for k in range(REQUESTS)
    ]


def send(url: str, bodies: list[dict[str, Any]]) -> Sent:
    """POST every body; the NumPy bin counts of the rows the model answered: the matrix
    rebuilt from the generated world and the request's context, the scores answered."""
    world = make_world(10_000, 5_000, 7)
    sent = Sent(np.zeros(sum(c.bins for c in PROFILE.columns), dtype=np.int64))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(part: list[dict[str, Any]]) -> None:
        try:
            model = session(MODEL_REPOSITORY / "ctr" / "1" / "model.onnx")
            with httpx.Client(base_url=url, timeout=10) as c:
                for body in part:
                    r = c.post("/predict", json=body)
                    assert r.status_code == 200, r.text
                    answer = r.json()
                    if answer.get("fallback"):
                        with lock:
                            sent.fallbacks += 1
                        continue
                    user = world.user_vectors[int(body["user_id"][1:])]
                    items = world.item_vectors[[int(i[1:]) for i in body["item_ids"]]]
                    matrix = SCHEMA.assemble(user, items, SCHEMA.encode_context(body["context"]))
                    # The model's own float32 scores, as Triton computes them (onnxruntime,
                    # the same file): the answer rounds them to 6 decimals, and the INT8
                    # model's scores are discrete levels, which the score edges are too.
                    scores = model.run(None, {SCHEMA.input_name: matrix})[0][:, 0]
                    answered = np.array([s["score"] for s in answer["scores"]])
                    assert np.abs(scores - answered).max() < 1e-6
                    counts = reference_counts(PROFILE, matrix, scores)
                    with lock:
                        sent.counts += counts
                        sent.rows += len(scores)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(bodies[n::CLIENTS],)) for n in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return sent


def numpy_report(sent: Sent) -> dict[str, float]:
    out, start = {}, 0
    for c in PROFILE.columns:
        out[c.name] = reference_psi(sent.counts[start : start + c.bins], c.shares)
        start += c.bins
    return out


@dataclass
class Stack:
    pods: dict[str, GatewayServer]
    prom: JobsPrometheus
    sent: dict[str, Sent]


@pytest.fixture(scope="module")
def stack(
    redis_server: RedisServer, triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("drift")
    base = {
        "GATEWAY_REDIS_URL": redis_server.url,
        "GATEWAY_TRITON_URL": triton.grpc_url,
        "GATEWAY_LOG_LEVEL": "WARNING",
        # Generous budgets: the machine is shared, and a fallback answer is not counted.
        "GATEWAY_BUDGET_TOTAL_MS": "500",
        "GATEWAY_BUDGET_FEATURES_MS": "200",
        "GATEWAY_BUDGET_INFERENCE_MS": "250",
        "GATEWAY_HEALTH_INTERVAL_S": "1",
        # Every request counted (the default samples half): the test knows which rows.
        "GATEWAY_DRIFT_SAMPLE_RATE": "1",
    }
    pods = {
        "steady": GatewayServer(env=base, workers=2, log_path=tmp / "steady.log"),
        "shifted": GatewayServer(
            env={**base, "GATEWAY_FEATURE_MAX_AGE_S": str(MAX_AGE_S)},
            workers=2,
            log_path=tmp / "shifted.log",
        ),
    }
    prom: JobsPrometheus | None = None
    try:
        for pod in pods.values():
            pod.start(ready=True)
        for pod in pods.values():  # the profile is loaded after the first model check
            deadline = time.monotonic() + 20
            while not httpx.get(f"{pod.url}/drift").json()["profile"]:
                assert time.monotonic() < deadline, "no drift profile loaded"
                time.sleep(0.2)
        prom = JobsPrometheus(
            workdir=tmp,
            targets=[],
            rule_files=[drift_rules_for_test(tmp)],
            jobs={job: pod.url.removeprefix("http://") for job, pod in pods.items()},
        ).start()
        # Every bin's series scraped at 0 before any row: the window then starts at 0.
        for job in pods:
            prom.wait_for(f'count(gateway_drift_bin_rows_total{{job="{job}"}})', lambda v: v > 200)
        sent: dict[str, Sent] = {}
        threads = [
            threading.Thread(
                target=lambda job=job: sent.__setitem__(
                    job, send(pods[job].url, requests_for(job == "shifted", seed=11))
                )
            )
            for job in pods
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert set(sent) == set(pods), "a traffic thread failed (see the assertion above)"
        yield Stack(pods, prom, sent)
    finally:
        if prom is not None:
            prom.stop()
        for pod in pods.values():
            pod.stop()


def _drift(pod: GatewayServer, rows: int) -> dict[str, Any]:
    """GET /drift once every worker has flushed the rows sent (each flushes every 2 s)."""
    deadline = time.monotonic() + 10
    while True:
        body: dict[str, Any] = httpx.get(f"{pod.url}/drift").json()
        if body["rows"] == rows or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


@pytest.mark.parametrize("job", ["steady", "shifted"])
def test_drift_endpoint_equals_numpy(stack: Stack, job: str) -> None:
    """GET /drift's PSI equals a direct NumPy computation over the same rows (the rows the
    model answered, rebuilt from the world and the request) within 1e-6."""
    sent = stack.sent[job]
    assert sent.fallbacks <= REQUESTS // 20, sent.fallbacks  # the model answered most
    body = _drift(stack.pods[job], sent.rows)
    assert body["model"] == {"name": "ctr", "version": "1"}
    assert body["rows"] == sent.rows and body["window_s"] > 0
    assert list(body["features"]) == list(INPUTS)
    expected = numpy_report(sent)
    for column in INPUTS:
        assert abs(body["features"][column] - expected[column]) < 1e-6, column
    assert abs(body["score"] - expected[SCORE_COLUMN]) < 1e-6


def _psi_by_column(prom: Prometheus, job: str, rows: int) -> dict[str, float]:
    prom.wait_for(
        f'sum(gateway_drift_bin_rows_total{{job="{job}",column="score"}})', lambda v: v == rows
    )
    # Two more rule evaluations after the scrape that saw every row.
    time.sleep(2.5)
    result = prom.query(f'job_column:gateway_drift_psi:1h{{job="{job}"}}')
    return {r["metric"]["column"]: float(r["value"][1]) for r in result}


def test_training_traffic_keeps_every_psi_under_0_1(stack: Stack) -> None:
    sent = stack.sent["steady"]
    psi = _psi_by_column(stack.prom, "steady", sent.rows)
    assert set(psi) == {*INPUTS, SCORE_COLUMN}
    assert max(psi.values()) < 0.1, psi
    # Prometheus's fleet-wide PSI (both workers) is the same number as the pod's.
    expected = numpy_report(sent)
    for column, value in psi.items():
        assert abs(value - expected[column]) < 1e-4, (column, value, expected[column])


def test_shifted_context_drives_hour_and_device_over_0_2_and_alerts(stack: Stack) -> None:
    sent = stack.sent["shifted"]
    psi = _psi_by_column(stack.prom, "shifted", sent.rows)
    shown = {c: round(v, 3) for c, v in sorted(psi.items())}
    print("PSI, shifted traffic (3 a.m., tablet):", json.dumps(shown))  # for the report
    for column in CONTEXT_SHIFTED:
        assert psi[column] > 0.2, (column, shown)
    for column in INPUTS:
        if column.startswith(("user.", "item.")):
            assert psi[column] < 0.1, (column, shown)

    # The alerts, in a real rule evaluation: critical (and warning) for exactly the
    # shifted columns of job "shifted" (and the score, which moves with them), none
    # for job "steady".
    def firing(name: str) -> set[tuple[str, str]]:
        alerts = stack.prom.api("alerts")["alerts"]
        return {
            (a["labels"]["job"], a["labels"].get("column", ""))
            for a in alerts
            if a["labels"]["alertname"] == name and a["state"] == "firing"
        }

    deadline = time.monotonic() + 10
    while not CONTEXT_SHIFTED <= {c for _, c in firing("GatewayFeatureDriftCritical")}:
        assert time.monotonic() < deadline, firing("GatewayFeatureDriftCritical")
        time.sleep(0.5)
    for name in ("GatewayFeatureDriftCritical", "GatewayFeatureDriftWarning"):
        got = firing(name)
        assert {j for j, _ in got} == {"shifted"}, (name, got)
        assert CONTEXT_SHIFTED <= {c for _, c in got} <= CONTEXT_SHIFTED | {SCORE_COLUMN}


def test_old_load_fires_the_freshness_alert(stack: Stack) -> None:
    """The features were loaded at the session's start: older than the shifted pod's
    3 s, far younger than the steady pod's default day."""
    prom = stack.prom
    age = prom.wait_for('max(gateway_feature_set_age_seconds{job="shifted"})', lambda v: v > 3)
    young = prom.wait_for('max(gateway_feature_set_age_seconds{job="steady"})', lambda v: v > 0)
    assert young < 3_600 and age < 3_600
    assert prom.scalar('max(gateway_feature_max_age_seconds{job="steady"})') == 86_400
    deadline = time.monotonic() + 15
    while True:
        alerts = prom.api("alerts")["alerts"]
        stale = {
            a["labels"]["job"]
            for a in alerts
            if a["labels"]["alertname"] == "GatewayFeaturesStale" and a["state"] == "firing"
        }
        if stale:
            break
        assert time.monotonic() < deadline, "GatewayFeaturesStale never fired"
        time.sleep(0.5)
    assert stale == {"shifted"}


def test_committed_profile_is_what_model_profile_writes(tmp_path: Path) -> None:
    """`gateway model profile --version 1` regenerates the committed profile byte for byte
    from the seeded training rows, and touches no model file."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    models = {p: p.read_bytes() for p in repo.rglob("*.onnx")}
    (repo / "ctr" / "1" / PROFILE_FILE).unlink()
    cmd = [sys.executable, "-m", "gateway", "model", "profile", "--model-repository", str(repo)]
    proc = subprocess.run([*cmd, "--version", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = (ROOT / "model_repository" / "ctr" / "1" / PROFILE_FILE).read_text()
    assert (repo / "ctr" / "1" / PROFILE_FILE).read_text() == committed
    assert {p: p.read_bytes() for p in repo.rglob("*.onnx")} == models
    # A version that is not there: one line, exit 2.
    proc = subprocess.run([*cmd, "--version", "7"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: no model ctr version 7")
