"""``gateway triton-local``: the real Triton server, on CPU, over the production repository.

The ``nvidia-pytriton`` wheel ships a ``tritonserver`` binary (Triton 2.51) with only
the Python backend. This module:

1. parses every ``<model>/config.pbtxt`` in the repository with Triton's own protobuf
   schema, and checks each version folder holds ``model.onnx``;
2. writes a temporary repository in which each ONNX Runtime model becomes a Python-
   backend model (``pybackend_model.py``) that runs the *same* ONNX file with
   onnxruntime, keeping max_batch_size, dynamic batching, the queue policy, the
   version policy and warmup, and moving instance groups to KIND_CPU (the TensorRT
   accelerator is GPU-only); a version folder holding its own ``model.py`` is served by
   that instead;
3. lays out a backend directory with the Python backend and the stub for this
   interpreter, sets LD_LIBRARY_PATH and PYTHONPATH the way the binary needs them;
4. starts the server, waits for ``/v2/health/ready``, prints where it listens, and
   forwards SIGTERM/SIGINT to it.

Nothing outlives the launcher, however it ends (normal exit, SIGTERM, SIGKILL):

- tritonserver gets ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` between fork and exec, so the
  kernel kills it when the launcher dies, SIGKILL included. (The signal follows the
  death of the *thread* that forked: ``run`` starts the server from the main thread,
  which lives as long as the process. A set-uid binary would clear it; tritonserver is
  none.)
- Its Python-backend stubs are its children and do not get that signal; they notice
  their parent is gone only after someone reaps it, which this machine's pid 1 took
  ~2 s to do and a container's pid 1 may never do. The temporary folder, too, must go
  when nothing is left to remove it. Both are the job of a janitor
  (``gateway.triton_local.janitor``): a detached process started before the server,
  reading a pipe whose only write end the launcher holds. EOF on that pipe is the
  kernel telling it the launcher is gone, by any death; it then SIGKILLs what is left
  of this server (found by the folder in their command lines), unlinks the stubs'
  shared memory and removes the folder. At a normal exit the launcher does the same
  sweep itself first, so the folder is gone when the launcher's exit status is.

Why not sweep stale folders at the next start instead: there may be no next start (a
CI machine, a developer's laptop), the stale server would keep holding its ports (and
the next start would fail on them), and telling a dead launcher's folder from a live
one's needs a pid file and its own races. The janitor leaves nothing behind at all.
What is left open: a SIGKILL in the few milliseconds between creating the folder and
starting the janitor leaks the (small) folder.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError, ModelRepositoryError, PortInUse
from gateway.triton_local.janitor import server_processes, shm_regions, sweep

PY_MODEL_TEMPLATE = Path(__file__).with_name("pybackend_model.py")
# Triton answers /v2/health/ready within a few seconds here; the bar is 30 s.
READY_TIMEOUT_S = 30.0
# How long Triton may take to drain in-flight requests after SIGTERM before we SIGKILL.
EXIT_TIMEOUT_S = 10
# How often the janitor is told the stubs' shared-memory regions anew: a scan of /proc
# took 1 ms here (~100 processes); stubs change only when the Python backend restarts
# one that crashed.
REGION_RESCAN_S = 5.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise ConfigError(
            "the local Triton needs the nvidia-pytriton wheel: "
            "pip install 'inference-gateway[triton]'"
        ) from exc
    return Path(pytriton.__file__).parent


def _onnx_backends() -> set[str]:
    return {"onnxruntime", "onnxruntime_onnx"}


def load_repository(repo: Path) -> dict[str, object]:
    """Parse and check every model config in ``repo``; return {name: ModelConfig}."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    if not repo.is_dir():
        raise ModelRepositoryError(f"model repository {repo} does not exist or is not a folder")
    configs: dict[str, object] = {}
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir()):
        cfg_path = model_dir / "config.pbtxt"
        if not cfg_path.is_file():
            continue
        cfg = model_config_pb2.ModelConfig()
        try:
            text_format.Parse(cfg_path.read_text(), cfg)
        except text_format.ParseError as exc:
            raise ModelRepositoryError(f"malformed {cfg_path}: {exc}") from exc
        if cfg.name and cfg.name != model_dir.name:
            raise ModelRepositoryError(
                f"{cfg_path}: name {cfg.name!r} does not match its folder {model_dir.name!r}"
            )
        backend = cfg.backend or cfg.platform
        if backend not in _onnx_backends():
            raise ModelRepositoryError(
                f"{cfg_path}: backend {backend!r} is not served locally (only ONNX Runtime models)"
            )
        versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if not versions:
            raise ModelRepositoryError(f"missing model file: {model_dir} has no version folder")
        for v in versions:
            if not (v / "model.onnx").is_file():
                raise ModelRepositoryError(f"missing model file: {v / 'model.onnx'}")
        configs[model_dir.name] = cfg
    if not configs:
        raise ModelRepositoryError(f"no model with a config.pbtxt in {repo}")
    return configs


def to_local_config(cfg: object) -> str:
    """The Python-backend form of a production config, as config.pbtxt text."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    local = model_config_pb2.ModelConfig()
    local.CopyFrom(cfg)
    local.ClearField("platform")
    local.backend = "python"
    local.ClearField("optimization")  # TensorRT is a GPU execution accelerator
    for group in local.instance_group:
        group.kind = model_config_pb2.ModelInstanceGroup.KIND_CPU
        del group.gpus[:]
    return str(text_format.MessageToString(local))


def write_local_repository(repo: Path, configs: dict[str, object], dest: Path) -> None:
    """Lay out the temporary Python-backend repository in ``dest``."""
    for name, cfg in configs.items():
        model_dir = dest / name
        model_dir.mkdir(parents=True)
        (model_dir / "config.pbtxt").write_text(to_local_config(cfg))
        for v in (p for p in (repo / name).iterdir() if p.is_dir() and p.name.isdigit()):
            vdir = model_dir / v.name
            vdir.mkdir()
            # A version folder may bring its own Python-backend model.py (a model that
            # is more than an ONNX graph; the rollout tests' slow version is one): it is
            # served as it is. Any other runs its model.onnx through the template.
            own = v / "model.py"
            shutil.copyfile(own if own.is_file() else PY_MODEL_TEMPLATE, vdir / "model.py")
            (vdir / "model.onnx").symlink_to((v / "model.onnx").resolve())


def write_backend_dir(dest: Path) -> None:
    """The Python backend and this interpreter's stub, side by side, as Triton wants them."""
    root = _pytriton_root() / "tritonserver"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigError(f"nvidia-pytriton has no Python backend stub for Python {ver}")
    py = dest / "python"
    py.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            (py / f.name).symlink_to(f)
    (py / stub.name).symlink_to(stub)


def server_env() -> dict[str, str]:
    """Environment for the binary and its Python stub (see the module docstring)."""
    env = dict(os.environ)
    libs = [
        str(sysconfig.get_config_var("LIBDIR")),
        str(_pytriton_root().parent / "nvidia_pytriton.libs"),
    ]
    if env.get("LD_LIBRARY_PATH"):
        libs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
    # The stub runs the base interpreter, so it must be told where the venv's packages are.
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    if env.get("PYTHONPATH"):
        paths[env["PYTHONPATH"]] = None
    env["PYTHONPATH"] = os.pathsep.join(paths)
    # The stub's embedded interpreter finds its prefix from the first python on PATH
    # (the same thing pytriton does): put this interpreter's bin folder first.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the servers do: connections of a previous run lingering in TIME_WAIT do not
        # make a port taken; only a listening socket does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"port {port} on {host} is already in use") from exc


def _start_janitor(root: Path) -> int:
    """Start the janitor for ``root``; return the pipe's write end, to hold until exit."""
    read_end, write_end = os.pipe()  # both close-on-exec: no other child inherits them
    try:
        janitor = subprocess.Popen(
            [sys.executable, "-m", "gateway.triton_local.janitor", str(root)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C or hang-up does not reach it.
            start_new_session=True,
        )
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    # The janitor forks and its first process exits at once (see janitor.py).
    janitor.wait()
    return write_end


@dataclass
class _Janitor:
    """The launcher's end of the janitor's pipe."""

    root: Path
    pipe: int
    told: set[bytes]

    def tell_regions(self) -> None:
        """Send the janitor the shared-memory regions of the stubs running now."""
        new = shm_regions(server_processes(self.root)) - self.told
        if new:
            self.told |= new
            try:
                os.write(self.pipe, b"".join(r + b"\n" for r in sorted(new)))
            except OSError:  # the janitor is gone: nothing to tell, our own sweep remains
                pass


@contextmanager
def prepared(repo: Path) -> Iterator[tuple[Path, Path, list[str], _Janitor]]:
    """Check ``repo``; yield (local repository, backend dir, model names, janitor's pipe);
    clean up after.

    Clean-up SIGKILLs whatever server processes are left under the folder and removes it;
    the janitor does the same if this process dies without getting here.
    """
    configs = load_repository(repo)
    root = Path(tempfile.mkdtemp(prefix="triton-local-"))
    try:
        janitor = _Janitor(root, _start_janitor(root), set())
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        local_repo = root / "models"
        backends = root / "backends"
        write_local_repository(repo, configs, local_repo)
        write_backend_dir(backends)
        yield local_repo, backends, sorted(configs), janitor
    finally:
        sweep(root, janitor.told)
        os.close(janitor.pipe)  # EOF: the janitor finds nothing left and exits


def _die_with_parent() -> Callable[[], None]:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies."""
    # Looked up here, in the parent: the child between fork and exec should do no more
    # than call it.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        # The parent may have died before prctl: then nobody would ever send the signal.
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _ready(host: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def run(repo: Path, ports: Ports, host: str = "127.0.0.1", log_verbose: int = 0) -> int:
    """Run Triton in the foreground until SIGTERM/SIGINT; return its exit status."""
    for p in (ports.http, ports.grpc, ports.metrics):
        check_port_free(host, p)
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if threading.current_thread() is not threading.main_thread():
        # PR_SET_PDEATHSIG fires when the thread that forked exits, not the process.
        raise RuntimeError("triton_local.run must be called from the main thread")
    with prepared(repo) as (local_repo, backends, models, janitor):
        cmd = [
            str(binary),
            f"--model-repository={local_repo}",
            f"--backend-directory={backends}",
            f"--http-address={host}",
            f"--http-port={ports.http}",
            f"--grpc-address={host}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-address={host}",
            f"--metrics-port={ports.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
            f"--log-verbose={log_verbose}",
        ]
        t0 = time.monotonic()
        # Its own session, so a terminal's Ctrl-C reaches only the launcher, which forwards
        # it; dies with the launcher (see the module docstring).
        proc = subprocess.Popen(
            cmd, env=server_env(), start_new_session=True, preexec_fn=_die_with_parent()
        )
        stopping = False

        def _forward(signum: int, _frame: object) -> None:
            nonlocal stopping
            stopping = True
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

        old = {s: signal.signal(s, _forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while not _ready(host, ports.http):
                if proc.poll() is not None or stopping:
                    break
                if time.monotonic() - t0 > READY_TIMEOUT_S:
                    proc.send_signal(signal.SIGTERM)
                    raise ConfigError(f"Triton was not ready within {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
            # Before the ready line: whoever reads it may kill us all the next moment.
            janitor.tell_regions()
            if proc.poll() is None and not stopping:
                print(
                    f"triton-local ready in {time.monotonic() - t0:.1f} s: "
                    f"HTTP http://{host}:{ports.http}, gRPC {host}:{ports.grpc}, "
                    f"metrics http://{host}:{ports.metrics}/metrics; models: {', '.join(models)}",
                    flush=True,
                )
            while True:
                try:
                    rc = proc.wait(timeout=REGION_RESCAN_S)
                    break
                except subprocess.TimeoutExpired:
                    janitor.tell_regions()  # the backend restarts a stub that died
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=EXIT_TIMEOUT_S + 5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for s, h in old.items():
                signal.signal(s, h)
        if stopping:
            return 0
        if rc != 0:
            raise ConfigError(f"tritonserver exited with status {rc} (its log is above)")
        return rc
