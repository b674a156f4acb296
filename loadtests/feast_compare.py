"""The gateway's Feast read versus the Feast SDK's ``get_online_features``, 50 items.

One user and 50 items per call, the features of three feature views (user_stats,
item_stats, item_emb) as the example schema maps them. The SDK call is what a ranking
service would make: one entity row per item carrying both ids. The gateway's call is
``FeastFeatureStore.fetch`` (read + decode into the schema's vectors) on uvloop, the loop
``gateway serve`` runs. Both run in one process (the Feast virtualenv, with the gateway's
source on the path, start-up allocations frozen out of the collector as the gateway
does), in interleaved rounds against the same redis-server, and the medians per call are
compared::

    flock /tmp/heavy.lock .venv/bin/python -m loadtests.feast_compare \\
        --out loadtests/results/feast-compare.md
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROUNDS, CALLS, ITEMS = 10, 200, 50


def child(repo: Path, schema_file: Path, rounds: int, calls: int) -> dict:
    from feast import FeatureStore

    from gateway.features.feast_store import FeastFeatureStore
    from gateway.schema import load_schema

    fs = FeatureStore(repo_path=str(repo))
    feats = ["user_stats:activity_log", "user_stats:emb", "item_stats:popularity_log",
             "item_stats:ctr_prior", "item_emb:emb"]  # fmt: skip
    store = FeastFeatureStore.from_repo(repo, load_schema(schema_file))
    # The gateway's read runs on uvloop, as `gateway serve` runs it (uvicorn's loop).
    import uvloop

    loop = uvloop.new_event_loop()
    users = [f"u{k}" for k in range(0, 10_000, 37)]
    items = [[f"i{(k * 97 + j * 13) % 5_000}" for j in range(ITEMS)] for k in range(calls)]

    def sdk(k: int) -> None:
        u = users[k % len(users)]
        fs.get_online_features(
            features=feats,
            entity_rows=[{"user_id": u, "item_id": i} for i in items[k]],
            full_feature_names=True,
        )

    async def gw(n: int) -> None:
        for k in range(n):
            await store.fetch(users[k % len(users)], items[k])

    for k in range(20):  # warm up both
        sdk(k)
    loop.run_until_complete(gw(20))
    # As the gateway does once started (api/app.py): what was allocated at start up
    # (here Feast's and the gateway's modules and clients) leaves the collector's reach,
    # for both sides alike.
    gc.collect()
    gc.freeze()
    per_sdk, per_gw = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for k in range(calls):
            sdk(k)
        per_sdk.append((time.perf_counter() - t0) / calls)
        t0 = time.perf_counter()
        loop.run_until_complete(gw(calls))
        per_gw.append((time.perf_counter() - t0) / calls)
    loop.run_until_complete(store.close())
    return {"sdk_ms": [x * 1e3 for x in per_sdk], "gateway_ms": [x * 1e3 for x in per_gw]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=ROUNDS)
    p.add_argument("--calls", type=int, default=CALLS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", nargs=2, metavar=("REPO", "SCHEMA"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        res = child(Path(args.child[0]), Path(args.child[1]), args.rounds, args.calls)
        print(json.dumps(res))
        return 0

    from tests import feastenv
    from tests.procs import ROOT, RedisServer

    python = feastenv.ensure_venv()
    server = RedisServer().start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            repo = feastenv.make_repo(Path(tmp), server.port, python, users=10_000, items=5_000)
            proc = subprocess.run(
                [str(python), "-m", "loadtests.feast_compare", "--rounds", str(args.rounds),
                 "--calls", str(args.calls), "--child", str(repo),
                 str(feastenv.EXAMPLE / "schema.toml")],
                cwd=ROOT, capture_output=True, text=True, check=False,
                env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"},
            )  # fmt: skip
    finally:
        server.stop()
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    sdk, gw = statistics.median(res["sdk_ms"]), statistics.median(res["gateway_ms"])
    ratios = [s / g for s, g in zip(res["sdk_ms"], res["gateway_ms"], strict=True)]
    lines = [
        "# Feast online read: the gateway versus the Feast SDK, 50 items",
        "",
        "Command: `flock /tmp/heavy.lock .venv/bin/python -m loadtests.feast_compare "
        f"--rounds {args.rounds} --calls {args.calls}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work); "
        "feast 0.67.0 (Python SDK, redis-py client), one redis-server on loopback; "
        "10,000 users and 5,000 items materialized, three feature views, 1 user + 50 items "
        "per call (20 floats per pair). Both in one process, interleaved rounds of "
        f"{args.calls} calls; the gateway's read on uvloop (as `gateway serve`), start-up "
        "allocations frozen out of the garbage collector for both (as the gateway does). "
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| per call (median of rounds) | ms |",
        "|---|---|",
        f"| Feast SDK `get_online_features` (50 entity rows, 5 features) | {sdk:.3f} |",
        f"| gateway `FeastFeatureStore.fetch` (read + decode to vectors) | {gw:.3f} |",
        f"| ratio (SDK / gateway), median of per-round ratios | {statistics.median(ratios):.1f}x |",
        f"| ratio range over rounds | {min(ratios):.1f}x - {max(ratios):.1f}x |",
        "",
        "Rounds (ms per call), SDK: "
        + ", ".join(f"{x:.3f}" for x in res["sdk_ms"])
        + "; gateway: "
        + ", ".join(f"{x:.3f}" for x in res["gateway_ms"]),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
