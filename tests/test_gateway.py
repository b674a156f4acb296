"""The gateway against a real redis-server and the real local Triton."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis

from gateway.features import codec
from gateway.features.loader import load
from gateway.features.redis_store import RedisFeatureStore
from gateway.schema import DEVICES, SCHEMA
from gateway.synth import Impressions, design_matrix, make_world
from tests.procs import MODEL_REPOSITORY, GatewayServer, RedisServer, TritonServer
from tests.protocols import PROTOCOLS, triton_url

BUDGET_SLACK_S = 0.010  # the "total budget + 10 ms"
ITEMS = [f"i{k}" for k in range(0, 500, 10)]  # 50 known items


# One client for the module: httpx.post() builds a client (and an SSL context) per call,
# which alone takes tens of milliseconds and would swamp the latencies measured here.
_HTTP = httpx.Client(timeout=5)


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    _HTTP.close()


def _post(
    gw: GatewayServer, body: dict, headers: dict | None = None
) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = _HTTP.post(f"{gw.url}/predict", json=body, headers=headers)
    return r, time.perf_counter() - t0


def _metric(gw: GatewayServer, name: str, **labels: str) -> float:
    text = _HTTP.get(f"{gw.url}/metrics", timeout=5).text
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = rf"^{name}{{{lab}}} (\S+)$" if lab else rf"^{name} (\S+)$"
    m = re.search(pat, text, re.M)
    return float(m.group(1)) if m else 0.0


def _triton_requests(t: TritonServer, model: str = "ctr") -> float:
    text = _HTTP.get(t.metrics_url, timeout=5).text
    total = 0.0
    for name in ("nv_inference_request_success", "nv_inference_request_failure"):
        m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        total += float(m.group(1)) if m else 0.0
    return total


def _env(redis_url: str, inference_url: str, **extra: object) -> dict[str, str]:
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_TRITON_URL": inference_url}
    env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def test_embedded_default_needs_no_servers(gateway_factory: Callable[..., GatewayServer]) -> None:
    gw = gateway_factory(ready=True)
    r, _ = _post(gw, {"user_id": "u1", "item_ids": ["i1", "i2", "unknown-item"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["fallback"] is None and body["model"] == {"name": "ctr", "version": "1"}
    assert [s["item_id"] for s in body["scores"]] == ["i1", "i2", "unknown-item"]
    assert body["missing"] == {"user": False, "items": 1}
    ready = _HTTP.get(f"{gw.url}/readyz").json()
    assert ready["features"] == "memory" and ready["inference"] == "onnxruntime-embedded"
    assert gw.log_path is not None and "embedded default" in gw.log_path.read_text()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_model_path_scores_equal_onnxruntime_on_the_same_features(
    protocol: str,
    redis_server: RedisServer,
    triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    gw = gateway_factory(_env(redis_server.url, triton_url(triton, protocol)), ready=True)
    items = ITEMS + ["not-an-item"]
    r, _ = _post(
        gw,
        {
            "user_id": "u5",
            "item_ids": items,
            "context": {"hour": 21, "device": "tablet"},
            "request_id": "req-1",
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["fallback"] is None, body
    assert body["request_id"] == "req-1"
    assert body["missing"] == {"user": False, "items": 1}
    assert set(body["timings_ms"]) == {"features", "inference", "postprocess", "total"}

    world = make_world()
    n = len(ITEMS)
    idx = np.array([int(i[1:]) for i in ITEMS])
    imps = Impressions(
        np.full(n, 5),
        idx,
        np.full(n, 21),
        np.full(n, DEVICES.index("tablet")),
        np.zeros(n, np.float32),
    )
    x = design_matrix(world, imps)
    unknown = SCHEMA.assemble(
        world.user_vectors[5],
        SCHEMA.item.default_vector()[None, :],
        SCHEMA.encode_context({"hour": 21, "device": "tablet"}),
    )
    x = np.vstack([x, unknown])
    sess = ort.InferenceSession(str(MODEL_REPOSITORY / "ctr" / "1" / "model.onnx"))
    expected = sess.run(None, {"features": x})[0][:, 0]
    got = np.array([s["score"] for s in body["scores"]])
    assert np.max(np.abs(got - expected)) < 1e-5


def test_gateway_feature_matrix_equals_training_matrix_byte_for_byte(
    redis_server: RedisServer,
) -> None:
    world = make_world()
    users = [3, 9999]
    items = np.array([0, 17, 4999, 1234, 17])

    async def served(u: int) -> np.ndarray:
        store = RedisFeatureStore(redis_server.url)
        try:
            b = await store.fetch(f"u{u}", [f"i{i}" for i in items])
        finally:
            await store.close()
        return SCHEMA.assemble(
            b.user, b.items, SCHEMA.encode_context({"hour": 7, "device": "mobile"})
        )

    for u in users:
        n = len(items)
        imps = Impressions(
            np.full(n, u), items, np.full(n, 7), np.zeros(n, np.int64), np.zeros(n, np.float32)
        )
        assert asyncio.run(served(u)).tobytes() == design_matrix(world, imps).tobytes()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_triton_down_breaker_opens_then_model_returns(
    protocol: str,
    redis_server: RedisServer,
    gateway_factory: Callable[..., GatewayServer],
    tmp_path,
) -> None:
    reset_s = 5.0
    t = TritonServer(log_path=tmp_path / "triton.log").start()
    try:
        gw = gateway_factory(
            _env(
                redis_server.url,
                triton_url(t, protocol),
                breaker_min_calls=3,
                breaker_reset_timeout_s=reset_s,
            ),
            ready=True,
        )
        req = {"user_id": "u1", "item_ids": ITEMS}
        r, _ = _post(gw, req)
        assert r.json()["fallback"] is None

        t.stop()
        reasons = []
        for _ in range(8):
            r, took = _post(gw, req)
            assert r.status_code == 200
            fb = r.json()["fallback"]
            assert fb is not None and fb["stage"] == "inference"
            reasons.append(fb["reason"])
            assert took <= 0.050 + BUDGET_SLACK_S, took
        assert reasons[0] in ("inference_error", "timeout")
        assert reasons[-1] == "circuit_open"
        opened = time.monotonic()
        assert _metric(gw, "gateway_circuit_state", dependency="triton") == 2

        t.start()  # Triton is back while the breaker is still open
        before = _triton_requests(t)
        while time.monotonic() - opened < reset_s - 1.0:
            r, took = _post(gw, req)
            body = r.json()
            if body["fallback"] is None:
                break
            assert body["fallback"]["reason"] == "circuit_open"
            assert body["timings_ms"]["total"] < 5.0, body["timings_ms"]
        assert _triton_requests(t) == before  # the open breaker never touched Triton

        while True:
            r, _ = _post(gw, req)
            if r.json()["fallback"] is None:
                break
            assert time.monotonic() - opened < reset_s + 2.0, "model did not come back in time"
            time.sleep(0.05)
        # The first answer was a half-open probe; the rest of the probes close it.
        for _ in range(3):
            assert _post(gw, req)[0].json()["fallback"] is None
        assert _metric(gw, "gateway_circuit_state", dependency="triton") == 0
    finally:
        t.stop()


def _loaded_fresh(server: RedisServer) -> None:
    load(server.url, progress=False)


def test_redis_pause_falls_back_within_budget_and_does_not_poison_the_pool(
    fresh_redis: RedisServer, triton: TritonServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    _loaded_fresh(fresh_redis)
    gw = gateway_factory(_env(fresh_redis.url, triton_url(triton)), ready=True)
    req = {"user_id": "u42", "item_ids": ITEMS}
    before, _ = _post(gw, req)
    assert before.json()["fallback"] is None
    r_admin = redis.Redis.from_url(fresh_redis.url)
    r_admin.execute_command("CLIENT", "PAUSE", "400", "ALL")
    paused_at = time.monotonic()
    r, took = _post(gw, req)
    fb = r.json()["fallback"]
    assert fb == {"reason": "features_unavailable", "stage": "features"}
    assert took <= 0.050 + BUDGET_SLACK_S
    assert r.json()["missing"] == {"user": True, "items": len(ITEMS)}

    r, took = _post(gw, req, headers={"X-Request-Timeout-Ms": "5"})
    assert r.json()["fallback"]["reason"] == "features_unavailable"
    assert r.json()["timings_ms"]["total"] < 5.0 + 3.0  # about 5 ms
    assert took < 0.005 + BUDGET_SLACK_S

    # Redis lifts a pause on its 100 ms cron tick (hz 10), so wait past 400 ms + a tick.
    time.sleep(max(0.0, 0.6 - (time.monotonic() - paused_at)))
    after, _ = _post(gw, req)
    assert after.json()["fallback"] is None
    assert after.json()["scores"] == before.json()["scores"]  # not a stale or mixed reply
    r_admin.close()


def test_retries_stay_within_the_retry_budget_during_an_outage(
    fresh_redis: RedisServer, triton: TritonServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    _loaded_fresh(fresh_redis)
    # A breaker that never opens, so every request reaches the retry layer.
    gw = gateway_factory(
        _env(
            fresh_redis.url,
            triton_url(triton),
            breaker_min_calls=100_000,
            retry_budget_min_per_s=0.5,
            retry_budget_ratio=0.1,
            retry_max_attempts=3,
        ),
        ready=True,
    )
    fresh_redis.stop()
    n = 60
    for _ in range(n):
        r, took = _post(gw, {"user_id": "u1", "item_ids": ITEMS[:5]})
        assert r.status_code == 200
        assert r.json()["fallback"]["reason"] == "features_unavailable"
        assert took <= 0.050 + BUDGET_SLACK_S
    retries = _metric(gw, "gateway_retries_total", dependency="redis")
    exhausted = _metric(gw, "gateway_retry_budget_exhausted_total", dependency="redis")
    assert 0 < retries <= 0.5 * 10 + 0.1 * n  # floor + 10 % of requests
    assert exhausted > 0


BAD_REQUESTS = [
    ("non-JSON", b"{nope", {"content-type": "application/json"}, 422, "invalid JSON"),
    (
        "wrong content type",
        b'{"user_id":"u","item_ids":["a"]}',
        {"content-type": "text/plain"},
        415,
        "application/json",
    ),
    ("wrong types", b'{"user_id":1,"item_ids":["a"]}', {}, 422, "user_id"),
    ("empty list", b'{"user_id":"u","item_ids":[]}', {}, 422, "item_ids"),
    (
        "too many items",
        ('{"user_id":"u","item_ids":[' + ",".join(['"a"'] * 501) + "]}").encode(),
        {},
        422,
        "item_ids",
    ),
    (
        "over-long id",
        ('{"user_id":"' + "x" * 129 + '","item_ids":["a"]}').encode(),
        {},
        422,
        "user_id",
    ),
    (
        "unknown context key",
        b'{"user_id":"u","item_ids":["a"],"context":{"moon":"full"}}',
        {},
        422,
        "context.moon",
    ),
    ("oversized body", b'{"user_id":"u","item_ids":["' + b"a" * 400_000 + b'"]}', {}, 413, "limit"),
    (
        "non-numeric timeout",
        b'{"user_id":"u","item_ids":["a"]}',
        {"x-request-timeout-ms": "soon"},
        422,
        "X-Request-Timeout-Ms",
    ),
    (
        "negative timeout",
        b'{"user_id":"u","item_ids":["a"]}',
        {"x-request-timeout-ms": "-3"},
        422,
        "X-Request-Timeout-Ms",
    ),
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_input_gets_its_4xx_and_never_reaches_redis_or_triton(
    protocol: str,
    fresh_redis: RedisServer,
    triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    _loaded_fresh(fresh_redis)
    gw = gateway_factory(_env(fresh_redis.url, triton_url(triton, protocol)), ready=True)
    admin = redis.Redis.from_url(fresh_redis.url)

    def mgets() -> int:
        return int(admin.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))

    redis_before, triton_before = mgets(), _triton_requests(triton)
    for name, body, headers, status, words in BAD_REQUESTS:
        h = {"content-type": "application/json", **headers}
        r = _HTTP.post(f"{gw.url}/predict", content=body, headers=h)
        assert r.status_code == status, (name, r.status_code, r.text[:200])
        err = r.json()
        assert err["error"] and words in err["message"], (name, err)
    assert mgets() == redis_before
    assert _triton_requests(triton) == triton_before
    admin.close()


def test_a_store_on_another_schema_is_not_read_and_readiness_says_why(
    fresh_redis: RedisServer, triton: TritonServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    """Readiness is about this process; a wrong schema or a dead Redis is in its body, and
    the fallback answers (reading vectors of another layout would feed the model garbage)."""
    _loaded_fresh(fresh_redis)
    gw = gateway_factory(
        _env(fresh_redis.url, triton_url(triton), health_interval_s=0.1), ready=True
    )
    admin = redis.Redis.from_url(fresh_redis.url)

    def mgets() -> int:
        return int(admin.info("commandstats").get("cmdstat_mget", {}).get("calls", 0))

    req = {"user_id": "u1", "item_ids": ITEMS}
    gen, version = codec.parse_pointer(admin.get(codec.POINTER_KEY))
    admin.set(codec.POINTER_KEY, codec.pointer_value(gen, "0:000000000000"))
    time.sleep(0.4)  # a few health checks
    r = _HTTP.get(f"{gw.url}/readyz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded", body
    assert "schema" in body["dependencies"]["features"]["error"]
    assert body["dependencies"]["model"] == {"ok": True}
    before = mgets()
    r, _ = _post(gw, req)
    assert r.json()["fallback"] == {"reason": "features_unavailable", "stage": "features"}
    assert mgets() == before  # nothing read from a store on another schema
    assert _metric(gw, "gateway_dependency_up", dependency="features") == 0

    assert version == SCHEMA.store_version
    admin.set(codec.POINTER_KEY, codec.pointer_value(gen, version))
    time.sleep(0.4)
    r = _HTTP.get(f"{gw.url}/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.json()
    assert _post(gw, req)[0].json()["fallback"] is None

    fresh_redis.stop()
    time.sleep(0.8)  # checks now wait for a connection that is refused
    r = _HTTP.get(f"{gw.url}/readyz")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded", body
    assert body["dependencies"]["features"]["ok"] is False
    r, _ = _post(gw, req)
    assert r.status_code == 200 and r.json()["fallback"]["stage"] == "features"
    admin.close()


def test_metrics_count_fallbacks_and_missing_entities(
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    gw = gateway_factory(ready=True)
    _post(gw, {"user_id": "nobody", "item_ids": ["i1", "x1", "x2"]})
    assert _metric(gw, "gateway_missing_features_total", entity="user") == 1
    assert _metric(gw, "gateway_missing_features_total", entity="item") == 2
    assert _metric(gw, "gateway_request_duration_seconds_count", outcome="model") >= 1
    assert _metric(gw, "gateway_items_per_request_count") >= 1


@pytest.mark.parametrize("value", ["5"])
def test_timeout_header_bounds_a_slow_dependency(
    value: str,
    fresh_redis: RedisServer,
    triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    _loaded_fresh(fresh_redis)
    gw = gateway_factory(_env(fresh_redis.url, triton_url(triton)), ready=True)
    admin = redis.Redis.from_url(fresh_redis.url)
    admin.execute_command("CLIENT", "PAUSE", "2000", "ALL")
    took = []
    for _ in range(5):
        r, t = _post(
            gw, {"user_id": "u1", "item_ids": ITEMS}, headers={"X-Request-Timeout-Ms": value}
        )
        assert r.status_code == 200 and r.json()["fallback"]["reason"] == "features_unavailable"
        assert r.json()["timings_ms"]["total"] < float(value) + 3.0
        took.append(t)
    # Client-side, HTTP included: the median of five, so one scheduler hiccup on a shared
    # 2-core machine does not decide the test.
    assert sorted(took)[2] < float(value) / 1e3 + BUDGET_SLACK_S, took
    admin.execute_command("CLIENT", "UNPAUSE")
    admin.close()
