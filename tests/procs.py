"""Real servers for the tests: redis-server, the local Triton, the gateway.

Each is a subprocess on free loopback ports, started by a fixture in conftest.py
and stopped at teardown. No mocks: these are the binaries production runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPOSITORY = ROOT / "model_repository"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, status: int = 200
) -> None:
    """Poll ``url`` until it answers ``status``; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == status:
                    return
                last = r.status
        except urllib.error.HTTPError as exc:
            last = exc.code
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not answering {status} after {timeout} s (last: {last})")


class _LogMixin:
    log_path: Path | None
    _log: Any

    def _open_log(self) -> Any:
        _close_log(self)
        if self.log_path is None:
            return subprocess.DEVNULL
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        return self._log


def _close_log(server: Any) -> None:
    if getattr(server, "_log", None) is not None:
        server._log.close()
        server._log = None


def _stop(server: Any, sig: int, timeout: float) -> int | None:
    """Signal the process, wait, SIGKILL if it overstays; close its log."""
    proc = server.proc
    try:
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                return int(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                proc.kill()
                return int(proc.wait())
        return proc.returncode if proc else None
    finally:
        _close_log(server)


@dataclass
class RedisServer:
    """A redis-server on a free port, nothing on disk."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError("redis-server did not start")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


@dataclass
class TritonServer(_LogMixin):
    """``gateway triton-local`` on free ports."""

    repo: Path = MODEL_REPOSITORY
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _log: Any = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 60) -> TritonServer:
        log = self._open_log()
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "gateway",
                "triton-local",
                "--model-repository",
                str(self.repo),
                "--http-port",
                str(self.http_port),
                "--grpc-port",
                str(self.grpc_port),
                "--metrics-port",
                str(self.metrics_port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_http(f"http://{self.http_url}/v2/health/ready", timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        return _stop(self, sig, timeout)

    def kill_tree(self) -> None:
        """SIGKILL the launcher and the tritonserver it started (a crash, not a stop)."""
        if self.proc is None:
            return
        # "--" so pkill does not read the pattern as one of its own options.
        subprocess.run(["pkill", "-KILL", "-f", "--", f"--grpc-port={self.grpc_port}"], check=False)
        self.proc.kill()
        self.proc.wait(10)
        _close_log(self)


@dataclass
class GatewayServer(_LogMixin):
    """``gateway serve`` on a free port with the given GATEWAY_* environment."""

    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    workers: int = 1
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    _log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30, ready: bool = False) -> GatewayServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env.update(self.env)
        log = self._open_log()
        self.proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "gateway",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        wait_http(f"{self.url}/healthz", timeout, self.proc)
        if ready:
            wait_http(f"{self.url}/readyz", timeout, self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        return _stop(self, sig, timeout)
