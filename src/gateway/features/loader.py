"""Writing feature sets into Redis: ``gateway features load`` (generated demo data) and the
generation machinery ``gateway features import`` (importer.py) shares with it.

Every write goes to a new generation and switches the pointer key last (the layout is
in codec.py), so a gateway never reads half a set:

1. take the lock ``feat:lock`` (SET NX with a TTL renewed while writing): two writers at
   once would delete each other's generations;
2. record the generation in ``feat:generations`` (before any vector, so the keys of a
   run that dies half-way are found and deleted by the next one);
3. write the vectors, pipelined in chunks (one MSET per chunk, ``mset_nonatomic`` on a
   cluster, which splits it by slot), idempotently: plain SETs of deterministic values;
4. record when the set was written (``feat:{gen}:meta``), then switch ``feat:current``
   to ``"{gen} {store_version}"`` with one SET;
5. delete every generation but the current one and the ``keep`` (default 1) most
   recently current before it: a gateway reads the pointer every health interval (2 s),
   so one kept generation covers gateways that have not seen the switch yet, unless
   writes come faster than that. ``keep=0`` deletes the previous set at once.

A failure before step 4 leaves the pointer (and every gateway) on the old set.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from redis.exceptions import RedisError
from tqdm import tqdm

from gateway.errors import ConfigError
from gateway.features import codec
from gateway.redisconn import NO_TLS, RedisTLS, describe, redact, sync_client
from gateway.schema import SCHEMA, FeatureSchema
from gateway.synth import World, item_id, make_world, user_id

# The lock's TTL: renewed with every chunk written (a chunk takes milliseconds), so it
# only expires when a writer died or hung; 60 s then lets the next run go ahead.
LOCK_TTL_MS = 60_000
# Keys per SCAN call and per pipelined UNLINK batch when deleting old generations.
DELETE_BATCH = 5_000


def generation(schema: FeatureSchema, *parts: bytes | str) -> str:
    """The generation of a data set: 8 hex digits of a hash of the schema and the data."""
    h = hashlib.sha256(schema.store_version.encode())
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
    return h.hexdigest()[:8]


def demo_generation(users: int, items: int, seed: int, schema: FeatureSchema = SCHEMA) -> str:
    """The generation ``gateway features load`` writes for these arguments."""
    return generation(schema, f"synth:{users}:{items}:{seed}")


def connect(redis_url: str, cluster: bool = False, tls: RedisTLS = NO_TLS) -> Any:
    """A synchronous client for the offline writers; ConfigError (one line, no password)
    on a bad URL, an unreachable server, refused credentials or an untrusted certificate."""
    return sync_client(redis_url, tls, cluster=cluster)


def current_generation(client: Any) -> tuple[str, str] | None:
    """``(generation, store_version)`` the pointer names, or None if there is none."""
    raw = client.get(codec.POINTER_KEY)
    return None if raw is None else codec.parse_pointer(raw)


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"


class GenerationWriter:
    """Writes one generation and switches the pointer to it (module docstring: steps 1-5)."""

    def __init__(
        self,
        client: Any,
        schema: FeatureSchema,
        gen: str,
        cluster: bool = False,
        keep: int = 1,
    ) -> None:
        self.client = client
        self.schema = schema
        self.gen = gen
        self.cluster = cluster
        self.keep = keep
        self._token = f"{os.getpid()}:{time.time_ns()}"
        self._user_prefix = codec.user_prefix(gen)
        self._item_prefix = codec.item_prefix(gen)
        self.bytes_written = 0
        self.deleted: list[str] = []

    @contextmanager
    def locked(self) -> Iterator[GenerationWriter]:
        if not self.client.set(codec.LOCK_KEY, self._token, nx=True, px=LOCK_TTL_MS):
            holder = self.client.get(codec.LOCK_KEY)
            raise ConfigError(
                f"another load or import is writing this store ({codec.LOCK_KEY} held by "
                f"{holder.decode() if holder else '?'}; it expires {LOCK_TTL_MS // 1000} s "
                "after its writer stops)"
            )
        try:
            # Recorded before any vector: a run that dies leaves a generation the next
            # run's clean-up finds. Score 0 until it is switched to (then its time).
            self.client.zadd(codec.GENERATIONS_KEY, {self.gen: 0}, nx=True)
            yield self
        finally:
            try:
                self.client.eval(_RELEASE, 1, codec.LOCK_KEY, self._token)
            except RedisError:
                pass  # the TTL frees it

    def _mset(self, mapping: dict[str, bytes]) -> None:
        if self.cluster:
            self.client.mset_nonatomic(mapping)
        else:
            self.client.mset(mapping)
        self.client.pexpire(codec.LOCK_KEY, LOCK_TTL_MS)

    def write(self, entity: str, ids: Sequence[str], matrix: np.ndarray) -> None:
        """Write one chunk of vectors of the ``user`` or ``item`` view (rows = ``ids``)."""
        view = self.schema.user if entity == "user" else self.schema.item
        prefix = self._user_prefix if entity == "user" else self._item_prefix
        m = np.ascontiguousarray(matrix, dtype=view.dtype)
        if m.shape != (len(ids), view.width):
            raise ValueError(
                f"{entity} chunk has shape {m.shape}, expected ({len(ids)}, {view.width})"
            )
        buf = m.tobytes()
        nb = view.nbytes
        self._mset({prefix + i: buf[k * nb : (k + 1) * nb] for k, i in enumerate(ids)})
        self.bytes_written += len(buf)

    def switch(self) -> None:
        """Point every reader at this generation (one SET), then delete old ones."""
        holder = self.client.get(codec.LOCK_KEY)
        if holder is None or holder.decode() != self._token:
            raise ConfigError(
                f"lost {codec.LOCK_KEY} while writing (another writer took it): "
                f"generation {self.gen} written but not switched to"
            )
        now = time.time()
        # When the set was written, for the gateway's freshness metric and alert; before
        # the pointer, so a reader that follows the pointer finds it.
        self.client.set(codec.meta_key(self.gen), codec.meta_value(now))
        self.client.set(codec.POINTER_KEY, codec.pointer_value(self.gen, self.schema.store_version))
        self.client.zadd(codec.GENERATIONS_KEY, {self.gen: now})
        self.delete_old()

    def delete_old(self) -> None:
        """Delete all generations but this one and the ``keep`` most recently current."""
        gens = self.client.zrevrange(codec.GENERATIONS_KEY, 0, -1, withscores=True)
        kept = 0
        for raw, score in gens:
            gen = raw.decode() if isinstance(raw, bytes) else str(raw)
            if gen == self.gen:
                continue
            if score > 0 and kept < self.keep:
                kept += 1
                continue
            delete_generation(self.client, gen)
            self.deleted.append(gen)


def delete_generation(client: Any, gen: str) -> int:
    """Delete every vector of ``gen`` (SCAN + pipelined UNLINK) and forget it; return count."""
    n = 0
    batch: list[bytes] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.unlink(key)
        pipe.execute()
        batch.clear()

    for key in client.scan_iter(match=codec.generation_pattern(gen), count=DELETE_BATCH):
        batch.append(key)
        n += 1
        if len(batch) >= DELETE_BATCH:
            flush()
    if batch:
        flush()
    client.zrem(codec.GENERATIONS_KEY, gen)
    return n


@dataclass
class LoadSummary:
    users: int
    items: int
    seconds: float
    bytes: int
    generation: str = ""
    schema_version: str = SCHEMA.store_version

    def line(self) -> str:
        return (
            f"loaded {self.users} users and {self.items} items "
            f"({self.users + self.items} entities, {self.bytes / 1e6:.2f} MB of values) "
            f"in {self.seconds:.2f} s; generation {self.generation}, "
            f"schema {self.schema_version}"
        )


def write_world(
    writer: GenerationWriter, world: World, chunk: int = 2_000, progress: bool = True
) -> None:
    """Write the world's vectors into the writer's generation (not switched yet)."""
    total = world.n_users + world.n_items
    with tqdm(total=total, unit="key", disable=not progress, file=sys.stderr) as bar:
        for entity, n, vectors, name in (
            ("user", world.n_users, world.user_vectors, user_id),
            ("item", world.n_items, world.item_vectors, item_id),
        ):
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                writer.write(entity, [name(i) for i in range(start, stop)], vectors[start:stop])
                bar.update(stop - start)


def load(
    redis_url: str,
    users: int = 10_000,
    items: int = 5_000,
    seed: int = 7,
    chunk: int = 2_000,
    progress: bool = True,
    cluster: bool = False,
    schema: FeatureSchema = SCHEMA,
    keep: int = 1,
    tls: RedisTLS = NO_TLS,
) -> LoadSummary:
    """Generate the world for ``seed`` and write it as a new generation, then switch to it.

    Generated data exists for the built-in schema's layout only; another schema gets a
    ConfigError pointing at ``gateway features import``.
    """
    if (schema.user.width, schema.item.width) != (SCHEMA.user.width, SCHEMA.item.width):
        raise ConfigError(
            f"generated demo data has the built-in schema's layout ({SCHEMA.user.width} user "
            f"and {SCHEMA.item.width} item features); schema {schema.source} has "
            f"{schema.user.width} and {schema.item.width}: use `gateway features import`"
        )
    t0 = time.perf_counter()
    client = connect(redis_url, cluster, tls)
    world = make_world(users, items, seed)
    gen = demo_generation(users, items, seed, schema)
    writer = GenerationWriter(client, schema, gen, cluster=cluster, keep=keep)
    try:
        with writer.locked():
            write_world(writer, world, chunk, progress)
            writer.switch()
    except RedisError as exc:
        raise ConfigError(
            f"writing to Redis at {redact(redis_url)} failed: {describe(exc, redis_url)}"
        ) from exc
    finally:
        client.close()
    summary = LoadSummary(
        users, items, time.perf_counter() - t0, writer.bytes_written, gen, schema.store_version
    )
    print(summary.line(), flush=True)
    return summary
