"""``gateway triton-local`` leaves nothing behind: no server, no stub, no port, no folder.

Real processes only: the launcher, the tritonserver it starts, the Python-backend stubs
tritonserver starts, and the janitor. The launcher is killed the ways it dies in life.
"""

from __future__ import annotations

import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.procs import TritonServer

# SIGKILLed processes vanish within 0.5 s here (the janitor sweeps as soon as the
# launcher's pipe reaches EOF); 10 s is the brief's "a few seconds" with slack for a
# loaded 2-core machine.
GONE_WITHIN_S = 10.0


@dataclass
class Tree:
    """What one running ``gateway triton-local`` consists of."""

    launcher: psutil.Process
    server: psutil.Process
    stubs: list[psutil.Process]
    root: Path  # the temporary repository folder
    shm: list[Path]  # the stubs' shared-memory regions


def _tree(t: TritonServer) -> Tree:
    assert t.proc is not None and t.log_path is not None
    # The launcher prints its ready line once it has told the janitor the stubs' regions.
    deadline = time.monotonic() + 10
    while "triton-local ready" not in t.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no ready line from the launcher"
        time.sleep(0.05)
    launcher = psutil.Process(t.proc.pid)
    servers = [p for p in launcher.children() if p.name() == "tritonserver"]
    assert len(servers) == 1, launcher.children()
    server = servers[0]
    repo = next(a for a in server.cmdline() if a.startswith("--model-repository="))
    root = Path(repo.split("=", 1)[1]).parent
    assert root.name.startswith("triton-local-") and root.is_dir(), root
    # The stubs start with the models; /v2/health/ready (which start() waited for) means
    # every model instance is loaded, so every stub is up.
    stubs = [p for p in server.children() if "triton_python_backend_stub" in p.name()]
    assert stubs, "no Python-backend stub under tritonserver"
    shm = [Path("/dev/shm") / p.cmdline()[2] for p in stubs]
    assert all(s.exists() for s in shm), shm
    return Tree(launcher, server, stubs, root, shm)


def _alive(p: psutil.Process) -> bool:
    # is_running() also checks the start time, so a reused pid is not mistaken for it;
    # a zombie is dead (it holds no port, no file), only not yet reaped.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _naming(root: Path) -> list[psutil.Process]:
    """Live processes whose command line names ``root`` (the janitor's included)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(str(root) in a for a in p.info["cmdline"] or ()) and _alive(p):
            found.append(p)
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As a server binds: a connection of the old one in TIME_WAIT does not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
        return True


def _assert_all_gone(tree: Tree, t: TritonServer, within: float) -> float:
    """Wait until nothing of ``tree`` is left; return how long it took."""
    t0 = time.monotonic()
    ports = (t.http_port, t.grpc_port, t.metrics_port)
    while True:
        left = {
            "server/stubs": [p.pid for p in (tree.server, *tree.stubs) if _alive(p)],
            "processes naming the folder": [p.pid for p in _naming(tree.root)],
            "ports in use": [p for p in ports if not _port_free(p)],
            "folder": [str(tree.root)] if tree.root.exists() else [],
            "shared memory": [str(s) for s in tree.shm if s.exists()],
        }
        if not any(left.values()):
            return time.monotonic() - t0
        if time.monotonic() - t0 > within:
            pytest.fail(f"left behind after {within} s: {left}")
        time.sleep(0.05)


def test_sigkill_of_the_launcher_takes_server_stubs_ports_and_folder(tmp_path: Path) -> None:
    t = TritonServer(log_path=tmp_path / "triton.log").start()
    try:
        tree = _tree(t)
        tree.launcher.send_signal(signal.SIGKILL)  # the launcher only
        assert t.proc is not None
        assert t.proc.wait(10) == -signal.SIGKILL
        took = _assert_all_gone(tree, t, GONE_WITHIN_S)
        print(f"all gone {took:.2f} s after the launcher's SIGKILL")
    finally:
        t.kill_tree()


def test_sigkill_of_the_whole_tree_still_removes_the_folder(tmp_path: Path) -> None:
    """As tests/test_faults.py's kill_tree does (and a supervisor killing a process tree):
    the janitor is not in the launcher's tree, so it survives and cleans up."""
    t = TritonServer(log_path=tmp_path / "triton.log").start()
    try:
        tree = _tree(t)
        procs = [tree.launcher, *tree.launcher.children(recursive=True)]
        for p in procs:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)
        _assert_all_gone(tree, t, GONE_WITHIN_S)
    finally:
        t.kill_tree()


def test_sigterm_exits_0_with_everything_gone_at_exit(tmp_path: Path) -> None:
    t = TritonServer(log_path=tmp_path / "triton.log").start()
    try:
        tree = _tree(t)
        assert t.stop(signal.SIGTERM) == 0
        # The launcher sweeps before it exits: nothing of the server is left once it has.
        assert not tree.root.exists()
        assert not any(_alive(p) for p in (tree.server, *tree.stubs))
        assert not any(s.exists() for s in tree.shm)
        # Only the janitor may still be finishing (it wakes at the launcher's exit).
        _assert_all_gone(tree, t, GONE_WITHIN_S)
    finally:
        t.kill_tree()
