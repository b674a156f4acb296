"""The processes under test, started on free loopback ports, and their CPU time.

Reuses the servers the test suite starts (``tests/procs.py``): the same redis-server,
local Triton and ``gateway serve``. Adds the naive and minimal apps and a way to run
the gateway from another git revision (the "before" of a change), all as plain
subprocesses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import psutil
from tests.procs import PYTHON, ROOT, GatewayServer, free_port, wait_http


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (Triton's launcher
    starts tritonserver, which starts one Python-backend stub per model instance)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


@dataclass
class NaiveServer:
    """``loadtests/naive_app.py`` under uvicorn, one worker, same loop and parser as the
    gateway, so the comparison isolates the request path, not the server."""

    redis_url: str
    triton_http: str
    model_name: str = "ctr"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> NaiveServer:
        env = dict(os.environ)
        env.update(
            NAIVE_REDIS_URL=self.redis_url,
            NAIVE_TRITON_HTTP=self.triton_http,
            NAIVE_MODEL_NAME=self.model_name,
        )
        self.proc = _uvicorn(["loadtests.naive_app:app"], self.port, env, self.log_path)
        wait_http(f"{self.url}/healthz", timeout, self.proc)
        return self

    def stop(self) -> None:
        _terminate(self.proc)


def _uvicorn(
    app: list[str], port: int, env: dict[str, str], log_path: Path | None
) -> subprocess.Popen:
    """uvicorn with the gateway's server settings (gateway/server.py): uvloop, httptools,
    one worker, no access log."""
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [PYTHON, "-m", "uvicorn", *app, "--port", str(port), "--host", "127.0.0.1",
             "--loop", "uvloop", "--http", "httptools", "--no-access-log",
             "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    finally:
        if log is not subprocess.DEVNULL:
            log.close()  # the child holds its own copy of the descriptor


def _terminate(proc: subprocess.Popen | None) -> None:
    if proc and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class MinimalServer:
    """``loadtests/minimal_app.py`` in one mode: ``triton`` (MGET + Triton gRPC),
    ``triton-http`` (MGET + Triton HTTP) or ``cpu`` (MGET + inline onnxruntime), with the
    gateway's server settings."""

    mode: str
    redis_url: str
    triton_grpc: str = ""
    model_name: str = "ctr"
    triton_http: str = ""
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> MinimalServer:
        if self.mode not in ("triton", "triton-http", "cpu"):
            raise ValueError(
                f"minimal app mode must be triton, triton-http or cpu, not {self.mode!r}"
            )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINIMAL_")}
        env.update(MINIMAL_REDIS_URL=self.redis_url, MINIMAL_MODEL_NAME=self.model_name)
        if self.mode == "triton":
            env["MINIMAL_TRITON_URL"] = self.triton_grpc
        elif self.mode == "triton-http":
            env["MINIMAL_TRITON_URL"] = self.triton_http
        app = f"loadtests.minimal_app:create_{self.mode.replace('-', '_')}_app"
        self.proc = _uvicorn(["--factory", app], self.port, env, self.log_path)
        wait_http(f"{self.url}/healthz", timeout, self.proc)
        return self

    def stop(self) -> None:
        _terminate(self.proc)


def export_src(ref: str, dest: Path, only: list[str] | None = None) -> Path:
    """Write ``src/`` as of git revision ``ref`` under ``dest``; return the src folder.

    With ``only`` (paths under src/gateway), take today's working tree and put just those
    files back as they were at ``ref``: the before/after of one change, isolated from
    other uncommitted work. The gateway started with that folder first on PYTHONPATH
    runs the old code with today's dependencies.
    """
    if only:
        shutil.copytree(ROOT / "src" / "gateway", dest / "src" / "gateway")
        for path in only:
            old = subprocess.run(
                ["git", "show", f"{ref}:{path}"], cwd=ROOT, check=True, capture_output=True
            ).stdout
            (dest / path).write_bytes(old)
        return dest / "src"
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "src/gateway"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def start_gateway(
    env: dict[str, str], log_dir: Path, name: str, src: Path | None = None, workers: int = 1
) -> GatewayServer:
    """``gateway serve`` with ``env``; with ``src``, the code from that folder."""
    env = dict(env)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")])
    gw = GatewayServer(env=env, workers=workers, log_path=log_dir / f"{name}.log")
    return gw.start(timeout=60, ready=True)
