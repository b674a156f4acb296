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

import asyncio
import random
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis
import redis.exceptions
from redis.crc import key_slot

from gateway.errors import FeatureStoreError
from gateway.features import codec
from gateway.features.loader import demo_generation, load
from gateway.features.redis_store import _mapped
from tests.procs import GatewayServer, RedisServer, free_port


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


def _start_cluster(work: Path, *extra: str) -> list[RedisServer]:
    """Three masters joined by ``redis-cli --cluster create``; all slots covered, state ok.

    The caller stops the nodes (also when this raises: they are appended as started).
    """
    nodes: list[RedisServer] = []
    try:
        for _ in range(3):
            node = RedisServer(port=_cluster_port())
            node.extra_args = (
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(work / f"nodes-{node.port}.conf"),
                "--cluster-node-timeout", "2000",
                "--dir", str(work),
                *extra,
            )  # fmt: skip
            nodes.append(node.start())
        cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        _wait_state(nodes, "ok")
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


def _wait_state(nodes: list[RedisServer], state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for n in nodes:
            with redis.Redis(port=n.port) as c:
                states.append(c.cluster("info")["cluster_state"])
        if states == [state] * len(nodes):
            return
        time.sleep(0.1)
    raise TimeoutError(f"cluster state not {state}: {states}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    nodes = _start_cluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
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
    assert sum(sizes) == 15_003 and min(sizes) > 4_000, sizes  # + pointer, generations, meta
    with redis.RedisCluster(host="127.0.0.1", port=cluster[0].port) as c:
        assert c.get(codec.POINTER_KEY) is not None
        assert len(c.get(codec.item_key("i42", GEN)) or b"") == 40

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


def _redis_exceptions() -> list[type[BaseException]]:
    """Every exception class redis-py 8 defines, read from the installed package."""
    return sorted(
        (
            c
            for c in vars(redis.exceptions).values()
            if isinstance(c, type) and issubclass(c, BaseException)
            and c.__module__ == "redis.exceptions"
        ),
        key=lambda c: c.__name__,
    )  # fmt: skip


@pytest.mark.parametrize("exc_type", _redis_exceptions(), ids=lambda c: c.__name__)
def test_every_redis_py_exception_becomes_a_feature_store_error(exc_type) -> None:
    """Pure mapping check, no server: whatever redis-py raises out of a store call is a
    FeatureStoreError (so the fallback answers), with its class name in the message."""
    # AskError/MovedError parse their message as "<slot> <host>:<port>".
    exc = exc_type("3999 127.0.0.1:6381")
    with pytest.raises(FeatureStoreError) as info, _mapped():
        raise exc
    assert info.value.__cause__ is exc


@pytest.mark.parametrize(
    "exc", [ValueError("bad reply"), KeyError("slot"), RuntimeError("loop gone")]
)
def test_any_other_exception_of_a_store_call_becomes_a_feature_store_error(exc) -> None:
    with pytest.raises(FeatureStoreError, match=type(exc).__name__), _mapped():
        raise exc


def test_cancellation_passes_through_the_mapping() -> None:
    with pytest.raises(asyncio.CancelledError), _mapped():
        raise asyncio.CancelledError


# Part of the first master's range (redis-cli gives it 0-5460); the schema version key
# (slot 11569) stays covered, so readiness can pass while these slots are not.
GAP = (0, 1000)


def _slot(key: str) -> int:
    return int(key_slot(key.encode()))


def _slot_count(node: RedisServer) -> int:
    """How many slots ``node`` sees assigned."""
    return _assigned(node, 0, 16383)


def _assigned(node: RedisServer, lo: int, hi: int) -> int:
    """How many of slots lo..hi ``node`` sees assigned."""
    with redis.Redis(port=node.port) as c:
        ranges = c.execute_command("CLUSTER", "SLOTS")
    return sum(max(0, min(hi, b) - max(lo, a) + 1) for a, b, *_ in ranges)


def _unassign(nodes: list[RedisServer], lo: int, hi: int) -> None:
    """Unassign slots lo..hi on every node, until none sees them assigned (a gossip
    message sent before the owner dropped them can bind them again on another node)."""
    deadline = time.monotonic() + 20
    while True:
        for n in nodes:
            with redis.Redis(port=n.port) as c:
                try:
                    c.execute_command("CLUSTER", "DELSLOTSRANGE", lo, hi)
                except redis.ResponseError:  # already unassigned there
                    pass
        time.sleep(0.3)
        if not any(_assigned(n, lo, hi) for n in nodes):
            return
        assert time.monotonic() < deadline, f"slots {lo}-{hi} still assigned"


def _in_gap(key: str) -> bool:
    return GAP[0] <= _slot(key) <= GAP[1]


@pytest.fixture
def gapped_cluster(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """A cluster with the features loaded, then slots ``GAP`` unassigned on every node.

    ``cluster-require-full-coverage no``: the nodes keep serving the slots they have (the
    default, yes, stops the whole cluster; a test turns it on to get that too).
    """
    nodes = _start_cluster(tmp_path, "--cluster-require-full-coverage", "no")
    try:
        load(f"redis://127.0.0.1:{nodes[0].port}", progress=False, cluster=True)
        _unassign(nodes, *GAP)
        for n in nodes:
            assert _slot_count(n) == 16384 - (GAP[1] - GAP[0] + 1), n.port
        _wait_state(nodes, "ok")
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def _post(url: str, body: bytes) -> tuple[int, dict]:
    """(status, body) of one /predict, 5xx included (urlopen raises on them)."""
    req = urllib.request.Request(
        f"{url}/predict", body, {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error body": exc.read().decode(errors="replace")}


def _status(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def _degraded_features(url: str, timeout: float = 5.0) -> dict:
    """Readiness stays 200 (the fallback answers) while /readyz's body reports the
    feature store down; the background check may take one interval to notice."""
    deadline = time.monotonic() + timeout
    while True:
        status, ready = _status(f"{url}/readyz")
        # 503 only while starting (first check not finished); never for the store.
        assert status == 200 or ready.get("reason") == "starting", ready
        features = ready.get("dependencies", {}).get("features", {})
        if status == 200 and ready["status"] == "degraded" and features.get("ok") is False:
            return ready
        assert time.monotonic() < deadline, ready
        time.sleep(0.1)


def _falls_back(url: str, body: bytes, n: int = 10) -> set[str]:
    """Send ``body`` n times: every answer a 200 from the fallback; return the reasons."""
    reasons = set()
    for _ in range(n):
        status, doc = _post(url, body)
        assert status == 200, (status, doc)
        assert doc["fallback"] is not None, doc
        assert doc["fallback"]["stage"] == "features", doc
        reasons.add(doc["fallback"]["reason"])
    assert reasons <= {"features_unavailable", "circuit_open"}, reasons
    return reasons


def _no_traceback(gw: GatewayServer) -> None:
    assert gw.log_path is not None
    log = gw.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


GEN = demo_generation(10_000, 5_000, 7)  # the generation load() writes by default
COVERED_ITEMS = [i for i in (f"i{k}" for k in range(5000)) if not _in_gap(codec.item_key(i, GEN))][
    :30
]
GAP_USER = next(u for u in (f"u{k}" for k in range(10_000)) if _in_gap(codec.user_key(u, GEN)))
COVERED_USER = next(
    u for u in (f"u{k}" for k in range(10_000)) if not _in_gap(codec.user_key(u, GEN))
)
GAP_ITEM = next(i for i in (f"i{k}" for k in range(5000)) if _in_gap(codec.item_key(i, GEN)))


def test_uncovered_slots_fall_back_and_covered_ones_are_served(
    gapped_cluster, triton, gateway_factory
) -> None:
    """Keys in unassigned slots: redis-py raises a bare KeyError (where it means
    SlotNotCoveredError, which is not a RedisError either), or, once the nodes require
    full coverage, the cluster answers CLUSTERDOWN: every answer a 200 from the
    fallback, never a 5xx, and no traceback in the log. Keys of covered slots are
    served meanwhile, and slots assigned again are served again."""
    seed_url = f"redis://127.0.0.1:{gapped_cluster[0].port}"
    gw = gateway_factory(
        {
            "GATEWAY_REDIS_URL": seed_url,
            "GATEWAY_REDIS_CLUSTER": "true",
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "WARNING",
        },
        ready=True,  # the pointer key's slot is covered
    )
    covered = orjson.dumps({"user_id": COVERED_USER, "item_ids": COVERED_ITEMS})
    status, doc = _post(gw.url, covered)
    assert status == 200 and doc["fallback"] is None, doc
    assert doc["missing"] == {"user": False, "items": 0}, doc

    in_gap = orjson.dumps({"user_id": GAP_USER, "item_ids": COVERED_ITEMS})
    _falls_back(gw.url, in_gap)
    _falls_back(gw.url, orjson.dumps({"user_id": COVERED_USER, "item_ids": [GAP_ITEM]}))

    # The slots get a node again (their keys are still on it): the gateway serves them
    # again by itself, once its breaker lets a call through and it has read the new
    # slot map (redis-py alone never would: the keys are never sent, so no MOVED).
    with redis.Redis(port=gapped_cluster[0].port) as c:
        c.execute_command("CLUSTER", "ADDSLOTSRANGE", *GAP)
    deadline = time.monotonic() + 20
    while any(_slot_count(n) < 16384 for n in gapped_cluster):
        assert time.monotonic() < deadline, "slots not assigned again on every node"
        time.sleep(0.1)
    healed_after = None
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:  # breaker reset 2 s by default, map read 1 s
        status, doc = _post(gw.url, in_gap)
        assert status == 200, (status, doc)
        if doc["fallback"] is None:
            healed_after = time.monotonic() - t0
            break
        time.sleep(0.2)
    assert healed_after is not None, "keys of slots assigned again never served"
    print(f"slots assigned again: served {healed_after:.1f} s later")
    assert doc["missing"] == {"user": False, "items": 0}, doc
    _unassign(gapped_cluster, *GAP)

    # Now the nodes refuse every key while slots are uncovered (Redis's default). A node
    # recomputes its state on a slot change, not on CONFIG SET: unassign one more slot.
    for n in gapped_cluster:
        with redis.Redis(port=n.port) as c:
            c.config_set("cluster-require-full-coverage", "yes")
    _unassign(gapped_cluster, GAP[1] + 1, GAP[1] + 1)
    _wait_state(gapped_cluster, "fail")
    _falls_back(gw.url, covered)
    _degraded_features(gw.url)

    # A gateway started against that cluster starts, says what is down, and answers from
    # the fallback.
    late = gateway_factory(
        {
            "GATEWAY_REDIS_URL": seed_url,
            "GATEWAY_REDIS_CLUSTER": "true",
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
    )
    _falls_back(late.url, covered)
    _degraded_features(late.url)
    for g in (gw, late):
        _no_traceback(g)


@pytest.mark.parametrize("seed", ["dead port", "not a cluster"])
def test_unusable_cluster_seed_gateway_starts_and_falls_back(
    seed, redis_server, triton, gateway_factory
) -> None:
    """The cluster client cannot initialise (redis-py raises RedisClusterException, not a
    RedisError): the gateway still starts, stays ready (its /readyz body says the feature
    store is down), and answers from the fallback."""
    port = free_port() if seed == "dead port" else redis_server.port
    gw = gateway_factory(
        {
            "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}",
            "GATEWAY_REDIS_CLUSTER": "true",
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "WARNING",
        }
    )
    _falls_back(gw.url, orjson.dumps({"user_id": "u1", "item_ids": ["i1", "i2"]}))
    _degraded_features(gw.url)
    _no_traceback(gw)


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
