"""The serving substrate against real servers: local Triton, redis-server, the CLI."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from gateway.features import codec
from gateway.features.loader import load
from gateway.features.redis_store import RedisFeatureStore
from gateway.schema import SCHEMA
from gateway.synth import design_matrix, make_impressions, make_world
from tests.procs import MODEL_REPOSITORY, PYTHON, ROOT, RedisServer, TritonServer, free_port

REPORT = MODEL_REPOSITORY / "build_report.json"


def _rows(n: int, seed: int = 0) -> np.ndarray:
    world = make_world(200, 100, seed=seed)
    return design_matrix(world, make_impressions(world, n, seed=seed))


def _ort(model: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(MODEL_REPOSITORY / model / "1" / "model.onnx"))
    return sess.run(None, {"features": x})[0]


@pytest.mark.parametrize("model", ["ctr", "ctr_fp32"])
def test_triton_http_and_grpc_equal_onnxruntime(triton: TritonServer, model: str) -> None:
    for n in (1, 37, 500):
        x = _rows(n, seed=n)
        expected = _ort(model, x)

        h = httpclient.InferenceServerClient(triton.http_url)
        hin = httpclient.InferInput("features", list(x.shape), "FP32")
        hin.set_data_from_numpy(x, binary_data=True)
        got_http = h.infer(model, [hin]).as_numpy("score")

        g = grpcclient.InferenceServerClient(triton.grpc_url)
        gin = grpcclient.InferInput("features", list(x.shape), "FP32")
        gin.set_data_from_numpy(x)
        got_grpc = g.infer(model, [gin]).as_numpy("score")

        assert got_http.shape == got_grpc.shape == (n, 1)
        assert np.max(np.abs(got_http - expected)) < 1e-5
        assert np.max(np.abs(got_grpc - expected)) < 1e-5


def _triton_counters(triton: TritonServer, model: str) -> tuple[float, float]:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()

    def metric(name: str) -> float:
        m = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.M)
        assert m, f"{name} for {model} not in Triton's metrics"
        return float(m.group(1))

    return metric("nv_inference_request_success"), metric("nv_inference_exec_count")


def test_dynamic_batching_merges_concurrent_requests(triton: TritonServer) -> None:
    req0, exec0 = _triton_counters(triton, "ctr")
    x = _rows(50, seed=3)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            c = grpcclient.InferenceServerClient(triton.grpc_url)
            for _ in range(15):
                inp = grpcclient.InferInput("features", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                c.infer("ctr", [inp])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[:1]
    deadline = time.monotonic() + 5  # Triton updates its counters just after responding
    while True:
        req1, exec1 = _triton_counters(triton, "ctr")
        if req1 - req0 >= 32 * 15 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    requests, executions = req1 - req0, exec1 - exec0
    assert requests == 32 * 15
    assert executions < requests, (executions, requests)


def test_loader_writes_exactly_the_schema_vectors(fresh_redis: RedisServer) -> None:
    summary = load(fresh_redis.url, users=40, items=25, seed=11, chunk=7, progress=False)
    assert (summary.users, summary.items) == (40, 25)
    assert summary.bytes == 40 * SCHEMA.user.nbytes + 25 * SCHEMA.item.nbytes
    world = make_world(40, 25, seed=11)
    r = redis.Redis.from_url(fresh_redis.url)
    gen, version = codec.parse_pointer(r.get(codec.POINTER_KEY))
    assert version == SCHEMA.store_version and gen == summary.generation
    assert r.dbsize() == 40 + 25 + 3  # + the pointer, the generations set, the meta key
    load(fresh_redis.url, users=40, items=25, seed=11, progress=False)  # idempotent
    assert r.dbsize() == 40 + 25 + 3

    async def fetch() -> None:
        store = RedisFeatureStore(fresh_redis.url)
        try:
            await store.check()
            batch = await store.fetch("u7", ["i3", "nope", "i24", "i0"])
            unknown = await store.fetch("ghost", ["i1"])
        finally:
            await store.close()
        assert np.array_equal(batch.user, world.user_vectors[7])
        assert np.array_equal(batch.items[0], world.item_vectors[3])
        assert np.array_equal(batch.items[1], SCHEMA.item.default_vector())
        assert np.array_equal(batch.items[2], world.item_vectors[24])
        assert np.array_equal(batch.items[3], world.item_vectors[0])
        assert (batch.user_missing, batch.items_missing) == (False, 1)
        assert unknown.user_missing and np.array_equal(unknown.user, SCHEMA.user.default_vector())

    import asyncio

    asyncio.run(fetch())


def test_committed_model_report_meets_its_targets() -> None:
    report = json.loads(REPORT.read_text())
    assert report["schema_version"] == SCHEMA.store_version
    m = report["models"]
    assert m["fp32"]["auc"] - m["int8_qdq"]["auc"] < 0.005
    assert report["fallback"]["auc"] >= 0.60
    assert report["data"]["impressions"] >= 200_000
    for f in ("ctr/1/model.onnx", "ctr_fp32/1/model.onnx", "ctr/1/model.cpu.onnx"):
        assert (MODEL_REPOSITORY / f).is_file()


def test_model_build_from_a_small_sample(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            PYTHON,
            "-m",
            "gateway",
            "model",
            "build",
            "--out",
            str(tmp_path),
            "--seed",
            "3",
            "--users",
            "2000",
            "--items",
            "1000",
            "--impressions",
            "30000",
            "--epochs",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "fp32" in out.stdout and "fallback rules" in out.stdout
    report = json.loads((tmp_path / "build_report.json").read_text())
    m = report["models"]
    assert m["fp32"]["auc"] > 0.70
    assert m["fp32"]["auc"] - m["int8_qdq"]["auc"] < 0.01
    assert report["fallback"]["auc"] >= 0.60
    for name in ("fp32", "int8_qdq", "int8_qoperator"):
        assert set(m[name]["latency_ms"]) == {"1", "64", "512"}
    x = _rows(10)
    qdq_path = tmp_path / "ctr" / "1" / "model.onnx"
    qdq = ort.InferenceSession(str(qdq_path))
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(qdq_path)).graph.node)
    assert qdq.run(None, {"features": x})[0].shape == (10, 1)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "gateway", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _one_error_line(p: subprocess.CompletedProcess[str], words: str) -> None:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert words in lines[0], lines[0]


def _copy_repo(tmp_path: Path) -> Path:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(MODEL_REPOSITORY, repo)
    return repo


def test_missing_model_file_is_one_clear_error(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    (repo / "ctr" / "1" / "model.onnx").unlink()
    _one_error_line(_cli("triton-local", "--model-repository", str(repo)), "missing model file")


def test_malformed_config_is_one_clear_error(tmp_path: Path) -> None:
    repo = _copy_repo(tmp_path)
    (repo / "ctr" / "config.pbtxt").write_text('name: "ctr"\nmax_batch_size: [oops\n')
    _one_error_line(_cli("triton-local", "--model-repository", str(repo)), "malformed")


def test_unreachable_redis_is_one_clear_error() -> None:
    _one_error_line(
        _cli(
            "features", "load", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--no-progress"
        ),
        "cannot reach Redis",
    )


def test_taken_port_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        _one_error_line(_cli("triton-local", "--grpc-port", str(port)), f"port {port}")


def test_triton_local_is_ready_fast_says_where_and_stops_on_sigterm() -> None:
    t = TritonServer()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "gateway",
            "triton-local",
            "--http-port",
            str(t.http_port),
            "--grpc-port",
            str(t.grpc_port),
            "--metrics-port",
            str(t.metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        ready_s = time.monotonic() - t0
        assert "ready in" in line and f"gRPC 127.0.0.1:{t.grpc_port}" in line, line
        assert ready_s < 30
        with urllib.request.urlopen(f"http://{t.http_url}/v2/health/ready") as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", t.grpc_port), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
