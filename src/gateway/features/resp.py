"""The request path's MGET on raw RESP2 connections: ``hiredis`` packs and parses, we pool.

Why not redis-py for this one command: it is the request path's largest Redis cost and
redis-py spends most of it outside the network. Measured per call (``time.process_time``,
uvloop, MGET of 51 keys, 16 concurrent callers, local redis-server): redis-py's asyncio
client with the store's settings 123 us (176 us at 1 caller); a raw connection that
writes ``hiredis.pack_command`` and feeds a ``hiredis.Reader`` 24 us (52 us at 1).
redis-py stays for everything else (the health check's GET, cluster mode, the loader):
only this command is hot.

What the pool promises:

* It honours what redis-py would read from the same URL (``redis.asyncio.connection.
  parse_url``: ``redis://``, ``rediss://``, ``unix://``, ``username:password@``, the db
  number, query arguments such as ``ssl_ca_certs``): a new connection sends ``AUTH`` and
  ``SELECT`` (pipelined: one round trip) when the URL names them, and TLS goes through
  :func:`tls_context` (asyncio's own TLS transport), built with redis-py's own
  ``RedisSSLContext`` from the same options redis-py gets (``redisconn.RedisTLS``: CA
  file, client certificate and key), so both clients verify alike.
* At most ``max_connections`` connections; a caller that finds none free waits up to
  ``connect_timeout_s`` for one (redis-py's ``BlockingConnectionPool`` with the store's
  settings does the same), then gets ``ConnectionError``.
* A new connection must be ready within ``connect_timeout_s``; a reply must come within
  ``socket_timeout_s`` (the store's backstop; the features stage's own timeout is
  normally shorter).
* One command per connection at a time; a connection goes back to the pool only after a
  complete reply. A call that times out, is cancelled or meets a protocol error closes
  its connection (a half-read reply must never reach the next request:
  CVE-2023-28858/28859 in redis-py was exactly that).

Errors are raised as the standard library's and hiredis's (``OSError``/
``ConnectionError``, ``TimeoutError``, ``hiredis.ReplyError`` for an error reply such as
``NOPERM`` or ``LOADING``, ``hiredis.ProtocolError``); ``redis_store._mapped`` converts
them to ours with redis-py's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio.connection import RedisSSLContext, SSLConnection, parse_url

from gateway.oneconn import OneCallConnection
from gateway.redisconn import NO_TLS, RedisTLS

Reply = Any  # hiredis's parsed reply: bytes, int, None, a list of them, or a ReplyError


def _pack(*args: str | int | bytes) -> bytes:
    # hiredis's stub types pack_command's argument as a 1-tuple; it takes any length.
    return hiredis.pack_command(args)  # type: ignore[arg-type]


def tls_context(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context for a ``rediss://`` URL, from its ``ssl_*`` query arguments.

    redis-py's ``RedisSSLContext`` with redis-py's defaults (certificate required, host
    name checked), so the fast path and redis-py's client accept the same servers. The
    CA file and client certificate arrive as ``ssl_*`` options from ``redisconn.RedisTLS``.
    """
    cert_reqs = options.get("ssl_cert_reqs", "required")
    return RedisSSLContext(
        keyfile=options.get("ssl_keyfile"),
        certfile=options.get("ssl_certfile"),
        cert_reqs=cert_reqs,
        ca_certs=options.get("ssl_ca_certs"),
        ca_path=options.get("ssl_ca_path"),
        check_hostname=_truthy(options.get("ssl_check_hostname", True)),
    ).get()


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "0", "false", "no", "n", "off")
    return bool(value)


class _Conn(OneCallConnection):
    """One RESP2 connection; one command (or one pipelined group) at a time."""

    __slots__ = ("loop", "_reader", "_want", "_replies", "_timer")
    PEER = "redis"
    TIMEOUT_MESSAGE = "redis did not answer in time"

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # made by the loop's create_connection
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reader = hiredis.Reader()
        self._waiter: asyncio.Future[list[Reply]] | None = None
        self._want = 0
        self._replies: list[Reply] = []
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            self._fail(hiredis.ProtocolError(f"{len(data)} bytes nobody asked for"))
            return
        reader = self._reader
        reader.feed(data)
        try:
            while True:
                reply = reader.gets()
                if reply is False:
                    return
                self._replies.append(reply)
                if len(self._replies) == self._want:
                    break
        except hiredis.ProtocolError as exc:
            self._fail(exc)
            return
        if reader.has_data():
            self._fail(hiredis.ProtocolError("more replies than commands"))
            return
        replies, self._replies = self._replies, []
        waiter.set_result(replies)

    async def call(self, data: bytes, replies: int, timeout_s: float) -> list[Reply]:
        """Send ``data`` (``replies`` commands), return their replies within ``timeout_s``.
        The caller closes the connection if this raises."""
        assert self.transport is not None
        loop = self.loop
        waiter: asyncio.Future[list[Reply]] = loop.create_future()
        self._waiter, self._want = waiter, replies
        self._timer = loop.call_later(timeout_s, self._expire)
        try:
            self.transport.write(data)
            return await waiter
        finally:
            self._timer.cancel()
            self._waiter = None


class RespPool:
    """Raw RESP2 connections for the request path's MGET; see the module docstring."""

    def __init__(
        self,
        url: str,
        connect_timeout_s: float,
        socket_timeout_s: float,
        max_connections: int,
        tls: RedisTLS = NO_TLS,
    ) -> None:
        options: dict[str, Any] = {**parse_url(url), **tls.redis_kwargs(url)}
        self._path: str | None = options.get("path")
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._ssl = (
            tls_context(options) if options.get("connection_class") is SSLConnection else None
        )
        setup: list[bytes] = []
        password = options.get("password")
        if password is not None:
            username = options.get("username")
            auth = ("AUTH", username, password) if username else ("AUTH", password)
            setup.append(_pack(*auth))
        db = int(options.get("db", 0) or 0)
        if db:
            setup.append(_pack("SELECT", db))
        self._setup = b"".join(setup)
        self._setup_replies = len(setup)
        self._connect_timeout_s = connect_timeout_s
        self._socket_timeout_s = socket_timeout_s
        self._max = max_connections
        self._idle: list[_Conn] = []
        self._open = 0  # connections counted against max: idle, in use, or connecting
        self._waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self._closed = False

    async def mget(self, keys: list[str]) -> list[bytes | None]:
        """One MGET; its reply, or raises (see the module docstring for what)."""
        (reply,) = await self.pipeline(_pack("MGET", *keys), (len(keys),))
        return reply

    async def pipeline(self, data: bytes, widths: Sequence[int]) -> list[list[Any]]:
        """Packed commands that each answer an array (MGET, HMGET), sent in one write;
        ``widths`` gives each one's expected length. Their replies, or raises like
        :meth:`mget`."""
        conn = await self._acquire()
        try:
            replies = await conn.call(data, len(widths), self._socket_timeout_s)
        except BaseException:
            self._discard(conn)
            raise
        for reply, width in zip(replies, widths, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                self._release(conn)  # error replies read in full: the connection is in step
                raise reply
            if not isinstance(reply, list) or len(reply) != width:
                self._discard(conn)  # not what Redis answers: trust nothing more from it
                raise hiredis.ProtocolError(
                    f"a command of {width} keys or fields answered with {reply!r:.80}"
                )
        self._release(conn)
        return replies

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.abort()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("redis pool closed"))

    # -- the pool ----------------------------------------------------------------------

    async def _acquire(self) -> _Conn:
        idle = self._idle
        while idle:
            conn = idle.pop()  # the most recently used
            if not conn.closed:
                return conn
            self._open -= 1
        if self._closed:
            raise ConnectionError("redis pool closed")
        if self._open >= self._max:
            reused = await self._wait_for_slot()
            if reused is not None:
                return reused
        self._open += 1
        try:
            return await self._connect()
        except BaseException:
            self._open -= 1
            self._wake()
            raise

    async def _wait_for_slot(self) -> _Conn | None:
        """Wait for a released connection (returned) or a freed slot (None)."""
        waiter: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                return await waiter
        except BaseException as exc:
            handed = waiter.done() and not waiter.cancelled() and waiter.exception() is None
            if handed and isinstance(exc, TimeoutError):
                return waiter.result()  # handed over just as the time ran out: use it
            if handed:
                # Cancelled after it was handed a connection or a slot: pass it on.
                conn = waiter.result()
                if conn is not None:
                    self._release(conn)
                else:
                    self._wake()
            if isinstance(exc, TimeoutError):
                raise ConnectionError(
                    f"no redis connection free within {self._connect_timeout_s * 1e3:.0f} ms "
                    f"(all {self._max} in use)"
                ) from None
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout_s):
            if self._path is not None:
                _, conn = await loop.create_unix_connection(_Conn, self._path)
            else:
                _, conn = await loop.create_connection(
                    _Conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
            if self._setup_replies:
                try:
                    replies = await conn.call(
                        self._setup, self._setup_replies, self._connect_timeout_s
                    )
                except BaseException:
                    conn.abort()
                    raise
                for reply in replies:
                    if isinstance(reply, hiredis.ReplyError):
                        conn.abort()
                        raise reply
        return conn

    def _release(self, conn: _Conn) -> None:
        if conn.closed or self._closed:
            self._discard(conn)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def _discard(self, conn: _Conn) -> None:
        conn.abort()
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        """A slot came free: let the first waiter connect."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
