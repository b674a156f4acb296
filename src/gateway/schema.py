"""The one feature schema, read by training, the Redis loader and the gateway.

Nothing else in the project declares a feature name, a dtype or an order: the
training pipeline, the loader and the request path all go through
:data:`SCHEMA`. That is the guard against train-serve skew.

Model input, one float32 row per (user, item) pair::

    [ user view (9) | item view (10) | context view (5) ]  -> 24 floats

User and item views are stored in Redis as packed little-endian float32
vectors (see ``features/codec.py``); the context view is encoded from the
request at serving time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = "1"

# The devices the context view one-hot encodes, in model-input order.
DEVICES: tuple[str, ...] = ("mobile", "desktop", "tablet")

# Prior CTR for an item the store does not know. Unknown items are mostly new, long-tail
# ones: the value sits between the generator's median item (0.02) and its
# impression-weighted mean (0.09); see synth.py.
GLOBAL_CTR_PRIOR = 0.05


# Hour of day on the unit circle, so 23:00 sits next to 00:00. One table for training
# and serving, so both produce the same float32 bits.
_HOUR_TABLE = np.stack(
    [np.sin(2.0 * np.pi * np.arange(24) / 24.0), np.cos(2.0 * np.pi * np.arange(24) / 24.0)],
    axis=1,
).astype(np.float32)


@dataclass(frozen=True)
class Feature:
    """One scalar feature: its name and the value used for an unknown entity."""

    name: str
    default: float = 0.0


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
class FeatureSchema:
    """The feature views and the order in which they form the model input."""

    version: str
    user: EntityView
    item: EntityView
    context: tuple[ContextField, ...]
    input_name: str = "features"
    output_name: str = "score"

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


EMBED_DIM = 8

SCHEMA = FeatureSchema(
    version=SCHEMA_VERSION,
    user=EntityView(
        name="user",
        features=(Feature("activity_log", 0.0),)
        + tuple(Feature(f"emb_{k}", 0.0) for k in range(EMBED_DIM)),
    ),
    item=EntityView(
        name="item",
        features=(
            Feature("popularity_log", 0.0),
            Feature("ctr_prior", GLOBAL_CTR_PRIOR),
        )
        + tuple(Feature(f"emb_{k}", 0.0) for k in range(EMBED_DIM)),
    ),
    context=(
        ContextField("hour", "hour", ("hour_sin", "hour_cos")),
        ContextField(
            "device", "category", tuple(f"device_{d}" for d in DEVICES), categories=DEVICES
        ),
    ),
)
