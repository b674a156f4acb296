"""The model's signature against the schema: refused at start (one line, exit 2); when the
model server is down at start, checked when it comes up, with the fallback answering
and /readyz saying why while they differ."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from gateway.inference.base import ModelSignature, TensorSpec, signature_mismatch
from gateway.schema import SCHEMA, builtin_schema_path, load_schema
from tests.procs import PYTHON, ROOT, GatewayServer, RedisServer, TritonServer, free_port


def _schema(tmp_path: Path, old: str, new: str) -> Path:
    path = tmp_path / "schema.toml"
    text = builtin_schema_path().read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return path


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [PYTHON, "-m", "gateway", "serve", "--port", str(free_port())],
        env={**base, **env}, capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_signature_mismatch_names_what_differs() -> None:
    ok = ModelSignature(
        (TensorSpec("features", "FP32", (-1, 24)),), (TensorSpec("score", "FP32", (-1, 1)),)
    )
    assert signature_mismatch(SCHEMA, ok, "ctr") is None
    cases = [
        (ModelSignature((TensorSpec("features", "FP32", (-1, 30)),), ok.outputs), "[-1, 30]"),
        (ModelSignature((TensorSpec("features", "FP16", (-1, 24)),), ok.outputs), "FP16"),
        (ModelSignature((TensorSpec("x", "FP32", (-1, 24)),), ok.outputs), "'x'"),
        (ModelSignature(ok.inputs * 2, ok.outputs), "takes inputs"),
        (ModelSignature(ok.inputs, (TensorSpec("prob", "FP32", (-1, 1)),)), "no output 'score'"),
    ]
    for sig, words in cases:
        line = signature_mismatch(SCHEMA, sig, "ctr")
        assert line is not None and words in line and "\n" not in line, line


def test_embedded_model_that_does_not_fit_the_schema_refuses_to_start(tmp_path: Path) -> None:
    bad = _schema(tmp_path, 'input = "features"', 'input = "inputs"')
    proc = _serve({"GATEWAY_SCHEMA_FILE": str(bad)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: model ctr does not match schema") and "'inputs'" in lines[0]


def test_a_wider_schema_than_the_model_refuses_to_start(
    tmp_path: Path, fresh_redis: RedisServer
) -> None:
    bad = _schema(
        tmp_path,
        '{ name = "activity_log", default = 0.0 },',
        '{ name = "activity_log", default = 0.0 }, { name = "age" },',
    )
    assert load_schema(bad).input_width == 25
    proc = _serve({"GATEWAY_SCHEMA_FILE": str(bad), "GATEWAY_REDIS_URL": fresh_redis.url})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "FP32[-1, 25]" in lines[0] and "FP32[-1, 24]" in lines[0], lines[0]


def test_a_bad_schema_file_is_one_line(tmp_path: Path) -> None:
    for text, words in [
        ("version = [", "not valid TOML"),
        ('version = "1"\n[model]\ninput = "x"\noutput = "y"\n', "user: missing table"),
        (builtin_schema_path().read_text().replace('kind = "hour"', 'kind = "hours"'), "kind"),
        (builtin_schema_path().read_text().replace("default = 0.05", 'default = "x"'),
         "item.features[1].default: must be a number"),
    ]:  # fmt: skip
        path = tmp_path / "s.toml"
        path.write_text(text)
        proc = _serve({"GATEWAY_SCHEMA_FILE": str(path)})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert str(path) in lines[0] and words in lines[0], lines[0]


def _triton_requests(t: TritonServer) -> float:
    text = httpx.get(t.metrics_url, timeout=5).text
    total = 0.0
    for m in re.finditer(
        r'^nv_inference_request_(?:success|failure){model="ctr",version="1"} (\S+)$', text, re.M
    ):
        total += float(m.group(1))
    return total


@pytest.mark.slow
def test_triton_down_at_start_then_up_with_another_signature(
    redis_server: RedisServer, gateway_factory: Callable[..., GatewayServer], tmp_path: Path
) -> None:
    """Triton is down when the gateway starts: it starts (the check waits for Triton).
    Triton comes up serving a model whose output is not the schema's: the fallback
    answers, Triton gets no inference request, /readyz says why. With the schema's own
    names (a second gateway), the same Triton serves."""
    bad = _schema(tmp_path, 'output = "score"', 'output = "probability"')
    triton = TritonServer(log_path=tmp_path / "triton.log")
    gw = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_SCHEMA_FILE": str(bad),
            "GATEWAY_HEALTH_INTERVAL_S": "0.2",
        },
        ready=True,
    )
    req = {"user_id": "u1", "item_ids": ["i1", "i2"]}
    with httpx.Client(timeout=5) as http:
        assert http.post(f"{gw.url}/predict", json=req).json()["fallback"] is not None
        triton.start()
        try:
            deadline = time.monotonic() + 15
            while True:
                body = http.get(f"{gw.url}/readyz").json()
                error = body.get("dependencies", {}).get("model", {}).get("error", "")
                if "does not match schema" in error:
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            assert body["status"] == "degraded" and "'probability'" in error, body
            before = _triton_requests(triton)
            for _ in range(5):
                r = http.post(f"{gw.url}/predict", json=req).json()
                assert r["fallback"] == {"reason": "inference_error", "stage": "inference"}, r
            assert _triton_requests(triton) == before  # the mismatched model was not called
            good = gateway_factory(
                {"GATEWAY_REDIS_URL": redis_server.url, "GATEWAY_TRITON_URL": triton.grpc_url},
                ready=True,
            )
            assert http.post(f"{good.url}/predict", json=req).json()["fallback"] is None
        finally:
            triton.stop()
