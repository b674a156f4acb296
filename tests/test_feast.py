"""The Feast source against a real Feast: ``feast apply`` and ``feast materialize`` (file
offline store over generated Parquet, some values null) into a local redis-server, then
the gateway's reader versus ``FeatureStore.get_online_features`` for the same entities.
Feast runs in its own virtualenv (tests/feastenv.py)."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.errors import ConfigError
from gateway.features.feast_store import FeastFeatureStore, FeastLayout
from gateway.schema import load_schema
from tests import feastenv
from tests.procs import PYTHON, ROOT, GatewayServer, RedisServer

SCHEMA_FILE = feastenv.EXAMPLE / "schema.toml"
# Known ids with null values (make_data.py --nulls: users k % 7 == 3 or k % 11 == 3, items
# k % 5 == 3 or k % 13 == 3), items without an embedding (k % 10 == 9), unknown ids.
USERS = ["u0", "u3", "u10", "u14", "u1999", "nobody"]
ITEMS = [f"i{k}" for k in range(0, 45)] + ["i999", "i16", "ghost-1", "ghost-2", "i29"]


@pytest.fixture(scope="module")
def feast_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str]]:
    """(feast python, repository, redis URL), materialized into a redis-server of its own."""
    python = feastenv.ensure_venv()
    server = RedisServer().start()
    try:
        repo = feastenv.make_repo(tmp_path_factory.mktemp("feast"), server.port, python)
        yield python, repo, server.url
    finally:
        server.stop()


def _expected(
    sdk: dict[str, list], names: list[tuple[str, int | None]], defaults: np.ndarray
) -> np.ndarray:
    """The SDK's answer as the schema's vectors: a null (None) on the feature's default."""
    n = len(next(iter(sdk.values())))
    out = np.tile(defaults, (n, 1)).astype(np.float32)
    for col, (feature, index) in enumerate(names):
        for row, v in enumerate(sdk[feature]):
            if v is not None:
                out[row, col] = v if index is None else v[index]
    return out


def _sdk_names(view) -> list[tuple[str, int | None]]:  # type: ignore[no-untyped-def]
    return [(f.feast.split(":")[1], f.feast_index) for f in view.features]


def test_gateway_matrix_equals_the_feast_sdk(feast_repo: tuple[Path, Path, str]) -> None:
    python, repo, _ = feast_repo
    schema = load_schema(SCHEMA_FILE)
    store = FeastFeatureStore.from_repo(repo, schema)

    async def fetch() -> list:
        try:
            return [await store.fetch(u, ITEMS) for u in USERS]
        finally:
            await store.close()

    batches = asyncio.run(fetch())
    users = feastenv.online_features(
        python, repo, ["user_stats:activity_log", "user_stats:emb"],
        [{"user_id": u} for u in USERS],
    )  # fmt: skip
    items = feastenv.online_features(
        python, repo, ["item_stats:popularity_log", "item_stats:ctr_prior", "item_emb:emb"],
        [{"item_id": i} for i in ITEMS],
    )  # fmt: skip
    want_users = _expected(users, _sdk_names(schema.user), schema.user.default_vector())
    want_items = _expected(items, _sdk_names(schema.item), schema.item.default_vector())
    ctx = schema.encode_context({"hour": 20, "device": "mobile"})
    for k, b in enumerate(batches):
        got = schema.assemble(b.user, b.items, ctx)
        want = schema.assemble(want_users[k], want_items, ctx)
        assert got.tobytes() == want.tobytes(), (USERS[k], np.argwhere(got != want)[:5])
    # Served on defaults: nulls (u3: both user features; i3: ctr_prior and
    # popularity_log; i9: no embedding at all) and unknown ids (counted as missing).
    assert [b.user_missing for b in batches] == [False] * 5 + [True]
    assert batches[0].items_missing == 2  # ghost-1, ghost-2
    b = batches[0]
    assert np.array_equal(batches[1].user, schema.user.default_vector())
    assert b.items[3, 1] == np.float32(0.05) and b.items[3, 0] == 0.0
    assert not b.items[9, 2:].any() and b.items[9, 1] != np.float32(0.05)


def test_gateway_serves_predictions_from_feast(
    feast_repo: tuple[Path, Path, str], gateway_factory: Callable[..., GatewayServer]
) -> None:
    _, repo, _ = feast_repo
    gw = gateway_factory(
        {
            "GATEWAY_FEATURE_SOURCE": "feast",
            "GATEWAY_FEAST_REPO": str(repo),
            "GATEWAY_SCHEMA_FILE": str(SCHEMA_FILE),
        },
        ready=True,
    )
    with httpx.Client(timeout=5) as http:
        # Ages are sampled on one request in 16 per worker, counted from the worker's first
        # read (warm-up and readiness reads included): 40 requests hold at least two.
        for _ in range(40):
            r = http.post(
                f"{gw.url}/predict",
                json={"user_id": "u10", "item_ids": ["i1", "i9", "ghost"], "context": {"hour": 20}},
            )
            assert r.status_code == 200, r.text
        body = r.json()
        assert body["fallback"] is None and body["missing"] == {"user": False, "items": 1}
        ready = http.get(f"{gw.url}/readyz").json()
        assert ready["features"] == "feast" and ready["status"] == "ready", ready
        text = http.get(f"{gw.url}/metrics").text
    for view in ("user_stats", "item_stats", "item_emb"):
        m = re.search(rf'^gateway_feature_age_seconds_count{{view="{view}"}} (\S+)$', text, re.M)
        assert m and float(m.group(1)) >= 2, view
    # make_data.py spreads event times over the last week: ages between 1 minute and 7 days.
    m = re.search(r'^gateway_feature_age_seconds_bucket{le="60.0",view="user_stats"} (\S+)$',
                  text, re.M)  # fmt: skip
    assert m and float(m.group(1)) == 0


def test_a_schema_that_does_not_resolve_in_the_registry_is_one_line(
    feast_repo: tuple[Path, Path, str], tmp_path: Path
) -> None:
    _, repo, _ = feast_repo
    text = SCHEMA_FILE.read_text()
    cases = [
        (text.replace("item_stats:ctr_prior", "item_stats:ctr"), "has no feature 'ctr'"),
        (text.replace("item_emb:emb", "item_vecs:emb"), "feature view 'item_vecs' is not in"),
        (text.replace("user_stats:activity_log", "user_stats:emb"), "declares a scalar"),
        (text.replace(', feast = "user_stats:activity_log"', ""), "activity_log has no feast"),
    ]
    for k, (bad, words) in enumerate(cases):
        path = tmp_path / f"bad{k}.toml"
        path.write_text(bad)
        with pytest.raises(ConfigError, match=re.escape(words)):
            FeastLayout.from_repo(repo, load_schema(path))
    # And `gateway serve` says it in one line, exit 2.
    proc = subprocess.run(
        [PYTHON, "-m", "gateway", "serve", "--port", "1"],
        env={"PATH": "/usr/bin:/bin", "GATEWAY_FEATURE_SOURCE": "feast",
             "GATEWAY_FEAST_REPO": str(repo), "GATEWAY_SCHEMA_FILE": str(tmp_path / "bad0.toml")},
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and "has no feature 'ctr'" in lines[0]


def test_feast_reader_needs_only_its_documented_acl_rules(
    feast_repo: tuple[Path, Path, str],
) -> None:
    """The Feast source's Redis permissions in docs/security.md suffice (an ACL user with
    only them reads features), and without the key pattern the health check reports a
    NOPERM refusal."""
    import redis

    from gateway.errors import FeatureStoreRefused

    _, repo, url = feast_repo
    admin = redis.Redis.from_url(url)
    rules = {"commands": ["+hmget"], "passwords": ["+pw"], "enabled": True}
    admin.acl_setuser("feast-reader", keys=["%R~*gateway_demo"], **rules)
    admin.acl_setuser("feast-no-keys", **rules)
    schema = load_schema(SCHEMA_FILE)

    async def main() -> None:
        ok, denied = (
            FeastFeatureStore.from_repo(repo, schema, redis_url=url.replace("//", f"//{u}:pw@"))
            for u in ("feast-reader", "feast-no-keys")
        )
        try:
            await ok.check()
            batch = await ok.fetch("u10", ["i1", "ghost"])
            assert not batch.user_missing and batch.items_missing == 1
            with pytest.raises(FeatureStoreRefused, match="NOPERM"):
                await denied.check()
        finally:
            await ok.close()
            await denied.close()

    asyncio.run(main())
    assert not [e for e in admin.acl_log() if e["username"] == "feast-reader"]
    admin.close()
