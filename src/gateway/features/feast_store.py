"""Features from a Feast Redis online store, read directly (``GATEWAY_FEATURE_SOURCE=feast``).

At start (:meth:`FeastLayout.from_repo`, off the request path): read the repository's
``feature_store.yaml`` (project, file registry, Redis online store, entity key
serialization version) and its registry (a ``Registry`` protobuf, parsed with the
messages declared in feast_proto.py, without the feast package), and resolve every
schema feature's ``feast = "view:feature"`` to a Feast feature view, its entity (join
key and id type) and the feature's value type. Anything that does not resolve is one
:class:`~gateway.errors.ConfigError` line.

Feast's Redis layout (feast 0.67 ``infra/online_stores/redis.py`` and
``infra/key_encoding_utils.py``), which this module reads as it is:

* one hash per entity: key = ``serialize_entity_key(entity, version 3) + project``;
  version 3 for one join key is ``<I 1> <I STRING> <I len(join_key)> join_key
  <I value type> <I len(value)> value``, the id as UTF-8 (STRING) or ``<q``/``<i``
  (INT64/INT32), all little-endian;
* one field per feature: the 4 little-endian bytes of ``murmur3_32("view:feature")``,
  holding a serialized ``ValueProto``; and ``_ts:view``, a serialized
  ``google.protobuf.Timestamp`` (the event time) per feature view.

**The request path** is one round trip: one ``HMGET`` per hash (the user's, then every
item's) with their views' fields, pipelined in one write on a raw RESP connection
(``resp.py``) and parsed by hiredis. The reply is joined into one buffer and decoded per
feature, for all entities at once: a FLOAT or DOUBLE value is a fixed 5- or 9-byte
string (tag + IEEE bytes) and a FLOAT_LIST or DOUBLE_LIST of a fixed length has a fixed
header, so all of them for 50 entities are one gather from that buffer; null, empty or
other-typed values (INT32, INT64, BOOL, lists of them) take the protobuf parser, one
value at a time. A null value or an entity a view does not hold is served on the
schema's default; an entity no view holds counts as missing.

Staleness: the ``_ts`` fields give each view's event time; the age of the oldest value a
request was served from each view feeds ``gateway_feature_age_seconds{view}`` (one
observation per view per request: per entity would cost more than the read).

Not supported (one line at start): registries other than a local file, Redis Cluster or
Sentinel online stores, entity key serialization versions other than 3, feature views
with several entities, and online feature view versioning.
"""

from __future__ import annotations

import functools
import itertools
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from gateway.errors import ConfigError
from gateway.features import feast_proto as fp
from gateway.features.base import FeatureBatch
from gateway.features.resp import RespPool
from gateway.redisconn import NO_TLS, RedisTLS
from gateway.schema import EntityView, FeatureSchema

log = logging.getLogger("gateway.features")

# Feature age buckets, seconds: a minute to a month. Feast materializes on a schedule
# (hourly to daily is common), so the interesting boundaries are hours and days.
AGE_BUCKETS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86_400,
               2 * 86_400, 7 * 86_400, 30 * 86_400)  # fmt: skip

# The ages are decoded on one request in 16: decoding every timestamp of a 50-item request
# cost 70 us (a profile), a quarter of the whole read; a sample keeps the histogram's
# shape at a sixteenth of the cost.
AGE_SAMPLE = 16

# Packed item commands kept (see FeastFeatureStore._item_command): 100,000 ids, ~20 MB.
ITEM_COMMANDS_MAX = 100_000


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _hmget_parts(fields: tuple[bytes, ...]) -> tuple[bytes, bytes]:
    """``HMGET <key> <fields...>`` in RESP as (what goes before the key, what after).

    The command's framing is written here rather than by ``hiredis.pack_command`` per
    call because only the key changes between the 51 commands of a read: the fields'
    part is packed once at start (this is RESP's documented array-of-bulk-strings form,
    the same bytes ``pack_command`` writes).
    """
    head = b"*%d\r\n$5\r\nHMGET\r\n" % (2 + len(fields))
    return head, b"".join(_bulk(f) for f in fields)


# The head of a key that no entity serializes to (version-3 keys start with b"\x01"):
# stands for an id that cannot be an INT64/INT32 entity value. The project follows it
# like any key's, so an ACL user limited to the project's keys (``%R~*project``,
# docs/security.md) may still read it.
_NO_KEY = b"\x00"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def mmh3_field(view: str, feature: str) -> bytes:
    """Feast's hash field name for a feature (``helpers._mmh3``)."""
    import mmh3

    return int(mmh3.hash(f"{view}:{feature}", signed=False)).to_bytes(4, "little")


@dataclass(frozen=True)
class _Field:
    """One Feast feature read for a schema view: the columns it fills and how it decodes."""

    view: str
    feature: str
    value_type: int
    columns: tuple[int, ...]  # positions in the schema view
    indexes: tuple[int, ...]  # positions in the value (a scalar: (0,))
    length: int  # values expected: 1 for a scalar, the declared size for a list

    # (header, numpy dtype, size) when the value type has a fixed layout, else None.
    fixed: tuple[bytes, str, int] | None = None

    @functools.cached_property
    def span(self) -> slice | None:
        """The schema columns as one slice when value ``j`` fills column ``c0 + j`` (the
        usual case: a decoded (n, length) block is then written in one assignment)."""
        c0 = self.columns[0]
        if self.indexes == tuple(range(self.length)) and self.columns == tuple(
            range(c0, c0 + self.length)
        ):
            return slice(c0, c0 + self.length)
        return None


def fixed_layout(vt: int, n: int) -> tuple[bytes, str, int] | None:
    """(header, dtype, size) of a ValueProto of type ``vt`` with ``n`` values, if fixed."""
    if vt == fp.FLOAT:
        return b"\x35", "<f4", 5
    if vt == fp.DOUBLE:
        return b"\x29", "<f8", 9
    if vt in (fp.FLOAT_LIST, fp.DOUBLE_LIST):
        width = 4 if vt == fp.FLOAT_LIST else 8
        packed = b"\x0a" + _varint(width * n)
        inner = len(packed) + width * n
        tag = b"\x82\x01" if vt == fp.FLOAT_LIST else b"\x7a"  # fields 16 and 15
        header = tag + _varint(inner) + packed
        return header, "<f4" if width == 4 else "<f8", len(header) + width * n
    return None


@dataclass(frozen=True)
class _Plan:
    """How one schema view (user or item) is read from Feast."""

    view: EntityView
    entity: str
    join_key: str
    id_type: int
    fields: tuple[_Field, ...]
    views: tuple[str, ...]  # Feast feature views, in the order of their _ts fields
    hash_fields: tuple[bytes, ...]  # feature fields, then one _ts field per view
    key_head: bytes
    project: bytes

    @functools.cached_property
    def default(self) -> np.ndarray:
        """The schema view's default vector (built once: it is read on every request)."""
        return self.view.default_vector()

    @functools.cached_property
    def gather(self) -> _Gather | None:
        """The fixed-layout fields' joint gather (see :func:`decode`), or None if none."""
        fixed = [(k, f) for k, f in enumerate(self.fields) if f.fixed is not None]
        if not fixed:
            return None
        field_of: list[int] = []
        offset: list[int] = []
        hpos: list[int] = []
        hval: list[int] = []
        hstart: list[int] = []
        values: list[tuple[int, _Field, int, int, str]] = []
        at = 0
        for k, f in fixed:
            assert f.fixed is not None
            header, dtype, size = f.fixed
            field_of += [k] * size
            offset += range(size)
            hstart.append(len(hpos))
            hpos += range(at, at + len(header))
            hval += header
            values.append((k, f, at + len(header), at + size, dtype))
            at += size
        return _Gather(
            np.array([k for k, _ in fixed]),
            np.array([f.fixed[2] for _, f in fixed if f.fixed is not None]),
            np.array(field_of),
            np.array(offset),
            np.array(hpos),
            np.array(hval, dtype=np.uint8),
            np.array(hstart),
            tuple(values),
        )

    def key(self, entity_id: str) -> bytes:
        """The Redis key of one entity (``serialize_entity_key`` v3 + project)."""
        if self.id_type == fp.STRING:
            value = entity_id.encode()
        else:
            try:
                value = struct.pack("<q" if self.id_type == fp.INT64 else "<i", int(entity_id))
            except (ValueError, struct.error):
                return _NO_KEY + self.project
        return b"".join((self.key_head, struct.pack("<I", len(value)), value, self.project))


@dataclass(frozen=True)
class _Gather:
    """Where the fixed-layout fields of one entity's reply sit, laid end to end: one
    fancy index fetches them all for every entity, one comparison checks every header."""

    fields: np.ndarray  # (F,) the fixed fields' positions in a reply row
    sizes: np.ndarray  # (F,) their serialized sizes
    field_of: np.ndarray  # (T,) per gathered byte: which reply field it comes from
    offset: np.ndarray  # (T,) ... and its offset in that field's value
    header_at: np.ndarray  # (H,) positions of the header bytes in the gathered row
    header: np.ndarray  # (H,) their expected values
    header_start: np.ndarray  # (F,) where each field's header bytes begin in header_at
    values: tuple[tuple[int, _Field, int, int, str], ...]  # (k, field, start, end, dtype)


def _load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"feast repo: {path} not found (GATEWAY_FEAST_REPO)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"feast repo: cannot read {path}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"feast repo: {path} is not a YAML mapping")
    return doc


def redis_url_from_connection_string(conn: str) -> str:
    """Feast's ``host:port,db=0,password=...,ssl=true`` as a redis:// URL."""
    hosts = [p for p in conn.split(",") if "=" not in p]
    params = dict(p.split("=", 1) for p in conn.split(",") if "=" in p)
    if len(hosts) != 1:
        raise ConfigError(
            f"feast online store: connection_string {conn!r} names {len(hosts)} hosts"
        )
    scheme = "rediss" if params.get("ssl", "").lower() == "true" else "redis"
    auth = f":{quote(params['password'], safe='')}@" if params.get("password") else ""
    return f"{scheme}://{auth}{hosts[0]}/{params.get('db', '0')}"


class FeastLayout:
    """What to read from Feast's Redis for the schema, resolved from the repo at start."""

    def __init__(self, project: str, redis_url: str, user: _Plan, item: _Plan) -> None:
        self.project = project
        self.redis_url = redis_url
        self.user = user
        self.item = item

    @classmethod
    def from_repo(cls, repo: Path, schema: FeatureSchema) -> FeastLayout:
        repo = Path(repo)
        cfg_path = repo / "feature_store.yaml"
        cfg = _load_yaml(cfg_path)
        where = f"feast repo {cfg_path}"
        project = cfg.get("project")
        if not isinstance(project, str) or not project:
            raise ConfigError(f"{where}: no project")
        version = cfg.get("entity_key_serialization_version", 3)
        if version != 3:
            raise ConfigError(
                f"{where}: entity_key_serialization_version {version}; the gateway reads 3"
            )
        online = cfg.get("online_store")
        if not isinstance(online, dict) or online.get("type") != "redis":
            raise ConfigError(f"{where}: online_store must be of type redis")
        if online.get("redis_type", "redis") != "redis":
            raise ConfigError(f"{where}: redis_type {online['redis_type']} is not supported")
        redis_url = redis_url_from_connection_string(
            str(online.get("connection_string", "localhost:6379"))
        )
        registry = cfg.get("registry")
        if isinstance(registry, dict):
            if registry.get("registry_type", "file") != "file":
                raise ConfigError(f"{where}: only a file registry is supported")
            if registry.get("enable_online_feature_view_versioning"):
                raise ConfigError(f"{where}: online feature view versioning is not supported")
            registry = registry.get("path")
        if not isinstance(registry, str) or "://" in registry:
            raise ConfigError(f"{where}: registry must be a local file path, got {registry!r}")
        reg_path = Path(registry) if Path(registry).is_absolute() else repo / registry
        try:
            reg = fp.Registry.FromString(reg_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(
                f"{where}: registry {reg_path} not found (run `feast apply`)"
            ) from None
        except Exception as exc:  # a protobuf DecodeError or an OS error
            raise ConfigError(f"{where}: cannot read registry {reg_path}: {exc}") from None
        entities = {e.spec.name: e.spec for e in reg.entities if e.spec.project == project}
        views = {v.spec.name: v.spec for v in reg.feature_views if v.spec.project == project}
        plans = [
            _plan(schema, view, entities, views, project, reg_path)
            for view in (schema.user, schema.item)
        ]
        return cls(project, redis_url, plans[0], plans[1])


def _plan(
    schema: FeatureSchema,
    view: EntityView,
    entities: dict[str, Any],
    views: dict[str, Any],
    project: str,
    reg_path: Path,
) -> _Plan:
    where = f"schema {schema.source}: {view.name}"
    groups: dict[str, list[tuple[int, int | None]]] = {}
    for col, f in enumerate(view.features):
        if f.feast is None:
            raise ConfigError(
                f"{where}.features: {f.name} has no feast = 'view:feature' "
                "(GATEWAY_FEATURE_SOURCE=feast needs one for every feature)"
            )
        groups.setdefault(f.feast, []).append((col, f.feast_index))
    fields: list[_Field] = []
    entity_name: str | None = None
    for ref, cols in groups.items():
        fv_name, feature = ref.split(":")
        spec = views.get(fv_name)
        if spec is None:
            raise ConfigError(
                f"{where}: feast feature view {fv_name!r} is not in registry {reg_path} "
                f"(project {project}; it has: {', '.join(sorted(views)) or 'none'})"
            )
        if len(spec.entities) != 1:
            raise ConfigError(
                f"{where}: feast feature view {fv_name!r} has {len(spec.entities)} entities; "
                "the gateway reads views of one entity"
            )
        if entity_name is None:
            entity_name = spec.entities[0]
        elif spec.entities[0] != entity_name:
            raise ConfigError(
                f"{where}: feast views of entities {entity_name!r} and {spec.entities[0]!r}; "
                "one schema view reads one entity"
            )
        fspec = next((x for x in spec.features if x.name == feature), None)
        if fspec is None:
            raise ConfigError(
                f"{where}: feast feature view {fv_name!r} has no feature {feature!r} "
                f"(it has: {', '.join(x.name for x in spec.features)})"
            )
        vt = fspec.value_type
        is_list = cols[0][1] is not None
        ok = fp.LIST_TYPES if is_list else fp.SCALAR_TYPES
        if vt not in ok:
            kind = "a list (size = N)" if is_list else "a scalar"
            raise ConfigError(
                f"{where}: feast feature {ref} has value type {vt}; the schema declares "
                f"{kind}, which reads {', '.join(ok.values())}"
            )
        fields.append(
            _Field(
                fv_name,
                feature,
                vt,
                tuple(c for c, _ in cols),
                tuple(i or 0 for _, i in cols),
                len(cols) if is_list else 1,
                fixed_layout(vt, len(cols) if is_list else 1),
            )
        )
    assert entity_name is not None
    ent = entities.get(entity_name)
    if ent is None:
        raise ConfigError(f"{where}: feast entity {entity_name!r} is not in registry {reg_path}")
    join_key = ent.join_key or entity_name
    id_type = ent.value_type if ent.value_type in (fp.STRING, fp.INT64, fp.INT32) else None
    if id_type is None:
        raise ConfigError(
            f"{where}: feast entity {entity_name!r} has id type {ent.value_type}; "
            "the gateway reads STRING, INT64 or INT32 ids"
        )
    fv_names = tuple(dict.fromkeys(f.view for f in fields))
    jk = join_key.encode()
    key_head = struct.pack("<III", 1, fp.STRING, len(jk)) + jk + struct.pack("<I", id_type)
    return _Plan(
        view=view,
        entity=entity_name,
        join_key=join_key,
        id_type=id_type,
        fields=tuple(fields),
        views=fv_names,
        hash_fields=tuple(mmh3_field(f.view, f.feature) for f in fields)
        + tuple(f"_ts:{v}".encode() for v in fv_names),
        key_head=key_head,
        project=project.encode(),
    )


# -- decoding ----------------------------------------------------------------------------


def _decode_slow(f: _Field, value: bytes, out: np.ndarray, row: int) -> None:
    """One value the joint gather could not take: parsed by protobuf; a null, empty or
    undecodable value leaves ``out``'s default."""
    vals = fp.value_as_floats(value)
    if vals is not None and len(vals) == f.length:
        out[row, f.columns] = [vals[i] for i in f.indexes]


def _seconds(lens: np.ndarray, starts: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Event times (Unix seconds, -1 where absent) of serialized protobuf Timestamps,
    given their lengths and offsets in ``buf``.

    A Timestamp is ``08 <varint seconds> [10 <varint nanos>]``; for any time from 1978
    to 3058 the seconds are a 5-byte varint, so they sit at bytes 1-5 of every value
    and decode for all entities at once. Anything else counts as absent.
    """
    out = np.full(len(lens), -1, dtype=np.int64)
    idx = np.flatnonzero(lens >= 6)
    if not len(idx):
        return out
    b = buf[starts[idx, None] + np.arange(6)].astype(np.int64)  # (m, 6)
    good = (b[:, 0] == 0x08) & ((b[:, 1:5] & 0x80) != 0).all(axis=1) & (b[:, 5] < 0x80)
    secs = ((b[:, 1:6] & 0x7F) << (7 * np.arange(5))).sum(axis=1)
    out[idx[good]] = secs[good]
    return out


def decode(
    plan: _Plan, flat: list[bytes], n: int, with_ages: bool = True
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(vectors (n, width), missing mask, oldest age per Feast view) for ``n`` entities
    whose replies are ``flat`` (one row of ``len(plan.hash_fields)`` values each, b""
    for a field the hash lacks). An entity no view holds (no ``_ts`` field) is missing.

    The whole reply is joined into one buffer once, and every fixed-layout value of
    every entity is gathered from it by offset in one fancy index (:class:`_Gather`):
    NumPy's per-call overhead, not the bytes, is the cost here (a profile of the earlier
    per-feature join spent 250 us of a 50-item read in it; a gather per feature, 42 us).
    """
    if n == 1 and not with_ages:
        return _decode_one(plan, flat)
    stride = len(plan.hash_fields)
    lens = np.fromiter(map(len, flat), dtype=np.int64, count=n * stride)
    buf = np.frombuffer(b"".join(flat), dtype=np.uint8)
    starts = (np.cumsum(lens) - lens).reshape(n, stride)
    lens = lens.reshape(n, stride)
    default = plan.default
    out = np.empty((n, len(default)), dtype=default.dtype)
    out[:] = default
    g = plan.gather
    if g is not None:
        # Every fixed-layout value of every entity in one gather; a row whose value is
        # absent or of another size gathers bytes of its neighbours (clipped at the end)
        # and is masked out by the size check.
        block = buf.take(starts[:, g.field_of] + g.offset, mode="clip")  # (n, T)
        valid = lens[:, g.fields] == g.sizes  # (n, F)
        bad = np.logical_or.reduceat(block[:, g.header_at] != g.header, g.header_start, axis=1)
        valid &= ~bad
        for j, (_, f, a, b, dtype) in enumerate(g.values):
            values = np.ascontiguousarray(block[:, a:b]).view(dtype)  # (n, length)
            ok = valid[:, j]
            span = f.span
            if ok.all():
                if span is not None:
                    out[:, span] = values
                else:
                    out[:, f.columns] = values[:, f.indexes]
            elif span is not None:
                out[ok, span] = values[ok]
            else:
                out[np.ix_(np.flatnonzero(ok), np.asarray(f.columns))] = values[ok][:, f.indexes]
        odd = (lens[:, g.fields] > 0) & ~valid
        if odd.any():  # null markers, other types, lists of another length
            for j, (k, f, *_) in enumerate(g.values):
                for r in np.flatnonzero(odd[:, j]):
                    _decode_slow(f, flat[r * stride + k], out, r)
    for k, f in enumerate(plan.fields):
        if f.fixed is None:
            for r in np.flatnonzero(lens[:, k]):
                _decode_slow(f, flat[r * stride + k], out, r)
    nf = len(plan.fields)
    present = (lens[:, nf:] > 0).any(axis=1)
    ages: dict[str, float] = {}
    if with_ages:
        now = time.time()
        for k, view in enumerate(plan.views):
            secs = _seconds(lens[:, nf + k], starts[:, nf + k], buf)
            if (secs >= 0).any():
                ages[view] = max(0.0, now - float(secs[secs >= 0].min()))
    return out, ~present, ages


def _decode_one(plan: _Plan, flat: list[bytes]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """:func:`decode` for one entity (the user), value by value: the array path's fixed
    cost (25 us, a profile) is more than decoding one entity's few values directly."""
    out = plan.default.copy()
    for f, value in zip(plan.fields, flat, strict=False):
        if not value:
            continue
        if f.fixed is not None and len(value) == f.fixed[2] and value.startswith(f.fixed[0]):
            vals = np.frombuffer(value, dtype=f.fixed[1], offset=len(f.fixed[0]))
        else:
            floats = fp.value_as_floats(value)
            if floats is None or len(floats) != f.length:
                continue
            vals = np.asarray(floats, dtype=out.dtype)
        if f.span is not None:
            out[f.span] = vals
        else:
            out[list(f.columns)] = vals[list(f.indexes)]
    present = any(flat[len(plan.fields) :])
    return out[None, :], np.array([not present]), {}


class FeastFeatureStore:
    """Reads the layout in the module docstring with one pipelined round trip per request."""

    name = "feast"

    def __init__(
        self,
        layout: FeastLayout,
        redis_url: str | None = None,
        connect_timeout_s: float = 0.05,
        socket_timeout_s: float = 0.1,
        max_connections: int = 64,
        tls: RedisTLS | None = None,
    ) -> None:
        self.layout = layout
        url = redis_url or layout.redis_url
        # The URL may come from feature_store.yaml: the TLS settings are checked against it.
        (tls or NO_TLS).check(url)
        # The raw RESP pool (resp.py) does AUTH, SELECT and TLS from the URL and settings.
        self._fast = RespPool(
            url, connect_timeout_s, socket_timeout_s, max_connections, tls or NO_TLS
        )
        self._requests = 0
        u, i = layout.user, layout.item
        self._user_cmd = _hmget_parts(u.hash_fields)
        self._item_cmd = _hmget_parts(i.hash_fields)
        self._ustride, self._istride = len(u.hash_fields), len(i.hash_fields)
        self._item_cmds: dict[str, bytes] = {}
        # Set by the gateway (runtime.py): observes the oldest age per view and request.
        self.observe_age: Callable[[str, float], None] | None = None

    @classmethod
    def from_repo(
        cls, repo: Path, schema: FeatureSchema, redis_url: str | None = None, **kwargs: Any
    ) -> FeastFeatureStore:
        return cls(FeastLayout.from_repo(repo, schema), redis_url, **kwargs)

    async def read(self, user_id: str, item_ids: list[str]) -> list[bytes]:
        """The raw flat reply: the user's fields, then each item's (one round trip), with
        b"" for a field a hash lacks.

        One HMGET per hash, pipelined in one write on a raw RESP connection (resp.py)
        and parsed by hiredis. Measured per 50-item read (loadtests/feast_compare.py's
        set-up, a profile): the earlier single EVALSHA of a Lua loop over the same
        HMGETs cost 188 us of Redis time alone (``INFO commandstats``) and 400 us in
        all through redis-py. An error or cancellation mid-reply closes the connection
        (CVE-2023-28858/28859), so a half-read reply never reaches the next request.
        """
        from gateway.features.redis_store import _mapped

        uhead, utail = self._user_cmd
        parts = [uhead, _bulk(self.layout.user.key(user_id)), utail]
        cache = self._item_cmds
        for i in item_ids:
            cmd = cache.get(i)
            if cmd is None:
                cmd = self._item_command(i)
            parts.append(cmd)
        widths = [self._ustride] + [self._istride] * len(item_ids)
        with _mapped():
            replies = await self._fast.pipeline(b"".join(parts), widths)
        return [v if v is not None else b"" for reply in replies for v in reply]

    def _item_command(self, item_id: str) -> bytes:
        """An item's packed HMGET, remembered: a catalogue's ids recur on every request,
        and packing its key cost 0.3 us per item (a profile: 15 us of a 50-item read).
        The memory is bounded (cleared when full; an id is a few hundred bytes there)."""
        ihead, itail = self._item_cmd
        cmd = ihead + _bulk(self.layout.item.key(item_id)) + itail
        if len(self._item_cmds) >= ITEM_COMMANDS_MAX:
            self._item_cmds.clear()
        self._item_cmds[item_id] = cmd
        return cmd

    async def fetch(self, user_id: str, item_ids: list[str]) -> FeatureBatch:
        flat = await self.read(user_id, item_ids)
        lay = self.layout
        self._requests += 1
        ages = self.observe_age is not None and self._requests % AGE_SAMPLE == 1
        user, user_missing, uages = decode(lay.user, flat[: self._ustride], 1, ages)
        items, items_missing, iages = decode(lay.item, flat[self._ustride :], len(item_ids), ages)
        if ages:
            for view, age in itertools.chain(uages.items(), iages.items()):
                self.observe_age(view, age)  # type: ignore[misc]
        return FeatureBatch(user[0], items, bool(user_missing[0]), int(items_missing.sum()))

    async def check(self) -> None:
        """Redis answers the request path's pipelined HMGETs (reachable, and our ACL user
        may read Feast's keys); Feast has no version key: the registry was checked at
        start."""
        await self.read("\x00health-check", ["\x00health-check"])

    async def close(self) -> None:
        from gateway.features.redis_store import _mapped

        with _mapped():
            await self._fast.close()


def age_observer(registry: Any) -> Callable[[str, float], None]:
    """``gateway_feature_age_seconds{view}`` on ``registry``, and a cheap observe(view, age)."""
    from prometheus_client import Histogram

    hist = Histogram(
        "gateway_feature_age_seconds",
        "Age of the oldest feature value a request was served from, per Feast feature "
        "view: now minus the view's event timestamp (_ts) in the online store. One "
        "observation per view per request.",
        ["view"],
        buckets=AGE_BUCKETS,
        registry=registry,
    )
    cache: dict[str, Callable[[float], None]] = {}

    def observe(view: str, age: float) -> None:
        obs = cache.get(view)
        if obs is None:
            obs = cache[view] = hist.labels(view).observe
        obs(age)

    return observe
