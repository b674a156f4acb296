"""Where a rollout's state lives: Redis for a fleet, memory for one embedded process.

Redis keys (fixed: the ACLs name them; the gateway needs read/write on ``gw:rollout:*``):

* ``gw:rollout:{model}:state``  the state hash (state.py); every change is a
  compare-and-set on its ``rev`` field under WATCH/MULTI/EXEC;
* ``gw:rollout:{model}:lease``  the decision-maker's lease: ``SET NX PX``, renewed by
  its holder under WATCH; one worker of the fleet judges the canary at a time;
* ``gw:rollout:{model}:counts:{rollout_id}.{step}``  per-variant counts of one step,
  added to by every worker with pipelined HINCRBY, expiring a day after the last write.

Every call has an explicit socket timeout and no retries: callers run off the request
path (the runtime's poll loop, the CLI) and simply try again on their next round.
redis-py's errors become :class:`RolloutStoreError` here only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from gateway.errors import GatewayError
from gateway.redisconn import NO_TLS, RedisTLS, describe, redact
from gateway.rollout.state import RolloutState

# Count keys outlive their rollout by a day: long enough for `status` and a post-mortem,
# short enough that weekly rollouts leave nothing behind.
COUNTS_TTL_MS = 86_400_000


class RolloutStoreError(GatewayError):
    """The rollout's store could not be read or written (one line)."""


class Conflict(RolloutStoreError):
    """The state changed since it was read (another writer won the compare-and-set)."""


def key(model: str, suffix: str) -> str:
    return f"gw:rollout:{model}:{suffix}"


class RolloutStore(Protocol):
    """What the runtime and the CLI need; Redis in a fleet, memory when embedded."""

    async def read(self) -> RolloutState: ...

    async def write(self, new: RolloutState, expected_rev: int) -> RolloutState:
        """Store ``new`` as revision ``expected_rev + 1`` if the stored one is still
        ``expected_rev``; else raise :class:`Conflict`."""
        ...

    async def hold_lease(self, owner: str, ttl_ms: int) -> bool:
        """Take or renew the decision-maker's lease; True while ``owner`` holds it."""
        ...

    async def add_counts(self, batches: Mapping[str, Mapping[str, int]]) -> None:
        """Add ``{counts token: {field: n}}`` to the step count hashes."""
        ...

    async def counts(self, token: str) -> dict[str, str]: ...

    async def close(self) -> None: ...


class RedisRolloutStore:
    """The state in Redis (see the module docstring for the keys)."""

    def __init__(
        self,
        url: str,
        model: str,
        timeout_s: float = 0.25,
        client: object | None = None,
        tls: RedisTLS = NO_TLS,
    ) -> None:
        import redis.asyncio as aioredis

        self.model = model
        self.url = url
        self._state_key = key(model, "state")
        self._lease_key = key(model, "lease")
        if client is None:
            tls.check(url)
        self._r = client or aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry_on_timeout=False,
            retry=None,
            decode_responses=True,
            max_connections=4,
            **tls.redis_kwargs(url),
        )

    async def _call(self, what: str, fn: Callable[[], object]) -> object:
        from redis.exceptions import RedisError, WatchError

        try:
            return await fn()  # type: ignore[misc]
        except WatchError as exc:
            raise Conflict("the rollout changed meanwhile; read it again") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            raise RolloutStoreError(
                f"Redis at {redact(self.url)} {what}: {describe(exc, self.url)}"
            ) from exc

    async def read(self) -> RolloutState:
        fields = await self._call("(read)", lambda: self._r.hgetall(self._state_key))  # type: ignore[attr-defined]
        try:
            return RolloutState.from_fields(fields)  # type: ignore[arg-type]
        except (ValueError, KeyError) as exc:
            raise RolloutStoreError(f"malformed rollout state in {self._state_key}: {exc}") from exc

    async def write(self, new: RolloutState, expected_rev: int) -> RolloutState:
        from dataclasses import replace

        stored = replace(new, rev=expected_rev + 1)

        async def cas() -> None:
            async with self._r.pipeline(transaction=True) as pipe:  # type: ignore[attr-defined]
                await pipe.watch(self._state_key)
                rev = await pipe.hget(self._state_key, "rev")
                if int(rev or 0) != expected_rev:
                    await pipe.unwatch()
                    raise Conflict(
                        f"the rollout changed meanwhile (revision {rev}, expected {expected_rev})"
                    )
                pipe.multi()
                pipe.hset(self._state_key, mapping=stored.to_fields())
                await pipe.execute()

        await self._call("(write)", cas)
        return stored

    async def hold_lease(self, owner: str, ttl_ms: int) -> bool:
        async def take() -> bool:
            if await self._r.set(self._lease_key, owner, nx=True, px=ttl_ms):  # type: ignore[attr-defined]
                return True
            async with self._r.pipeline(transaction=True) as pipe:  # type: ignore[attr-defined]
                await pipe.watch(self._lease_key)
                if await pipe.get(self._lease_key) != owner:
                    await pipe.unwatch()
                    return False
                pipe.multi()
                pipe.pexpire(self._lease_key, ttl_ms)
                await pipe.execute()
                return True

        try:
            return bool(await self._call("(lease)", take))
        except Conflict:
            return False

    async def add_counts(self, batches: Mapping[str, Mapping[str, int]]) -> None:
        async def flush() -> None:
            async with self._r.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
                for token, fields in batches.items():
                    k = key(self.model, f"counts:{token}")
                    for f, n in fields.items():
                        pipe.hincrby(k, f, n)
                    pipe.pexpire(k, COUNTS_TTL_MS)
                await pipe.execute()

        await self._call("(counts)", flush)

    async def counts(self, token: str) -> dict[str, str]:
        k = key(self.model, f"counts:{token}")
        return await self._call("(counts)", lambda: self._r.hgetall(k))  # type: ignore[attr-defined,return-value]

    async def ping(self) -> None:
        await self._call("(ping)", lambda: self._r.ping())  # type: ignore[attr-defined]

    async def close(self) -> None:
        await self._r.aclose()  # type: ignore[attr-defined]


class MemoryRolloutStore:
    """One process's rollout (embedded mode, no Redis): set from settings at start."""

    def __init__(self, initial: RolloutState | None = None) -> None:
        self._state = initial or RolloutState()
        self._counts: dict[str, dict[str, int]] = {}

    async def read(self) -> RolloutState:
        return self._state

    async def write(self, new: RolloutState, expected_rev: int) -> RolloutState:
        from dataclasses import replace

        if self._state.rev != expected_rev:
            raise Conflict(f"revision {self._state.rev}, expected {expected_rev}")
        self._state = replace(new, rev=expected_rev + 1)
        return self._state

    async def hold_lease(self, owner: str, ttl_ms: int) -> bool:
        return True  # one process: always the decision-maker

    async def add_counts(self, batches: Mapping[str, Mapping[str, int]]) -> None:
        for token, fields in batches.items():
            c = self._counts.setdefault(token, {})
            for f, n in fields.items():
                c[f] = c.get(f, 0) + n

    async def counts(self, token: str) -> dict[str, str]:
        return {k: str(v) for k, v in self._counts.get(token, {}).items()}

    async def close(self) -> None:
        return None
