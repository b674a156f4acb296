"""The operating artefacts (issue 4) checked with the tools that consume them.

- Prometheus rules: ``promtool check rules`` and ``promtool test rules`` (one firing and
  one quiet case per alert, in deploy/prometheus/tests/).
- The Grafana dashboard: every metric name its queries use is exported by the gateway
  (its real registry), by the real local Triton (its /metrics), or recorded by a rule.
- Kubernetes: ``kubectl kustomize`` renders each overlay and ``kubernetes-validate
  --strict`` accepts the output for Kubernetes 1.30 and the newest schema it ships; the
  HPA's custom metric traces through the prometheus-adapter rule to a series the gateway
  exports; the rendered objects have the properties issue 4 asks for.
- The Dockerfile: hadolint, and its shape (multi-stage, base as ARG, non-root, HEALTHCHECK).
- The image itself: scripts/container-smoke builds and runs it (see test_container_smoke).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.metrics import OUTCOMES, Metrics
from tests.procs import ROOT, TritonServer

DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "inference-gateway.json"
VENV_BIN = Path(sys.executable).parent
RULE_FILES = sorted((PROM / "rules").glob("*.yml"))

# The oldest Kubernetes the manifests promise, and the newest schema the tool ships.
K8S_VERSIONS = ("1.30.0", None)


def _run(cmd: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(VENV_BIN))
    assert path, f"{name} is not installed (see scripts/test for the Debian/PyPI package)"
    return path


# ---- metric names ------------------------------------------------------------------------


def gateway_metric_names() -> set[str]:
    """Every sample name the gateway's registry exports (what /metrics serves)."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    return {fam.name + s for fam in registry.collect() for s in suffixes[fam.type]}


def recorded_names() -> set[str]:
    names = set()
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names |= {r["record"] for r in group["rules"] if "record" in r}
    return names


# PromQL words that look like identifiers but are not metric names.
_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "atan2",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, matchers, ranges,
    grouping clauses and function calls removed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    found = re.findall(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e)
    return {n for n in found if n.lower() not in _PROMQL_WORDS}


def test_metric_name_extraction() -> None:
    """The extractor the dashboard test relies on, on the shapes the dashboard uses."""
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{job=~"$job",le!="x"}'
        "[$__rate_interval]))) / ignoring (reason) group_left b:rec:p99_5m > bool 1e3"
    ) == {"a_bucket", "b:rec:p99_5m"}


def dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var["type"] == "query" and query:
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            exprs.append(m.group(1) if m else query)
    return exprs


def triton_metric_names(triton: TritonServer) -> set[str]:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def test_dashboard_metrics_exist(triton: TritonServer) -> None:
    """Every metric a panel queries is exported by the gateway or the real Triton, or
    recorded by a rule; and the panels issue 4 asks for are there."""
    gateway, rec, tri = gateway_metric_names(), recorded_names(), triton_metric_names(triton)
    assert any(n.startswith("nv_inference_") for n in tri), "local Triton exported no nv_*"
    used: dict[str, set[str]] = {}
    for expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add(expr)
    unknown = {n: sorted(e) for n, e in used.items() if n not in gateway | rec | tri}
    assert not unknown, f"dashboard queries metrics nobody exports or records: {unknown}"
    # The views issue 4 names, by the series behind them.
    for needed in (
        "gateway_request_duration_seconds_count",  # request rate
        "job:gateway_request_duration_seconds:p50_5m",
        "job:gateway_request_duration_seconds:p95_5m",
        "job:gateway_request_duration_seconds:p99_5m",
        "job_stage:gateway_stage_duration_seconds:p99_5m",
        "job_reason:gateway_fallback_ratio:rate5m",
        "job:gateway_shed_ratio:rate5m",
        "job:gateway_error_ratio:rate5m",
        "gateway_circuit_state",
        "gateway_dependency_up",
        "gateway_uncounted_timeouts_total",
        "gateway_admission_limit",
        "gateway_inflight_requests",
        "gateway_event_loop_lag_seconds",
        "gateway_model_info",
        "gateway_items_per_request_bucket",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
    ):
        assert needed in used, f"no dashboard panel uses {needed}"


def test_dashboard_layout() -> None:
    """No two panels overlap on Grafana's 24-column grid, ids are unique, and the
    outcomes panel stacks its series (its top is the offered load)."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    outcome = [
        p for p in panels
        if any("by (outcome)" in t["expr"] for t in p.get("targets", []))
    ]  # fmt: skip
    assert outcome, "no panel shows requests by outcome"
    assert all(p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
               for p in outcome)  # fmt: skip


# ---- Prometheus rules ------------------------------------------------------------------


def test_rules_are_valid() -> None:
    out = _run([_tool("promtool"), "check", "rules", *map(str, RULE_FILES)])
    assert out.returncode == 0, out.stdout + out.stderr
    # The standalone config loads exactly these rule files.
    out = _run([_tool("promtool"), "check", "config", str(PROM / "prometheus.yml")])
    assert out.returncode == 0, out.stdout + out.stderr
    loaded = yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]
    assert sorted(PROM / f for f in loaded) == RULE_FILES


def test_recording_rules_use_exported_metrics() -> None:
    exported = gateway_metric_names()
    for group in yaml.safe_load((PROM / "rules" / "gateway-recording.yml").read_text())["groups"]:
        for rule in group["rules"]:
            names = metric_names(rule["expr"])
            assert names and names <= exported, (rule["record"], names - exported)


def _outcomes(expr: str) -> set[str]:
    """The ``outcome`` values a PromQL expression's matchers name (= or =~ alternatives)."""
    found: set[str] = set()
    for op, value in re.findall(r'outcome\s*(=~|=)\s*"([^"]*)"', expr):
        found |= set(value.split("|")) if op == "=~" else {value}
    return found


def test_rules_and_panels_name_outcomes_the_gateway_exports() -> None:
    """A renamed outcome would make a rule select nothing, silently. Latency quantiles and
    the fallback ratio are over answered requests (model, fallback) only."""
    exprs = {
        r.get("record") or r["alert"]: r["expr"]
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
    }
    for name, expr in [*exprs.items(), *(("dashboard", e) for e in dashboard_queries())]:
        assert _outcomes(expr) <= set(OUTCOMES), (name, _outcomes(expr) - set(OUTCOMES))
    answered = {"model", "fallback"}
    for q in ("p50", "p95", "p99"):
        assert _outcomes(exprs[f"job:gateway_request_duration_seconds:{q}_5m"]) == answered
    assert _outcomes(exprs["job:gateway_fallback_ratio:rate5m"]) == answered
    assert _outcomes(exprs["job:gateway_shed_ratio:rate5m"]) == {"shed"}
    assert _outcomes(exprs["job:gateway_error_ratio:rate5m"]) == {"error"}


def test_alert_rules_unit_tests() -> None:
    """promtool test rules: every alert has a case where it fires and one where it must not."""
    tests = sorted((PROM / "tests").glob("*.test.yml"))
    out = _run([_tool("promtool"), "test", "rules", *map(str, tests)], cwd=PROM)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr
    alerts = {
        r["alert"]
        for f in RULE_FILES
        for g in yaml.safe_load(f.read_text())["groups"]
        for r in g["rules"]
        if "alert" in r
    }
    assert {"GatewayP99LatencyHigh", "GatewayFallbackRatioHigh", "GatewayCircuitOpen",
            "GatewayReadinessFlapping", "GatewayDependencyDown", "GatewaySheddingSustained",
            "GatewayErrorRatioHigh"} <= alerts  # fmt: skip
    fires, quiet = set(), set()
    for f in tests:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    assert alerts <= fires, f"alerts never shown firing: {alerts - fires}"
    assert alerts <= quiet, f"alerts never shown quiet: {alerts - quiet}"


# ---- Kubernetes --------------------------------------------------------------------------

TARGETS = ("overlays/dev", "overlays/prod", "prometheus-adapter")


def render(target: str) -> list[dict]:
    out = _run([_tool("kubectl"), "kustomize", str(K8S / target)])
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {t: render(t) for t in TARGETS}


def _objs(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("version", K8S_VERSIONS, ids=lambda v: v or "newest")
@pytest.mark.parametrize("target", TARGETS)
def test_kustomize_output_validates(
    target: str, version: str | None, rendered: dict[str, list[dict]], tmp_path: Path
) -> None:
    """kubernetes-validate --strict (unknown fields rejected) on the rendered overlay."""
    out_file = tmp_path / "rendered.yaml"
    out_file.write_text(yaml.safe_dump_all(rendered[target]))
    cmd = [_tool("kubernetes-validate"), "--strict", "--quiet"]
    if version:
        cmd += ["-k", version]
    out = _run([*cmd, str(out_file)])
    assert out.returncode == 0, out.stdout + out.stderr
    # CRDs (Prometheus Operator) have no bundled schema: only those may be skipped.
    skipped = re.findall(r"Couldn't find schema for kind (\w+)", out.stdout + out.stderr)
    assert set(skipped) <= {"ServiceMonitor", "PrometheusRule"}, skipped


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/prod"])
def test_overlay_shape(overlay: str, rendered: dict[str, list[dict]], monkeypatch) -> None:
    """The objects issue 4 asks for, wired to each other."""
    docs = rendered[overlay]
    ns = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert len(ns) == 1 and None not in ns, f"every object in one namespace: {ns}"
    namespace = ns.pop()
    deployments, services = _objs(docs, "Deployment"), _objs(docs, "Service")

    gw = deployments["gateway"]["spec"]["template"]["spec"]
    c = gw["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys() & c["resources"]["limits"].keys()
    assert c["lifecycle"]["preStop"]
    assert gw["topologySpreadConstraints"]
    assert gw["securityContext"]["runAsNonRoot"] is True and gw["securityContext"]["runAsUser"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert _objs(docs, "PodDisruptionBudget")["gateway"]

    # The ConfigMap's GATEWAY_* values are settings the gateway accepts.
    cm_name = c["envFrom"][0]["configMapRef"]["name"]
    data = _objs(docs, "ConfigMap")[cm_name]["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # type: ignore[call-arg]
    # Client-side balancing: gRPC resolves the headless Service in this namespace.
    triton_svc = services["triton-grpc"]
    assert triton_svc["spec"]["clusterIP"] == "None"
    assert settings.triton_url == (
        f"dns:///triton-grpc.{namespace}.svc.cluster.local:"
        f"{next(p['port'] for p in triton_svc['spec']['ports'] if p['name'] == 'grpc')}"
    )
    # The Redis URL carries credentials: a Secret, never the ConfigMap (test_security.py).
    assert settings.redis_url is None and "redis" in services

    triton = deployments["triton"]["spec"]["template"]["spec"]
    tc = triton["containers"][0]
    assert tc["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert tc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert tc["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert any(m["mountPath"] == "/models" for m in tc["volumeMounts"])
    assert {p["name"] for p in triton_svc["spec"]["ports"]} == {"grpc", "metrics"}

    # ServiceMonitors select a Service that has the named port.
    for sm in _objs(docs, "ServiceMonitor").values():
        sel = sm["spec"]["selector"]["matchLabels"]
        matching = [
            s for s in services.values() if sel.items() <= s["metadata"].get("labels", {}).items()
        ]
        assert matching, f"ServiceMonitor {sm['metadata']['name']} selects no Service"
        for ep in sm["spec"]["endpoints"]:
            assert any(ep["port"] in {p["name"] for p in s["spec"]["ports"]} for s in matching)
    assert set(_objs(docs, "ServiceMonitor")) == {"gateway", "triton"}

    # The operator's copy of the rules is the rule files, unchanged.
    groups = {g["name"]: g for f in RULE_FILES for g in yaml.safe_load(f.read_text())["groups"]}
    in_k8s = _objs(docs, "PrometheusRule")["gateway"]["spec"]["groups"]
    assert {g["name"]: g for g in in_k8s} == groups

    redis_sts = _objs(docs, "StatefulSet").get("redis")
    if overlay.endswith("dev"):
        assert redis_sts is not None, "dev runs its own Redis"
    else:
        assert redis_sts is None, "prod uses an external Redis"
        assert services["redis"]["spec"]["type"] == "ExternalName"


def test_hpa_custom_metric_is_exported_through_the_adapter(
    rendered: dict[str, list[dict]],
) -> None:
    """HPA metric name -> prometheus-adapter rule -> a series the gateway exports."""
    adapter_cm = _objs(rendered["prometheus-adapter"], "ConfigMap")["prometheus-adapter-gateway"]
    rules = yaml.safe_load(adapter_cm["data"]["config.yaml"])["rules"]
    exported = gateway_metric_names()
    for overlay in ("overlays/dev", "overlays/prod"):
        hpa = _objs(rendered[overlay], "HorizontalPodAutoscaler")["gateway"]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["name"] == "gateway"
        behavior = hpa["spec"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 60
        assert behavior["scaleUp"]["policies"] and behavior["scaleDown"]["policies"]
        metrics = hpa["spec"]["metrics"]
        assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in metrics)
        custom = [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"]
        assert custom, "no per-pod custom metric"
        for name in custom:
            served = []
            for rule in rules:
                series = re.match(r"\s*([A-Za-z_:][\w:]*)", rule["seriesQuery"]).group(1)
                as_name = re.sub(rule["name"]["matches"], rule["name"].get("as", ""), series)
                if re.search(rule["name"]["matches"], series) and as_name == name:
                    served.append((rule, series))
            assert len(served) == 1, f"HPA metric {name}: adapter rules serving it: {served}"
            rule, series = served[0]
            assert series in exported, f"{name} comes from {series}, which the gateway lacks"
            assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
            if series.endswith(("_total", "_count")):
                assert "rate(" in rule["metricsQuery"], "a counter must be served as a rate"


# ---- the image -----------------------------------------------------------------------------


def test_dockerfile_lints_clean_and_has_the_required_shape() -> None:
    out = _run([_tool("hadolint"), "Dockerfile"])
    assert out.returncode == 0, out.stdout + out.stderr
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0].startswith("ARG BASE_IMAGE="), "the base must be a build argument"
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and all("${BASE_IMAGE}" in f for f in froms)
    assert re.search(r"^USER (\d+)", text, re.M) and not re.search(r"^USER (0|root)", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'ENTRYPOINT ["gateway", "serve"]' in text


SMOKE_CANNOT_RUN = {3: "missing tool", 4: "no mirror or index", 6: "podman cannot run"}


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_container_smoke() -> None:
    """Build the image from a debootstrap'd base with podman and smoke-test it running.

    Measured here: about 2 min 15 s with a fresh base (debootstrap ~65 s, wheelhouse ~20 s,
    build ~35 s), about 1 min when the base image already exists. Opt out only
    explicitly, with GATEWAY_SKIP_CONTAINER_SMOKE=1 (reported as a skip); where the
    script says it cannot run here, the test fails with its reason.
    """
    if os.environ.get("GATEWAY_SKIP_CONTAINER_SMOKE") == "1":
        pytest.skip("GATEWAY_SKIP_CONTAINER_SMOKE=1: container build and smoke test opted out")
    out = _run([str(ROOT / "scripts" / "container-smoke")], timeout=450)
    log = out.stdout + out.stderr
    assert out.returncode != 2, log
    if out.returncode in SMOKE_CANNOT_RUN:
        pytest.fail(
            f"container smoke cannot run on this machine ({SMOKE_CANNOT_RUN[out.returncode]}); "
            f"set GATEWAY_SKIP_CONTAINER_SMOKE=1 to opt out:\n{log}"
        )
    assert out.returncode == 0, log
    for step in ("/healthz: ", "/predict: ", "/metrics: counts", "HEALTHCHECK: healthy"):
        assert step in log, f"{step!r} missing from the smoke log:\n{log}"
