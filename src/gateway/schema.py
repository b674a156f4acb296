"""The one feature schema, read by training, the Redis loader and importer, the Feast
reader and the gateway.

A schema is a TOML file (:func:`load_schema`); the built-in one,
``gateway/schemas/ctr.toml``, describes the synthetic CTR world and is :data:`SCHEMA`,
the default everywhere. ``GATEWAY_SCHEMA_FILE`` (the gateway) and ``--schema FILE``
(``gateway model build``, ``features load``, ``features import``) select another.
Nothing else in the project declares a feature name, a dtype or an order: that is the
guard against train-serve skew.

Model input, one float32 row per (user, item) pair::

    [ user view | item view | context view ]   (24 floats for the built-in schema)

User and item views are stored in Redis as packed little-endian float32 vectors (see
``features/codec.py``) or read from Feast (``features/feast_store.py``); the context
view is encoded from the request at serving time. The file format is documented in
docs/own-features.md; every problem in a file is reported as one line naming the
file, the key and what is wrong (:class:`SchemaError`).
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import ConfigError

# The devices the built-in schema's context view one-hot encodes, in model-input order,
# and the only ones the HTTP API accepts (api/schemas.py).
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")

# The built-in schema's prior CTR for an unknown item (its ctr_prior default, which
# ctr.toml explains); a unit test checks the two agree.
GLOBAL_CTR_PRIOR = 0.05

# The context fields the HTTP API accepts (api/schemas.py validates them), by kind. A
# schema may use any of them, not others, until the API reads its fields from the schema.
API_CONTEXT = {"hour": "hour", "device": "category"}

# The only model input dtype the gateway sends (Triton's name, ONNX's element type 1).
MODEL_DTYPE = "FP32"


# Hour of day on the unit circle, so 23:00 sits next to 00:00. One table for training
# and serving, so both produce the same float32 bits.
_HOUR_TABLE = np.stack(
    [np.sin(2.0 * np.pi * np.arange(24) / 24.0), np.cos(2.0 * np.pi * np.arange(24) / 24.0)],
    axis=1,
).astype(np.float32)


class SchemaError(ConfigError):
    """A schema file that cannot be read or is wrong; the message is one line."""


@dataclass(frozen=True)
class Feature:
    """One scalar feature: its name, the value used for an unknown entity, and where a
    Feast source reads it (``feast``: ``"view:feature"``; ``feast_index``: the position
    in a list-valued Feast feature, for a feature declared with ``size``)."""

    name: str
    default: float = 0.0
    feast: str | None = None
    feast_index: int | None = None


@dataclass(frozen=True)
class EntityView:
    """A view keyed by an entity id (user or item), stored as a packed vector."""

    name: str
    features: tuple[Feature, ...]
    dtype: str = "<f4"

    @property
    def width(self) -> int:
        return len(self.features)

    @property
    def nbytes(self) -> int:
        return self.width * np.dtype(self.dtype).itemsize

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.features)

    def default_vector(self) -> np.ndarray:
        """The vector served for an entity that is not in the store."""
        return np.array([f.default for f in self.features], dtype=self.dtype)


@dataclass(frozen=True)
class ContextField:
    """A request-time feature: how it is given in the request and which columns it fills."""

    name: str
    kind: str  # "hour" (int 0..23) or "category"
    columns: tuple[str, ...]
    categories: tuple[str, ...] = ()


@dataclass(frozen=True)
class FallbackRules:
    """The fallback scorer's rules, linear in log-odds (see fallback.py).

    ``base``: a model-input column holding a probability the score starts from (its
    logit), or None to start from ``prior``; ``weights``: (column, weight) pairs added
    to the log-odds. An ``hour_peak`` rule of the file is two such pairs on the hour
    columns, ``w cos(2 pi (h - peak) / 24) = w cos(peak') cos(h') + w sin(peak') sin(h')``.
    """

    base: str | None = None
    prior: float = 0.5
    weights: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class FeatureSchema:
    """The feature views and the order in which they form the model input."""

    version: str
    user: EntityView
    item: EntityView
    context: tuple[ContextField, ...]
    input_name: str = "features"
    output_name: str = "score"
    fallback: FallbackRules = field(default_factory=FallbackRules)
    source: str = "<built in>"  # the file it was read from, for messages

    @property
    def context_width(self) -> int:
        return sum(len(c.columns) for c in self.context)

    @property
    def input_width(self) -> int:
        return self.user.width + self.item.width + self.context_width

    @property
    def input_columns(self) -> tuple[str, ...]:
        ctx = tuple(col for c in self.context for col in c.columns)
        return (
            tuple(f"user.{n}" for n in self.user.names)
            + tuple(f"item.{n}" for n in self.item.names)
            + tuple(f"context.{n}" for n in ctx)
        )

    @property
    def context_keys(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.context)

    @property
    def fingerprint(self) -> str:
        """A short hash of the layout; changes whenever a column, dtype or default does."""
        desc = repr(
            (
                self.version,
                [(f.name, f.default) for f in self.user.features],
                self.user.dtype,
                [(f.name, f.default) for f in self.item.features],
                self.item.dtype,
                [(c.name, c.kind, c.columns, c.categories) for c in self.context],
            )
        )
        return hashlib.sha256(desc.encode()).hexdigest()[:12]

    @property
    def store_version(self) -> str:
        """The value of the feature store's version key; the gateway refuses any other."""
        return f"{self.version}:{self.fingerprint}"

    def encode_context(self, context: Mapping[str, object] | None) -> np.ndarray:
        """Encode request-time features; an absent or unknown value encodes as zeros."""
        out = np.zeros(self.context_width, dtype=np.float32)
        if not context:
            return out
        pos = 0
        for c in self.context:
            value = context.get(c.name)
            if c.kind == "hour":
                if value is not None:
                    out[pos : pos + 2] = _HOUR_TABLE[int(value)]  # type: ignore[call-overload]
            elif c.kind == "category":
                if value in c.categories:
                    out[pos + c.categories.index(value)] = 1.0
            pos += len(c.columns)
        return out

    def encode_context_columns(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Vectorised :meth:`encode_context` for training.

        ``columns`` maps each context name to an array: hours as ints, categories as
        indexes into the field's ``categories``.
        """
        n = len(next(iter(columns.values())))
        out = np.zeros((n, self.context_width), dtype=np.float32)
        pos = 0
        for c in self.context:
            values = columns[c.name]
            if c.kind == "hour":
                out[:, pos : pos + 2] = _HOUR_TABLE[values]
            elif c.kind == "category":
                out[np.arange(n), pos + values] = 1.0
            pos += len(c.columns)
        return out

    def assemble(
        self, user_vec: np.ndarray, item_matrix: np.ndarray, context_vec: np.ndarray
    ) -> np.ndarray:
        """Build the model input for one user, N items and one context: shape (N, width).

        Training calls :meth:`assemble_rows` (one user and context per row); both write
        the same columns in the same order, which a test checks byte for byte.
        """
        n = item_matrix.shape[0]
        out = np.empty((n, self.input_width), dtype=np.float32)
        u, i = self.user.width, self.item.width
        out[:, :u] = user_vec
        out[:, u : u + i] = item_matrix
        out[:, u + i :] = context_vec
        return out

    def assemble_rows(
        self, user_rows: np.ndarray, item_rows: np.ndarray, context_rows: np.ndarray
    ) -> np.ndarray:
        """Build the model input row by row (training): all three arrays have N rows."""
        return np.ascontiguousarray(
            np.concatenate([user_rows, item_rows, context_rows], axis=1), dtype=np.float32
        )


# The built-in schema's user and item taste vectors (``emb`` in ctr.toml); synth.py draws
# them.
EMBED_DIM = 8

BUILTIN_SCHEMA = "ctr.toml"


def builtin_schema_path() -> Path:
    """The built-in CTR schema file shipped inside the package."""
    return Path(str(resources.files("gateway.schemas").joinpath(BUILTIN_SCHEMA)))


# -- reading a schema file ---------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_VERSION = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
# A view's features and a schema's inputs: a few hundred is already a large tabular model;
# the cap only stops a runaway `size` from allocating gigabytes.
_MAX_COLUMNS = 4096


class _Reader:
    """Walks the parsed TOML and raises one SchemaError line per problem: file, key, what."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, what: str) -> SchemaError:
        return SchemaError(f"schema {self.path}: {key}: {what}")

    def table(self, doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        value = doc.get(key)
        if not isinstance(value, dict):
            raise self.fail(f"{where}{key}", "missing table" if value is None else "not a table")
        return value

    def string(
        self, doc: Mapping[str, Any], key: str, where: str, default: str | None = None
    ) -> str:
        value = doc.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.fail(
                f"{where}{key}", "missing" if value is None else "must be a non-empty string"
            )
        return value

    def number(self, doc: Mapping[str, Any], key: str, where: str, default: float) -> float:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{where}{key}", f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise self.fail(f"{where}{key}", f"must be finite, got {value!r}")
        return float(value)

    def unknown(self, doc: Mapping[str, Any], known: set[str], where: str) -> None:
        extra = sorted(set(doc) - known)
        if extra:
            raise self.fail(
                f"{where}{extra[0]}", f"unknown key (known: {', '.join(sorted(known))})"
            )

    def view(self, doc: Mapping[str, Any], name: str) -> EntityView:
        tbl = self.table(doc, name, "")
        self.unknown(tbl, {"features", "dtype"}, f"{name}.")
        dtype = tbl.get("dtype", "float32")
        if dtype not in ("float32", "<f4"):
            raise self.fail(f"{name}.dtype", f"only float32 is stored, got {dtype!r}")
        items = tbl.get("features")
        if not isinstance(items, list) or not items:
            raise self.fail(f"{name}.features", "must be a non-empty array of tables")
        features: list[Feature] = []
        for k, item in enumerate(items):
            where = f"{name}.features[{k}]."
            if not isinstance(item, dict):
                raise self.fail(f"{name}.features[{k}]", "must be a table {name = ..., ...}")
            self.unknown(item, {"name", "default", "size", "feast"}, where)
            fname = self.string(item, "name", where)
            if not _NAME.match(fname):
                raise self.fail(f"{where}name", f"{fname!r} is not an identifier")
            default = self.number(item, "default", where, 0.0)
            feast = item.get("feast")
            if feast is not None and (not isinstance(feast, str) or feast.count(":") != 1):
                raise self.fail(f"{where}feast", f"must be 'feature_view:feature', got {feast!r}")
            size = item.get("size")
            if size is None:
                features.append(Feature(fname, default, feast))
                continue
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= _MAX_COLUMNS:
                raise self.fail(
                    f"{where}size", f"must be an integer 1-{_MAX_COLUMNS}, got {size!r}"
                )
            features += [
                Feature(f"{fname}_{j}", default, feast, j if feast else None) for j in range(size)
            ]
        names = [f.name for f in features]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise self.fail(f"{name}.features", f"feature {dup!r} declared twice")
        if len(features) > _MAX_COLUMNS:
            raise self.fail(f"{name}.features", f"more than {_MAX_COLUMNS} features")
        return EntityView(name, tuple(features))

    def context(self, doc: Mapping[str, Any]) -> tuple[ContextField, ...]:
        items = doc.get("context", [])
        if not isinstance(items, list):
            raise self.fail("context", "must be an array of tables ([[context]])")
        fields: list[ContextField] = []
        for k, item in enumerate(items):
            where = f"context[{k}]."
            if not isinstance(item, dict):
                raise self.fail(f"context[{k}]", "must be a table")
            self.unknown(item, {"name", "kind", "columns", "categories"}, where)
            name = self.string(item, "name", where)
            kind = self.string(item, "kind", where)
            if name not in API_CONTEXT:
                raise self.fail(
                    f"{where}name",
                    f"{name!r}: the HTTP API takes only the context fields "
                    f"{', '.join(API_CONTEXT)} (see docs/own-features.md)",
                )
            if kind != API_CONTEXT[name]:
                raise self.fail(f"{where}kind", f"{name!r} must be of kind {API_CONTEXT[name]!r}")
            columns = item.get("columns")
            if not isinstance(columns, list) or not all(
                isinstance(c, str) and _NAME.match(c) for c in columns
            ):
                raise self.fail(f"{where}columns", "must be an array of identifiers")
            categories: tuple[str, ...] = ()
            if kind == "hour" and len(columns) != 2:
                raise self.fail(f"{where}columns", "an hour takes two columns (sin, cos)")
            if kind == "category":
                cats = item.get("categories")
                if (
                    not isinstance(cats, list)
                    or not cats
                    or not all(isinstance(c, str) and c for c in cats)
                ):
                    raise self.fail(f"{where}categories", "must be a non-empty array of strings")
                unknown = [c for c in cats if c not in DEVICES]
                if unknown:
                    raise self.fail(
                        f"{where}categories",
                        f"{unknown[0]!r} is not a device the HTTP API accepts "
                        f"({', '.join(DEVICES)})",
                    )
                if len(set(cats)) != len(cats):
                    raise self.fail(f"{where}categories", "a category is listed twice")
                if len(columns) != len(cats):
                    raise self.fail(f"{where}columns", "needs one column per category")
                categories = tuple(cats)
            fields.append(ContextField(name, kind, tuple(columns), categories))
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise self.fail("context", "a field is declared twice")
        return tuple(fields)

    def fallback(self, doc: Mapping[str, Any], schema: FeatureSchema) -> FallbackRules:
        tbl = doc.get("fallback")
        if tbl is None:
            return FallbackRules()
        if not isinstance(tbl, dict):
            raise self.fail("fallback", "not a table")
        self.unknown(tbl, {"base", "prior", "rules"}, "fallback.")
        cols = schema.input_columns
        base = tbl.get("base")
        if base is not None and base not in cols:
            raise self.fail("fallback.base", f"{base!r} is not a model input column")
        prior = self.number(tbl, "prior", "fallback.", 0.5)
        if not 0.0 < prior < 1.0:
            raise self.fail("fallback.prior", f"must be a probability in (0, 1), got {prior}")
        rules = tbl.get("rules", [])
        if not isinstance(rules, list):
            raise self.fail("fallback.rules", "must be an array of tables")
        weights: list[tuple[str, float]] = []
        hour = next((c for c in schema.context if c.kind == "hour"), None)
        for k, rule in enumerate(rules):
            where = f"fallback.rules[{k}]."
            if not isinstance(rule, dict):
                raise self.fail(f"fallback.rules[{k}]", "must be a table")
            self.unknown(rule, {"column", "weight", "hour_peak"}, where)
            w = self.number(rule, "weight", where, math.nan) if "weight" in rule else None
            if w is None:
                raise self.fail(f"{where}weight", "missing")
            if "hour_peak" in rule:
                peak = self.number(rule, "hour_peak", where, 0.0)
                if hour is None:
                    raise self.fail(f"{where}hour_peak", "the schema has no hour context field")
                a = 2.0 * math.pi * peak / 24.0
                sin_col, cos_col = (f"context.{c}" for c in hour.columns)
                weights += [(cos_col, w * math.cos(a)), (sin_col, w * math.sin(a))]
            else:
                col = self.string(rule, "column", where)
                if col not in cols:
                    raise self.fail(f"{where}column", f"{col!r} is not a model input column")
                weights.append((col, w))
        return FallbackRules(base=base, prior=prior, weights=tuple(weights))


def parse_schema(text: str, source: str = "<string>") -> FeatureSchema:
    """Build a schema from TOML text; raise SchemaError (one line) on any problem."""
    r = _Reader(source)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SchemaError(f"schema {source}: not valid TOML: {exc}") from None
    r.unknown(doc, {"version", "model", "user", "item", "context", "fallback"}, "")
    version = doc.get("version")
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not _VERSION.match(version):
        raise r.fail("version", "must be a short string of letters, digits, '.', '_' or '-'")
    model = r.table(doc, "model", "")
    r.unknown(model, {"input", "output", "dtype"}, "model.")
    if model.get("dtype", MODEL_DTYPE) != MODEL_DTYPE:
        raise r.fail("model.dtype", f"the gateway sends {MODEL_DTYPE} only")
    schema = FeatureSchema(
        version=version,
        user=r.view(doc, "user"),
        item=r.view(doc, "item"),
        context=r.context(doc),
        input_name=r.string(model, "input", "model."),
        output_name=r.string(model, "output", "model."),
        source=source,
    )
    if schema.input_width > _MAX_COLUMNS:
        raise r.fail("user/item/context", f"more than {_MAX_COLUMNS} model inputs")
    cols = schema.input_columns
    dup = next((c for c in cols if cols.count(c) > 1), None)
    if dup is not None:
        raise r.fail("context", f"column {dup!r} declared twice")
    return FeatureSchema(**{**schema.__dict__, "fallback": r.fallback(doc, schema)})


def load_schema(path: str | Path | None = None) -> FeatureSchema:
    """Read a schema file (the built-in CTR schema when ``path`` is None)."""
    p = Path(path) if path is not None else builtin_schema_path()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SchemaError(f"schema {p}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SchemaError(f"schema {p}: cannot read: {exc}") from None
    return parse_schema(text, str(p))


SCHEMA = load_schema()
"""The built-in CTR schema: the default of every command and of the gateway."""
