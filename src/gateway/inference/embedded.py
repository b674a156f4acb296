"""In-process onnxruntime behind a micro-batcher: the embedded default.

The batcher has the semantics of Triton's dynamic batcher in the model's
config.pbtxt: requests that arrive within ``max_queue_delay`` of the first waiting
one are merged, up to ``max_batch_size`` rows, and run in one onnxruntime call on a
worker thread (onnxruntime releases the GIL), so the event loop keeps serving.
Written here because onnxruntime has no request batching of its own; it is the
same idea as Triton's, in about sixty lines.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from gateway.errors import InferenceError
from gateway.inference.base import ModelSignature, TensorSpec
from gateway.schema import SCHEMA, FeatureSchema

# onnxruntime's element type names -> Triton's datatype names (what the schema check uses).
_ORT_TYPES = {
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(float16)": "FP16",
    "tensor(int64)": "INT64",
    "tensor(int32)": "INT32",
    "tensor(int8)": "INT8",
    "tensor(uint8)": "UINT8",
    "tensor(bool)": "BOOL",
    "tensor(string)": "BYTES",
}


class MicroBatcher:
    """Merge concurrent ``submit`` calls into batches for one synchronous ``run`` function."""

    def __init__(self, run, max_batch_rows: int, max_delay_s: float) -> None:
        self._run = run
        self.max_batch_rows = max_batch_rows
        self.max_delay_s = max_delay_s
        self._pending: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
        self._rows = 0
        self._timer: asyncio.TimerHandle | None = None
        # One thread: batches run one after another, as on one model instance.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ort")
        self.batches = 0  # executions, for tests and metrics

    async def submit(self, matrix: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((matrix, fut))
        self._rows += len(matrix)
        if self._rows >= self.max_batch_rows:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_delay_s, self._flush)
        return await fut

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending, self._rows = self._pending, [], 0
        live = [(m, f) for m, f in batch if not f.done()]  # drop callers that gave up
        if not live:
            return
        self.batches += 1
        loop = asyncio.get_running_loop()
        inputs = live[0][0] if len(live) == 1 else np.concatenate([m for m, _ in live])
        job = loop.run_in_executor(self._executor, self._run, inputs)
        job.add_done_callback(lambda j: _split(j, live))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _split(
    job: asyncio.Future[np.ndarray], live: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]]
) -> None:
    exc = job.exception()
    start = 0
    for m, fut in live:
        n = len(m)
        if not fut.done():
            if exc is not None:
                fut.set_exception(InferenceError(f"onnxruntime failed: {exc}"))
            else:
                fut.set_result(job.result()[start : start + n])
        start += n


def version_model_file(version_dir: Path) -> Path:
    """The file the embedded backend runs from a version folder: the CPU pick, else the
    Triton file (``gateway model build`` writes both)."""
    from gateway.modelbuild import CPU_MODEL_FILE

    path = version_dir / CPU_MODEL_FILE
    return path if path.is_file() else version_dir / "model.onnx"


class _Version:
    """One model version: its onnxruntime session behind its own micro-batcher."""

    def __init__(
        self,
        path: Path,
        max_batch_rows: int,
        max_delay_s: float,
        threads: int,
        schema: FeatureSchema,
    ) -> None:
        import onnxruntime as ort

        if not path.is_file():
            raise InferenceError(f"model file {path} not found")
        opts = ort.SessionOptions()
        # One thread: the gateway's event loop needs the other core.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.path = path
        self._input_name, self._output_name = schema.input_name, schema.output_name
        self.batcher = MicroBatcher(self._run, max_batch_rows, max_delay_s)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self._output_name], {self._input_name: x})[0]
        return np.asarray(out[:, 0], dtype=np.float32)


class EmbeddedBackend:
    """onnxruntime on this process's CPU, batched like Triton's dynamic batcher.

    Serves the version of ``model_path``'s folder, and any sibling version folder
    :meth:`load_version` was asked for (a rollout's candidate), each with its own session.
    """

    name = "onnxruntime-embedded"

    def __init__(
        self,
        model_path: Path,
        model_name: str,
        max_batch_rows: int,
        max_delay_s: float,
        threads: int = 1,
        schema: FeatureSchema = SCHEMA,
    ) -> None:
        self._args = (max_batch_rows, max_delay_s, threads, schema)
        primary = _Version(model_path, *self._args)
        self.model_name = model_name
        # The version folder's name (model_repository/<model>/<version>/...).
        version = model_path.parent.name
        self.model_version = version if version.isdigit() else "1"
        self.model_path = model_path
        self._versions: dict[str, _Version] = {self.model_version: primary}
        self._primary = primary

    @property
    def batcher(self) -> MicroBatcher:
        return self._primary.batcher

    async def start(self) -> None:
        return None

    async def load_version(self, version: str) -> None:
        """Load a sibling version folder's model (off the request path: in a thread)."""
        if version in self._versions:
            return
        path = version_model_file(self.model_path.parent.parent / version)
        try:
            loaded = await asyncio.to_thread(_Version, path, *self._args)
        except InferenceError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's load errors have no common base
            raise InferenceError(f"model {path} could not be loaded: {exc}") from exc
        self._versions.setdefault(version, loaded)

    async def infer(
        self, matrix: np.ndarray, timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        # The pipeline's stage timeout bounds the wait; a caller that gives up is
        # dropped from its batch if the batch has not started.
        v = self._primary if version is None else self._versions.get(version)
        if v is None:
            raise InferenceError(f"model {self.model_name} version {version} is not loaded")
        return await v.batcher.submit(matrix)

    async def ready(self) -> None:
        return None

    async def signature(self) -> ModelSignature:
        """The ONNX file's inputs and outputs (a named or unknown dimension is ``-1``)."""

        def spec(arg: Any) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

        s = self._primary.session
        return ModelSignature(
            tuple(spec(a) for a in s.get_inputs()), tuple(spec(a) for a in s.get_outputs())
        )

    async def close(self) -> None:
        for v in self._versions.values():
            v.batcher.close()
