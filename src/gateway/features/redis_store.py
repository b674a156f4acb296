"""Redis feature store: one MGET per request (one round trip), packed vectors.

Without cluster mode the request path's MGET goes over raw RESP2 connections
(``features/resp.py``: redis-py cost 5x their CPU for this one command); the health
check and cluster mode use redis-py. Every exception out of either client is converted
to ours here and nowhere else (``_mapped``): a failing store is a fallback reason, never
a 500. That includes the cluster client's errors that are not ``RedisError``
(``RedisClusterException`` and its ``SlotNotCoveredError``), and anything else it may
raise; only cancellation passes. redis-py's own retries are off (``Retry(NoBackoff(),
0)``) and the fast path has none: the gateway retries in one layer, its own, inside the
stage deadline. Timeouts are explicit. A call cancelled by the stage timeout
disconnects its connection (redis-py's fix for CVE-2023-28858/28859; ``resp.py`` does
the same), so a half-read reply never reaches the next request; a test checks this with
``CLIENT PAUSE``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import hiredis
import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ChildDeadlockedError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import (
    FeatureStoreError,
    FeatureStoreRefused,
    FeatureStoreTimeout,
    FeatureStoreUnavailable,
    SchemaMismatch,
)
from gateway.features import codec
from gateway.features.base import FeatureBatch
from gateway.features.resp import RespPool
from gateway.redisconn import NO_TLS, RedisTLS, refusal
from gateway.schema import SCHEMA, FeatureSchema

log = logging.getLogger("gateway.features")

# After a request met a slot no node serves, the client's slot map is read again from
# the cluster, at most this often. redis-py reads it again only on MOVED, CLUSTERDOWN or
# a dropped connection, and a key whose slot has no node is never sent, so none of those
# come: a slot assigned again would stay unserved for good. A read is one CLUSTER SLOTS
# round trip, off the request path; 1 s bounds both its rate and how long a slot
# assigned again stays unserved here.
SLOT_MAP_REFRESH_S = 1.0
# The id the health check reads (absent or not, the reply does not matter: only whether
# the command is allowed and answered).
PROBE_ID = "\x00health-check"


@contextmanager
def _mapped(cluster: bool = False) -> Iterator[None]:
    """Convert every exception of a redis-py or fast-path call to a FeatureStoreError subclass.

    The fast path (``resp.py``) raises the standard library's ``OSError``/
    ``ConnectionError`` and ``TimeoutError`` and hiredis's ``ReplyError`` (an error reply)
    and ``ProtocolError``, converted here alongside redis-py's.

    redis-py 8's tree (``redis/exceptions.py``): ``RedisError`` holds the connection,
    timeout and server-reply errors, the cluster's ``ClusterDownError``,
    ``MasterDownError``, ``MovedError``/``AskError``/``TryAgainError`` (``ResponseError``)
    and ``ClusterError``; ``RedisClusterException`` (``SlotNotCoveredError``: a key in a
    slot no node serves; "cannot be connected" when no startup node answers; "Cluster
    mode is not enabled") is a separate root, as are ``ChildDeadlockedError`` and
    ``IncorrectPolicyType``. Its TimeoutError is not the builtin one. CancelledError is a
    BaseException and passes: the stage timeout and shutdown rely on it.

    ``cluster``: a bare ``KeyError`` (the slot number) from the cluster client means a
    key's slot is served by no node: redis-py 8's async ``get_node_from_slot`` means to
    raise SlotNotCoveredError there but catches only IndexError/TypeError around a dict
    lookup (redis-py issue #4296); the uncovered-slot test meets it on every such key.
    """
    try:
        yield
    except FeatureStoreError:
        raise
    except Exception as exc:
        raise _convert(exc, cluster) from exc


def _convert(exc: Exception, cluster: bool) -> FeatureStoreError:
    """The FeatureStoreError for one exception of either client (``_mapped``)."""
    if isinstance(exc, KeyError):
        if not cluster:
            return _unexpected(exc)
        return FeatureStoreError(f"redis cluster: no node serves slot {exc}")
    if isinstance(exc, (RedisTimeoutError, TimeoutError)):
        return FeatureStoreTimeout(f"redis timed out: {exc}")
    # Refused: WRONGPASS/NOAUTH (redis-py's AuthenticationError, a ConnectionError
    # subclass, or an error reply to the fast path's AUTH), NOPERM (an ACL user without
    # a permission: redis-py's NoPermissionError or a reply on the fast path), or a TLS
    # certificate we do not trust (an OSError). Not an outage: a retry cannot help, and
    # "unreachable" would send an operator looking at the network.
    why = refusal(exc)
    if why is not None:
        return FeatureStoreRefused(why)
    if isinstance(exc, (AuthenticationError, AuthorizationError)):
        return FeatureStoreRefused(f"redis refused our credentials (WRONGPASS/NOAUTH): {exc}")
    if isinstance(exc, (RedisConnectionError, ConnectionError, OSError)):
        return FeatureStoreUnavailable(f"redis unreachable: {exc}")
    if isinstance(exc, (RedisError, RedisClusterException, ChildDeadlockedError)):
        return FeatureStoreError(f"redis error: {type(exc).__name__}: {exc}")
    if isinstance(exc, hiredis.ReplyError):
        # An error reply on the fast path (resp.py): LOADING, ...
        return FeatureStoreError(f"redis error: {exc}")
    if isinstance(exc, hiredis.HiredisError):
        return FeatureStoreError(f"redis protocol error: {type(exc).__name__}: {exc}")
    if isinstance(exc, RuntimeError) and "closed" in str(exc):
        # uvloop raises RuntimeError("unable to perform operation on <TCPTransport
        # closed=True ...>; the handler is closed") when redis-py writes to a connection
        # the peer has reset; redis-py passes it through (after closing the connection).
        # It is a dead connection, not a bug of ours: found by the connection-reset
        # fault test, where it surfaced as a 500.
        return FeatureStoreUnavailable(f"redis connection closed: {exc}")
    return _unexpected(exc)


_warned: set[type[BaseException]] = set()


def _unexpected(exc: Exception) -> FeatureStoreError:
    # Not one of redis-py's documented errors: still a failed store (the fallback
    # answers), but worth a log line, since it may be a bug on either side. Once per
    # exception type: a broken store fails every request the same way.
    msg = f"unexpected error from the redis client: {type(exc).__name__}: {exc}"
    log.log(logging.DEBUG if type(exc) in _warned else logging.WARNING, "%s", msg)
    _warned.add(type(exc))
    return FeatureStoreError(msg)


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
        tls: RedisTLS = NO_TLS,
    ) -> None:
        self._schema = schema
        self._cluster = cluster
        # Key prefixes of the generation the pointer names (codec.py), set by check(),
        # which the gateway's health check calls every few seconds.
        self.generation: str | None = None
        # When the served generation was written (its meta key), None if unknown.
        self.written_at: float | None = None
        self._user_prefix = self._item_prefix = ""
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = -SLOT_MAP_REFRESH_S
        self._fast: RespPool | None = None
        kwargs = client_kwargs(connect_timeout_s, socket_timeout_s, max_connections)
        kwargs.update(tls.redis_kwargs(url))
        if cluster:
            from redis.asyncio.cluster import RedisCluster

            kwargs.pop("health_check_interval")
            # Cluster-level retries (MOVED/ASK handling aside) off too: redis-py's
            # RedisCluster takes ``retry`` for them; it has no ``retry_on_timeout``.
            kwargs.pop("retry_on_timeout")
            # A slot no node serves fails only the requests whose keys hash there (the
            # fallback answers them): nodes with cluster-require-full-coverage=no go on
            # serving the other slots. With redis-py's default (True) the client refuses
            # to initialise while any slot is uncovered, and every request fails.
            self._client: Any = RedisCluster.from_url(url, require_full_coverage=False, **kwargs)
        else:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                timeout=connect_timeout_s,
                **{k: v for k, v in kwargs.items() if k != "retry_on_timeout"},
            )
            self._client = redis.Redis(connection_pool=pool, retry=Retry(NoBackoff(), 0))
            # The request path's MGET: same URL, timeouts and connection limit.
            self._fast = RespPool(url, connect_timeout_s, socket_timeout_s, max_connections, tls)

    @property
    def client(self) -> Any:
        return self._client

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        """``_mapped``; on a cluster, a slot with no node also has the slot map read again."""
        with _mapped(self._cluster):
            try:
                yield
            except (SlotNotCoveredError, KeyError):
                if self._cluster:
                    self._refresh_slot_map()
                raise

    def _refresh_slot_map(self) -> None:
        now = time.monotonic()
        if (self._refresh is not None and not self._refresh.done()) or (
            now - self._refreshed_at < SLOT_MAP_REFRESH_S
        ):
            return
        self._refreshed_at = now
        self._refresh = asyncio.get_running_loop().create_task(self._read_slot_map())

    async def _read_slot_map(self) -> None:
        try:
            # redis-py's own refresh: CLUSTER SLOTS from a known node; keeps the pools.
            await self._client.nodes_manager.initialize()
        except Exception as exc:  # the next miss tries again
            log.debug("redis cluster slot map not read: %s: %s", type(exc).__name__, exc)

    async def fetch(self, user_id: str, item_ids: list[str]) -> FeatureBatch:
        if self.generation is None:
            # Only before the first health check (after it, a store without a usable
            # pointer is not read at all: Pipeline.features_blocked).
            await self.check()
        ip = self._item_prefix
        keys = [self._user_prefix + user_id] + [ip + i for i in item_ids]
        with self._guarded():
            if self._fast is not None:
                values = await self._fast.mget(keys)
            else:
                # Cluster: groups keys by slot and sends one pipelined batch per node.
                values = await self._client.mget_nonatomic(keys)
        return codec.decode(values[0], values[1:], self._schema)

    async def check(self) -> None:
        """Read the pointer: follow its generation if it is on our schema, else raise."""
        with self._guarded():
            stored = await self._client.get(codec.POINTER_KEY)
            if stored is None:
                legacy = await self._client.exists(codec.LEGACY_VERSION_KEY)
        if stored is None:
            self.generation = None
            hint = (
                "holds the layout of an older loader: load or import it again"
                if legacy
                else "is empty"
            )
            raise SchemaMismatch(
                f"feature store has no {codec.POINTER_KEY} (it {hint}): run "
                "`gateway features load` or `gateway features import`"
            )
        try:
            gen, version = codec.parse_pointer(stored)
        except ValueError as exc:
            self.generation = None
            raise SchemaMismatch(f"feature store pointer unreadable: {exc}") from None
        if version != self._schema.store_version:
            self.generation = None
            raise SchemaMismatch(
                f"feature store holds schema {version}, this gateway reads "
                f"{self._schema.store_version}"
            )
        if gen != self.generation:
            self._user_prefix, self._item_prefix = codec.user_prefix(gen), codec.item_prefix(gen)
            self.generation = gen
            log.info("feature store: reading generation %s", gen)
        # Read at every check: loading the same data again rewrites the same generation.
        with self._guarded():
            self.written_at = codec.parse_meta(await self._client.get(codec.meta_key(gen)))
        # The request path's own command on its own connections: an ACL user that may
        # GET the pointer but not MGET the vectors (NOPERM), or a fast-path TLS or AUTH
        # problem, shows here (in /readyz and one log line) instead of only as fallbacks.
        probe = [self._user_prefix + PROBE_ID, self._item_prefix + PROBE_ID]
        with self._guarded():
            if self._fast is not None:
                await self._fast.mget(probe)
            else:
                await self._client.mget_nonatomic(probe)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with suppress(asyncio.CancelledError):
                await self._refresh
        if self._fast is not None:
            await self._fast.close()
        with _mapped(self._cluster):
            if self._cluster:
                await self._client.aclose()
            else:
                # The pool was passed in, so the client does not own it unless told to.
                await self._client.aclose(close_connection_pool=True)
