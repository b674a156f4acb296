"""The processes under test, started on free loopback ports, and their CPU time.

Reuses the servers the test suite starts (``tests/procs.py``): the same redis-server,
local Triton and ``gateway serve``. Adds the naive app and a way to run the gateway
from another git revision (the "before" of a change), both as plain subprocesses.
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
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "uvicorn", "loadtests.naive_app:app", "--port", str(self.port),
             "--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools",
             "--no-access-log", "--log-level", "warning"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        wait_http(f"{self.url}/healthz", timeout, self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
