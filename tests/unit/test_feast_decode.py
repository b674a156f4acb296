"""The Feast reply decoder (feast_store.decode) against a value-by-value reference.

Pure logic: replies are built here from serialized ValueProtos of every kind the layout
can hold (the fixed layouts, nulls, absent fields, other numeric types, lists of another
length, a value whose size matches a fixed layout but whose header does not), and the
vectorized decoder must give exactly what parsing each value with protobuf gives.
"""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from gateway.features import feast_proto as fp
from gateway.features.feast_store import _Field, _Plan, decode, fixed_layout
from gateway.schema import load_schema
from tests.feastenv import EXAMPLE

SCHEMA = load_schema(EXAMPLE / "schema.toml")


def _plan(view_name: str) -> _Plan:
    if view_name == "item":
        fields = (
            _Field("item_stats", "popularity_log", fp.DOUBLE, (0,), (0,), 1,
                   fixed_layout(fp.DOUBLE, 1)),
            _Field("item_stats", "ctr_prior", fp.FLOAT, (1,), (0,), 1,
                   fixed_layout(fp.FLOAT, 1)),
            _Field("item_emb", "emb", fp.FLOAT_LIST, tuple(range(2, 10)), tuple(range(8)), 8,
                   fixed_layout(fp.FLOAT_LIST, 8)),
        )  # fmt: skip
        views, view = ("item_stats", "item_emb"), SCHEMA.item
    else:
        fields = (
            _Field("user_stats", "activity_log", fp.FLOAT, (0,), (0,), 1,
                   fixed_layout(fp.FLOAT, 1)),
            _Field("user_stats", "emb", fp.FLOAT_LIST, tuple(range(1, 9)), tuple(range(8)), 8,
                   fixed_layout(fp.FLOAT_LIST, 8)),
        )  # fmt: skip
        views, view = ("user_stats",), SCHEMA.user
    hash_fields = tuple(f"{f.view}:{f.feature}".encode() for f in fields) + tuple(
        f"_ts:{v}".encode() for v in views
    )
    return _Plan(view, view_name, "id", fp.STRING, fields, views, hash_fields, b"", b"p")


def _value(rng: random.Random, f: _Field) -> bytes:
    """A serialized value for field ``f``: usually its own layout, sometimes anything."""
    v = fp.Value()
    kind = rng.random()
    if kind < 0.55:  # the field's own type
        if f.value_type == fp.DOUBLE:
            v.double_val = rng.uniform(-5, 5)
        elif f.value_type == fp.FLOAT:
            v.float_val = rng.uniform(-5, 5)
        else:
            v.float_list_val.val.extend(rng.uniform(-1, 1) for _ in range(f.length))
    elif kind < 0.65:
        return b""  # a null (Feast writes an empty ValueProto)
    elif kind < 0.72:
        v.int64_val = rng.choice([3, -7, 2**40, 2**56 + 5])  # 2**56: 9 bytes, like a DOUBLE
    elif kind < 0.77:
        v.int32_val = rng.randint(-100, 100)
    elif kind < 0.82:
        v.double_list_val.val.extend(rng.uniform(-1, 1) for _ in range(f.length))
    elif kind < 0.87:
        v.float_list_val.val.extend(rng.uniform(-1, 1) for _ in range(rng.choice([1, 7, 9])))
    elif kind < 0.92:
        v.bool_val = rng.random() < 0.5
    else:
        v.float_val = rng.uniform(-5, 5)  # a FLOAT where a DOUBLE or a list is declared
    return bytes(v.SerializeToString())


def _timestamp(rng: random.Random) -> bytes:
    if rng.random() < 0.15:
        return b""  # the view does not hold this entity
    secs = rng.randint(1_700_000_000, 1_800_000_000)
    nanos = rng.choice([0, rng.randint(1, 999_999_999)])
    out = b"\x08" + _varint(secs)
    return out + (b"\x10" + _varint(nanos) if nanos else b"")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _reference(plan: _Plan, flat: list[bytes], n: int) -> tuple[np.ndarray, np.ndarray]:
    stride = len(plan.hash_fields)
    out = np.tile(plan.view.default_vector(), (n, 1))
    missing = np.ones(n, dtype=bool)
    for r in range(n):
        row = flat[r * stride : (r + 1) * stride]
        for f, raw in zip(plan.fields, row, strict=False):
            vals = fp.value_as_floats(raw) if raw else None
            if vals is not None and len(vals) == f.length:
                out[r, list(f.columns)] = [vals[i] for i in f.indexes]
        missing[r] = not any(row[len(plan.fields) :])
    return out, missing


@pytest.mark.parametrize("view", ["item", "user"])
@pytest.mark.parametrize("n", [1, 2, 50, 200])
def test_vectorized_decode_equals_protobuf_value_by_value(view: str, n: int) -> None:
    plan = _plan(view)
    for seed in range(20):
        rng = random.Random(seed * 1000 + n)
        flat: list[bytes] = []
        for _ in range(n):
            flat += [_value(rng, f) for f in plan.fields]
            flat += [_timestamp(rng) for _ in plan.views]
        for with_ages in (False, True):
            got, missing, _ = decode(plan, flat, n, with_ages)
            want, want_missing = _reference(plan, flat, n)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), (seed, np.argwhere(got != want)[:5])
            assert np.array_equal(missing, want_missing), seed


def test_ages_are_the_oldest_event_time_per_view() -> None:
    plan = _plan("item")
    now = 1_750_000_000
    ts = [now - 60, now - 3600, now - 10]  # per entity, item_stats; item_emb 1 s younger
    flat: list[bytes] = []
    for t in ts:
        flat += [b"", b"", b""]
        flat += [b"\x08" + _varint(t), b"\x08" + _varint(t + 1) + b"\x10\x05"]
    before = time.time()
    _, missing, ages = decode(plan, flat, len(ts), True)
    after = time.time()
    assert not missing.any()
    # Measured from time.time(): the oldest value of each view is the one at now - 3600.
    assert before - (now - 3600) <= ages["item_stats"] <= after - (now - 3600)
    assert ages["item_stats"] - ages["item_emb"] == pytest.approx(1.0, abs=1e-6)
