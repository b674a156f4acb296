"""``gateway triton-local``: the real Triton server, on CPU, over the production repository.

The ``nvidia-pytriton`` wheel ships a ``tritonserver`` binary (Triton 2.51) with only
the Python backend. This module:

1. parses every ``<model>/config.pbtxt`` in the repository with Triton's own protobuf
   schema, and checks each version folder holds ``model.onnx``;
2. writes a temporary repository in which each ONNX Runtime model becomes a Python-
   backend model (``pybackend_model.py``) that runs the *same* ONNX file with
   onnxruntime, keeping max_batch_size, dynamic batching, the queue policy and warmup,
   and moving instance groups to KIND_CPU (the TensorRT accelerator is GPU-only);
3. lays out a backend directory with the Python backend and the stub for this
   interpreter, sets LD_LIBRARY_PATH and PYTHONPATH the way the binary needs them;
4. starts the server, waits for ``/v2/health/ready``, prints where it listens, and
   forwards SIGTERM/SIGINT to it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import ConfigError, ModelRepositoryError, PortInUse

PY_MODEL_TEMPLATE = Path(__file__).with_name("pybackend_model.py")
# Triton answers /v2/health/ready within a few seconds here; the bar is 30 s.
READY_TIMEOUT_S = 30.0
# How long Triton may take to drain in-flight requests after SIGTERM before we SIGKILL.
EXIT_TIMEOUT_S = 10


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
            shutil.copyfile(PY_MODEL_TEMPLATE, vdir / "model.py")
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


@contextmanager
def prepared(repo: Path) -> Iterator[tuple[Path, Path, list[str]]]:
    """Check ``repo`` and yield (local repository, backend dir, model names); clean up after."""
    configs = load_repository(repo)
    with tempfile.TemporaryDirectory(prefix="triton-local-") as tmp:
        local_repo = Path(tmp) / "models"
        backends = Path(tmp) / "backends"
        write_local_repository(repo, configs, local_repo)
        write_backend_dir(backends)
        yield local_repo, backends, sorted(configs)


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
    with prepared(repo) as (local_repo, backends, models):
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
        proc = subprocess.Popen(cmd, env=server_env(), start_new_session=True)
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
            if proc.poll() is None and not stopping:
                print(
                    f"triton-local ready in {time.monotonic() - t0:.1f} s: "
                    f"HTTP http://{host}:{ports.http}, gRPC {host}:{ports.grpc}, "
                    f"metrics http://{host}:{ports.metrics}/metrics; models: {', '.join(models)}",
                    flush=True,
                )
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    continue
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
