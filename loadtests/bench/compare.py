"""``python -m loadtests.bench.compare``: what the gateway's resilience layer costs, closed loop.

Two pairs, each the gateway against the least code that does the same work on the
same servers and data (``loadtests/minimal_app.py``):

- ``triton``: ``gateway`` (GATEWAY_REDIS_URL + GATEWAY_TRITON_URL) vs ``minimal-triton``
  (one MGET + one Triton gRPC infer);
- ``triton-http``: the same over Triton's HTTP/REST port: ``gateway-http``
  (GATEWAY_TRITON_URL=http://...) vs ``minimal-triton-http`` (tritonclient.http.aio);
- ``cpu``: ``gateway-cpu`` (GATEWAY_REDIS_URL, no Triton: in-process onnxruntime) vs
  ``minimal-cpu`` (one MGET + onnxruntime inline on the event loop).

For each number of connections, ``wrk`` (closed loop, ``wrk.py``) drives each server
for a few seconds, **interleaved**: every round runs both sides of every pair, the
order swapped from one round to the next (A B, then B A), so a neighbour's load on a
shared machine lands on both sides rather than on one. Per pair and connections it
reports goodput (2xx/s) and all responses/s, wrk's P50/P99, non-2xx, the gateway's
fallback share (``gateway_fallback_total`` before/after the run), the server's CPU
milliseconds per request, and the gateway/minimal ratio of each, computed round by
round (adjacent runs) and summarised by the median and range over rounds.

With ``--profile-seconds N`` it then samples each server with py-spy for N seconds
under wrk at ``--profile-connections`` and reports where each spends its CPU per
request, and what the gateway spends on top of its minimal counterpart.

All servers start once on free loopback ports (redis-server loaded with the generated
features, the local Triton, the four apps) and are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.procs import GatewayServer, RedisServer, TritonServer

from gateway.features.loader import load
from loadtests.bench import profile, promstats
from loadtests.bench.run import machine, wait_quiet
from loadtests.bench.stack import MinimalServer, self_cpu_s, tree_cpu_s
from loadtests.bench.workload import Workload
from loadtests.bench.wrk import WrkResult, run_wrk

log = logging.getLogger("bench.compare")

PAIRS: dict[str, tuple[str, str]] = {
    "triton": ("gateway", "minimal-triton"),
    "triton-http": ("gateway-http", "minimal-triton-http"),
    "cpu": ("gateway-cpu", "minimal-cpu"),
}
DESCRIPTIONS = {
    "gateway": "gateway serve, GATEWAY_REDIS_URL + GATEWAY_TRITON_URL (INT8 `ctr` on Triton)",
    "minimal-triton": "minimal_app: one MGET + one tritonclient.grpc.aio infer",
    "gateway-http": "gateway serve, GATEWAY_REDIS_URL + GATEWAY_TRITON_URL=http://... "
    "(Triton's HTTP/REST port, the gateway's own HTTP transport)",
    "minimal-triton-http": "minimal_app: one MGET + one tritonclient.http.aio infer "
    "(binary tensors)",
    "gateway-cpu": "gateway serve, GATEWAY_REDIS_URL only (in-process onnxruntime, "
    "micro-batcher on a worker thread)",
    "minimal-cpu": "minimal_app: one MGET + onnxruntime session.run inline on the loop",
}


@dataclass
class Server:
    name: str
    url: str
    pids: dict[str, int]  # "server" and the dependencies it uses
    metrics_url: str | None
    stop: Callable[[], Any]


def _int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected comma-separated numbers, each at least 1")
    return values


def start_servers(
    names: list[str], redis: RedisServer, triton: TritonServer | None, log_dir: Path
) -> dict[str, Server]:
    """Start every named server; on failure stop the ones already started."""
    out: dict[str, Server] = {}
    try:
        for name in names:
            out[name] = _start(name, redis, triton, log_dir)
    except BaseException:
        for srv in out.values():
            srv.stop()
        raise
    return out


def _start(name: str, redis: RedisServer, triton: TritonServer | None, log_dir: Path) -> Server:
    deps = {"redis": redis.proc.pid}  # type: ignore[union-attr]
    if name in ("gateway", "minimal-triton", "gateway-http", "minimal-triton-http"):
        assert triton is not None and triton.proc is not None
        deps["triton"] = triton.proc.pid
    if name.startswith("gateway"):
        env = {"GATEWAY_REDIS_URL": redis.url, "GATEWAY_LOG_LEVEL": "WARNING"}
        if name == "gateway":
            env["GATEWAY_TRITON_URL"] = triton.grpc_url  # type: ignore[union-attr]
        elif name == "gateway-http":
            env["GATEWAY_TRITON_URL"] = f"http://{triton.http_url}"  # type: ignore[union-attr]
        gw = GatewayServer(env=env, log_path=log_dir / f"{name}.log").start(60, ready=True)
        return Server(name, gw.url, {"server": gw.proc.pid, **deps}, f"{gw.url}/metrics", gw.stop)  # type: ignore[union-attr]
    mode = name.removeprefix("minimal-")
    mn = MinimalServer(
        mode,
        redis.url,
        triton.grpc_url if triton else "",
        triton_http=triton.http_url if triton else "",
        log_path=log_dir / f"{name}.log",
    ).start()
    return Server(name, mn.url, {"server": mn.proc.pid, **deps}, None, mn.stop)  # type: ignore[union-attr]


def _fallbacks(srv: Server) -> dict[str, float]:
    """The gateway's gateway_fallback_total by reason (nothing for the minimal apps)."""
    if srv.metrics_url is None:
        return {}
    reasons = promstats.scrape(srv.metrics_url).get("fallback_reasons", {})
    return {k: v.get(0.0, 0.0) for k, v in reasons.items()}


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished children: wrk, once it has exited."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _thread_cpu_s(pid: int) -> tuple[float, float]:
    """(main thread, all other threads) CPU seconds of one process. The main thread runs
    the event loop; the others are onnxruntime's executor (gateway-cpu) or gRPC's
    poller (the Triton clients)."""
    import psutil

    try:
        threads = psutil.Process(pid).threads()
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    main = sum(t.user_time + t.system_time for t in threads if t.id == pid)
    rest = sum(t.user_time + t.system_time for t in threads if t.id != pid)
    return main, rest


def _machine_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal


def measure(
    srv: Server,
    bodies: list[bytes],
    connections: int,
    seconds: int,
    threads: int,
    quiet_max_wait_s: float,
) -> dict[str, Any]:
    """One wrk run against one server, with its CPU and fallback accounting."""
    waited = wait_quiet(list(srv.pids.values()), quiet_max_wait_s)
    fb0 = _fallbacks(srv)
    cpu0 = {k: tree_cpu_s(p) for k, p in srv.pids.items()}
    th0 = _thread_cpu_s(srv.pids["server"])
    wrk0, self0, mach0, t0 = _children_cpu_s(), self_cpu_s(), _machine_cpu_s(), time.perf_counter()
    res: WrkResult = run_wrk(srv.url + "/predict", bodies, connections, seconds, threads)
    wall = time.perf_counter() - t0
    th1 = _thread_cpu_s(srv.pids["server"])
    cpu1 = {k: tree_cpu_s(p) for k, p in srv.pids.items()}
    used = {k: cpu1[k] - cpu0[k] for k in cpu0}
    used["wrk"] = _children_cpu_s() - wrk0
    used["harness"] = self_cpu_s() - self0
    others = max(0.0, _machine_cpu_s() - mach0 - sum(used.values()))
    fb1 = _fallbacks(srv)
    reasons = {k: int(v - fb0.get(k, 0.0)) for k, v in fb1.items() if v - fb0.get(k, 0.0) > 0}
    fallbacks = sum(reasons.values())
    ok = res.requests - res.non_2xx
    row = res.as_dict()
    row.update(
        # 2xx that the model answered: a fallback answer is a 200 but not the model's.
        model_rps=(ok - fallbacks) / res.seconds if res.seconds else 0.0,
        server=srv.name,
        fallbacks=fallbacks,
        fallback_reasons=reasons,
        fallback_share=fallbacks / ok if ok else None,
        server_cpu_ms_per_request=used["server"] / res.requests * 1e3 if res.requests else None,
        loop_thread_cpu_ms_per_request=(
            (th1[0] - th0[0]) / res.requests * 1e3 if res.requests else None
        ),
        other_threads_cpu_ms_per_request=(
            (th1[1] - th0[1]) / res.requests * 1e3 if res.requests else None
        ),
        cores={k: v / wall for k, v in used.items()} | {"others": others / wall},
        quiet_wait_s=waited,
    )
    log.info(
        "%-15s c=%-3d %7.0f 2xx/s  p50 %6.2f  p99 %6.2f ms  non2xx %d  fb %d  cpu %.3f ms/req"
        "  others %.2f cores",
        srv.name, connections, res.goodput, res.p50_ms, res.p99_ms, res.non_2xx, fallbacks,
        row["server_cpu_ms_per_request"] or -1, row["cores"]["others"],
    )  # fmt: skip
    return row


def _stats(values: list[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


METRICS = (
    "goodput_rps",
    "model_rps",
    "rps",
    "p50_ms",
    "p99_ms",
    "server_cpu_ms_per_request",
    "loop_thread_cpu_ms_per_request",
    "other_threads_cpu_ms_per_request",
)


def summarize(pair: str, connections: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per side and gateway/minimal ratios round by round."""
    a_name, b_name = PAIRS[pair]
    a = [r[a_name] for r in rounds]
    b = [r[b_name] for r in rounds]
    out: dict[str, Any] = {"pair": pair, "a": a_name, "b": b_name, "connections": connections}
    for side, runs in (("a_stats", a), ("b_stats", b)):
        out[side] = {m: _stats([r[m] for r in runs]) for m in METRICS}
        out[side]["non_2xx"] = sum(r["non_2xx"] for r in runs)
        out[side]["requests"] = sum(r["requests"] for r in runs)
        out[side]["socket_errors"] = sum(sum(r["socket_errors"].values()) for r in runs)
        fb = sum(r["fallbacks"] for r in runs)
        reasons: dict[str, int] = {}
        for r in runs:
            for k, v in r["fallback_reasons"].items():
                reasons[k] = reasons.get(k, 0) + v
        out[side]["fallback_reasons"] = reasons
        good = sum(r["requests"] - r["non_2xx"] for r in runs)
        out[side]["fallbacks"] = fb
        out[side]["fallback_share"] = fb / good if good else None
        out[side]["others_cores_max"] = max(r["cores"]["others"] for r in runs)
    out["ratio"] = {
        m: _stats([ra[m] / rb[m] if ra[m] and rb[m] else None for ra, rb in zip(a, b, strict=True)])
        for m in METRICS
    }
    return out


def _spy(
    srv: Server, bodies: list[bytes], connections: int, seconds: int, raw: Path, nonblocking: bool
) -> tuple[Counter[profile.Stack], dict[str, int], float]:
    """One py-spy recording under wrk: (loop-thread stacks, counts, loop CPU ms/req)."""
    pid = srv.pids["server"]
    cpu0 = _thread_cpu_s(pid)[0]
    fb0 = sum(_fallbacks(srv).values())
    spy = profile.record(pid, seconds, raw, nonblocking)
    try:
        # wrk runs one second past the recording, so every sample is under load.
        res = run_wrk(srv.url + "/predict", bodies, connections, seconds + 1)
        spy_out, _ = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed on {srv.name}: {spy_out[-500:]}")
    cpu_ms = (_thread_cpu_s(pid)[0] - cpu0) / max(res.requests, 1) * 1e3
    fallbacks = int(sum(_fallbacks(srv).values()) - fb0)
    if res.non_2xx or fallbacks:
        # The profile should show the model path: say so when it did not.
        log.warning(
            "%s while profiled: %d non-2xx, %d fallback answers of %d",
            srv.name, res.non_2xx, fallbacks, res.requests,
        )  # fmt: skip
    stacks = profile.loop_thread(profile.parse_raw(raw.read_text()))
    counts = {"requests": res.requests, "non_2xx": res.non_2xx, "fallbacks": fallbacks}
    return stacks, counts, cpu_ms


def profile_server(
    srv: Server, bodies: list[bytes], connections: int, seconds: int, out_dir: Path
) -> dict[str, Any]:
    """py-spy on one server under wrk at ``connections``: a non-blocking recording for
    self time, then a blocking one for inclusive time (profile.py says why both)."""
    nb, counts, cpu_ms = _spy(
        srv, bodies, connections, seconds, out_dir / f"{srv.name}.nonblocking.txt", True
    )
    bl, counts_bl, _ = _spy(
        srv, bodies, connections, seconds, out_dir / f"{srv.name}.blocking.txt", False
    )
    n_nb, n_bl = sum(nb.values()), sum(bl.values())
    log.info("profiled %s: %d + %d loop-thread samples", srv.name, n_nb, n_bl)
    return {
        "server": srv.name,
        "samples": n_nb,
        "samples_blocking": n_bl,
        "requests": counts["requests"],
        "non_2xx": counts["non_2xx"] + counts_bl["non_2xx"],
        "fallbacks": counts["fallbacks"] + counts_bl["fallbacks"],
        "cpu_ms_per_request_while_profiled": cpu_ms,
        "self_by_category": profile.self_by_category(nb),
        "self_by_function": profile.self_by_function(nb, top=80),
        "inclusive_gateway": profile.inclusive(bl, "gateway/", top=25),
    }


def extra_cost(
    gw: dict[str, Any], mn: dict[str, Any], cpu: dict[str, tuple[float, float]]
) -> list[dict[str, Any]]:
    """Per category: µs/request in the gateway, in the minimal app, and the difference,
    largest extra first. ``cpu``: side -> (loop thread, other threads) CPU ms/request.
    A category's µs = its share of the loop thread's samples x the loop thread's CPU;
    the other threads are one row, as the OS measured them."""
    (g_loop, g_other), (m_loop, m_other) = cpu["a"], cpu["b"]
    g_total = (g_loop + g_other) * 1e3
    cats = set(gw["self_by_category"]) | set(mn["self_by_category"])
    rows = []
    for c in cats:
        g = gw["self_by_category"].get(c, 0.0) * g_loop * 1e3
        m = mn["self_by_category"].get(c, 0.0) * m_loop * 1e3
        rows.append({"category": c, "gateway_us": g, "minimal_us": m})
    rows.append(
        {
            "category": "other threads, OS-measured (onnxruntime executor; gRPC poller)",
            "gateway_us": g_other * 1e3,
            "minimal_us": m_other * 1e3,
        }
    )
    for r in rows:
        r["extra_us"] = r["gateway_us"] - r["minimal_us"]
        r["gateway_share"] = r["gateway_us"] / g_total if g_total else 0.0
    return sorted(rows, key=lambda r: -r["extra_us"])


def extra_functions(
    gw: dict[str, Any], mn: dict[str, Any], g_loop: float, m_loop: float, top: int = 15
) -> list[dict[str, Any]]:
    """The functions (self time, loop thread) with the most extra µs/request."""
    g, m = gw["self_by_function"], mn["self_by_function"]
    rows = [
        {
            "function": f,
            "gateway_us": g.get(f, 0.0) * g_loop * 1e3,
            "minimal_us": m.get(f, 0.0) * m_loop * 1e3,
        }
        for f in set(g) | set(m)
    ]
    for r in rows:
        r["extra_us"] = r["gateway_us"] - r["minimal_us"]
    return sorted(rows, key=lambda r: -r["extra_us"])[:top]


def run(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.perf_counter()
    names = [n for p in args.pairs for n in PAIRS[p]]
    bodies = Workload(seed=args.seed).bodies(args.bodies, args.items)
    rounds_out: dict[str, dict[int, list[dict[str, Any]]]] = {p: {} for p in args.pairs}
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        log_dir = Path(tmp)
        redis = RedisServer().start()
        uses_triton = any(p.startswith("triton") for p in args.pairs)
        triton = TritonServer(log_path=log_dir / "triton.log") if uses_triton else None
        servers: dict[str, Server] = {}
        try:
            load(redis.url, progress=False)
            if triton is not None:
                triton.start(timeout=120)
            servers = start_servers(names, redis, triton, log_dir)
            for name in names:
                # Warm-up: connections, pools, gRPC channel, first-call allocations.
                run_wrk(servers[name].url + "/predict", bodies, max(args.connections), 1)
            out_dir = args.out / "profiles" if args.keep_profiles else log_dir

            def profile_all() -> None:
                out_dir.mkdir(parents=True, exist_ok=True)
                for name in names:
                    profiles[name] = profile_server(
                        servers[name], bodies, args.profile_connections, args.profile_seconds,
                        out_dir,
                    )  # fmt: skip

            for ci, c in enumerate(args.connections):
                if args.profile_seconds and not profiles and c > args.profile_connections:
                    # Profile before any heavier level: overload there opens the gateway's
                    # breakers, and the fallback answers would then land in the profile.
                    profile_all()
                for r in range(args.rounds):
                    for pi, pair in enumerate(args.pairs):
                        a, b = PAIRS[pair]
                        # A B, then B A next round; pairs and connection levels start
                        # on alternate sides too.
                        order = (a, b) if (r + pi + ci) % 2 == 0 else (b, a)
                        row = {
                            n: measure(
                                servers[n], bodies, c, args.seconds, args.threads, args.quiet_wait
                            )
                            for n in order
                        }
                        row["order"] = list(order)  # type: ignore[assignment]
                        rounds_out[pair].setdefault(c, []).append(row)
            if args.profile_seconds and not profiles:
                profile_all()
        finally:
            for srv in servers.values():
                srv.stop()
            if triton is not None:
                triton.stop()
            redis.stop()
    summaries = [summarize(p, c, rounds_out[p][c]) for c in args.connections for p in args.pairs]
    extra: dict[str, Any] = {}
    for pair in args.pairs:
        a, b = PAIRS[pair]
        if a in profiles and b in profiles:
            at = [
                s
                for s in summaries
                if s["pair"] == pair and s["connections"] == args.profile_connections
            ]
            # CPU per request from the measured (unprofiled) runs at that level when it
            # ran; else from the profiled run (loop thread only, nothing for the others).
            cpu: dict[str, tuple[float, float]] = {}
            for side, name in (("a", a), ("b", b)):
                st = at[0][f"{side}_stats"] if at else None
                loop = st["loop_thread_cpu_ms_per_request"]["median"] if st else None
                other = st["other_threads_cpu_ms_per_request"]["median"] if st else None
                if loop is None:
                    loop, other = profiles[name]["cpu_ms_per_request_while_profiled"], 0.0
                cpu[side] = (loop, other or 0.0)
            extra[pair] = {
                "cpu_ms_per_request": {a: sum(cpu["a"]), b: sum(cpu["b"])},
                "loop_thread_cpu_ms_per_request": {a: cpu["a"][0], b: cpu["b"][0]},
                "categories": extra_cost(profiles[a], profiles[b], cpu),
                "functions": extra_functions(profiles[a], profiles[b], cpu["a"][0], cpu["b"][0]),
            }
    return {
        "machine": machine(),
        "command": command(args),
        "config": {
            "connections": args.connections,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "threads": args.threads,
            "items_per_request": args.items,
            "bodies": args.bodies,
            "pairs": {p: list(PAIRS[p]) for p in args.pairs},
            "servers": {n: DESCRIPTIONS[n] for n in names},
            "wrk_timeout_s": 2,
            "profile_seconds": args.profile_seconds,
            "profile_connections": args.profile_connections,
        },
        "summaries": summaries,
        "rounds": {p: {str(c): v for c, v in by_c.items()} for p, by_c in rounds_out.items()},
        "profiles": profiles,
        "extra_cost": extra,
        "wall_seconds": time.perf_counter() - t_start,
    }


def command(args: argparse.Namespace) -> str:
    cmd = "python -m loadtests.bench.compare"
    defaults = build_parser().parse_args([])
    for opt in ("connections", "seconds", "rounds", "threads", "items", "pairs",
                "profile_seconds", "profile_connections"):  # fmt: skip
        v, d = getattr(args, opt), getattr(defaults, opt)
        if v != d:
            text = ",".join(map(str, v)) if isinstance(v, list) else str(v)
            cmd += f" --{opt.replace('_', '-')} {text}"
    return cmd


def _f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def _rng(s: dict[str, float | None], nd: int = 2) -> str:
    if s["median"] is None:
        return "n/a"
    return f"{s['median']:.{nd}f} ({s['min']:.{nd}f}–{s['max']:.{nd}f})"


def markdown(data: dict[str, Any]) -> str:
    m, cfg = data["machine"], data["config"]
    lines = [
        "# Gateway vs a minimal path, closed loop (wrk)",
        "",
        f"Run {m['date']}, `{data['command']}` ({data['wall_seconds']:.0f} s wall), "
        f"code at {m.get('code', 'an unrecorded commit')}.",
        "",
        f"- Machine: {m['cpu']}, {m['memory']} RAM, {m['os']}; shared. Python {m['python']}, "
        f"redis-server {m['redis']}, Triton {m['triton']}.",
        "- Everything on loopback on that one machine: wrk (1 thread), the server under test "
        "(uvicorn, uvloop + httptools, 1 worker, no access log), Redis, Triton.",
        f"- {cfg['items_per_request']} items per request, {cfg['bodies']} prebuilt bodies "
        f"cycled by a Lua script (Zipf users and items, 2 % unknown ids). "
        f"{cfg['seconds']} s per run, {cfg['rounds']} rounds per connection count; each round "
        "runs both sides of each pair back to back, the order swapped every round.",
        "- wrk is closed loop: each connection sends its next request when the previous "
        "answer is in, so latency is that of requests *sent* (no coordinated-omission "
        "correction; the open-loop curve is `python -m loadtests.bench`'s). Percentiles are "
        f"wrk's, µs resolution; requests over {cfg['wrk_timeout_s']} s count as timeouts and "
        "are left out. Goodput = responses with status < 400 per second (wrk counts ≥ 400 as "
        "errors; nothing here sends 1xx/3xx).",
        "",
        "Servers:",
        "",
        *[f"- `{n}`: {d}" for n, d in cfg["servers"].items()],
        "",
        "## Gateway / minimal, same run",
        "",
        "Medians over rounds, (min–max) for the ratios, each ratio taken between the two "
        "adjacent runs of one round. *Goodput*: 2xx responses/s. *Model answers*: goodput "
        "minus the gateway's fallback answers (a 200 too; counted by `gateway_fallback_total` "
        "before and after each run). *CPU ms/req*: the server process's CPU time (all its "
        "threads) per response of any status (a shed 503 costs little). *Others' CPU*: what "
        "the rest of this shared machine used during the run.",
        "",
        "| pair | connections | goodput 2xx/s gateway / minimal | ratio "
        "| model answers/s gateway / minimal | ratio | all responses/s ratio "
        "| P50 ms gateway / minimal | P99 ms gateway / minimal | non-2xx gateway / minimal "
        "| gateway fallback share, reasons | CPU ms/req gateway / minimal (ratio) "
        "| others' CPU, max cores |",
        "|---|---:|---|---|---|---|---|---|---|---|---|---|---:|",
    ]
    for s in data["summaries"]:
        a, b, r = s["a_stats"], s["b_stats"], s["ratio"]
        fb = s["a_stats"]["fallback_share"]
        lines.append(
            f"| `{s['a']}` vs `{s['b']}` | {s['connections']} | "
            f"{_f(a['goodput_rps']['median'], 0)} / {_f(b['goodput_rps']['median'], 0)} | "
            f"**{_rng(r['goodput_rps'])}** | "
            f"{_f(a['model_rps']['median'], 0)} / {_f(b['model_rps']['median'], 0)} | "
            f"**{_rng(r['model_rps'])}** | {_rng(r['rps'])} | "
            f"{_f(a['p50_ms']['median'])} / {_f(b['p50_ms']['median'])} | "
            f"{_f(a['p99_ms']['median'])} / {_f(b['p99_ms']['median'])} | "
            f"{a['non_2xx']} / {b['non_2xx']} of {a['requests']} / {b['requests']} | "
            f"{'n/a' if fb is None else f'{fb:.2%}'}"
            + "".join(f", {k} {v}" for k, v in sorted(a["fallback_reasons"].items()))
            + " | "
            f"{_f(a['server_cpu_ms_per_request']['median'], 3)} / "
            f"{_f(b['server_cpu_ms_per_request']['median'], 3)} "
            f"({_f(r['server_cpu_ms_per_request']['median'])}) | "
            f"{max(a['others_cores_max'], b['others_cores_max']):.2f} |"
        )
    if data["extra_cost"]:
        lines += [
            "",
            f"## Where the gateway's extra CPU goes (py-spy, {cfg['profile_seconds']} s per "
            f"server at {cfg['profile_connections']} connections)",
            "",
            "py-spy samples (non-blocking) of the event-loop thread, each charged to its "
            "innermost Python frame (a C extension's time lands on the line that called it; "
            "loadtests/bench/profile.py explains the sampling). µs/request = the "
            "category's share of those samples × the loop thread's CPU ms/request measured "
            "by the OS in the runs above at that connection count; the other threads (the "
            "onnxruntime executor, gRPC's poller) are one row, from the OS, because py-spy "
            "counts a worker thread blocked on its queue as busy. Rows under half a percent "
            "on both sides are left out.",
        ]
        for pair, e in data["extra_cost"].items():
            a, b = PAIRS[pair]
            ca, cb = e["cpu_ms_per_request"][a], e["cpu_ms_per_request"][b]
            pa = data["profiles"][a]
            lines += [
                "",
                f"### `{a}` ({ca * 1e3:.0f} µs/request) vs `{b}` ({cb * 1e3:.0f} µs/request): "
                f"{(ca - cb) * 1e3:+.0f} µs",
                "",
                f"While profiled (two recordings of {cfg['profile_seconds']} s, "
                f"{pa['samples']} + {pa.get('samples_blocking', 0)} loop-thread samples), "
                f"`{a}` answered {pa.get('non_2xx', 0)} non-2xx and "
                f"{pa.get('fallbacks', 0)} fallback answers.",
                "",
                "| where (innermost frame) | gateway µs/req | share of gateway CPU "
                "| minimal µs/req | extra µs/req |",
                "|---|---:|---:|---:|---:|",
            ]
            for row in e["categories"]:
                if max(row["gateway_us"], row["minimal_us"]) < 0.005 * ca * 1e3:
                    continue
                lines.append(
                    f"| {row['category']} | {row['gateway_us']:.0f} | "
                    f"{row['gateway_share']:.1%} | {row['minimal_us']:.0f} | "
                    f"{row['extra_us']:+.0f} |"
                )
            lines += [
                "",
                "Functions with the most extra self time (loop thread; a function the "
                "minimal app also runs is compared with its count there):",
                "",
                "| function (innermost frame) | gateway µs/req | minimal µs/req | extra |",
                "|---|---:|---:|---:|",
                *[
                    f"| `{r['function']}` | {r['gateway_us']:.0f} | {r['minimal_us']:.0f} | "
                    f"{r['extra_us']:+.0f} |"
                    for r in e.get("functions", [])
                ],
            ]
            prof = data["profiles"][a]
            loop_ms = e["loop_thread_cpu_ms_per_request"][a]
            lines += [
                "",
                f"`{a}`'s own functions, inclusive (share of loop-thread samples with the "
                "function on the stack, from a blocking recording, which over-weights lines "
                "right after a system call; and that share of the loop thread's CPU):",
                "",
                "| function | share | µs/req |",
                "|---|---:|---:|",
                *[
                    f"| `{k}` | {v:.1%} | {v * loop_ms * 1e3:.0f} |"
                    for k, v in list(prof["inclusive_gateway"].items())[:20]
                ],
            ]
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(data, indent=1))
    md = out / "compare.md"
    md.write_text(markdown(data))
    return md


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.bench.compare", description=__doc__)
    p.add_argument("--connections", type=_int_list, default=[1, 16, 64], help="default 1,16,64")
    p.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds per connections (3)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--items", type=int, default=50, help="items per request (default 50)")
    p.add_argument("--bodies", type=int, default=2_000, help="prebuilt bodies (2000)")
    p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    p.add_argument(
        "--pairs",
        type=lambda t: [x for x in t.split(",") if x],
        default=list(PAIRS),
        help="comma-separated subset of " + ",".join(PAIRS),
    )
    p.add_argument(
        "--profile-seconds", type=int, default=0, help="py-spy each server this long (0: off)"
    )
    p.add_argument("--profile-connections", type=int, default=16, help="default 16")
    p.add_argument(
        "--keep-profiles", action="store_true", help="keep py-spy's raw stacks under --out"
    )
    p.add_argument(
        "--quiet-wait", type=float, default=5.0,
        help="seconds to wait, before each run, for other processes to go quiet (default 5)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("loadtests/results"))
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    bad = [x for x in args.pairs if x not in PAIRS]
    if bad or not args.pairs:
        p.error(f"--pairs: choose from {', '.join(PAIRS)} (got {', '.join(bad) or 'none'})")
    for opt in ("seconds", "rounds", "threads", "items", "bodies", "profile_connections"):
        if getattr(args, opt) < 1:
            p.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.profile_seconds < 0:
        p.error("--profile-seconds must be 0 (off) or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    data = run(args)
    md = write(data, args.out)
    print(f"results: {md}")
    for s in data["summaries"]:
        r = s["ratio"]["goodput_rps"]["median"]
        print(f"{s['pair']} c={s['connections']}: goodput ratio {_f(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
