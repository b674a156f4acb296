"""The request path's own transports against real servers.

* ``inference/triton_http.py``: Triton over raw keep-alive HTTP/1.1 with binary tensors;
  the same scores as the gRPC backend and onnxruntime, its error mapping, a timed-out or
  cancelled call never poisoning the next one, round robin over the addresses a name
  resolves to and their re-resolution.
* ``features/resp.py``: the raw RESP2 MGET; the same replies as redis-py, AUTH (password
  and ACL user) and SELECT from the URL, TLS with a CA made here, the connection limit,
  and a cancelled call closing its connection.

Triton and redis-server are the real ones (fixtures in conftest.py); only the DNS answer
(``resolver=``) and, in one parser test, a peer that sends malformed HTTP are played by
the test.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis
import uvloop

from gateway.errors import (
    FeatureStoreError,
    FeatureStoreRefused,
    InferenceError,
    InferenceTimeout,
    InferenceUnavailable,
    SchemaMismatch,
)
from gateway.features import codec
from gateway.features.loader import load
from gateway.features.redis_store import RedisFeatureStore
from gateway.features.resp import RespPool
from gateway.inference.triton import TritonBackend
from gateway.inference.triton_http import TritonHTTPBackend, _reply_error
from gateway.synth import design_matrix, make_impressions, make_world
from tests.faultproxy import ProxyProcess
from tests.procs import MODEL_REPOSITORY, GatewayServer, RedisServer, TritonServer, free_port

ROWS = (1, 7, 50, 200, 500)  # 500 = GATEWAY_MAX_ITEMS, the largest request


def _rows(n: int, seed: int) -> np.ndarray:
    world = make_world(200, 100, seed=seed)
    return design_matrix(world, make_impressions(world, n, seed=seed))


def _http(triton: TritonServer) -> str:
    return f"http://{triton.http_url}"


def _successes(triton: TritonServer) -> float:
    """Triton's own count of successful ``ctr`` requests."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()
    m = re.search(r'^nv_inference_request_success\{model="ctr",version="1"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


# -- Triton over HTTP ----------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_http_scores_equal_grpc_and_onnxruntime(triton: TritonServer, loop: str) -> None:
    """Byte-equal to the gRPC backend's scores, and onnxruntime's within float noise."""
    sess = ort.InferenceSession(str(MODEL_REPOSITORY / "ctr" / "1" / "model.onnx"))

    async def main() -> None:
        h = TritonHTTPBackend(_http(triton), "ctr")
        g = TritonBackend(triton.grpc_url, "ctr")
        await h.start()
        await g.start()
        try:
            assert h.model_version == g.model_version == "1"
            for n in ROWS:
                x = _rows(n, seed=n)
                got_http, got_grpc = await h.infer(x, 1.0), await g.infer(x, 1.0)
                assert got_http.shape == (n,) and got_http.dtype == np.float32
                assert got_http.tobytes() == got_grpc.tobytes()
                expected = sess.run(None, {"features": x})[0][:, 0]
                assert np.max(np.abs(got_http - expected)) < 1e-5
        finally:
            await h.close()
            await g.close()

    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


def test_http_readiness_version_and_error_replies(triton: TritonServer) -> None:
    """Readiness and the served version from Triton; its error replies become ours with
    its message; a host name is resolved (``localhost``)."""

    async def main() -> None:
        h = TritonHTTPBackend(f"http://localhost:{triton.http_port}", "ctr")
        unknown = TritonHTTPBackend(_http(triton), "nope")
        pinned = TritonHTTPBackend(_http(triton), "ctr", model_version="7")
        for b in (h, unknown, pinned):
            await b.start()
        try:
            await h.ready()
            assert h.model_version == "1"
            with pytest.raises(InferenceUnavailable, match="not ready"):
                await unknown.ready()
            with pytest.raises(InferenceError, match="unknown model: 'nope'") as info:
                await unknown.infer(_rows(3, 1), 1.0)
            assert not isinstance(info.value, InferenceUnavailable | InferenceTimeout)
            with pytest.raises(InferenceError, match="version 7"):
                await pinned.infer(_rows(3, 1), 1.0)
            # Triton's own queue timeout would answer 503 "Request timeout expired": a
            # timeout, not an outage. (The shipped config has no queue policy any more, so
            # Triton ignores per-request timeouts; a model with one still gets this right.)
            err = _reply_error(503, b'{"error":"Request timeout expired"}')
            assert isinstance(err, InferenceTimeout) and "Request timeout expired" in str(err)
            # The connection that carried an error reply stays usable.
            x = _rows(50, 2)
            assert np.isfinite(await h.infer(x, 1.0)).all()
        finally:
            for b in (h, unknown, pinned):
                await b.close()

    asyncio.run(main())


def test_reply_mapping_of_tritons_messages() -> None:
    """Triton's literal error replies (captured from the local Triton 2.51)."""
    cases = [
        (503, b'{"error":"Request timeout expired"}', InferenceTimeout),
        (503, b'{"error":"Exceeds maximum queue size"}', InferenceUnavailable),
        (503, b'{"error":"Server is stopping"}', InferenceUnavailable),
        (
            400,
            b"{\"error\":\"unexpected inference input 'bogus' for model 'ctr'\"}",
            InferenceError,
        ),
        (500, b"not json at all", InferenceError),
    ]
    for status, body, kind in cases:
        err = _reply_error(status, body)
        assert type(err) is kind, (body, err)
        message = body.decode().split('"error":"')[-1].rstrip('"}')
        assert message in str(err), (message, err)


@pytest.fixture
def http_proxy(triton: TritonServer, tmp_path: Path) -> Iterator[ProxyProcess]:
    proxy = ProxyProcess(triton.http_url, log_path=tmp_path / "proxy.log").start()
    yield proxy
    proxy.stop()


def test_http_timed_out_or_cancelled_call_closes_its_connection(
    triton: TritonServer, http_proxy: ProxyProcess
) -> None:
    """A reply that comes too late must never answer the next request: the connection of
    a timed-out or cancelled call is closed, and the next call gets its own scores."""
    a, b, c = _rows(50, 11), _rows(50, 12), _rows(50, 13)

    async def main() -> None:
        direct = TritonHTTPBackend(_http(triton), "ctr")
        h = TritonHTTPBackend(f"http://{http_proxy.address}", "ctr")
        await direct.start()
        await h.start()
        try:
            want_b, want_c = await direct.infer(b, 1.0), await direct.infer(c, 1.0)
            await h.infer(a, 1.0)
            (addr,) = h._addrs
            (conn,) = addr.idle
            http_proxy.set("latency", ms=60)
            with pytest.raises(InferenceTimeout):
                await h.infer(a, 0.02)
            assert conn.closed and conn not in addr.idle
            http_proxy.set("pass")
            # At once: on a reused connection a's late reply would answer b.
            assert (await h.infer(b, 1.0)).tobytes() == want_b.tobytes()

            (conn,) = addr.idle
            http_proxy.set("latency", ms=60)
            with pytest.raises(TimeoutError):
                # The stage's asyncio.timeout cancels the call (the gateway's case).
                async with asyncio.timeout(0.02):
                    await h.infer(a, 1.0)
            assert conn.closed and conn not in addr.idle
            http_proxy.set("pass")
            assert (await h.infer(c, 1.0)).tobytes() == want_c.tobytes()
        finally:
            await h.close()
            await direct.close()

    asyncio.run(main())


def test_http_refused_and_reset_are_transient(http_proxy: ProxyProcess) -> None:
    async def main() -> None:
        nobody = TritonHTTPBackend(f"http://127.0.0.1:{free_port()}", "ctr")
        h = TritonHTTPBackend(f"http://{http_proxy.address}", "ctr")
        await nobody.start()
        await h.start()
        try:
            with pytest.raises(InferenceUnavailable, match="ConnectionRefusedError"):
                await nobody.infer(_rows(5, 1), 0.5)
            with pytest.raises(InferenceUnavailable):
                await nobody.ready()
            await h.infer(_rows(5, 1), 1.0)
            http_proxy.set("reset")
            with pytest.raises(InferenceUnavailable):
                await h.infer(_rows(5, 1), 1.0)
            http_proxy.set("pass")
            await asyncio.sleep(0.3)  # past the first reconnect backoff (100 ms)
            assert np.isfinite(await h.infer(_rows(5, 1), 1.0)).all()
        finally:
            await nobody.close()
            await h.close()

    asyncio.run(main())


def test_http_malformed_replies_close_the_connection() -> None:
    """Replies that are not what Triton sends: the call fails, the connection is closed."""
    replies = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # no Content-Length
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}EXTRA",  # more than announced
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",  # not a binary inference reply
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",  # not HTTP
    ]

    async def one(reply: bytes) -> None:
        handlers: list[asyncio.Task[None]] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The same reply to every request, until the client closes.
            try:
                while await reader.read(65536):
                    writer.write(reply)
            except ConnectionError:
                pass
            writer.close()
            await writer.wait_closed()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            handlers.append(asyncio.ensure_future(serve(reader, writer)))

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        h = TritonHTTPBackend(f"http://127.0.0.1:{port}", "ctr")
        await h.start()
        try:
            with pytest.raises(InferenceError) as info:
                await h.infer(_rows(3, 1), 1.0)
            assert not isinstance(info.value, InferenceTimeout), reply
            assert h._addrs[0].idle == [], reply
        finally:
            await h.close()
            server.close()
            await server.wait_closed()
            await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 5)

    async def main() -> None:
        for reply in replies:
            await one(reply)

    asyncio.run(main())


@pytest.fixture
def second_triton(tmp_path: Path) -> Iterator[TritonServer]:
    server = TritonServer(log_path=tmp_path / "triton-2.log").start()
    yield server
    server.stop()


def test_http_round_robin_over_resolved_addresses_and_re_resolution(
    triton: TritonServer, second_triton: TritonServer
) -> None:
    """A name that resolves to two Tritons (a headless Service) gets about half the
    requests on each; after it resolves to one, that one gets them all."""
    answer = [("127.0.0.1", triton.http_port), ("127.0.0.1", second_triton.http_port)]
    asked: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[tuple[str, int]]:
        asked.append((host, port))
        return list(answer)

    async def main() -> None:
        h = TritonHTTPBackend("http://triton-headless:8000", "ctr", resolver=resolver)
        await h.start()
        try:
            assert asked == [("triton-headless", 8000)]
            before = _successes(triton), _successes(second_triton)
            for i in range(100):
                await h.infer(_rows(10, i), 1.0)
            d1, d2 = _successes(triton) - before[0], _successes(second_triton) - before[1]
            assert d1 + d2 == 100 and min(d1, d2) >= 40, (d1, d2)

            answer.pop()  # the second pod left the Service
            await h.resolve()
            gone = [a for a in h._addrs if a.port == second_triton.http_port]
            assert gone == []
            before = _successes(triton), _successes(second_triton)
            for i in range(50):
                await h.infer(_rows(10, i), 1.0)
            assert _successes(triton) - before[0] == 50
            assert _successes(second_triton) == before[1]
        finally:
            await h.close()

    asyncio.run(main())


# -- Redis: the raw RESP2 MGET -------------------------------------------------------------


def _keys(client: redis.Redis) -> list[str]:
    """Known and unknown ids under the store's current generation (loader.py)."""
    gen = codec.parse_pointer(client.get(codec.POINTER_KEY))[0]
    return [codec.user_key("u42", gen), codec.user_key("nobody", gen)] + [
        codec.item_key(f"i{k}", gen) for k in (0, 1, 4999, 5000, 17)
    ]


def _pool(url: str, **kw: float) -> RespPool:
    return RespPool(
        url,
        connect_timeout_s=kw.get("connect", 0.05),
        socket_timeout_s=kw.get("socket", 0.1),
        max_connections=int(kw.get("max", 8)),
    )


def _our_connections(admin: redis.Redis) -> int:
    """Client connections other than the admin's own."""
    return sum(1 for c in admin.client_list() if c.get("cmd") != "client|list")


def test_fast_mget_equals_redis_py(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url)
    KEYS = _keys(client)  # noqa: N806
    expected = client.mget(KEYS)
    client.close()
    assert expected[0] is not None and expected[1] is None  # known and unknown ids

    async def main() -> None:
        pool = _pool(redis_server.url)
        store = RedisFeatureStore(redis_server.url)
        try:
            assert await pool.mget(KEYS) == expected
            batch = await store.fetch("u42", ["i0", "i1", "i4999", "i5000", "i17"])
            ref = codec.decode(expected[0], expected[2:])
            assert batch.items.tobytes() == ref.items.tobytes()
            assert batch.items_missing == ref.items_missing == 1
        finally:
            await pool.close()
            await store.close()

    asyncio.run(main())


def test_fast_mget_auth_acl_user_and_db_from_the_url(fresh_redis: RedisServer) -> None:
    """Password, ACL user and db number come from the URL; error replies (WRONGPASS,
    NOPERM) become FeatureStoreErrors with Redis's text."""
    base = f"127.0.0.1:{fresh_redis.port}"
    with redis.Redis.from_url(fresh_redis.url) as first:
        first.config_set("requirepass", "s3cret")
    admin = redis.Redis.from_url(f"redis://:s3cret@{base}/0")
    admin.execute_command(
        "ACL", "SETUSER", "gw", "on", ">gwpw", "~feat:*", "+mget", "+get", "+select"
    )
    admin.execute_command("ACL", "SETUSER", "getonly", "on", ">gopw", "~feat:*", "+get", "+select")
    load(f"redis://:s3cret@{base}/2", users=50, items=20, progress=False)

    async def fetch(url: str) -> object:
        store = RedisFeatureStore(url)
        try:
            return await store.fetch("u1", ["i1", "i2"])
        finally:
            await store.close()

    async def main() -> None:
        batch = await fetch(f"redis://:s3cret@{base}/2")
        assert not batch.user_missing and batch.items_missing == 0  # type: ignore[attr-defined]
        batch = await fetch(f"redis://gw:gwpw@{base}/2")
        assert not batch.user_missing  # type: ignore[attr-defined]
        # Another db holds no feature set at all: SELECT was sent.
        with pytest.raises(SchemaMismatch, match="has no feat:current"):
            await fetch(f"redis://:s3cret@{base}/0")
        with pytest.raises(FeatureStoreError, match="WRONGPASS"):
            await fetch(f"redis://:wrong@{base}/2")
        with pytest.raises(FeatureStoreError, match="NOAUTH"):
            await fetch(f"redis://{base}/2")
        with pytest.raises(FeatureStoreError, match="NOPERM"):
            await fetch(f"redis://getonly:gopw@{base}/2")

    try:
        asyncio.run(main())
    finally:
        admin.close()


def _make_tls(dest: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    p = {k: dest / f"{k}.pem" for k in ("ca", "ca_key", "cert", "key")}
    ext = dest / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
        "-keyout", str(p["ca_key"]), "-out", str(p["ca"]))  # fmt: skip
    csr = dest / "server.csr"
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(p["key"]), "-out", str(csr))  # fmt: skip
    ssl("x509", "-req", "-in", str(csr), "-CA", str(p["ca"]), "-CAkey", str(p["ca_key"]),
        "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(p["cert"]))  # fmt: skip
    return p


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, int, dict[str, Path]]]:
    """redis-server with a TLS port (certificate from a CA made here) and a password;
    its plain port stays open for the fixture's own readiness check only."""
    certs = _make_tls(tmp_path)
    tls_port = free_port()
    server = RedisServer(
        extra_args=(
            "--tls-port",
            str(tls_port),
            "--tls-cert-file",
            str(certs["cert"]),
            "--tls-key-file",
            str(certs["key"]),
            "--tls-ca-cert-file",
            str(certs["ca"]),
            "--tls-auth-clients",
            "no",
        )  # fmt: skip
    ).start()
    yield server, tls_port, certs
    server.stop()


def test_fast_mget_over_tls_verifies_the_server(
    tls_redis: tuple[RedisServer, int, dict[str, Path]],
) -> None:
    server, tls_port, certs = tls_redis
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca']}"
    load(url, users=50, items=20, progress=False)

    async def main() -> None:
        store = RedisFeatureStore(url)
        untrusted = RedisFeatureStore(f"rediss://127.0.0.1:{tls_port}/0", connect_timeout_s=1.0)
        try:
            batch = await store.fetch("u1", ["i1", "i2", "nope"])
            assert not batch.user_missing and batch.items_missing == 1
            await store.check()
            # Without our CA the server's certificate is not trusted: no features.
            # A configuration error, not an outage (redisconn.refusal): one clear line.
            with pytest.raises(FeatureStoreRefused, match="certificate is not trusted"):
                await untrusted.fetch("u1", ["i1"])
        finally:
            await store.close()
            await untrusted.close()

    asyncio.run(main())


def test_gateway_on_tls_redis_with_a_password(
    tls_redis: tuple[RedisServer, int, dict[str, Path]],
    triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    """End to end: the request path (fast path) and the health check (redis-py) both
    read a password-protected TLS Redis from one URL."""
    server, tls_port, certs = tls_redis
    admin = redis.Redis.from_url(server.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    url = f"rediss://:s3cret@127.0.0.1:{tls_port}/0?ssl_ca_certs={certs['ca']}"
    load(url, progress=False)
    gw = gateway_factory(
        {"GATEWAY_REDIS_URL": url, "GATEWAY_TRITON_URL": _http(triton)}, ready=True
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        r = client.post("/predict", json={"user_id": "u42", "item_ids": ["i1", "i2", "nope"]})
        body = r.json()
        assert r.status_code == 200 and body["fallback"] is None, body
        assert body["missing"] == {"user": False, "items": 1}
        deadline = time.monotonic() + 5
        while True:
            ready = client.get("/readyz").json()
            if ready.get("dependencies", {}).get("features") is not None:
                break
            assert time.monotonic() < deadline, ready
            time.sleep(0.1)
        assert ready["dependencies"]["features"] == {"ok": True}, ready


def test_fast_mget_cancelled_under_client_pause_closes_its_connection(
    fresh_redis: RedisServer,
) -> None:
    load(fresh_redis.url, users=50, items=20, progress=False)
    admin = redis.Redis.from_url(fresh_redis.url)
    KEYS = _keys(admin)  # noqa: N806
    expected = admin.mget(KEYS)

    async def main() -> None:
        pool = _pool(fresh_redis.url, socket=1.0)
        try:
            assert await pool.mget(KEYS) == expected
            (conn,) = pool._idle
            admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
            paused = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.02):
                    await pool.mget(KEYS)
            assert conn.closed and pool._idle == [] and pool._open == 0
            # Redis lifts a pause on its 100 ms cron tick: wait past 300 ms + a tick.
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - paused)))
            for _ in range(3):
                assert await pool.mget(KEYS) == expected  # never the stale reply
            assert pool._open == 1
        finally:
            await pool.close()

    try:
        asyncio.run(main())
    finally:
        admin.close()


def test_fast_mget_respects_max_connections(fresh_redis: RedisServer) -> None:
    """At most max_connections; callers beyond wait for one, up to the connect timeout."""
    load(fresh_redis.url, users=50, items=20, progress=False)
    admin = redis.Redis.from_url(fresh_redis.url)
    KEYS = _keys(admin)  # noqa: N806
    expected = admin.mget(KEYS)

    async def main() -> None:
        pool = _pool(fresh_redis.url, max=2, connect=0.05, socket=2.0)
        try:
            results = await asyncio.gather(*(pool.mget(KEYS) for _ in range(40)))
            assert all(r == expected for r in results)
            assert pool._open <= 2 and _our_connections(admin) <= 2
            # Both connections stuck behind a pause: the third caller gives up after the
            # 50 ms connect timeout with a transient error; the two finish after it.
            admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
            t0 = time.monotonic()
            held = [asyncio.ensure_future(pool.mget(KEYS)) for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(ConnectionError, match="no redis connection free"):
                await pool.mget(KEYS)
            assert time.monotonic() - t0 < 0.25
            assert [await f for f in held] == [expected, expected]
            assert _our_connections(admin) <= 2
        finally:
            await pool.close()

    try:
        asyncio.run(main())
    finally:
        admin.close()
