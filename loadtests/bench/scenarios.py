"""What the benchmark measures: one scenario per way of answering the same request.

Every scenario answers /predict requests (or, for Triton direct, the batch such a
request becomes) on the same Redis data and the same model files: 50 items each
(``--items``) unless the scenario draws its own item counts, under the run's arrival
process (``--arrivals``) unless the scenario pins its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from tests.procs import GatewayServer, RedisServer, TritonServer, free_port

from gateway.schema import SCHEMA
from gateway.synth import make_world
from loadtests.bench import loadgen
from loadtests.bench.arrivals import Arrivals
from loadtests.bench.stack import MinimalServer, NaiveServer, start_gateway

JSON = {"Content-Type": "application/json"}


@dataclass
class Shared:
    """Servers every scenario uses, started once."""

    redis: RedisServer
    triton: TritonServer
    log_dir: Path
    baseline_src: Path | None = None
    workers: int = 1


@dataclass
class Target:
    """A started scenario: where to send, what to send, which processes to account."""

    port: int
    path: str
    headers: dict[str, str]
    bodies: list[bytes]
    classify: loadgen.Classify
    pids: dict[str, int]
    metrics_url: str | None
    stop: Callable[[], None]
    expects_model: bool = True  # a fallback answer counts against this scenario


@dataclass
class Scenario:
    name: str
    label: str
    start: Callable[[Shared, list[bytes]], Target]
    notes: str = ""
    tags: set[str] = field(default_factory=set)
    arrivals: Arrivals | None = None  # pinned arrival process; None: the run's --arrivals
    items: tuple[int, int] | None = None  # item count drawn uniformly here; None: --items


def _gateway_target(
    shared: Shared, bodies: list[bytes], env: dict[str, str], name: str, **kw: object
) -> Target:
    gw: GatewayServer = start_gateway(
        env,
        shared.log_dir,
        name,
        src=kw.get("src"),
        workers=shared.workers,  # type: ignore[arg-type]
    )
    pids = {"server": gw.proc.pid, "triton": shared.triton.proc.pid, "redis": shared.redis.proc.pid}  # type: ignore[union-attr]
    return Target(
        gw.port, "/predict", JSON, bodies, loadgen.classify_gateway, pids,
        f"{gw.url}/metrics", gw.stop, expects_model=bool(kw.get("expects_model", True)),
    )  # fmt: skip


def _prod_env(shared: Shared, model: str = "ctr") -> dict[str, str]:
    return {
        "GATEWAY_REDIS_URL": shared.redis.url,
        "GATEWAY_TRITON_URL": shared.triton.grpc_url,
        "GATEWAY_MODEL_NAME": model,
        "GATEWAY_LOG_LEVEL": "WARNING",
    }


def gateway_int8(shared: Shared, bodies: list[bytes]) -> Target:
    return _gateway_target(shared, bodies, _prod_env(shared), "gateway-int8")


def gateway_http(shared: Shared, bodies: list[bytes]) -> Target:
    env = {**_prod_env(shared), "GATEWAY_TRITON_URL": f"http://{shared.triton.http_url}"}  # type: ignore[union-attr]
    return _gateway_target(shared, bodies, env, "gateway-http")


def gateway_drift_off(shared: Shared, bodies: list[bytes]) -> Target:
    env = _prod_env(shared) | {"GATEWAY_DRIFT_SAMPLE_RATE": "0"}
    return _gateway_target(shared, bodies, env, "gateway-drift-off")


def gateway_drift_all(shared: Shared, bodies: list[bytes]) -> Target:
    env = _prod_env(shared) | {"GATEWAY_DRIFT_SAMPLE_RATE": "1"}
    return _gateway_target(shared, bodies, env, "gateway-drift-all")


def gateway_fp32(shared: Shared, bodies: list[bytes]) -> Target:
    return _gateway_target(shared, bodies, _prod_env(shared, "ctr_fp32"), "gateway-fp32")


def gateway_before(shared: Shared, bodies: list[bytes]) -> Target:
    return _gateway_target(
        shared, bodies, _prod_env(shared), "gateway-before", src=shared.baseline_src
    )


def gateway_cpu(shared: Shared, bodies: list[bytes]) -> Target:
    # Redis features, in-process onnxruntime (GATEWAY_TRITON_URL unset): the
    # counterpart of minimal-cpu.
    env = {"GATEWAY_REDIS_URL": shared.redis.url, "GATEWAY_LOG_LEVEL": "WARNING"}
    return _gateway_target(shared, bodies, env, "gateway-cpu")


def _minimal(shared: Shared, bodies: list[bytes], mode: str) -> Target:
    log_path = shared.log_dir / f"minimal-{mode}.log"
    srv = MinimalServer(mode, shared.redis.url, shared.triton.grpc_url, log_path=log_path)
    srv.start()
    pids = {"server": srv.proc.pid, "redis": shared.redis.proc.pid}  # type: ignore[union-attr]
    if mode == "triton":
        pids["triton"] = shared.triton.proc.pid  # type: ignore[union-attr]
    return Target(
        srv.port, "/predict", JSON, bodies, loadgen.classify_gateway, pids, None, srv.stop
    )  # fmt: skip


def minimal_triton(shared: Shared, bodies: list[bytes]) -> Target:
    return _minimal(shared, bodies, "triton")


def minimal_cpu(shared: Shared, bodies: list[bytes]) -> Target:
    return _minimal(shared, bodies, "cpu")


def gateway_embedded(shared: Shared, bodies: list[bytes]) -> Target:
    return _gateway_target(shared, bodies, {"GATEWAY_LOG_LEVEL": "WARNING"}, "gateway-embedded")


def gateway_triton_down(shared: Shared, bodies: list[bytes]) -> Target:
    # Nothing listens on this port: every inference call fails at connect, the breaker
    # opens once GATEWAY_BREAKER_MIN_CALLS calls in its window failed, and the fallback
    # answers.
    env = _prod_env(shared) | {"GATEWAY_TRITON_URL": f"127.0.0.1:{free_port()}"}
    gw = GatewayServer(env=env, workers=shared.workers, log_path=shared.log_dir / "fallback.log")
    gw.start(timeout=60, ready=False)  # never ready: Triton is down, by design
    pids = {"server": gw.proc.pid, "redis": shared.redis.proc.pid}  # type: ignore[union-attr]
    return Target(
        gw.port, "/predict", JSON, bodies, loadgen.classify_gateway, pids,
        f"{gw.url}/metrics", gw.stop, expects_model=False,
    )  # fmt: skip


# Shadow counters of each shadow scenario's gateway, scraped just before it stops (the
# run's results carry them: a shadow cost measured with every shadow call dropped would
# mean nothing).
SHADOW_COUNTS: dict[str, dict[str, float]] = {}


def gateway_shadow(shared: Shared, bodies: list[bytes]) -> Target:
    """The gateway scenario with a shadow rollout running: every answered request also
    goes to the candidate off the request path. Its own Redis database (features loaded
    there too), so the rollout state it follows is not the plain gateway's. The candidate
    is version 1 again (the committed repository has one version): a retrained version
    has the same architecture, so the same cost."""
    import urllib.request

    import redis

    from gateway.features.loader import load
    from gateway.rollout.runtime import started
    from gateway.rollout.state import Mode, RolloutState

    url = shared.redis.url.rsplit("/", 1)[0] + "/1"
    load(url, progress=False)
    state = started(RolloutState(), time.time(), "1", "1", Mode.SHADOW, (), 60.0)
    client = redis.Redis.from_url(url)
    client.delete("gw:rollout:ctr:state")
    client.hset("gw:rollout:ctr:state", mapping=state.to_fields())  # type: ignore[arg-type]
    client.close()
    env = _prod_env(shared) | {"GATEWAY_REDIS_URL": url, "GATEWAY_MODEL_VERSION": "1"}
    target = _gateway_target(shared, bodies, env, "gateway-shadow")
    stop = target.stop
    metrics_url = target.metrics_url

    def scrape_then_stop() -> None:
        counts: dict[str, float] = {}
        try:
            assert metrics_url is not None
            with urllib.request.urlopen(metrics_url, timeout=5) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("gateway_shadow_total{"):
                        outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
                        counts[outcome] = float(line.rsplit(" ", 1)[1])
        finally:
            SHADOW_COUNTS["gateway-shadow"] = counts
            stop()

    target.stop = scrape_then_stop
    return target


def naive(shared: Shared, bodies: list[bytes]) -> Target:
    nv = NaiveServer(
        shared.redis.url, shared.triton.http_url, log_path=shared.log_dir / "naive.log"
    ).start()
    pids = {"server": nv.proc.pid, "triton": shared.triton.proc.pid, "redis": shared.redis.proc.pid}  # type: ignore[union-attr]
    return Target(nv.port, "/predict", JSON, bodies, loadgen.classify_gateway, pids, None, nv.stop)


def triton_bodies(bodies: list[bytes]) -> tuple[list[bytes], int]:
    """The model input each /predict body becomes, as Triton HTTP binary-tensor requests.

    Returns the bodies and the JSON header length (the same for all: same shape)."""
    world = make_world()
    out: list[bytes] = []
    header_len = 0
    for raw in bodies:
        body = orjson.loads(raw)
        uid = body["user_id"]
        user = (
            world.user_vectors[int(uid[1:])] if uid[1:].isdigit() else SCHEMA.user.default_vector()
        )
        items = np.stack(
            [
                world.item_vectors[int(i[1:])] if i[1:].isdigit() else SCHEMA.item.default_vector()
                for i in body["item_ids"]
            ]
        )
        matrix = SCHEMA.assemble(user, items, SCHEMA.encode_context(body.get("context")))
        header = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": SCHEMA.input_name,
                        "shape": list(matrix.shape),
                        "datatype": "FP32",
                        "parameters": {"binary_data_size": matrix.nbytes},
                    }
                ],
                "outputs": [{"name": SCHEMA.output_name, "parameters": {"binary_data": True}}],
            }
        )
        header_len = len(header)
        out.append(header + matrix.tobytes())
    return out, header_len


def triton_direct(shared: Shared, bodies: list[bytes]) -> Target:
    tbodies, header_len = triton_bodies(bodies)
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(header_len),
    }
    pids = {"triton": shared.triton.proc.pid}  # type: ignore[union-attr]
    return Target(
        shared.triton.http_port, "/v2/models/ctr/infer", headers, tbodies,
        loadgen.classify_status, pids, None, lambda: None,
    )  # fmt: skip


SCENARIOS = [
    Scenario(
        "gateway", "gateway (Redis + Triton, INT8)", gateway_int8,
        "the product: one MGET, one Triton gRPC request", {"core"},
    ),
    Scenario(
        "gateway-http", "gateway (Redis + Triton over HTTP, INT8)", gateway_http,
        "GATEWAY_TRITON_URL=http://...: the gateway's own HTTP transport to Triton", {"core"},
    ),
    Scenario(
        "naive", "naive (GET per entity, clients per request)", naive,
        "loadtests/naive_app.py", {"core"},
    ),
    Scenario(
        "triton-direct", "Triton direct, same batch (HTTP, binary)", triton_direct,
        "lower bound of the inference stage", {"core"},
    ),
    Scenario(
        "embedded", "gateway embedded (in-memory + onnxruntime)", gateway_embedded,
        "no Redis, no Triton", {"core"},
    ),
    Scenario(
        "gateway-fp32", "gateway (Redis + Triton, FP32)", gateway_fp32,
        "GATEWAY_MODEL_NAME=ctr_fp32", {"core"},
    ),
    Scenario(
        "fallback", "gateway, Triton down (fallback)", gateway_triton_down,
        "breaker open, rule-based scorer answers", {"core"},
    ),
    Scenario(
        "gateway-poisson", "gateway INT8, Poisson arrivals", gateway_int8,
        "same server as gateway; exponential inter-arrival times (seeded)", {"core"},
        arrivals=Arrivals("poisson"),
    ),
    Scenario(
        "gateway-burst", "gateway INT8, bursts of 20", gateway_int8,
        "same server as gateway; 20 requests at once every 20/rate s (100 ms at 200/s)",
        {"core"}, arrivals=Arrivals("burst", burst_size=20),
    ),
    Scenario(
        "gateway-locust", "gateway INT8, locust traffic (bursts of 20, 10-200 items)",
        gateway_int8,
        "bursts of 20 as locust's 20 users spawned together; 10-200 items per request",
        {"core"}, arrivals=Arrivals("burst", burst_size=20), items=(10, 200),
    ),
    Scenario(
        "gateway-shadow", "gateway INT8, shadow rollout on", gateway_shadow,
        "every answered request also scored by a candidate off the request path; run with "
        "gateway, interleaved", {"rollout"},
    ),
    Scenario(
        "gateway-before", "gateway before this change (INT8)", gateway_before,
        "--baseline-ref: src/gateway from that git revision", {"baseline"},
    ),
    Scenario(
        "gateway-drift-off", "gateway INT8, drift counting off", gateway_drift_off,
        "GATEWAY_DRIFT_SAMPLE_RATE=0 (the gateway scenario: the default, 0.5)", {"drift"},
    ),
    Scenario(
        "gateway-drift-all", "gateway INT8, drift counting every request", gateway_drift_all,
        "GATEWAY_DRIFT_SAMPLE_RATE=1", {"drift"},
    ),
    Scenario(
        "gateway-cpu", "gateway, Redis + in-process onnxruntime", gateway_cpu,
        "GATEWAY_REDIS_URL set, GATEWAY_TRITON_URL unset", {"minimal"},
    ),
    Scenario(
        "minimal-triton", "minimal app: MGET + Triton gRPC", minimal_triton,
        "loadtests/minimal_app.py: no budgets, breakers, retries, admission, metrics",
        {"minimal"},
    ),
    Scenario(
        "minimal-cpu", "minimal app: MGET + inline onnxruntime", minimal_cpu,
        "loadtests/minimal_app.py, onnxruntime session.run on the event loop", {"minimal"},
    ),
]  # fmt: skip
