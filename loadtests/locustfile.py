"""Locust load test for POST /predict, with pass/fail targets.

Realistic traffic: Zipf-popular users and items (loadtests/bench/workload.py), 10 to
200 items per request, about 2 % unknown ids (served on schema defaults), a context
on every request. A headless run exits non-zero when any target is missed:

    .venv/bin/locust -f loadtests/locustfile.py --headless -H http://127.0.0.1:8080 \\
        -u 20 -r 20 -t 60s --p99-ms 25 --max-error-rate 0.001 --max-fallback-rate 0.01

Targets (command-line options, or the environment variables named in ``--help``):
P99 of /predict in ms, the failed-request ratio, and the ratio of answers that came
from the fallback instead of the model. Each user sends ``--user-rps`` requests per
second (``constant_throughput``), so ``-u`` users offer about ``u * user-rps`` requests/s.

Locust is closed loop: a user waits for an answer before its next request, so when
the gateway stalls the offered load drops and the stall is under-counted (coordinated
omission). It answers "does this deployment meet its targets under this traffic?";
the latency-vs-throughput curve comes from the open-loop benchmark,
``python -m loadtests.bench``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson
from locust import FastHttpUser, constant_throughput, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

# Locust puts this folder on sys.path; the shared workload lives in the package above.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from loadtests.bench.workload import Workload  # noqa: E402

_fallbacks = 0  # answers from the fallback, this process (workers report theirs to the master)
_BODIES: list[bytes] | None = None
# Bodies drawn once per process, before the clock matters: drawing a Zipf sample of up to
# 200 ids and encoding it took locust ~0.3 ms of CPU per request, on the same two cores
# as the gateway. 4,096 distinct bodies (each user cycles through them from its own
# offset) keep the traffic's mix of users, items and sizes.
POOL = 4_096


@events.init_command_line_parser.add_listener
def _options(parser) -> None:  # type: ignore[no-untyped-def]
    group = parser.add_argument_group("gateway targets")
    group.add_argument(
        "--p99-ms", type=float, default=25.0, env_var="LOCUST_P99_MS",
        help="fail when the P99 of /predict is above this (ms)",
    )  # fmt: skip
    group.add_argument(
        "--max-error-rate", type=float, default=0.001, env_var="LOCUST_MAX_ERROR_RATE",
        help="fail when more than this share of requests fail (0-1)",
    )  # fmt: skip
    group.add_argument(
        "--max-fallback-rate", type=float, default=0.01, env_var="LOCUST_MAX_FALLBACK_RATE",
        help="fail when more than this share of answers come from the fallback (0-1)",
    )  # fmt: skip
    group.add_argument(
        "--user-rps", type=float, default=10.0, env_var="LOCUST_USER_RPS",
        help="requests per second per user (0: no pause between requests)",
    )  # fmt: skip
    group.add_argument(
        "--workload-seed", type=int, default=1, env_var="LOCUST_WORKLOAD_SEED",
        help="seed of the traffic generator",
    )  # fmt: skip


def _bodies(env: Environment) -> list[bytes]:
    global _BODIES
    if _BODIES is None:
        workload = Workload(seed=int(env.parsed_options.workload_seed), min_items=10, max_items=200)
        _BODIES = workload.bodies(POOL)
    return _BODIES


class GatewayUser(FastHttpUser):
    """One client of the gateway: /predict with Zipf users and items."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        rps = float(environment.parsed_options.user_rps) if environment.parsed_options else 10.0
        self._pacer = constant_throughput(rps) if rps > 0 else None
        self._bodies = _bodies(environment)
        self._next = id(self) % POOL

    def wait_time(self) -> float:
        """Pace each user at --user-rps (constant_throughput), or not at all."""
        return float(self._pacer(self)) if self._pacer else 0.0

    @task
    def predict(self) -> None:
        global _fallbacks
        body = self._bodies[self._next]
        self._next = (self._next + 1) % POOL
        with self.client.post(
            "/predict",
            data=body,
            headers={"Content-Type": "application/json"},
            name="/predict",
            catch_response=True,
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return
            content = resp.content or b""
            # The gateway writes compact JSON: the model's answers say so literally, and
            # only the rest are parsed (a full parse of 200 scores costs locust CPU).
            if b'"fallback":null' not in content:
                try:
                    answer = orjson.loads(content)
                except orjson.JSONDecodeError:
                    resp.failure("response is not JSON")
                    return
                if answer.get("fallback") is not None:
                    _fallbacks += 1
            resp.success()


@events.report_to_master.add_listener
def _to_master(client_id: str, data: dict) -> None:
    global _fallbacks
    data["gateway_fallbacks"], _fallbacks = _fallbacks, 0


@events.worker_report.add_listener
def _from_worker(client_id: str, data: dict) -> None:
    global _fallbacks
    _fallbacks += int(data.get("gateway_fallbacks", 0))


def verdict(env: Environment) -> list[str]:
    """The targets missed by this run, as readable lines; empty when all were met."""
    opts = env.parsed_options
    total = env.stats.total
    missed = []
    if total.num_requests == 0:
        return ["no requests were sent"]
    p99 = total.get_response_time_percentile(0.99)
    if p99 > opts.p99_ms:
        missed.append(f"P99 {p99:.1f} ms > {opts.p99_ms:g} ms")
    if total.fail_ratio > opts.max_error_rate:
        missed.append(f"error rate {total.fail_ratio:.2%} > {opts.max_error_rate:.2%}")
    answered = max(1, total.num_requests - total.num_failures)
    fb = _fallbacks / answered
    if fb > opts.max_fallback_rate:
        missed.append(f"fallback rate {fb:.2%} > {opts.max_fallback_rate:.2%}")
    return missed


@events.quitting.add_listener
def _exit_code(environment: Environment, **_kw: object) -> None:
    if environment.parsed_options is None or isinstance(environment.runner, WorkerRunner):
        return  # the master (or a standalone run) decides
    missed = verdict(environment)
    total = environment.stats.total
    line = (
        f"gateway targets: {total.num_requests} requests, "
        f"P99 {total.get_response_time_percentile(0.99):.1f} ms, "
        f"errors {total.fail_ratio:.2%}, fallbacks {_fallbacks}"
    )
    if missed:
        print(f"{line}: MISSED ({'; '.join(missed)})", file=sys.stderr)
        environment.process_exit_code = 1
    else:
        print(f"{line}: all targets met", file=sys.stderr)
        environment.process_exit_code = 0
