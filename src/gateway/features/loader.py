"""``gateway features load``: write the generated features into Redis.

Pipelined in chunks (one round trip per ``chunk`` keys), idempotent (plain SETs of
deterministic values: loading twice leaves the same store), with a progress bar and
a summary. The schema version key is written last, so a gateway never accepts a
store whose load did not finish.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry
from tqdm import tqdm

from gateway.errors import ConfigError
from gateway.features import codec
from gateway.schema import SCHEMA
from gateway.synth import World, item_id, make_world, user_id


@dataclass
class LoadSummary:
    users: int
    items: int
    seconds: float
    bytes: int

    def line(self) -> str:
        return (
            f"loaded {self.users} users and {self.items} items "
            f"({self.users + self.items} entities, {self.bytes / 1e6:.2f} MB of values) "
            f"in {self.seconds:.2f} s; schema {SCHEMA.store_version}"
        )


def _entries(world: World) -> list[tuple[str, bytes]]:
    out = [
        (codec.user_key(user_id(i)), world.user_vectors[i].tobytes()) for i in range(world.n_users)
    ]
    out += [
        (codec.item_key(item_id(i)), world.item_vectors[i].tobytes()) for i in range(world.n_items)
    ]
    return out


def write_world(
    client: redis.Redis, world: World, chunk: int = 2_000, progress: bool = True
) -> int:
    """Write every vector, then the version key; return the bytes of values written."""
    entries = _entries(world)
    written = 0
    with tqdm(total=len(entries), unit="key", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(entries), chunk):
            part = entries[start : start + chunk]
            pipe = client.pipeline(transaction=False)
            for key, value in part:
                pipe.set(key, value)
            pipe.execute()
            written += sum(len(v) for _, v in part)
            bar.update(len(part))
    client.set(codec.VERSION_KEY, SCHEMA.store_version)
    return written


def load(
    redis_url: str,
    users: int = 10_000,
    items: int = 5_000,
    seed: int = 7,
    chunk: int = 2_000,
    progress: bool = True,
    cluster: bool = False,
) -> LoadSummary:
    """Generate the world for ``seed`` and write it; raise ConfigError on a bad URL or server."""
    t0 = time.perf_counter()
    kwargs = dict(
        socket_connect_timeout=2.0,
        socket_timeout=10.0,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        if cluster:
            client: redis.Redis = redis.RedisCluster.from_url(redis_url, **kwargs)  # type: ignore[assignment]
        else:
            client = redis.Redis.from_url(redis_url, **kwargs)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"bad --redis-url {redis_url!r}: {exc}") from exc
    except RedisError as exc:
        raise ConfigError(f"cannot reach Redis at {redis_url}: {exc}") from exc
    world = make_world(users, items, seed)
    try:
        nbytes = write_world(client, world, chunk, progress)
    except RedisError as exc:
        raise ConfigError(f"writing to Redis at {redis_url} failed: {exc}") from exc
    finally:
        client.close()
    summary = LoadSummary(users, items, time.perf_counter() - t0, nbytes)
    print(summary.line(), flush=True)
    return summary
