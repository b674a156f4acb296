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


class EmbeddedBackend:
    """onnxruntime on this process's CPU, batched like Triton's dynamic batcher."""

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
        import onnxruntime as ort

        if not model_path.is_file():
            raise InferenceError(f"model file {model_path} not found")
        opts = ort.SessionOptions()
        # One thread: the gateway's event loop needs the other core.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(model_path), opts, providers=["CPUExecutionProvider"]
        )
        self.model_name = model_name
        self.model_version = "1"
        self.model_path = model_path
        self._input_name, self._output_name = schema.input_name, schema.output_name
        self._batcher = MicroBatcher(self._run, max_batch_rows, max_delay_s)

    @property
    def batcher(self) -> MicroBatcher:
        return self._batcher

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output_name], {self._input_name: x})[0]
        return np.asarray(out[:, 0], dtype=np.float32)

    async def start(self) -> None:
        return None

    async def infer(self, matrix: np.ndarray, timeout_s: float) -> np.ndarray:
        # The pipeline's stage timeout bounds the wait; a caller that gives up is
        # dropped from its batch if the batch has not started.
        return await self._batcher.submit(matrix)

    async def ready(self) -> None:
        return None

    async def signature(self) -> ModelSignature:
        """The ONNX file's inputs and outputs (a named or unknown dimension is ``-1``)."""

        def spec(arg: Any) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)

        s = self._session
        return ModelSignature(
            tuple(spec(a) for a in s.get_inputs()), tuple(spec(a) for a in s.get_outputs())
        )

    async def close(self) -> None:
        self._batcher.close()
