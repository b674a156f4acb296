"""The benchmark: start the stack, run each scenario over the rate ladder, keep numbers.

Per step it records the client-side latency (from scheduled send time), achieved
throughput, error and fallback rates, the gateway's own stage histograms (difference
of two /metrics scrapes) and the CPU seconds each process spent, the generator's own
included.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import uvloop
from tests.procs import ROOT, RedisServer, TritonServer

from gateway.features.loader import load
from loadtests.bench import loadgen, promstats
from loadtests.bench.arrivals import Arrivals
from loadtests.bench.scenarios import SCENARIOS, SHADOW_COUNTS, Scenario, Shared, Target
from loadtests.bench.stack import export_src, self_cpu_s, tree_cpu_s
from loadtests.bench.workload import Workload

log = logging.getLogger("bench")

# Full ladder: from a rate where every scenario is idle to past where the gateway
# saturates on two cores; the low rungs resolve the naive app's capacity.
FULL_RATES = [10, 25, 50, 100, 200, 300, 400, 600, 800, 1000, 1300]
QUICK_RATES = [20, 60]

# Saturation: once a step is this bad, higher rates only measure the collapse; the
# ladder stops for that scenario (keeps a full run near ten minutes).
STOP_P99_MS = 250.0
STOP_ERROR_RATE = 0.05
STOP_FALLBACK_RATE = 0.5
# The box is shared: before each step, wait (at most QUIET_MAX_WAIT_S) until processes
# that are not ours use under QUIET_CORES of CPU, so a neighbour's test run does not land
# inside a step. What others used during each step is reported either way.
QUIET_CORES = 0.3
QUIET_MAX_WAIT_S = 5.0


@dataclass
class Config:
    rates: list[float]
    duration_s: float
    warmup_s: float
    items: int
    connections: int
    scenarios: list[str]
    out: Path
    baseline_ref: str | None = None
    baseline_paths: list[str] = field(default_factory=list)
    workers: int = 1
    bodies: int = 2_000
    seed: int = 1
    quiet_max_wait_s: float = QUIET_MAX_WAIT_S
    arrivals: Arrivals = field(default_factory=Arrivals)
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: list[float], qs: tuple[float, ...]) -> list[float | None]:
    if not values:
        return [None] * len(qs)
    arr = np.asarray(values)
    return [float(x) for x in np.percentile(arr, qs)]


def summarize(step: loadgen.StepResult, expects_model: bool) -> dict[str, Any]:
    ok = [s for s in step.samples if s.ok]
    lat_ms = [s.latency_s * 1e3 for s in ok]
    p50, p95, p99, p999 = _pct(lat_ms, (50, 95, 99, 99.9))
    n = step.scheduled
    fb = sum(s.fallback for s in ok)
    row: dict[str, Any] = {
        "rate": step.rate,
        "arrivals": step.arrivals.as_dict() if step.arrivals else {"process": "constant"},
        "scheduled": n,
        "ok": len(ok),
        "achieved_rps": step.achieved_rps,
        "conn_waits": step.conn_waits,
        "error_rate": step.errors / n,
        "fallback_rate": fb / n,
        "p50_ms": p50,
        "p95_ms": p95,
        "p99_ms": p99,
        "p999_ms": p999,
        "expects_model": expects_model,
    }
    kinds: dict[str, int] = {}
    for smp in step.samples:
        if not smp.ok:
            kinds[smp.error] = kinds.get(smp.error, 0) + 1
    if step.unsent:
        kinds["not sent before the drain deadline"] = step.unsent
    row["error_kinds"] = kinds
    row["send_lag_p50_ms"], row["send_lag_p99_ms"] = _pct(
        [s.send_lag_s * 1e3 for s in ok], (50, 99)
    )
    # From the moment the request was written, not from its scheduled time: the
    # generator's own timer lag is not the gateway's overhead.
    timed = [
        ((s.latency_s - s.send_lag_s) * 1e3, s.server_ms)
        for s in ok
        if s.server_ms and not s.fallback
    ]
    if timed:
        # Overhead = what the gateway adds to its two dependencies: the client-measured
        # latency (from send) minus the request's own Redis and Triton stage times (so it
        # includes HTTP parsing, validation, assembly, rendering, the loopback and any
        # queueing in the gateway),
        # and the same from the server's own total (inside the route only).
        e2e = [lat - f - i for lat, (f, i, _p, _t) in timed]
        srv = [t - f - i for _lat, (f, i, _p, t) in timed]
        row["overhead_p50_ms"], row["overhead_p99_ms"] = _pct(e2e, (50, 99))
        row["server_overhead_p50_ms"], row["server_overhead_p99_ms"] = _pct(srv, (50, 99))
    return row


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {name: tree_cpu_s(pid) for name, pid in pids.items()}
    out["generator"] = self_cpu_s()
    # Everything else on the machine (the box is shared): busy CPU time of all
    # processes, minus ours, is computed from this after the step.
    t = psutil.cpu_times()
    out["machine"] = t.user + t.nice + t.system + t.irq + t.softirq + t.steal
    return out


def _cores(c0: dict[str, float], c1: dict[str, float], wall: float) -> dict[str, float]:
    cores = {k: (c1[k] - c0[k]) / wall for k in c0}
    machine = cores.pop("machine")
    cores["others"] = max(0.0, machine - sum(cores.values()))
    return cores


def wait_quiet(ours: list[int], max_wait_s: float = QUIET_MAX_WAIT_S) -> float:
    """Wait until the machine's other processes are quiet; return seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        pids = {str(p): p for p in ours}
        c0 = _cpu(pids)
        time.sleep(0.5)
        c1 = _cpu(pids)
        if _cores(c0, c1, 0.5)["others"] < QUIET_CORES:
            break
    return time.perf_counter() - t0


def _stages(url: str | None, before: dict[str, Any] | None) -> tuple[dict[str, Any] | None, Any]:
    if url is None:
        return None, None
    now = promstats.scrape(url)
    if before is None:
        return None, now
    out: dict[str, Any] = {}
    for fam, key in (
        ("gateway_stage_duration_seconds", ("features", "inference", "postprocess")),
        ("gateway_request_duration_seconds", ("model", "fallback")),
    ):
        h = promstats.diff(now.get(fam, {}), before.get(fam, {}))
        for label in key:
            out[label] = promstats.summary(h, label)
    reasons = promstats.diff(now.get("fallback_reasons", {}), before.get("fallback_reasons", {}))
    out["fallback_reasons"] = {k: int(v[0.0]) for k, v in reasons.items() if v.get(0.0)}
    return out, now


class _Live:
    """One started scenario inside a run: its target, requests, scrape state and steps."""

    def __init__(self, sc: Scenario, target: Target, arrivals: Arrivals) -> None:
        self.sc = sc
        self.target = target
        self.arrivals = arrivals
        self.reqs = loadgen.build_requests(
            "127.0.0.1", target.port, target.path, target.bodies, target.headers
        )
        self.scrape: Any = None
        self.steps: list[dict[str, Any]] = []
        self.done = False
        self.t_start = time.perf_counter()
        self.busy_s = 0.0

    def step(
        self, runner: asyncio.Runner, cfg: Config, rate: float, duration: float
    ) -> loadgen.StepResult:
        return runner.run(
            loadgen.run_step(
                "127.0.0.1", self.target.port, self.reqs, rate, duration, cfg.connections,
                self.target.classify, self.arrivals.at(rate),
            )
        )  # fmt: skip

    def result(self) -> dict[str, Any]:
        return {
            "name": self.sc.name,
            "label": self.sc.label,
            "notes": self.sc.notes,
            "arrivals": self.arrivals.describe(),
            "items": list(self.sc.items) if self.sc.items else None,
            "steps": self.steps,
            "seconds": self.busy_s,
        }


def _measure(runner: asyncio.Runner, live: _Live, cfg: Config, rate: float) -> None:
    t0 = time.perf_counter()
    target = live.target
    waited = wait_quiet(list(target.pids.values()), cfg.quiet_max_wait_s)
    c0 = _cpu(target.pids)
    t_cpu = time.perf_counter()
    res = live.step(runner, cfg, rate, cfg.duration_s)
    c1 = _cpu(target.pids)
    row = summarize(res, target.expects_model)
    row["cpu_cores"] = _cores(c0, c1, time.perf_counter() - t_cpu)
    if row["ok"] and "server" in c0:
        row["server_cpu_ms_per_request"] = (c1["server"] - c0["server"]) / row["ok"] * 1e3
    row["quiet_wait_s"] = waited
    row["stages"], live.scrape = _stages(target.metrics_url, live.scrape)
    live.steps.append(row)
    log.info(
        "%-15s %6.0f/s -> %6.0f/s  p50 %7.2f  p99 %7.2f ms  lag99 %.2f  err %.3f  fb %.3f"
        "  connwait %d  cpu %s",
        live.sc.name, row["rate"], row["achieved_rps"], row["p50_ms"] or -1,
        row["p99_ms"] or -1, row["send_lag_p99_ms"] or -1, row["error_rate"],
        row["fallback_rate"], row["conn_waits"],
        " ".join(f"{k}={v:.2f}" for k, v in row["cpu_cores"].items()),
    )  # fmt: skip
    if (
        (row["p99_ms"] or 1e9) > STOP_P99_MS
        or row["error_rate"] > STOP_ERROR_RATE
        or (target.expects_model and row["fallback_rate"] > STOP_FALLBACK_RATE)
    ):
        log.info("%s saturated at %.0f/s; its ladder stops", live.sc.name, rate)
        live.done = True
    live.busy_s += time.perf_counter() - t0


def run_group(
    runner: asyncio.Runner,
    group: list[Scenario],
    shared: Shared,
    bodies: Callable[[Scenario], list[bytes]],
    cfg: Config,
) -> list[dict[str, Any]]:
    """Run scenarios over the ladder; a group of several is interleaved step by step.

    Interleaving (A then B at each rate, the order swapped at every rate) is how the
    before/after pair is measured: on a shared machine, whatever a neighbour does lands
    on both sides of the comparison instead of on one scenario's whole ladder.
    """
    lives: list[_Live] = []
    try:
        for sc in group:
            lives.append(_Live(sc, sc.start(shared, bodies(sc)), sc.arrivals or cfg.arrivals))
        for live in lives:
            # Warm up: connections, pools, the breaker's view of a dead Triton.
            live.step(runner, cfg, cfg.rates[0], cfg.warmup_s)
            _, live.scrape = _stages(live.target.metrics_url, None)
        for k, rate in enumerate(cfg.rates):
            order = lives if k % 2 == 0 else lives[::-1]
            for live in order:
                if not live.done:
                    _measure(runner, live, cfg, rate)
            if all(live.done for live in lives):
                break
    finally:
        for live in lives:
            live.target.stop()
    return [live.result() for live in lives]


def code_version() -> str:
    """The commit the measured gateway code comes from, and whether src/gateway differed."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src/gateway")
    return f"{head}" + (" with uncommitted changes in src/gateway" if dirty else "")


def machine() -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    redis_v = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "code": code_version(),
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs",
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "os": platform.platform(),
        "python": platform.python_version(),
        "redis": next((w[2:] for w in redis_v if w.startswith("v=")), "?"),
        "triton": "2.51 (nvidia-pytriton wheel), CPU, Python backend running onnxruntime",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run(cfg: Config) -> dict[str, Any]:
    """Start the stack, run every selected scenario, return all numbers."""
    t_start = time.perf_counter()
    selected = [s for s in SCENARIOS if s.name in cfg.scenarios]
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        log_dir = Path(tmp)
        redis = RedisServer().start()
        triton = TritonServer(log_path=log_dir / "triton.log")
        try:
            load(redis.url, progress=False)
            triton.start(timeout=120)
            baseline_src = (
                export_src(cfg.baseline_ref, log_dir, cfg.baseline_paths)
                if cfg.baseline_ref
                else None
            )
            shared = Shared(redis, triton, log_dir, baseline_src, cfg.workers)
            cache: dict[tuple[int, int] | None, list[bytes]] = {}

            def bodies(sc: Scenario) -> list[bytes]:
                # One body set per item-count spec, drawn once: scenarios with the same
                # spec send the very same requests.
                if sc.items not in cache:
                    if sc.items is None:
                        cache[None] = Workload(seed=cfg.seed).bodies(cfg.bodies, cfg.items)
                    else:
                        lo, hi = sc.items
                        wl = Workload(seed=cfg.seed, min_items=lo, max_items=hi)
                        cache[sc.items] = wl.bodies(cfg.bodies)
                return cache[sc.items]

            results: list[dict[str, Any]] = []
            # The before/after pair, and shadow on/off, run interleaved with "gateway";
            # every other scenario on its own.
            names = {s.name for s in selected}
            groups: list[list[Scenario]] = []
            for paired in ({"gateway", "gateway-before"}, {"gateway", "gateway-shadow"}):
                if names >= paired:
                    break
            else:
                paired = set()
            for sc in selected:
                if sc.name in paired:
                    if sc.name == "gateway":
                        groups.append([s for s in selected if s.name in paired])
                    continue
                groups.append([sc])
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                for group in groups:
                    results.extend(run_group(runner, group, shared, bodies, cfg))
        finally:
            triton.stop()
            redis.stop()
    return {
        "machine": machine(),
        "config": {
            "rates": cfg.rates,
            "step_seconds": cfg.duration_s,
            "warmup_seconds": cfg.warmup_s,
            "items_per_request": cfg.items,
            "connections": cfg.connections,
            "scenarios": cfg.scenarios,
            "quick": cfg.quick,
            "seed": cfg.seed,
            "arrivals": cfg.arrivals.describe(),
            "arrivals_options": {
                "kind": cfg.arrivals.kind,
                "burst_size": cfg.arrivals.burst_size,
                "burst_interval_ms": (
                    cfg.arrivals.burst_interval_s * 1e3 if cfg.arrivals.burst_interval_s else None
                ),
            },
            "gateway_workers": cfg.workers,
            "baseline_ref": cfg.baseline_ref,
            "baseline_paths": cfg.baseline_paths,
        },
        "scenarios": results,
        **({"shadow_counts": dict(SHADOW_COUNTS)} if SHADOW_COUNTS else {}),
        "wall_seconds": time.perf_counter() - t_start,
    }
