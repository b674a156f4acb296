"""The Redis layout: one packed little-endian float32 vector per entity.

::

    feat:u:{user_id}        -> user view,  9 x float32 = 36 bytes
    feat:i:{item_id}        -> item view, 10 x float32 = 40 bytes
    feat:schema_version     -> SCHEMA.store_version, e.g. "1:3f2a9c0d1e4b"

One ``MGET`` of the user key and every item key is one round trip for one request,
and its reply is decoded with one ``numpy.frombuffer`` when every value is present.
Packed vectors instead of a hash per entity: a hash needs ``HGETALL`` per key (N
commands), and each field comes back as text to parse; a packed vector is one bulk
string per key, a quarter of the bytes, and decodes without a Python loop per field.
"""

from __future__ import annotations

import numpy as np

from gateway.features.base import FeatureBatch
from gateway.schema import SCHEMA, EntityView, FeatureSchema

PREFIX = "feat"
VERSION_KEY = f"{PREFIX}:schema_version"


def user_key(user_id: str) -> str:
    return f"{PREFIX}:u:{user_id}"


def item_key(item_id: str) -> str:
    return f"{PREFIX}:i:{item_id}"


def encode(view: EntityView, vector: np.ndarray) -> bytes:
    """Pack one entity's vector (schema order) into its stored bytes."""
    arr = np.asarray(vector, dtype=view.dtype)
    if arr.shape != (view.width,):
        raise ValueError(f"{view.name} vector must have {view.width} values, got {arr.shape}")
    return arr.tobytes()


def _valid(view: EntityView, raw: bytes | None) -> np.ndarray | None:
    if raw is None or len(raw) != view.nbytes:
        return None
    vec = np.frombuffer(raw, dtype=view.dtype)
    if not np.isfinite(vec).all():
        return None
    return vec


def decode(
    user_raw: bytes | None, items_raw: list[bytes | None], schema: FeatureSchema = SCHEMA
) -> FeatureBatch:
    """Turn an MGET reply into a batch; absent or unusable values get the schema defaults.

    Unusable (wrong length, NaN or infinite) values count as missing *and* as corrupt.
    """
    user = _valid(schema.user, user_raw)
    user_missing = user is None
    corrupt = int(user_missing and user_raw is not None)
    if user is None:
        user = schema.user.default_vector()
    iv = schema.item
    n = len(items_raw)
    if all(r is not None and len(r) == iv.nbytes for r in items_raw):
        joined = b"".join(items_raw)  # type: ignore[arg-type]
        items = np.frombuffer(joined, dtype=iv.dtype).reshape(n, iv.width)
        if np.isfinite(items).all():
            return FeatureBatch(user, items, user_missing, 0, corrupt)
    items = np.empty((n, iv.width), dtype=iv.dtype)
    default = iv.default_vector()
    missing = 0
    for k, raw in enumerate(items_raw):
        vec = _valid(iv, raw)
        if vec is None:
            missing += 1
            corrupt += raw is not None
            items[k] = default
        else:
            items[k] = vec
    return FeatureBatch(user, items, user_missing, missing, corrupt)
