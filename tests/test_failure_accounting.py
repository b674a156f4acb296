"""Failure accounting on the real stack: what counts against a dependency, what readiness
means, and metrics that tell the truth (issue: resilience under real clients).

Real gateway processes, a real redis-server and the local Triton; raw sockets where a
test needs a client that misbehaves (a late or abandoned body).
"""

from __future__ import annotations

import concurrent.futures
import re
import signal
import socket
import time
from collections.abc import Callable

import httpx
import psutil

from tests.procs import GatewayServer, RedisServer, TritonServer, free_port, wait_http

ITEMS = [f"i{k}" for k in range(50)]
BODY = {"user_id": "u1", "item_ids": ITEMS}


def _env(redis_url: str, triton_url: str, **extra: object) -> dict[str, str]:
    env = {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_TRITON_URL": triton_url}
    env.update({f"GATEWAY_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def metrics(gw: GatewayServer) -> dict[str, float]:
    text = httpx.get(f"{gw.url}/metrics", timeout=5).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def dead_url() -> str:
    return f"127.0.0.1:{free_port()}"


def test_tiny_client_deadlines_never_open_a_breaker(
    redis_server: RedisServer, triton: TritonServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    """45 requests with X-Request-Timeout-Ms 0.05, 1 and 2 used to open the Triton
    breaker, so the next normal requests got circuit_open."""
    gw = gateway_factory(_env(redis_server.url, triton.grpc_url), ready=True)
    with httpx.Client(timeout=5) as c:
        assert c.post(f"{gw.url}/predict", json=BODY).json()["fallback"] is None
        for _ in range(15):
            for ms in ("0.05", "1", "2"):
                r = c.post(f"{gw.url}/predict", json=BODY, headers={"X-Request-Timeout-Ms": ms})
                assert r.status_code == 200
                fb = r.json()["fallback"]
                assert fb is None or fb["reason"] in ("timeout", "features_unavailable"), fb
        for _ in range(10):
            assert c.post(f"{gw.url}/predict", json=BODY).json()["fallback"] is None
    m = metrics(gw)
    assert m['gateway_circuit_state{dependency="triton"}'] == 0
    assert m['gateway_circuit_state{dependency="redis"}'] == 0
    assert m.get('gateway_fallback_total{reason="circuit_open"}', 0) == 0
    # Stages with under 1 ms left were not attempted (fallback "timeout"), and timeouts of
    # squeezed calls were counted as the client's, not the dependency's.
    assert m.get('gateway_fallback_total{reason="timeout"}', 0) > 0


def test_readiness_holds_while_every_dependency_is_down(
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    """Ready = this process can answer: with Redis and Triton both unreachable it answers
    from the fallback, so it stays in the Service; /readyz's body says what is down."""
    gw = gateway_factory(_env(f"redis://{dead_url()}/0", dead_url()), ready=True)
    r = httpx.get(f"{gw.url}/readyz", timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "degraded", body
    assert body["dependencies"]["features"]["ok"] is False
    assert body["dependencies"]["model"]["ok"] is False
    r = httpx.post(f"{gw.url}/predict", json=BODY, timeout=5)
    assert r.status_code == 200 and r.json()["fallback"]["stage"] == "features"
    m = metrics(gw)
    assert m['gateway_dependency_up{dependency="features"}'] == 0
    assert m['gateway_dependency_up{dependency="model"}'] == 0


def _raw(port: int, data: bytes, then_close: bool, wait_s: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        if then_close:
            time.sleep(0.05)
            return b""
        time.sleep(wait_s)
        s.settimeout(5)
        return s.recv(65536)


def test_every_outcome_is_timed_and_slow_bodies_get_408(
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    gw = gateway_factory({"GATEWAY_MAX_INFLIGHT": "1", "GATEWAY_BODY_TIMEOUT_MS": "300"})
    head = (
        b"POST /predict HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n"
    )
    # A body that never completes: 408 after the body timeout, never an in-flight slot.
    t0 = time.perf_counter()
    answer = _raw(gw.port, head + b'{"user_id": "u1"', then_close=False, wait_s=0.5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"not received within 300 ms" in answer
    assert time.perf_counter() - t0 < 2.0
    # A client that leaves halfway through its body.
    _raw(gw.port, head + b'{"user_id": "u1"', then_close=True, wait_s=0)
    # A bad request, then enough concurrent good ones to be shed at an in-flight limit of 1.
    assert httpx.post(f"{gw.url}/predict", content=b"{nope", timeout=5).status_code in (415, 422)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        statuses = list(
            pool.map(
                lambda _: httpx.post(f"{gw.url}/predict", json=BODY, timeout=5).status_code,
                range(64),
            )
        )
    assert 200 in statuses and 503 in statuses, statuses
    time.sleep(0.2)
    m = metrics(gw)
    count = {
        o: m.get(f'gateway_request_duration_seconds_count{{outcome="{o}"}}', 0)
        for o in ("model", "fallback", "shed", "client_error", "disconnected", "error")
    }
    # A 200 is the model's or, when a stage ran out of time on this busy box, the fallback's.
    assert count["model"] + count["fallback"] == statuses.count(200)
    assert count["shed"] == statuses.count(503)
    assert count["client_error"] == 2  # the 408 and the bad request
    assert count["disconnected"] == 1
    assert count["error"] == 0
    assert m["gateway_admission_limit"] >= 1
    assert "gateway_event_loop_lag_seconds" in m
    log = gw.log_path.read_text() if gw.log_path else ""
    assert "Traceback" not in log


def test_stages_that_were_skipped_add_no_latency_samples(
    redis_server: RedisServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    gw = gateway_factory(_env(redis_server.url, dead_url(), breaker_min_calls=3))
    with httpx.Client(timeout=5) as c:
        for _ in range(5):
            c.post(f"{gw.url}/predict", json=BODY)
        before = metrics(gw)
        for _ in range(10):
            assert c.post(f"{gw.url}/predict", json=BODY).json()["fallback"]["reason"] == (
                "circuit_open"
            )
    after = metrics(gw)
    key = 'gateway_stage_duration_seconds_count{stage="%s"}'
    assert after[key % "inference"] == before[key % "inference"]
    assert after[key % "features"] == before[key % "features"] + 10


def test_served_model_version_follows_a_triton_that_starts_later(
    redis_server: RedisServer, gateway_factory: Callable[..., GatewayServer], tmp_path
) -> None:
    t = TritonServer(log_path=tmp_path / "triton.log")  # ports chosen, not started yet
    gw = gateway_factory(
        _env(redis_server.url, t.grpc_url, health_interval_s=0.2, breaker_min_calls=1000),
        ready=True,
    )
    r = httpx.post(f"{gw.url}/predict", json=BODY, timeout=5).json()
    assert r["fallback"] is not None and r["model"]["version"] == ""
    t.start()
    try:
        deadline = time.monotonic() + 10
        while True:
            r = httpx.post(f"{gw.url}/predict", json=BODY, timeout=5).json()
            if r["fallback"] is None and r["model"]["version"] == "1":
                break
            assert time.monotonic() < deadline, r
            time.sleep(0.1)
        assert metrics(gw)['gateway_model_info{model="ctr",version="1"}'] == 1
    finally:
        t.stop()


def test_breaker_state_of_a_dead_worker_is_forgotten(
    redis_server: RedisServer, gateway_factory: Callable[..., GatewayServer]
) -> None:
    gw = gateway_factory(_env(redis_server.url, dead_url(), breaker_min_calls=3), workers=2)
    assert gw.proc is not None
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: httpx.post(f"{gw.url}/predict", json=BODY, timeout=5), range(80)))
    assert metrics(gw)['gateway_circuit_state{dependency="triton"}'] == 2
    workers = psutil.Process(gw.proc.pid).children()
    assert len(workers) >= 2
    old = {w.pid for w in workers}
    for w in workers:
        w.send_signal(signal.SIGKILL)
    # uvicorn's supervisor starts new workers in their place.
    deadline = time.monotonic() + 30
    while True:
        pids = {c.pid for c in psutil.Process(gw.proc.pid).children()}
        if len(pids - old) >= 2:
            break
        assert time.monotonic() < deadline, "workers were not replaced"
        time.sleep(0.2)
    wait_http(f"{gw.url}/healthz", 30)
    m = metrics(gw)
    assert m['gateway_circuit_state{dependency="triton"}'] == 0
    assert m["gateway_inflight_requests"] == 0


def test_health_checks_do_not_count_as_traffic(
    redis_server: RedisServer, triton: TritonServer, gateway_factory
) -> None:
    """The background checks run without requests and leave the request metrics alone."""
    gw = gateway_factory(_env(redis_server.url, triton.grpc_url, health_interval_s=0.1))
    time.sleep(0.5)
    m = metrics(gw)
    requests = [v for k, v in m.items() if k.startswith("gateway_request_duration_seconds_count")]
    assert requests and sum(requests) == 0
    assert m['gateway_dependency_up{dependency="features"}'] == 1
    assert m['gateway_dependency_up{dependency="model"}'] == 1
