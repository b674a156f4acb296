"""``gateway features import``: user and item features from Parquet files into Redis.

Each file has an id column (``user_id``, ``item_id``) and one numeric column per feature
of the schema's view, named as the schema names it (a feature declared ``{name = "emb",
size = 8}`` is the columns ``emb_0`` .. ``emb_7``); other columns are ignored.

Two streaming passes over each file, in record batches (pyarrow), so memory stays flat
whatever the file's size (the ids are kept, as one Arrow string array, to find
duplicates):

1. **check**: every column present and numeric, no null, NaN or infinite value (after
   the cast to float32, so a float64 beyond float32's range is caught), no null, empty,
   over-long or duplicate id; the first problem stops the import with one line naming
   the file, the column and the row (counted from 0). Nothing has been written then.
2. **write**: the vectors into a new generation, then the pointer switch (loader.py's
   :class:`GenerationWriter`): readers see the old set until the whole new one is
   written; a Redis failure half-way never switches the pointer.

The generation is a hash of the schema and of the checked data, so importing the same
data again rewrites the same keys with the same values.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis.exceptions import RedisError
from tqdm import tqdm

from gateway.errors import ConfigError
from gateway.features import codec
from gateway.features.loader import GenerationWriter, connect, delete_generation, generation
from gateway.redisconn import NO_TLS, RedisTLS, describe, redact
from gateway.schema import EntityView, FeatureSchema

# The API's limit on an id (api/schemas.py): a longer one could never be requested.
MAX_ID_CHARS = 128
# Keys per MSET: 5,000 vectors of a few dozen floats are a few hundred kB per command,
# large enough that per-command overhead vanishes, small enough not to stall Redis.
WRITE_CHUNK = 5_000


class ImportFileError(ConfigError):
    """A Parquet file that cannot be imported; the message names file, column and row."""


@dataclass
class _Checked:
    """What the check pass learned about one file."""

    path: Path
    entity: str
    rows: int = 0
    # Two digests, so the generation does not depend on where batches are cut.
    ids_digest: Any = field(default_factory=hashlib.sha256)
    values_digest: Any = field(default_factory=hashlib.sha256)

    def digest(self) -> bytes:
        return self.ids_digest.digest() + self.values_digest.digest()


@dataclass
class ImportSummary:
    users: int
    items: int
    seconds: float
    bytes: int
    generation: str
    schema_version: str
    deleted: list[str]

    def line(self) -> str:
        n = self.users + self.items
        rate = n / self.seconds if self.seconds > 0 else 0.0
        gone = f"; deleted generations {', '.join(self.deleted)}" if self.deleted else ""
        return (
            f"imported {self.users} users and {self.items} items ({n} entities, "
            f"{self.bytes / 1e6:.2f} MB of values) in {self.seconds:.2f} s "
            f"({rate:,.0f} entities/s); generation {self.generation}, "
            f"schema {self.schema_version}{gone}"
        )


def _pyarrow() -> tuple[Any, Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "gateway features import needs pyarrow: pip install 'inference-gateway[import]'"
        ) from None
    return pa, pc, pq


def _open(path: Path) -> Any:
    _, _, pq = _pyarrow()
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise ImportFileError(f"{path}: no such file") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a bad file
        raise ImportFileError(f"{path}: not a readable Parquet file: {exc}") from None


def _columns(pf: Any, path: Path, id_column: str, view: EntityView) -> list[str]:
    """Check the file's columns and types against the view; return the columns to read."""
    pa, _, _ = _pyarrow()
    arrow = pf.schema_arrow
    names = set(arrow.names)
    if id_column not in names:
        raise ImportFileError(f"{path}: column {id_column}: missing (the id column)")
    id_type = arrow.field(id_column).type
    if not (
        pa.types.is_string(id_type)
        or pa.types.is_large_string(id_type)
        or pa.types.is_integer(id_type)
    ):
        raise ImportFileError(
            f"{path}: column {id_column}: has type {id_type}, needs a string or an integer"
        )
    for name in view.names:
        if name not in names:
            raise ImportFileError(
                f"{path}: column {name}: missing (the schema's {view.name} view has "
                f"{view.width} features: {', '.join(view.names[:6])}"
                f"{', ...' if view.width > 6 else ''})"
            )
        t = arrow.field(name).type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise ImportFileError(f"{path}: column {name}: has type {t}, needs a number")
    return [id_column, *view.names]


def _batches(
    pf: Any, path: Path, columns: list[str], batch: int
) -> Iterator[tuple[int, Any, np.ndarray]]:
    """(first row, ids as an Arrow string array, float32 matrix) per record batch.

    The matrix is checked here (nulls, NaN, inf): the write pass meets the same data.
    """
    pa, pc, _ = _pyarrow()
    start = 0
    try:
        for rb in pf.iter_batches(batch_size=batch, columns=columns):
            n = rb.num_rows
            ids = rb.column(0)
            if ids.null_count:
                row = start + pc.index(pc.is_null(ids), True).as_py()
                raise ImportFileError(f"{path}: column {columns[0]}, row {row}: null id")
            if not pa.types.is_string(ids.type):
                ids = pc.cast(ids, pa.string())
            lengths = pc.utf8_length(ids)
            if pc.min(lengths).as_py() == 0:
                row = start + pc.index(lengths, 0).as_py()
                raise ImportFileError(f"{path}: column {columns[0]}, row {row}: empty id")
            if pc.max(lengths).as_py() > MAX_ID_CHARS:
                row = start + pc.index(pc.greater(lengths, MAX_ID_CHARS), True).as_py()
                raise ImportFileError(
                    f"{path}: column {columns[0]}, row {row}: id longer than "
                    f"{MAX_ID_CHARS} characters (the API's limit)"
                )
            matrix = np.empty((n, len(columns) - 1), dtype=np.float32)
            for k, name in enumerate(columns[1:]):
                col = rb.column(k + 1)
                if col.null_count:
                    row = start + pc.index(pc.is_null(col), True).as_py()
                    raise ImportFileError(f"{path}: column {name}, row {row}: null value")
                with np.errstate(over="ignore"):
                    matrix[:, k] = col.to_numpy(zero_copy_only=False)
            bad = ~np.isfinite(matrix)
            if bad.any():
                r, k = np.argwhere(bad)[0]
                value = rb.column(int(k) + 1)[int(r)].as_py()
                what = "NaN" if value != value else f"{value!r} (not finite as float32)"
                raise ImportFileError(
                    f"{path}: column {columns[int(k) + 1]}, row {start + int(r)}: {what}"
                )
            yield start, ids, matrix
            start += n
    except ImportFileError:
        raise
    except Exception as exc:  # a corrupt page, a truncated file: pyarrow's own errors
        raise ImportFileError(f"{path}: row {start} and on: cannot read: {exc}") from None


def _check(
    path: Path, entity: str, view: EntityView, batch: int, bar: Any
) -> tuple[_Checked, list[str]]:
    pa, pc, _ = _pyarrow()
    id_column = f"{entity}_id"
    pf = _open(path)
    columns = _columns(pf, path, id_column, view)
    checked = _Checked(path, entity)
    chunks = []
    for _, ids, matrix in _batches(pf, path, columns, batch):
        chunks.append(ids)
        checked.ids_digest.update("".join(i + "\x00" for i in ids.to_pylist()).encode())
        checked.values_digest.update(matrix.tobytes())
        checked.rows += len(matrix)
        bar.update(len(matrix))
    if checked.rows == 0:
        raise ImportFileError(f"{path}: no rows")
    all_ids = pa.chunked_array(chunks, type=pa.string())
    counts = pc.value_counts(all_ids)
    dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
    if len(dup):
        value = dup[0].as_py()
        rows = pc.indices_nonzero(pc.equal(all_ids, value)).to_pylist()
        raise ImportFileError(
            f"{path}: column {id_column}, row {rows[1]}: duplicate id {value!r} "
            f"(also at row {rows[0]})"
        )
    return checked, columns


def import_parquet(
    users: Path,
    items: Path,
    redis_url: str,
    schema: FeatureSchema,
    batch: int = 65_536,
    progress: bool = True,
    cluster: bool = False,
    keep: int = 1,
    tls: RedisTLS = NO_TLS,
) -> ImportSummary:
    """Check both files, then write them as a new generation and switch to it."""
    t0 = time.perf_counter()
    _pyarrow()
    files = (("user", users, schema.user), ("item", items, schema.item))
    checked: list[tuple[_Checked, list[str], EntityView]] = []
    total = sum(_open(p).metadata.num_rows for _, p, _ in files)
    with tqdm(total=total, unit="row", desc="check", disable=not progress, file=sys.stderr) as bar:
        for entity, path, view in files:
            c, columns = _check(path, entity, view, batch, bar)
            checked.append((c, columns, view))
    gen = generation(schema, *(c.digest() for c, _, _ in checked))

    client = connect(redis_url, cluster, tls)
    writer = GenerationWriter(client, schema, gen, cluster=cluster, keep=keep)
    switched = False
    try:
        with writer.locked():
            with tqdm(
                total=total, unit="row", desc="write", disable=not progress, file=sys.stderr
            ) as bar:
                for c, columns, _view in checked:
                    for _, ids, matrix in _batches(_open(c.path), c.path, columns, batch):
                        names = ids.to_pylist()
                        for s in range(0, len(names), WRITE_CHUNK):
                            writer.write(
                                c.entity, names[s : s + WRITE_CHUNK], matrix[s : s + WRITE_CHUNK]
                            )
                        bar.update(len(names))
            writer.switch()
            switched = True
    except RedisError as exc:
        if not switched:
            _forget(client, gen)
        raise ConfigError(
            f"writing to Redis at {redact(redis_url)} failed ({describe(exc, redis_url)}); "
            + (
                "the pointer was not switched: readers keep the previous set"
                if not switched
                else "after the switch, while deleting old generations"
            )
        ) from exc
    finally:
        client.close()
    summary = ImportSummary(
        checked[0][0].rows,
        checked[1][0].rows,
        time.perf_counter() - t0,
        writer.bytes_written,
        gen,
        schema.store_version,
        writer.deleted,
    )
    print(summary.line(), flush=True)
    return summary


def _forget(client: Any, gen: str) -> None:
    """Best effort: delete a generation that was never switched to (else the next run does)."""
    try:
        current = client.get(codec.POINTER_KEY)
        if current is None or codec.parse_pointer(current)[0] != gen:
            delete_generation(client, gen)
    except (RedisError, ValueError):
        pass
