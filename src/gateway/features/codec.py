"""The Redis layout: one packed little-endian float32 vector per entity, in generations.

::

    feat:{gen}:u:{user_id}  -> user view,  9 x float32 = 36 bytes (built-in schema)
    feat:{gen}:i:{item_id}  -> item view, 10 x float32 = 40 bytes
    feat:{gen}:meta         -> JSON {"written_at": unix seconds}, set at each switch
    feat:current            -> "{gen} {store_version}", e.g. "5e0c61a2 1:c78376701f29"
    feat:generations        -> sorted set: every generation written, scored by write time
    feat:lock               -> held (SET NX with a TTL) while a load or import runs

**Generations.** A load or import writes every vector under a new generation ``gen``
(8 hex digits, a hash of the schema and of the data: the same data gives the same
generation, so a repeated load rewrites identical values) and then, last, switches
the one pointer key ``feat:current`` with one SET. A reader that follows the pointer
sees the old set or the new one, never half of each; an import that fails half-way
never switches it. The gateway reads the pointer in its background health check and
builds keys with precomputed prefixes, so a request is still one MGET. Old generations
are deleted after a switch except the ``keep`` most recent (loader.py), so a gateway
that read the pointer up to one health interval ago still finds its keys.

Redis Cluster: the generation is a plain prefix (no ``{hash tag}``), so user and item
keys spread over slots as before and ``mget_nonatomic`` groups them by slot.

One ``MGET`` of the user key and every item key is one round trip for one request,
and its reply is decoded with one ``numpy.frombuffer`` when every value is present.
Packed vectors instead of a hash per entity: a hash needs ``HGETALL`` per key (N
commands), and each field comes back as text to parse; a packed vector is one bulk
string per key, a quarter of the bytes, and decodes without a Python loop per field.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np

from gateway.features.base import FeatureBatch
from gateway.schema import SCHEMA, EntityView, FeatureSchema

PREFIX = "feat"
POINTER_KEY = f"{PREFIX}:current"
GENERATIONS_KEY = f"{PREFIX}:generations"
LOCK_KEY = f"{PREFIX}:lock"
# Before generations: the version key of a store written by an older loader.
LEGACY_VERSION_KEY = f"{PREFIX}:schema_version"

_GEN = re.compile(r"^[0-9a-f]{8}$")


def user_prefix(gen: str) -> str:
    """Every user key of generation ``gen`` is this plus the user id."""
    return f"{PREFIX}:{gen}:u:"


def item_prefix(gen: str) -> str:
    return f"{PREFIX}:{gen}:i:"


def user_key(user_id: str, gen: str) -> str:
    return f"{PREFIX}:{gen}:u:{user_id}"


def item_key(item_id: str, gen: str) -> str:
    return f"{PREFIX}:{gen}:i:{item_id}"


def meta_key(gen: str) -> str:
    """When generation ``gen`` was last written and switched to (freshness); deleted with it."""
    return f"{PREFIX}:{gen}:meta"


def meta_value(written_at: float) -> str:
    return json.dumps({"written_at": round(written_at, 3)})


def parse_meta(raw: bytes | str | None) -> float | None:
    """``written_at`` from a meta key's value; None if absent or unreadable (an older
    loader wrote the set)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)["written_at"]
    except (ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def generation_pattern(gen: str) -> str:
    """A SCAN pattern matching every vector of generation ``gen``."""
    return f"{PREFIX}:{gen}:*"


def pointer_value(gen: str, store_version: str) -> str:
    if not _GEN.match(gen):
        raise ValueError(f"bad generation {gen!r}")
    return f"{gen} {store_version}"


def parse_pointer(raw: bytes | str) -> tuple[str, str]:
    """``(generation, store_version)`` from the pointer's value; ValueError if malformed."""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    gen, _, version = text.partition(" ")
    if not _GEN.match(gen) or not version:
        raise ValueError(f"malformed {POINTER_KEY} value {text[:60]!r}")
    return gen, version


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
    nbytes = iv.nbytes
    sized = [r is not None and len(r) == nbytes for r in items_raw]
    if all(sized):
        joined = b"".join(items_raw)  # type: ignore[arg-type]
        items = np.frombuffer(joined, dtype=iv.dtype).reshape(n, iv.width)
        if np.isfinite(items).all():
            return FeatureBatch(user, items, user_missing, 0, corrupt)
    # Some values are absent, the wrong length or not finite (about 2 % of ids are
    # unknown, so most 50-item requests land here): still one join and one frombuffer,
    # with the default standing in for each unusable value, instead of a Python loop
    # of frombuffer + isfinite per item.
    default = iv.default_vector()
    pad = default.tobytes()
    buf = bytearray(b"".join(r if ok else pad for r, ok in zip(items_raw, sized, strict=True)))  # type: ignore[misc]
    items = np.frombuffer(buf, dtype=iv.dtype).reshape(n, iv.width)
    ok_rows = np.fromiter(sized, dtype=bool, count=n)
    nonfinite = ok_rows & ~np.isfinite(items).all(axis=1)
    items[nonfinite] = default
    absent = sum(r is None for r in items_raw)
    missing = n - int(ok_rows.sum()) + int(nonfinite.sum())
    corrupt += missing - absent
    return FeatureBatch(user, items, user_missing, missing, corrupt)
