"""Bursts of simultaneous ModelInfer calls against Triton, as the gateway sends them.

``python -m loadtests.triton_burst --grpc 127.0.0.1:8001 [--metrics URL]`` loads a
running Triton; ``--model-repository DIR`` starts a local Triton (``gateway
triton-local``) over a repository; ``--variant LABEL=CONFIG`` (repeatable) starts one
local Triton per ``config.pbtxt`` for ``--model`` and runs them interleaved,
``--rounds`` times each, so a before/after comparison shares the machine's noise.

Every ``--interval-ms`` a burst of ``--size`` requests starts at once (on a fixed
schedule: a slow burst does not delay the next), each of ``--min-rows``..``--max-rows``
rows, through the gateway's own client (``gateway.inference.triton.TritonBackend``:
the same channel, the remaining budget as gRPC deadline and as Triton's per-request
``timeout``). Per run it prints the outcomes the client saw, client latency
P50/P99/max, and Triton's own counters as the difference of two scrapes of its
/metrics (successes, failures by reason, queue and compute time per request, rows and
requests per execution) plus the mean time failed requests spent inside Triton
(statistics extension). The load is bounded: ``--bursts`` x ``--size`` requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gateway.errors import InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.inference.triton import TritonBackend, grpc_target
from gateway.schema import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"

# Triton's per-model counters this tool reads (metrics docs, "Inference Request Metrics"
# and "Latencies"); the durations count successful requests only.
_COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)


@dataclass
class Load:
    bursts: int
    size: int
    interval_ms: float
    min_rows: int
    max_rows: int
    timeout_ms: float
    seed: int


@dataclass
class RunResult:
    label: str
    round: int
    requests: int
    outcomes: dict[str, int]
    # Requests Triton failed, any reason (its statistics extension): REJECTED (queue
    # policy timeout) or CANCELED (the client's deadline passed while the request sat
    # in Triton's queue), by reason in ``triton`` when its /metrics were read.
    dropped: int
    rejected: int | None  # REJECTED alone; None without /metrics
    latency_ms: dict[str, float | None]  # every request, whatever its outcome
    ok_latency_ms: dict[str, float | None]
    triton: dict[str, float | None]
    wall_s: float


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
    }


def scrape(url: str, model: str) -> dict[str, float]:
    """Triton's per-model counters, summed over versions, failures keyed by reason."""
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            # prometheus_client's parser names counter samples "<family>_total".
            name = s.name.removesuffix("_total")
            if name not in _COUNTERS or s.labels.get("model") != model:
                continue
            key = name
            if "reason" in s.labels:
                key += ":" + s.labels["reason"]
            out[key] = out.get(key, 0.0) + s.value
    return out


def _triton_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(before) | set(after)}
    ok = d.get("nv_inference_request_success", 0.0)
    execs = d.get("nv_inference_exec_count", 0.0)

    def per(name: str, n: float, scale: float = 1e-3) -> float | None:
        return round(d.get(name, 0.0) * scale / n, 3) if n else None

    out: dict[str, float | None] = {
        "success": ok,
        "executions": execs,
        "queue_ms_per_ok": per("nv_inference_queue_duration_us", ok),
        "compute_infer_ms_per_ok": per("nv_inference_compute_infer_duration_us", ok),
        "compute_io_ms_per_ok": (
            round(
                (
                    d.get("nv_inference_compute_input_duration_us", 0.0)
                    + d.get("nv_inference_compute_output_duration_us", 0.0)
                )
                * 1e-3
                / ok,
                3,
            )
            if ok
            else None
        ),
        "rows_per_execution": per("nv_inference_count", execs, 1.0),
        "requests_per_execution": per("nv_inference_request_success", execs, 1.0),
    }
    for k, v in sorted(d.items()):
        if k.startswith("nv_inference_request_failure:"):
            out["failure_" + k.split(":", 1)[1]] = v
    return out


async def _fail_stats(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """(count, ns) of failed requests from Triton's statistics extension."""
    stats = await client.get_inference_statistics(model, as_json=True, client_timeout=5)
    fail = stats["model_stats"][0]["inference_stats"].get("fail", {})
    return int(fail.get("count", 0)), int(fail.get("ns", 0))


def _classify(exc: BaseException) -> str:
    msg = str(exc)
    if isinstance(exc, InferenceTimeout):
        return "rejected_in_queue" if "in its queue" in msg else "deadline_exceeded"
    if isinstance(exc, InferenceUnavailable):
        return "unavailable"
    return "error"


async def run_bursts(
    grpc_url: str,
    metrics_url: str | None,
    model: str,
    load: Load,
    label: str = "",
    round_no: int = 0,
    progress: bool = True,
) -> RunResult:
    """One bounded run: ``load.bursts`` bursts of ``load.size`` concurrent requests."""
    rng = np.random.default_rng(load.seed)
    sizes = rng.integers(load.min_rows, load.max_rows + 1, size=(load.bursts, load.size))
    pool = rng.standard_normal((load.max_rows, SCHEMA.input_width)).astype(np.float32)
    backend = TritonBackend(grpc_url, model)
    await backend.start()
    stats_client = grpcclient.InferenceServerClient(grpc_target(grpc_url))
    timeout_s = load.timeout_ms / 1e3
    outcomes: Counter[str] = Counter()
    lat: list[float] = []
    ok_lat: list[float] = []

    async def one(rows: int) -> None:
        t0 = time.perf_counter()
        try:
            await backend.infer(pool[:rows], timeout_s)
            kind = "ok"
        except InferenceError as exc:
            kind = _classify(exc)
        ms = (time.perf_counter() - t0) * 1e3
        outcomes[kind] += 1
        lat.append(ms)
        if kind == "ok":
            ok_lat.append(ms)

    try:
        # Warm the channel and the model instances outside the measured window.
        for _ in range(3):
            await asyncio.gather(*(one(int(n)) for n in sizes[0][:4]), return_exceptions=True)
        outcomes.clear()
        lat.clear()
        ok_lat.clear()
        await asyncio.sleep(0.3)
        before = scrape(metrics_url, model) if metrics_url else {}
        fail0 = await _fail_stats(stats_client, model)
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        report_every = max(1, load.bursts // 5)
        for b in range(load.bursts):
            delay = start + b * load.interval_ms / 1e3 - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.extend(asyncio.create_task(one(int(n))) for n in sizes[b])
            if progress and (b + 1) % report_every == 0:
                print(
                    f"  [{label or 'run'} r{round_no}] burst {b + 1}/{load.bursts}: "
                    + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items())),
                    file=sys.stderr,
                    flush=True,
                )
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        # Triton finishes a request it rejects only when its batcher thread next wakes
        # (up to 500 ms later, see the results file); wait for the counters to settle.
        await asyncio.sleep(1.0)
        after = scrape(metrics_url, model) if metrics_url else {}
        fail1 = await _fail_stats(stats_client, model)
    finally:
        await backend.close()
        await stats_client.close()
    triton = _triton_summary(before, after) if metrics_url else {}
    nfail = fail1[0] - fail0[0]
    triton["failed_mean_ms_in_triton"] = (
        round((fail1[1] - fail0[1]) / nfail / 1e6, 1) if nfail else None
    )
    return RunResult(
        label=label,
        round=round_no,
        requests=load.bursts * load.size,
        outcomes=dict(sorted(outcomes.items())),
        dropped=nfail,
        rejected=int(triton.get("failure_REJECTED") or 0) if metrics_url else None,
        latency_ms=_pct(lat),
        ok_latency_ms=_pct(ok_lat),
        triton=triton,
        wall_s=round(wall, 2),
    )


def describe(r: RunResult) -> str:
    """One line: what the client saw and what Triton counted."""
    t = r.triton
    return (
        f"{r.label or 'run'} r{r.round}: {r.requests} requests, dropped by Triton {r.dropped} "
        f"({_reasons(r) or 'none' if r.rejected is not None else 'reasons need --metrics'}), "
        f"client "
        f"{r.outcomes}; latency (all) P50/P99/max {_cell(r.latency_ms['p50'])}/"
        f"{_cell(r.latency_ms['p99'])}/{_cell(r.latency_ms['max'])} ms, ok P99 "
        f"{_cell(r.ok_latency_ms['p99'])} ms; Triton: failed requests spent "
        f"{_cell(t.get('failed_mean_ms_in_triton'))} ms there on average, queue "
        f"{_cell(t.get('queue_ms_per_ok'))} ms/ok, compute "
        f"{_cell(t.get('compute_infer_ms_per_ok'))} ms/ok, "
        f"{_cell(t.get('requests_per_execution'))} requests and "
        f"{_cell(t.get('rows_per_execution'))} rows per execution"
    )


# -- local Triton servers ---------------------------------------------------------------


def variant_repository(base: Path, model: str, config: Path, dest: Path) -> Path:
    """A repository holding only ``model``, with ``config`` and links to base's versions."""
    src = base / model
    if not src.is_dir():
        raise SystemExit(f"error: {src} is not a model folder")
    if not config.is_file():
        raise SystemExit(f"error: {config} is not a file")
    mdir = dest / model
    mdir.mkdir(parents=True)
    shutil.copyfile(config, mdir / "config.pbtxt")
    for v in (p for p in src.iterdir() if p.is_dir() and p.name.isdigit()):
        (mdir / v.name).symlink_to(v.resolve())
    return dest


@contextmanager
def local_triton(repo: Path, log_dir: Path, label: str) -> Iterator[tuple[str, str]]:
    """``gateway triton-local`` over ``repo``; yields (gRPC url, metrics url)."""
    if not repo.is_dir():
        raise SystemExit(f"error: model repository {repo} is not a folder")
    sys.path.insert(0, str(ROOT))
    from tests.procs import TritonServer  # the test suite's launcher: free ports, log

    server = TritonServer(repo=repo, log_path=log_dir / f"triton-{label}.log")
    try:
        server.start()
    except Exception as exc:
        server.stop()
        log = server.log_path.read_text(errors="replace") if server.log_path else ""
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "")
        raise SystemExit(
            f"error: the local Triton for {label!r} did not start ({exc}); last log line: {last}"
        ) from exc
    try:
        yield server.grpc_url, server.metrics_url
    finally:
        server.stop()


async def check_target(grpc_url: str, model: str) -> None:
    """Fail with one line unless ``model`` is ready on the Triton at ``grpc_url``."""
    client = grpcclient.InferenceServerClient(grpc_target(grpc_url))
    try:
        ready = await client.is_model_ready(model, client_timeout=5)
    except InferenceServerException as exc:
        raise SystemExit(f"error: Triton at {grpc_url}: {exc.message()}") from None
    finally:
        await client.close()
    if not ready:
        raise SystemExit(f"error: model {model!r} is not ready on the Triton at {grpc_url}")


# -- command line -----------------------------------------------------------------------


def _labelled(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return v

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.triton_burst",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--grpc", help="host:port of a running Triton's gRPC endpoint")
    where.add_argument(
        "--model-repository", type=Path, help="start a local Triton over this repository"
    )
    where.add_argument(
        "--variant",
        type=_labelled,
        action="append",
        metavar="LABEL=CONFIG",
        help="a config.pbtxt for --model; one local Triton per variant, runs interleaved",
    )
    p.add_argument("--metrics", help="Triton's metrics URL (with --grpc; else known)")
    p.add_argument("--model", default="ctr")
    p.add_argument(
        "--base-repository",
        type=Path,
        default=MODEL_REPOSITORY,
        help="where --variant takes the model files from",
    )
    p.add_argument("--bursts", type=_positive(int), default=100)
    p.add_argument("--size", type=_positive(int), default=20, help="requests per burst")
    p.add_argument("--interval-ms", type=_positive(float), default=100.0)
    p.add_argument("--min-rows", type=_positive(int), default=10)
    p.add_argument("--max-rows", type=_positive(int), default=200)
    p.add_argument(
        "--timeout-ms",
        type=_positive(float),
        default=30.0,
        help="gRPC deadline and Triton per-request timeout (the gateway's inference budget)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--rounds", type=_positive(int), default=1, help="runs per target")
    p.add_argument("--json", type=Path, help="write every run's numbers here")
    p.add_argument("--markdown", type=Path, help="write a results table here")
    p.add_argument("--note", default="", help="a line for the markdown header")
    return p


def _cell(v: object) -> str:
    return "-" if v is None else str(v)


def _reasons(r: RunResult) -> str:
    """Triton's failures by reason, e.g. ``CANCELED 432``; empty when none or unknown."""
    return ", ".join(
        f"{k.removeprefix('failure_')} {int(v)}"
        for k, v in r.triton.items()
        if k.startswith("failure_") and v
    )


def _markdown(results: list[RunResult], load: Load, argv: list[str], note: str) -> str:
    labels = list(dict.fromkeys(r.label for r in results))
    lines = [
        "# Triton under bursts",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"`python -m loadtests.triton_burst {' '.join(argv)}`",
        "",
        f"- {load.bursts} bursts x {load.size} simultaneous requests every "
        f"{load.interval_ms:g} ms, {load.min_rows}-{load.max_rows} rows each (seed "
        f"{load.seed}), deadline and Triton timeout {load.timeout_ms:g} ms, through the "
        "gateway's TritonBackend; runs of the targets interleaved.",
        f"- Machine: {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, shared and noisy; local Triton 2.51 "
        "(nvidia-pytriton wheel, Python backend running onnxruntime on CPU).",
    ]
    if note:
        lines.append(f"- {note}")
    lines += [
        "",
        "| target | round | dropped by Triton (by reason) | client ok / deadline "
        "| all P50 / P99 / max ms | ok P99 ms | failed: mean ms in Triton | queue ms/ok "
        "| requests / rows per execution |",
        "|---|---:|---:|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        t = r.triton
        lines.append(
            f"| {r.label} | {r.round} | {r.dropped} ({_reasons(r) or '-'}) "
            f"| {r.outcomes.get('ok', 0)} / {r.outcomes.get('deadline_exceeded', 0)} | "
            f"{_cell(r.latency_ms['p50'])} / {_cell(r.latency_ms['p99'])} / "
            f"{_cell(r.latency_ms['max'])} | {_cell(r.ok_latency_ms['p99'])} | "
            f"{_cell(t.get('failed_mean_ms_in_triton'))} | {_cell(t.get('queue_ms_per_ok'))} | "
            f"{_cell(t.get('requests_per_execution'))} / {_cell(t.get('rows_per_execution'))} |"
        )
    lines += [
        "",
        "| target | runs | dropped (sum) | dropped per run | ok P99 ms per run | worst max ms |",
        "|---|---:|---:|---|---|---:|",
    ]
    for label in labels:
        rs = [r for r in results if r.label == label]
        lines.append(
            f"| {label} | {len(rs)} | {sum(r.dropped for r in rs)} | "
            f"{', '.join(str(r.dropped) for r in rs)} | "
            f"{', '.join(str(r.ok_latency_ms['p99']) for r in rs)} | "
            f"{max((r.latency_ms['max'] or 0) for r in rs)} |"
        )
    return "\n".join(lines) + "\n"


async def _amain(args: argparse.Namespace, argv: list[str]) -> int:
    load = Load(
        bursts=args.bursts,
        size=args.size,
        interval_ms=args.interval_ms,
        min_rows=args.min_rows,
        max_rows=args.max_rows,
        timeout_ms=args.timeout_ms,
        seed=args.seed,
    )
    results: list[RunResult] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triton-burst-")))
        targets: list[tuple[str, str, str | None]] = []
        if args.grpc:
            targets.append(("triton", args.grpc, args.metrics))
        elif args.model_repository:
            g, m = stack.enter_context(local_triton(args.model_repository, tmp, "repo"))
            targets.append(("repo", g, m))
        else:
            seen: set[str] = set()
            for label, config in args.variant:
                if label in seen:
                    raise SystemExit(f"error: variant label {label!r} given twice")
                seen.add(label)
                repo = variant_repository(
                    args.base_repository, args.model, config, tmp / "repos" / label
                )
                print(f"starting a local Triton for {label} ({config})", file=sys.stderr)
                g, m = stack.enter_context(local_triton(repo, tmp, label))
                targets.append((label, g, m))
        for _, grpc_url, _ in targets:
            await check_target(grpc_url, args.model)
        for rnd in range(1, args.rounds + 1):
            for label, grpc_url, metrics_url in targets:
                r = await run_bursts(grpc_url, metrics_url, args.model, load, label, rnd)
                print(describe(r), flush=True)
                results.append(r)
    if len(targets) > 1 or args.rounds > 1:
        print("summary (dropped by Triton, per run):")
        for label, _, _ in targets:
            rs = [r for r in results if r.label == label]
            print(f"  {label}: {[r.dropped for r in rs]} (sum {sum(r.dropped for r in rs)})")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"argv": argv, "load": asdict(load), "runs": [asdict(r) for r in results]},
                indent=1,
            )
            + "\n"
        )
    if args.markdown:
        args.markdown.write_text(_markdown(results, load, argv, args.note))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.min_rows > args.max_rows:
        _parser().error("--min-rows must not exceed --max-rows")
    if args.grpc and ":" not in args.grpc:
        _parser().error(f"--grpc wants host:port, got {args.grpc!r}")
    return asyncio.run(_amain(args, argv))


if __name__ == "__main__":
    sys.exit(main())
