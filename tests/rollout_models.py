"""Test-only model versions for the rollout tests, built into a copy of the repository.

* :func:`add_nan_version`: an ONNX graph with the model's signature whose every score is
  NaN (a broken retrain): served by Triton and the embedded backend alike.
* :func:`add_slow_version`: the primary's ONNX file behind a Python-backend ``model.py``
  that sleeps before scoring (a slow model): the local Triton serves a version folder's
  own ``model.py`` (triton_local/server.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from gateway.schema import SCHEMA
from gateway.triton_local.server import PY_MODEL_TEMPLATE


def add_nan_version(repo: Path, version: int, model: str = "ctr") -> Path:
    """``{repo}/{model}/{version}/model.onnx``: score = sum(features) x NaN."""
    vdir = repo / model / str(version)
    vdir.mkdir(parents=True)
    width = SCHEMA.input_width
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["features", "axes"], ["s"], keepdims=1),
            helper.make_node("Mul", ["s", "nan"], ["score"]),
        ],
        "nan_model",
        [helper.make_tensor_value_info(SCHEMA.input_name, TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info(SCHEMA.output_name, TensorProto.FLOAT, ["n", 1])],
        [
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "nan"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, vdir / "model.onnx")
    return vdir


def add_slow_version(
    repo: Path, version: int, delay_ms: float, source: int = 1, model: str = "ctr"
) -> Path:
    """Version ``source``'s model, answering ``delay_ms`` later (local Triton only)."""
    vdir = repo / model / str(version)
    vdir.mkdir(parents=True)
    shutil.copyfile(repo / model / str(source) / "model.onnx", vdir / "model.onnx")
    code = PY_MODEL_TEMPLATE.read_text()
    marker = "    def execute(self, requests):\n"
    assert marker in code
    code = code.replace(
        marker, marker + f"        import time\n\n        time.sleep({delay_ms / 1e3!r})\n", 1
    )
    (vdir / "model.py").write_text(code)
    return vdir
