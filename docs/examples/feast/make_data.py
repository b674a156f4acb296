"""Write the generated demo world as the Parquet sources of this Feast repository.

    python docs/examples/feast/make_data.py [--users N] [--items N] [--nulls]

data/users.parquet (user_stats), data/items.parquet (item_stats) and data/item_emb.parquet
(item_emb: every item but each 10th, so some items are only half there), with event
timestamps spread over the last week. ``--nulls`` blanks some values (every 7th user's
activity, every 11th user's embedding, every 5th item's ctr_prior, every 13th item's
popularity) to show them served on the schema's defaults. Runs with the gateway's
environment (it uses gateway.synth), not Feast's.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gateway.synth import item_id, make_world, user_id


def _times(n: int, rng: np.random.Generator) -> pa.Array:
    now = datetime.now(UTC).replace(microsecond=0)
    ages = rng.integers(60, 7 * 86_400, n)
    return pa.array([now - timedelta(seconds=int(a)) for a in ages], pa.timestamp("us", "UTC"))


def _blank(values: list, every: int) -> list:
    return [None if k % every == 3 else v for k, v in enumerate(values)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--nulls", action="store_true")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    args = p.parse_args()
    w = make_world(args.users, args.items, args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    activity = w.user_vectors[:, 0].tolist()
    uemb = w.user_vectors[:, 1:].tolist()
    pop = w.item_vectors[:, 0].astype(np.float64).tolist()
    ctr = w.item_vectors[:, 1].tolist()
    if args.nulls:
        activity, uemb, ctr, pop = (
            _blank(activity, 7), _blank(uemb, 11), _blank(ctr, 5), _blank(pop, 13)
        )
    f32 = pa.float32()
    pq.write_table(pa.table({
        "user_id": [user_id(i) for i in range(args.users)],
        "activity_log": pa.array(activity, f32),
        "emb": pa.array(uemb, pa.list_(f32)),
        "event_timestamp": _times(args.users, rng),
    }), args.out / "users.parquet")
    pq.write_table(pa.table({
        "item_id": [item_id(i) for i in range(args.items)],
        "popularity_log": pa.array(pop, pa.float64()),
        "ctr_prior": pa.array(ctr, f32),
        "event_timestamp": _times(args.items, rng),
    }), args.out / "items.parquet")
    keep = [i for i in range(args.items) if i % 10 != 9]
    pq.write_table(pa.table({
        "item_id": [item_id(i) for i in keep],
        "emb": pa.array(w.item_vectors[keep, 2:].tolist(), pa.list_(f32)),
        "event_timestamp": _times(len(keep), rng),
    }), args.out / "item_emb.parquet")
    print(f"wrote {args.users} users and {args.items} items to {args.out}")


if __name__ == "__main__":
    main()
