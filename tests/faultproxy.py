"""A small asyncio TCP fault proxy for the fault-injection tests.

Sits between the gateway and one upstream (Redis, Triton's gRPC port) on loopback and
injects, on command:

* ``pass``                   forward bytes untouched;
* ``latency`` ms [jitter_ms] delay every chunk, both directions, by ms + U(0, jitter);
                             order is kept (each direction is one FIFO);
* ``blackhole``              accept, read and drop everything, never answer; existing
                             connections go silent too (a hung peer, a dropped route);
* ``reset``                  RST every open connection (SO_LINGER 0) and each new one;
* ``slow_close`` ms          stop forwarding, then FIN each connection after ms;
* ``drop``                   close every open connection (FIN), keep the mode;
* ``upstream`` to            send new connections to another host:port (a server
                             restarted elsewhere, as a Kubernetes pod comes back).

Why a subprocess with a line protocol on stdin/stdout, not a thread: the tests run their
load generator in the test process and measure each request's latency there. A proxy
thread would share the GIL with it, and CPython hands the GIL over only every 5 ms
(``sys.getswitchinterval``): the proxy would add milliseconds of jitter to the very
latencies the tests assert on. In its own process the proxy costs nothing there, and
the test still controls it synchronously: each command is answered with ``ok`` once it
is in force. No maintained pure-Python fault proxy exists (toxiproxy is a Go binary).

Run: ``python -m tests.faultproxy --upstream 127.0.0.1:6379`` prints ``listening PORT``;
then send JSON lines such as ``{"mode": "latency", "ms": 20, "jitter_ms": 5}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CHUNK = 65536


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: the peer sees ECONNRESET."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy:
    """The proxy's state and its asyncio server; one instance per upstream."""

    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode = "pass"
        self.latency_s = 0.0
        self.jitter_s = 0.0
        self.close_after_s = 0.0
        self.conns: set[_Conn] = set()
        self.rand = random.Random(seed)
        self.accepted = 0

    # -- control -----------------------------------------------------------------------
    def command(self, cmd: dict) -> str:
        mode = cmd.get("mode", "pass")
        if mode == "upstream":  # point new connections elsewhere (a restarted server)
            host, port = str(cmd["to"]).rsplit(":", 1)
            self.upstream = (host, int(port))
            return "ok"
        if mode not in ("pass", "latency", "blackhole", "reset", "slow_close", "drop"):
            return f"error unknown mode {mode!r}"
        if mode == "drop":  # close every open connection, keep the mode
            for c in list(self.conns):
                self._close(c, rst=False)
            return "ok"
        self.mode = mode
        self.latency_s = float(cmd.get("ms", 0)) / 1e3
        self.jitter_s = float(cmd.get("jitter_ms", 0)) / 1e3
        self.close_after_s = float(cmd.get("ms", 0)) / 1e3
        if mode == "reset":
            for c in list(self.conns):
                self._close(c, rst=True)
        elif mode == "slow_close":
            loop = asyncio.get_running_loop()
            for c in list(self.conns):
                loop.call_later(self.close_after_s, self._close, c, False)
        return "ok"

    def _close(self, c: _Conn, rst: bool) -> None:
        for t in c.tasks:
            t.cancel()
        for w in (c.client, c.upstream):
            if w is None:
                continue
            if rst:
                _rst(w)
            else:
                w.close()
        self.conns.discard(c)

    # -- data path -----------------------------------------------------------------------
    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction, applying the mode in force when each chunk arrives."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def sender() -> None:
            while True:
                due, data = await queue.get()
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if not data:
                    writer.write_eof() if writer.can_write_eof() else writer.close()
                    return
                writer.write(data)
                await writer.drain()

        send_task = asyncio.create_task(sender())
        try:
            while True:
                data = await reader.read(CHUNK)
                if self.mode in ("blackhole", "slow_close"):
                    if not data:
                        return
                    continue  # swallowed
                delay = 0.0
                if self.mode == "latency":
                    delay = self.latency_s + self.rand.uniform(0, self.jitter_s)
                queue.put_nowait((time.monotonic() + delay, data))
                if not data:
                    await send_task
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            if not send_task.done():
                send_task.cancel()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        self.accepted += 1
        conn = _Conn(cwriter)
        self.conns.add(conn)
        loop = asyncio.get_running_loop()
        try:
            if self.mode == "reset":
                self._close(conn, rst=True)
                return
            if self.mode in ("blackhole", "slow_close"):
                if self.mode == "slow_close":
                    loop.call_later(self.close_after_s, self._close, conn, False)
                while await creader.read(CHUNK):
                    pass  # never answer
                return
            try:
                ureader, uwriter = await asyncio.open_connection(*self.upstream)
            except OSError:
                self._close(conn, rst=True)  # upstream down: the client sees a reset
                return
            conn.upstream = uwriter
            up = asyncio.create_task(self._pipe(creader, uwriter))
            down = asyncio.create_task(self._pipe(ureader, cwriter))
            conn.tasks = [up, down]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.wait(conn.tasks, timeout=1.0)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            if conn in self.conns:
                self._close(conn, rst=False)

    async def serve(self, port: int) -> None:
        server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        bound = server.sockets[0].getsockname()[1]
        print(f"listening {bound}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        async with server:
            while line := await reader.readline():
                try:
                    reply = self.command(json.loads(line))
                except (ValueError, TypeError) as exc:
                    reply = f"error {exc}"
                print(reply, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", required=True, help="host:port")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    asyncio.run(FaultProxy(host, int(port), args.seed).serve(args.port))


class ProxyProcess:
    """The test side: start the proxy process and send it commands."""

    def __init__(self, upstream: str, log_path: Path | None = None) -> None:
        self.upstream = upstream
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ProxyProcess:
        root = Path(__file__).resolve().parents[1]
        self._log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faultproxy", "--upstream", self.upstream],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log or subprocess.DEVNULL,
            cwd=root,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            raise RuntimeError(f"fault proxy did not start: {line}")
        self.port = int(line[1])
        return self

    def set(self, mode: str, **params: float | str) -> None:
        """Put ``mode`` in force; returns once the proxy has applied it."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"mode": mode, **params}) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        if reply != "ok":
            raise RuntimeError(f"fault proxy refused {mode}: {reply}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # EOF on the control channel ends the proxy
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc and self.proc.stdout:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    main()
