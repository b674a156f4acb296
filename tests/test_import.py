"""``gateway features import`` against a real redis-server: Parquet in, generations out.

Each bad file: exit 2, one ``error:`` line naming the file, the column and the row, and
nothing written (the store keeps its keys and its pointer). A Redis failure half-way
leaves the pointer on the previous set. The 1M-entity run is loadtests/import_scale.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from gateway.features import codec
from gateway.features.importer import import_parquet
from gateway.features.loader import load
from gateway.schema import SCHEMA
from gateway.synth import make_world
from tests.procs import PYTHON, ROOT, RedisServer

USERS, ITEMS = 50_000, 20_000


def write_parquet(
    folder: Path, n_users: int, n_items: int, seed: int = 7, **edits: Callable[[dict], None]
) -> tuple[Path, Path]:
    """users.parquet and items.parquet of the generated world; ``edits`` change the columns."""
    w = make_world(n_users, n_items, seed)
    paths = []
    for name, prefix, view, vecs in (
        ("users", "u", SCHEMA.user, w.user_vectors),
        ("items", "i", SCHEMA.item, w.item_vectors),
    ):
        cols: dict = {f"{view.name}_id": [f"{prefix}{i}" for i in range(len(vecs))]}
        for k, fname in enumerate(view.names):
            cols[fname] = vecs[:, k].copy()
        if name in edits:
            edits[name](cols)
        path = folder / f"{name}.parquet"
        pq.write_table(pa.table(cols), path, row_group_size=4_096)
        paths.append(path)
    return paths[0], paths[1]


def _cli(users: Path, items: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "gateway", "features", "import", "--users", str(users),
         "--items", str(items), "--redis-url", url, "--no-progress", "--batch", "5000", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def _pointer(r: redis.Redis) -> tuple[str, str]:
    raw = r.get(codec.POINTER_KEY)
    assert raw is not None
    return codec.parse_pointer(raw)


def test_import_writes_the_vectors_and_switches_generations(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    users, items = write_parquet(tmp_path, USERS, ITEMS)
    r = redis.Redis.from_url(fresh_redis.url)
    s1 = import_parquet(users, items, fresh_redis.url, SCHEMA, batch=8_192, progress=False)
    assert (s1.users, s1.items) == (USERS, ITEMS)
    assert s1.bytes == USERS * SCHEMA.user.nbytes + ITEMS * SCHEMA.item.nbytes
    assert _pointer(r) == (s1.generation, SCHEMA.store_version)
    assert r.dbsize() == USERS + ITEMS + 3  # + pointer, generations, meta
    w = make_world(USERS, ITEMS, 7)
    for k in (0, 1234, USERS - 1):
        raw = r.get(codec.user_key(f"u{k}", s1.generation))
        assert np.frombuffer(raw, np.float32).tobytes() == w.user_vectors[k].tobytes()
    raw = r.get(codec.item_key(f"i{ITEMS - 1}", s1.generation))
    assert raw == w.item_vectors[ITEMS - 1].tobytes()

    # The same data again: the same generation, nothing added (idempotent).
    s2 = import_parquet(users, items, fresh_redis.url, SCHEMA, progress=False)
    assert s2.generation == s1.generation and r.dbsize() == USERS + ITEMS + 3

    # Other data: a new generation; the previous one is kept (keep=1) ...
    other = tmp_path / "other"
    other.mkdir()
    u3, i3 = write_parquet(other, 1_000, 500, seed=8)
    s3 = import_parquet(u3, i3, fresh_redis.url, SCHEMA, progress=False)
    assert s3.generation != s1.generation and s3.deleted == []
    assert r.dbsize() == USERS + ITEMS + 1_500 + 4
    # ... until the next switch, which deletes it; the demo loader shares the scheme.
    s4 = load(fresh_redis.url, users=40, items=25, progress=False)
    assert _pointer(r)[0] == s4.generation
    assert r.dbsize() == 1_500 + 65 + 4
    assert r.get(codec.user_key("u0", s1.generation)) is None
    r.close()


def test_readers_never_see_half_an_import(fresh_redis: RedisServer, tmp_path: Path) -> None:
    """While an import writes, the pointer names the old, complete set; when it switches,
    every key of the new set is there already."""
    load(fresh_redis.url, users=100, items=100, progress=False)
    users, items = write_parquet(tmp_path, USERS, ITEMS, seed=9)
    r = redis.Redis.from_url(fresh_redis.url)
    old = _pointer(r)[0]
    seen: list[str] = []
    done = threading.Event()

    def watch() -> None:
        last = f"i{ITEMS - 1}"
        while not done.is_set():
            gen = _pointer(r)[0]
            if not seen or seen[-1] != gen:
                seen.append(gen)
            if gen != old:
                # The last item is written last: present as soon as the pointer moves.
                assert r.get(codec.item_key(last, gen)) is not None
            time.sleep(0.001)

    t = threading.Thread(target=watch)
    t.start()
    try:
        proc = _cli(users, items, fresh_redis.url)
    finally:
        done.set()
        t.join()
    assert proc.returncode == 0, proc.stderr
    assert seen[0] == old and len(seen) == 2, seen
    assert "imported 50000 users and 20000 items" in proc.stdout
    r.close()


def _nan(col: str, row: int) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols[col][row] = np.nan

    return edit


def _set(col: str, values: Callable[[dict], object]) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols[col] = values(cols)

    return edit


def _drop(col: str) -> Callable[[dict], None]:
    return lambda cols: cols.pop(col)


def _dup(cols: dict) -> None:
    cols["item_id"][777] = cols["item_id"][12]


def _null_at(row: int) -> Callable[[dict], object]:
    def values(cols: dict) -> object:
        v = cols["ctr_prior"].astype(object)
        v[row] = None
        return pa.array(v.tolist(), type=pa.float32())

    return values


def _at(col: str, row: int, value: float) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        v = cols[col].astype(np.float64)
        v[row] = value
        cols[col] = v

    return edit


def _ids(col: str, row: int, value: str | None) -> Callable[[dict], None]:
    def edit(cols: dict) -> None:
        cols[col][row] = value

    return edit


def _text(col: str) -> Callable[[dict], None]:
    return _set(col, lambda c: [str(x) for x in c[col]])


BAD = [
    # (case, which file, edit, words the one line must hold)
    ("missing column", "items", _drop("ctr_prior"), ["items.parquet", "ctr_prior", "missing"]),
    ("missing id column", "users", _drop("user_id"), ["users.parquet", "user_id", "missing"]),
    ("text feature", "items", _text("popularity_log"),
     ["items.parquet", "column popularity_log", "string", "needs a number"]),
    ("NaN", "users", _nan("emb_3", 4321), ["users.parquet", "column emb_3", "row 4321", "NaN"]),
    ("infinity", "items", _at("emb_0", 15000, np.inf),
     ["items.parquet", "column emb_0", "row 15000", "inf"]),
    ("beyond float32", "items", _at("emb_1", 3, 1e300),
     ["items.parquet", "column emb_1", "row 3", "not finite as float32"]),
    ("null value", "items", _set("ctr_prior", _null_at(9999)),
     ["items.parquet", "column ctr_prior", "row 9999", "null"]),
    ("duplicate id", "items", _dup,
     ["items.parquet", "column item_id", "row 777", "duplicate id 'i12'", "row 12"]),
    ("empty id", "users", _ids("user_id", 42, ""),
     ["users.parquet", "column user_id", "row 42", "empty id"]),
    ("null id", "users", _ids("user_id", 7, None),
     ["users.parquet", "column user_id", "row 7", "null id"]),
]  # fmt: skip


@pytest.mark.parametrize("case,which,edit,words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_file_writes_nothing_and_says_where(
    case: str,
    which: str,
    edit: Callable[[dict], None],
    words: list[str],
    fresh_redis: RedisServer,
    tmp_path: Path,
) -> None:
    load(fresh_redis.url, users=30, items=20, progress=False)
    r = redis.Redis.from_url(fresh_redis.url)
    before = (_pointer(r), r.dbsize())
    users, items = write_parquet(tmp_path, USERS, ITEMS, **{which: edit})
    proc = _cli(users, items, fresh_redis.url)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert (_pointer(r), r.dbsize()) == before  # nothing written, nothing switched
    r.close()


def test_unreadable_files_and_a_foreign_schema_are_one_line(
    fresh_redis: RedisServer, tmp_path: Path
) -> None:
    users, items = write_parquet(tmp_path, 10, 10)
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("user_id,activity_log\nu1,0.5\n")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"user_id": pa.array([], pa.string())}).append_column(
        "x", pa.array([], pa.float32())), empty)  # fmt: skip
    bad_schema = tmp_path / "bad.toml"
    bad_schema.write_text('version = "2"\n[model]\ninput = "x"\noutput = "y"\n[user]\n')
    cases = [
        ((tmp_path / "nope.parquet", items), (), ["nope.parquet", "no such file"]),
        ((not_parquet, items), (), ["notes.parquet", "not a readable Parquet file"]),
        ((users, empty), (), ["empty.parquet", "column item_id", "missing"]),
        ((users, items), ("--schema", str(bad_schema)), ["bad.toml", "user.features"]),
    ]
    for (u, i), extra, words in cases:
        proc = _cli(u, i, fresh_redis.url, *extra)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert all(w in lines[0] for w in words), (words, lines[0])
    r = redis.Redis.from_url(fresh_redis.url)
    assert r.dbsize() == 0
    r.close()


def test_redis_failing_half_way_leaves_the_pointer_on_the_previous_set(tmp_path: Path) -> None:
    """A Redis that runs out of memory mid-import (noeviction): exit 2, one line, and
    readers keep the previous, complete generation."""
    server = RedisServer(extra_args=("--maxmemory", "6mb", "--maxmemory-policy", "noeviction"))
    server.start()
    try:
        load(server.url, users=100, items=100, progress=False)
        r = redis.Redis.from_url(server.url)
        before = _pointer(r)
        users, items = write_parquet(tmp_path, USERS, ITEMS, seed=3)
        proc = _cli(users, items, server.url)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert "the pointer was not switched" in lines[0], lines[0]
        assert _pointer(r) == before
        assert r.get(codec.user_key("u99", before[0])) is not None
        r.close()
    finally:
        server.stop()
