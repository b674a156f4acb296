"""The feature store on a real 3-master Redis Cluster started by the test.

``redis-server --cluster-enabled yes`` on three ports, joined by ``redis-cli --cluster
create ... --cluster-replicas 0``; the loader writes the generated features into it; a
gateway with ``GATEWAY_REDIS_CLUSTER=true`` reads them. Proves:

* the loader's pipelined writes land on the right nodes (every key readable);
* the gateway serves the same features as from a single Redis (same scores);
* one round trip per node per request: each node's ``total_reads_processed`` (one per
  read event on a client socket) grows by one per request, although the request's
  keys span dozens of slots there (one pipelined write of per-slot MGETs per node).
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from gateway.features import codec
from gateway.features.loader import load
from tests.procs import RedisServer


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free and valid too."""
    for _ in range(200):
        port = random.randrange(20_000, 50_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    work: Path = tmp_path_factory.mktemp("cluster")
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            node = RedisServer(port=_cluster_port())
            node.extra_args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(work / f"nodes-{node.port}.conf"),
                "--cluster-node-timeout", "2000",
                "--dir", str(work),
            )  # fmt: skip
            nodes.append(node.start())
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            states = []
            for n in nodes:
                with redis.Redis(port=n.port) as c:
                    states.append(c.cluster("info")["cluster_state"])
            if states == ["ok"] * 3:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError(f"cluster not ok: {states}")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _stats(port: int) -> tuple[int, int]:
    """(read events, MGET commands) processed by one node so far."""
    with redis.Redis(port=port) as c:
        reads = int(c.info("stats")["total_reads_processed"])
        mget = c.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
    return reads, int(mget)


def _predict(url: str, body: bytes) -> dict:
    req = urllib.request.Request(
        f"{url}/predict", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return orjson.loads(r.read())


def test_loader_and_gateway_on_a_cluster(cluster, redis_server, triton, gateway_factory) -> None:
    seed_url = f"redis://127.0.0.1:{cluster[0].port}"
    summary = load(seed_url, progress=False, cluster=True)
    assert summary.users == 10_000 and summary.items == 5_000

    # Every node holds a share of the keys, and all of them are readable.
    sizes = []
    for n in cluster:
        with redis.Redis(port=n.port) as c:
            sizes.append(c.dbsize())
    assert sum(sizes) == 15_001 and min(sizes) > 4_000, sizes
    with redis.RedisCluster(host="127.0.0.1", port=cluster[0].port) as c:
        assert c.get(codec.VERSION_KEY) is not None
        assert len(c.get(codec.item_key("i42")) or b"") == 40

    env = {"GATEWAY_TRITON_URL": triton.grpc_url, "GATEWAY_LOG_LEVEL": "WARNING"}
    gw = gateway_factory(
        {**env, "GATEWAY_REDIS_URL": seed_url, "GATEWAY_REDIS_CLUSTER": "true"}, ready=True
    )
    single = gateway_factory({**env, "GATEWAY_REDIS_URL": redis_server.url}, ready=True)

    ids = [f"i{k * 97 % 5000}" for k in range(50)]
    body = orjson.dumps({"user_id": "u123", "item_ids": ids})
    from_cluster = _predict(gw.url, body)
    assert from_cluster["fallback"] is None, from_cluster
    assert from_cluster["missing"] == {"user": False, "items": 0}
    assert from_cluster["scores"] == _predict(single.url, body)["scores"]

    # One round trip per node per request.
    n_requests = 40
    before = [_stats(n.port) for n in cluster]
    for k in range(n_requests):
        doc = _predict(gw.url, orjson.dumps({"user_id": f"u{k}", "item_ids": ids}))
        assert doc["fallback"] is None
    after = [_stats(n.port) for n in cluster]
    for (r0, m0), (r1, m1) in zip(before, after, strict=True):
        reads = r1 - r0 - 2  # minus our own INFO connection's commands
        mgets = m1 - m0
        # 51 keys over 3 nodes: ~17 slots, so ~17 MGETs, per node and request ...
        assert mgets >= 5 * n_requests, mgets
        # ... arriving as one read: one round trip (a little slack for a split segment).
        assert n_requests <= reads <= n_requests * 1.25, (reads, n_requests)


def test_cluster_node_down_falls_back(cluster, triton, gateway_factory) -> None:
    """A dead master: its slots are unreachable; the gateway answers from the fallback
    within budget, never a 5xx. (Runs last in this module: it stops a node.)"""
    seed_url = f"redis://127.0.0.1:{cluster[0].port}"
    gw = gateway_factory(
        {
            "GATEWAY_REDIS_URL": seed_url,
            "GATEWAY_REDIS_CLUSTER": "true",
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "WARNING",
        },
        ready=True,
    )
    ids = [f"i{k}" for k in range(30)]
    body = orjson.dumps({"user_id": "u1", "item_ids": ids})
    assert _predict(gw.url, body)["fallback"] is None
    cluster[2].stop()
    reasons = set()
    for _ in range(20):
        t = time.perf_counter()
        doc = _predict(gw.url, body)
        assert time.perf_counter() - t < 0.060
        reasons.add((doc["fallback"] or {}).get("reason"))
    assert reasons <= {"features_unavailable", "circuit_open"}, reasons
