"""``gateway model build``: train the CTR model, export ONNX FP32, quantize to INT8, report.

Steps, all from one seed:

1. Draw the world and impressions (:mod:`gateway.synth`), split off 20 % held out.
2. Train a 24→64→32→1 MLP with Adam in NumPy. The project needs no deep-learning
   framework at run time, and a framework wheel is gigabytes here; an MLP this size
   trains in seconds on two cores with hand-written backprop.
3. Export it to ONNX (MatMul/Add/Relu/Sigmoid; the input standardisation is folded
   into the first layer), then quantize it with onnxruntime's static quantizer in QDQ
   form, calibrated on training rows: the form TensorRT and onnxruntime's GPU
   providers consume. Also write the QOperator variant for CPU serving.
4. Measure AUC and log-loss of every variant and of the fallback rules on the held-out
   split, and onnxruntime CPU latency per batch of 1, 64 and 512 rows; write
   ``build_report.json`` and print a table.
5. Write the version's drift reference (:func:`write_profile`, drift.py): bins and
   training shares of every input column and of the served model's scores.

``gateway model profile`` redoes step 5 alone for a version already built, from the same
seeded training rows (read from ``build_report.json``), without touching a model file.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gateway.drift import build_profile, category_columns, profile_path
from gateway.errors import ConfigError
from gateway.fallback import FallbackScorer
from gateway.schema import SCHEMA, FeatureSchema
from gateway.synth import design_matrix, make_impressions, make_world, split

MODEL_NAME = "ctr"
FP32_MODEL_NAME = "ctr_fp32"
# The CPU deployments' pick, written beside the Triton model file (Triton loads only
# model.onnx from a version folder and ignores other files there).
CPU_MODEL_FILE = "model.cpu.onnx"
HIDDEN = (64, 32)
LATENCY_BATCHES = (1, 64, 512)


@dataclass
class BuildConfig:
    out: Path
    seed: int = 7
    users: int = 10_000
    items: int = 5_000
    impressions: int = 250_000
    epochs: int = 4
    batch_size: int = 512
    learning_rate: float = 3e-3
    calibration_rows: int = 2_000
    latency_repeats: int = 200
    schema: FeatureSchema = SCHEMA
    # None: rebuild the repository (ctr/1, ctr_fp32/1, build_report.json). A number: add
    # ctr/<version>/ only (model.onnx, model.cpu.onnx and its build_report.json), for a
    # rollout (README "Shipping a new model"); an existing version is never overwritten.
    version: int | None = None


def _log(msg: str) -> None:
    print(f"[model build] {msg}", file=sys.stderr, flush=True)


# -- metrics -------------------------------------------------------------------------


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged.

    Written here instead of pulling in scikit-learn for one function.
    """
    y = np.asarray(y, dtype=np.float64)
    order = np.argsort(score, kind="mergesort")
    s = np.asarray(score)[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = 0.5 * (i + j) + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    pos = y.sum()
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((r[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


# -- training ------------------------------------------------------------------------


@dataclass
class Mlp:
    """Trained weights: inputs are standardised with (mean, std), then the layers apply."""

    mean: np.ndarray
    std: np.ndarray
    layers: list[tuple[np.ndarray, np.ndarray]]


def train_mlp(x: np.ndarray, y: np.ndarray, cfg: BuildConfig) -> Mlp:
    """Train the MLP with Adam on binary cross-entropy."""
    rng = np.random.default_rng(cfg.seed + 3)
    mean = x.mean(axis=0)
    std = x.std(axis=0) + 1e-6
    xs = ((x - mean) / std).astype(np.float32)
    sizes = (x.shape[1], *HIDDEN, 1)
    params: list[list[np.ndarray]] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        w = (rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        params.append([w, np.zeros(fan_out, dtype=np.float32)])
    m = [[np.zeros_like(p) for p in layer] for layer in params]
    v = [[np.zeros_like(p) for p in layer] for layer in params]
    b1, b2, eps = 0.9, 0.999, 1e-8
    step = 0
    n = len(xs)
    for epoch in range(cfg.epochs):
        perm = rng.permutation(n)
        total = 0.0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb, yb = xs[idx], y[idx]
            # forward
            acts = [xb]
            h = xb
            for k, (w, b) in enumerate(params):
                z = h @ w + b
                h = np.maximum(z, 0.0) if k < len(params) - 1 else z
                acts.append(h)
            logit = acts[-1][:, 0]
            p = 1.0 / (1.0 + np.exp(-logit))
            total += float(log_loss(yb, p)) * len(idx)
            # backward (binary cross-entropy on the logit)
            grad = ((p - yb) / len(idx))[:, None].astype(np.float32)
            step += 1
            for k in range(len(params) - 1, -1, -1):
                w, _ = params[k]
                gw = acts[k].T @ grad
                gb = grad.sum(axis=0)
                if k > 0:
                    grad = (grad @ w.T) * (acts[k] > 0)
                for j, g in enumerate((gw, gb)):
                    m[k][j] = b1 * m[k][j] + (1 - b1) * g
                    v[k][j] = b2 * v[k][j] + (1 - b2) * g * g
                    mh = m[k][j] / (1 - b1**step)
                    vh = v[k][j] / (1 - b2**step)
                    params[k][j] -= (cfg.learning_rate * mh / (np.sqrt(vh) + eps)).astype(
                        np.float32
                    )
        _log(f"epoch {epoch + 1}/{cfg.epochs}: train log-loss {total / n:.4f}")
    return Mlp(mean.astype(np.float32), std.astype(np.float32), [(w, b) for w, b in params])


# -- ONNX ----------------------------------------------------------------------------


def to_onnx(mlp: Mlp, path: Path, schema: FeatureSchema = SCHEMA) -> None:
    """Write the MLP as an ONNX graph with a dynamic batch dimension.

    The standardisation stays an explicit Sub/Mul in front of the first MatMul rather
    than folded into its weights: INT8 quantizes each activation tensor with one scale,
    and raw inputs span 0.02 (ctr_prior) to 11 (popularity_log), which would round
    the small-range features away (AUC drop 0.006 folded, 0.001 explicit).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(mlp.mean, "input_mean"),
        numpy_helper.from_array((1.0 / mlp.std).astype(np.float32), "input_inv_std"),
    ]
    nodes = [
        helper.make_node("Sub", [schema.input_name, "input_mean"], ["centered"], name="center"),
        helper.make_node("Mul", ["centered", "input_inv_std"], ["standardized"], name="scale"),
    ]
    cur = "standardized"
    layers = mlp.layers
    for k, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{k}"), numpy_helper.from_array(b, f"B{k}")]
        nodes.append(helper.make_node("MatMul", [cur, f"W{k}"], [f"mm{k}"], name=f"matmul{k}"))
        nodes.append(helper.make_node("Add", [f"mm{k}", f"B{k}"], [f"z{k}"], name=f"add{k}"))
        if k < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [f"z{k}"], [f"h{k}"], name=f"relu{k}"))
            cur = f"h{k}"
        else:
            nodes.append(
                helper.make_node("Sigmoid", [f"z{k}"], [schema.output_name], name="sigmoid")
            )
    graph = helper.make_graph(
        nodes,
        "ctr_mlp",
        [
            helper.make_tensor_value_info(
                schema.input_name, TensorProto.FLOAT, ["batch", schema.input_width]
            )
        ],
        [helper.make_tensor_value_info(schema.output_name, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by the onnxruntime in Triton 24.x images
    model.doc_string = f"CTR MLP, feature schema {schema.store_version}"
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def quantize(
    fp32: Path, out: Path, calib: np.ndarray, fmt: str, input_name: str = SCHEMA.input_name
) -> None:
    """Static INT8 quantization of ``fp32`` calibrated on ``calib`` rows (QDQ or QOperator)."""
    import logging

    # The quantizer logs advice on the root logger at WARNING; keep the build output ours.
    logging.getLogger().setLevel(logging.ERROR)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(np.array_split(calib, max(1, len(calib) // 256)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._it, None)
            return None if chunk is None else {input_name: chunk}

    if fmt == "qdq":
        # TensorRT takes only symmetric signed INT8 (zero point 0) Q/DQ pairs.
        options: dict[str, Any] = dict(
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    else:
        # onnxruntime's x64 integer kernels want unsigned activations in QOperator form.
        options = dict(
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_static(
        str(fp32),
        str(out),
        _Reader(),
        per_channel=True,  # per-output-channel weight scales: AUC drop 0.004 -> 0.001 here
        **options,
    )


def session(path: Path, threads: int = 0) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predict(path: Path, x: np.ndarray, input_name: str = SCHEMA.input_name) -> np.ndarray:
    return session(path).run(None, {input_name: x})[0][:, 0]


def latency_ms(
    path: Path, x: np.ndarray, repeats: int, input_name: str = SCHEMA.input_name
) -> dict[str, float]:
    """Median onnxruntime CPU latency per batch size, in milliseconds."""
    sess = session(path)
    out: dict[str, float] = {}
    for bs in LATENCY_BATCHES:
        batch = np.ascontiguousarray(x[:bs])
        for _ in range(10):
            sess.run(None, {input_name: batch})
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sess.run(None, {input_name: batch})
            times.append(time.perf_counter() - t0)
        out[str(bs)] = round(float(np.median(times)) * 1e3, 4)
    return out


# -- drift reference -----------------------------------------------------------------


def write_profile(
    out: Path, model: str, version: str, x_train: np.ndarray, schema: FeatureSchema = SCHEMA
) -> Path:
    """Write ``model``/``version``'s drift profile from its training rows and the scores
    its served file (``model.onnx``, what Triton loads) gives them; return the path."""
    scores = predict(out / model / version / "model.onnx", x_train, schema.input_name)
    profile = build_profile(
        model, version, x_train, scores, schema.input_columns, category_columns(schema)
    )
    path = profile_path(out, model, version)
    path.write_text(profile.to_json())
    return path


def training_rows(cfg: BuildConfig) -> np.ndarray:
    """The training split's model input, as ``build`` draws it for ``cfg``'s seed and sizes."""
    world = make_world(cfg.users, cfg.items, cfg.seed)
    train, _ = split(make_impressions(world, cfg.impressions), cfg.seed)
    return design_matrix(world, train, cfg.schema)


def profile_existing(repo: Path, model: str = MODEL_NAME, version: str = "1") -> Path:
    """``gateway model profile``: the drift profile of a version already in ``repo``,
    from the seeded training rows its ``build_report.json`` names. ConfigError if absent."""
    if not (repo / model / version / "model.onnx").is_file():
        raise ConfigError(f"no model {model} version {version} in {repo} (no model.onnx)")
    try:
        report = json.loads((repo / "build_report.json").read_text())
        data = report["data"]
        cfg = BuildConfig(
            out=repo,
            seed=int(report["seed"]),
            users=int(data["users"]),
            items=int(data["items"]),
            impressions=int(data["impressions"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{repo / 'build_report.json'}: cannot read the build's data: {exc}"
        ) from None
    x_train = training_rows(cfg)
    if len(x_train) != data.get("train_rows", len(x_train)):
        raise ConfigError(
            f"regenerated {len(x_train)} training rows, the build report says "
            f"{data['train_rows']}: not the data this model was trained on"
        )
    return write_profile(repo, model, version, x_train)


# -- the command ---------------------------------------------------------------------


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Rebuild every model file and the report under ``cfg.out``; return the report."""
    t_start = time.perf_counter()
    out = cfg.out
    schema = cfg.schema
    if (schema.user.width, schema.item.width, schema.context_keys) != (
        SCHEMA.user.width,
        SCHEMA.item.width,
        SCHEMA.context_keys,
    ):
        # The generated world (synth.py) has the built-in layout; a model for another
        # layout is trained where its data lives, and checked against the schema at start.
        raise ConfigError(
            f"model build trains on generated data of the built-in schema's layout; schema "
            f"{schema.source} has another (bring a model trained on your data: the gateway "
            "checks its signature against the schema at start)"
        )
    if cfg.version is not None:
        if cfg.version < 1:
            raise ConfigError(f"--version must be 1 or more, got {cfg.version}")
        vdir = out / MODEL_NAME / str(cfg.version)
        if not (out / MODEL_NAME / "config.pbtxt").is_file():
            raise ConfigError(f"{out / MODEL_NAME} is not a model folder (no config.pbtxt)")
        if vdir.exists():
            raise ConfigError(f"version {cfg.version} exists already: {vdir}")
    _log(
        f"generating {cfg.users} users, {cfg.items} items, "
        f"{cfg.impressions} impressions (seed {cfg.seed})"
    )
    world = make_world(cfg.users, cfg.items, cfg.seed)
    imps = make_impressions(world, cfg.impressions)
    train, held = split(imps, cfg.seed)
    x_train, x_held = design_matrix(world, train, schema), design_matrix(world, held, schema)
    _log(f"train {len(train)} rows, held-out {len(held)} rows, CTR {imps.click.mean():.3f}")

    t0 = time.perf_counter()
    mlp = train_mlp(x_train, train.click, cfg)
    train_s = time.perf_counter() - t0
    _log(f"trained in {train_s:.1f} s")

    version = str(cfg.version or 1)
    # A new version is written to a staging folder beside it (a name Triton skips: not a
    # number) and renamed in whole: nothing ever sees a version folder without its files.
    staging: Path | None = None
    if cfg.version is not None:
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=out / MODEL_NAME))
        vdir, fp32_path = staging / version, staging / "fp32" / "model.onnx"
    else:
        vdir, fp32_path = out / MODEL_NAME / version, out / FP32_MODEL_NAME / "1" / "model.onnx"
    qdq_path = vdir / "model.onnx"
    cpu_path = vdir / CPU_MODEL_FILE
    to_onnx(mlp, fp32_path, schema)
    qdq_path.parent.mkdir(parents=True, exist_ok=True)
    rows = np.random.default_rng(cfg.seed + 4).permutation(len(x_train))[: cfg.calibration_rows]
    calib = x_train[rows]
    y = held.click
    report: dict[str, Any] = {
        "schema_version": schema.store_version,
        "model": MODEL_NAME,
        "version": version,
        "seed": cfg.seed,
        "data": {
            "users": cfg.users,
            "items": cfg.items,
            "impressions": cfg.impressions,
            "train_rows": len(train),
            "heldout_rows": len(held),
            "ctr": round(float(imps.click.mean()), 4),
        },
        "train_seconds": round(train_s, 2),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        # The quantizer writes helper files next to its input; keep them out of ``out``.
        tmp_fp32 = Path(tmp) / "model.onnx"
        tmp_fp32.write_bytes(fp32_path.read_bytes())
        qop_path = Path(tmp) / "model_qoperator.onnx"
        quantize(tmp_fp32, qdq_path, calib, "qdq", schema.input_name)
        quantize(tmp_fp32, qop_path, calib, "qoperator", schema.input_name)
        _log("exported FP32, INT8 QDQ and INT8 QOperator ONNX models; measuring")
        variants = {"fp32": fp32_path, "int8_qdq": qdq_path, "int8_qoperator": qop_path}
        for name, path in variants.items():
            p = predict(path, x_held, schema.input_name)
            report["models"][name] = {
                "bytes": path.stat().st_size,
                "auc": round(roc_auc(y, p), 5),
                "log_loss": round(log_loss(y, p), 5),
                "latency_ms": latency_ms(path, x_held, cfg.latency_repeats, schema.input_name),
            }
        models = report["models"]
        # The CPU deployments (embedded mode) take whichever of FP32 and the CPU-oriented
        # INT8 form was faster at batch 512 in this build.
        cpu_pick = min(("fp32", "int8_qoperator"), key=lambda k: models[k]["latency_ms"]["512"])
        cpu_path.write_bytes(variants[cpu_pick].read_bytes())
    fb = FallbackScorer(schema).score(x_held)
    report["fallback"] = {"auc": round(roc_auc(y, fb), 5), "log_loss": round(log_loss(y, fb), 5)}
    report["int8_auc_drop"] = round(models["fp32"]["auc"] - models["int8_qdq"]["auc"], 5)
    fp32_512 = models["fp32"]["latency_ms"]["512"]
    for name in ("int8_qdq", "int8_qoperator"):
        ratio = models[name]["latency_ms"]["512"] / fp32_512
        report[f"{name}_vs_fp32_latency_at_512"] = round(ratio, 3)
    v = version
    report["deployments"] = {
        "triton_gpu": f"{MODEL_NAME}/{v}/model.onnx: INT8 QDQ, symmetric; TensorRT builds INT8 "
        "kernels from the Q/DQ pairs",
        "triton_local_cpu": f"{MODEL_NAME}/{v}/model.onnx: the same file, run by onnxruntime "
        "inside Triton's Python backend",
        "embedded": f"{MODEL_NAME}/{v}/{CPU_MODEL_FILE}: {cpu_pick}, the faster on CPU at "
        "batch 512",
    }
    if cfg.version is None:
        report["deployments"]["triton_fp32"] = (
            f"{FP32_MODEL_NAME}/1/model.onnx: FP32, for the INT8-vs-FP32 benchmark"
        )
    report["notes"] = (
        "On CPU, onnxruntime runs a QDQ graph by fusing the Q/DQ pairs around each MatMul "
        "into integer kernels; for a 24-64-32-1 MLP the quantisation and dequantisation of "
        "activations at every layer costs as much as the small FP32 matmuls it replaces, so "
        "INT8 is not faster than FP32 on CPU here. INT8 pays off on GPU tensor cores "
        "(TensorRT) and for larger layers. The embedded (CPU) mode therefore serves the "
        "variant named under deployments.embedded."
    )
    write_profile(out, MODEL_NAME, "1", x_train, schema)
    report["build_seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2) + "\n"
    if staging is None:
        (out / "build_report.json").write_text(text)
    else:
        (vdir / "build_report.json").write_text(text)
        vdir.rename(out / MODEL_NAME / version)  # same filesystem: one atomic rename
        shutil.rmtree(staging, ignore_errors=True)
    print_table(report)
    return report


def print_table(report: dict[str, Any]) -> None:
    """The short table on stdout."""
    head = f"{'model':<16}{'AUC':>8}{'logloss':>9}" + "".join(
        f"{'ms@' + b:>10}" for b in map(str, LATENCY_BATCHES)
    )
    print(head)
    for name, m in report["models"].items():
        lat = "".join(f"{m['latency_ms'][str(b)]:>10.3f}" for b in LATENCY_BATCHES)
        print(f"{name:<16}{m['auc']:>8.4f}{m['log_loss']:>9.4f}{lat}")
    fb = report["fallback"]
    print(f"{'fallback rules':<16}{fb['auc']:>8.4f}{fb['log_loss']:>9.4f}")
    print(
        f"INT8 QDQ AUC drop vs FP32: {report['int8_auc_drop']:+.5f}; latency at 512 vs FP32: "
        f"QDQ {report['int8_qdq_vs_fp32_latency_at_512']:.2f}x, "
        f"QOperator {report['int8_qoperator_vs_fp32_latency_at_512']:.2f}x"
    )
    print(f"embedded (CPU) serves: {report['deployments']['embedded']}")
