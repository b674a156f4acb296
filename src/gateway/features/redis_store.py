"""Redis feature store: one MGET per request (one round trip), packed vectors.

Every redis-py error is converted to ours here and nowhere else (``_mapped``).
redis-py's own retries are off (``Retry(NoBackoff(), 0)``): the gateway retries in
one layer, its own, inside the stage deadline. Timeouts are explicit.
A call cancelled by the stage timeout makes redis-py disconnect that connection
(the fix for CVE-2023-28858/28859), so a half-read reply never reaches the next
request; a test checks this with ``CLIENT PAUSE``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import (
    FeatureStoreError,
    FeatureStoreTimeout,
    FeatureStoreUnavailable,
    SchemaMismatch,
)
from gateway.features import codec
from gateway.features.base import FeatureBatch
from gateway.schema import SCHEMA, FeatureSchema


@contextmanager
def _mapped() -> Iterator[None]:
    """Convert redis-py's errors to ours (its TimeoutError is not the builtin one)."""
    try:
        yield
    except (RedisTimeoutError, TimeoutError) as exc:
        raise FeatureStoreTimeout(f"redis timed out: {exc}") from exc
    except (RedisConnectionError, ConnectionError, OSError) as exc:
        raise FeatureStoreUnavailable(f"redis unreachable: {exc}") from exc
    except RedisError as exc:
        raise FeatureStoreError(f"redis error: {exc}") from exc
    except RuntimeError as exc:
        # uvloop raises RuntimeError("unable to perform operation on <TCPTransport
        # closed=True ...>; the handler is closed") when redis-py writes to a connection
        # the peer has reset; redis-py passes it through (after closing the connection).
        # It is a dead connection, not a bug of ours: found by the connection-reset
        # fault test, where it surfaced as a 500.
        if "closed" in str(exc):
            raise FeatureStoreUnavailable(f"redis connection closed: {exc}") from exc
        raise


def client_kwargs(
    connect_timeout_s: float, socket_timeout_s: float, max_connections: int
) -> dict[str, Any]:
    """The explicit redis-py client settings shared by the store and the loader.

    A new connection must cost one TCP handshake and nothing else, because it is made
    inside a request's features budget (a call cut off by that budget closes its
    connection, so the next request opens one). redis-py 8's defaults spend three more
    round trips on it: ``HELLO 3`` (RESP3), ``CLIENT MAINT_NOTIFICATIONS`` and ``CLIENT
    SETINFO``. With 3-5 ms to Redis that is past the 15 ms budget, every request times
    out, each timeout closes the connection, and the store never recovers (the fault
    test ``test_redis_latency_under_budget_is_served`` found this). So: RESP2 (no HELLO,
    no maintenance notifications; MGET replies are the same bulk strings) and no
    driver info (no SETINFO).
    """
    return dict(
        protocol=2,
        driver_info=None,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=max_connections,
    )


class RedisFeatureStore:
    """Reads the layout in ``codec.py`` with one MGET per request."""

    name = "redis"

    def __init__(
        self,
        url: str,
        connect_timeout_s: float = 0.05,
        socket_timeout_s: float = 0.1,
        max_connections: int = 64,
        cluster: bool = False,
        schema: FeatureSchema = SCHEMA,
    ) -> None:
        self._schema = schema
        self._cluster = cluster
        kwargs = client_kwargs(connect_timeout_s, socket_timeout_s, max_connections)
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            kwargs.pop("health_check_interval")
            # Cluster-level retries (MOVED/ASK handling aside) off too: redis-py's
            # RedisCluster takes ``retry`` for them; it has no ``retry_on_timeout``.
            kwargs.pop("retry_on_timeout")
            self._client: Any = RedisCluster.from_url(url, **kwargs)
        else:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                timeout=connect_timeout_s,
                **{k: v for k, v in kwargs.items() if k != "retry_on_timeout"},
            )
            self._client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))

    @property
    def client(self) -> Any:
        return self._client

    async def fetch(self, user_id: str, item_ids: list[str]) -> FeatureBatch:
        keys = [codec.user_key(user_id)] + [codec.item_key(i) for i in item_ids]
        with _mapped():
            if self._cluster:
                # Groups keys by slot and sends one pipelined batch per node.
                values = await self._client.mget_nonatomic(keys)
            else:
                values = await self._client.mget(keys)
        return codec.decode(values[0], values[1:], self._schema)

    async def check(self) -> None:
        with _mapped():
            stored = await self._client.get(codec.VERSION_KEY)
        if stored is None:
            raise SchemaMismatch(
                f"feature store has no {codec.VERSION_KEY}: run `gateway features load`"
            )
        stored_s = stored.decode() if isinstance(stored, bytes) else str(stored)
        if stored_s != self._schema.store_version:
            raise SchemaMismatch(
                f"feature store holds schema {stored_s}, this gateway reads "
                f"{self._schema.store_version}"
            )

    async def close(self) -> None:
        with _mapped():
            if self._cluster:
                await self._client.aclose()
            else:
                # The pool was passed in, so the client does not own it unless told to.
                await self._client.aclose(close_connection_pool=True)
