"""The least a /predict can do on the gateway's data: the yardstick for its overhead.

Used only by the benchmark (``python -m loadtests.bench.compare`` and the opt-in
``minimal-*`` scenarios), to measure what the gateway's resilience layer costs. Two
modes, each an app factory for uvicorn (``--factory``), run with the gateway's server
settings (uvloop, httptools, one worker, no access log):

- ``create_triton_app``: one Redis ``MGET`` (redis-py asyncio) and one Triton gRPC
  ``ModelInfer`` (``tritonclient.grpc.aio``, one client made at startup on the running
  loop): the same two round trips as ``gateway`` with ``GATEWAY_TRITON_URL`` set.
- ``create_cpu_app``: the same ``MGET``, then onnxruntime's ``session.run`` inline on
  the event loop (the model file the embedded gateway loads, one intra-op thread): the
  counterpart of ``gateway-cpu`` (Redis features, in-process onnxruntime).

Both decode, assemble and render exactly as the gateway does (``codec.decode``,
``SCHEMA.assemble`` / ``encode_context``, scores rounded to 6 places, orjson), so the
work per request is the same. What they leave out is what is measured: request
validation (only ``orjson.loads`` and key look-ups), budgets, breakers, retries,
admission control, metrics, request ids and timings. A dependency failure is a 500.

Configuration, read by the factory in the server process (never at import):
``MINIMAL_REDIS_URL``, ``MINIMAL_TRITON_URL`` (``host:port``: gRPC's, or HTTP's for
``create_triton_http_app``), ``MINIMAL_MODEL_NAME``
(default ``ctr``), ``MINIMAL_MODEL_PATH`` (cpu mode; default the ``ctr`` CPU model).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis.asyncio as redis
from fastapi import FastAPI, Request
from starlette.responses import Response

from gateway.features import codec
from gateway.schema import SCHEMA

Infer = Callable[[np.ndarray], Awaitable[np.ndarray]]
Close = Callable[[], Awaitable[None]]
# The file the embedded gateway loads for model ``ctr`` (runtime.build_backend).
CPU_MODEL = (
    Path(__file__).resolve().parents[1] / "model_repository" / "ctr" / "1" / "model.cpu.onnx"
)


def _app(infer_factory: Callable[[], Awaitable[tuple[Infer, Close]]]) -> FastAPI:
    model_name = os.environ.get("MINIMAL_MODEL_NAME", "ctr")
    # RESP2 as the gateway uses, so the bytes on the wire are the same; everything else
    # is redis-py's default (a plain, unbounded connection pool).
    store = redis.Redis.from_url(os.environ["MINIMAL_REDIS_URL"], protocol=2)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state["infer"], close = await infer_factory()
        # The generation the store's pointer names (features/codec.py), read once.
        gen, _ = codec.parse_pointer(await store.get(codec.POINTER_KEY) or b"")
        state["user_prefix"], state["item_prefix"] = codec.user_prefix(gen), codec.item_prefix(gen)
        yield
        await close()
        await store.aclose()

    app = FastAPI(title="minimal predict", lifespan=lifespan)
    model = {"name": model_name, "version": "1"}

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        body = orjson.loads(await request.body())
        item_ids: list[str] = body["item_ids"]
        ip = state["item_prefix"]
        keys = [state["user_prefix"] + body["user_id"]] + [ip + i for i in item_ids]
        values = await store.mget(keys)
        batch = codec.decode(values[0], values[1:])
        context = SCHEMA.encode_context(body.get("context"))
        matrix = SCHEMA.assemble(batch.user, batch.items, context)
        scores = await state["infer"](matrix)
        rows = [
            {"item_id": i, "score": s}
            for i, s in zip(item_ids, np.round(scores.astype(np.float64), 6).tolist(), strict=True)
        ]
        payload = {
            "request_id": body.get("request_id", ""),
            "model": model,
            "scores": rows,
            "fallback": None,
            "missing": {"user": batch.user_missing, "items": batch.items_missing},
        }
        return Response(orjson.dumps(payload), media_type="application/json")

    return app


def create_triton_app() -> FastAPI:
    """Redis MGET + one Triton gRPC infer per request."""
    import tritonclient.grpc.aio as grpcclient

    url = os.environ["MINIMAL_TRITON_URL"]
    model_name = os.environ.get("MINIMAL_MODEL_NAME", "ctr")

    async def make() -> tuple[Infer, Close]:
        # Made here, inside the lifespan: a grpc.aio channel belongs to the loop it was
        # created on.
        client = grpcclient.InferenceServerClient(url)
        outputs = [grpcclient.InferRequestedOutput(SCHEMA.output_name)]

        async def infer(matrix: np.ndarray) -> np.ndarray:
            inp = grpcclient.InferInput(SCHEMA.input_name, list(matrix.shape), "FP32")
            inp.set_data_from_numpy(matrix)
            result = await client.infer(model_name, [inp], outputs=outputs)
            return result.as_numpy(SCHEMA.output_name)[:, 0]

        return infer, client.close

    return _app(make)


def create_triton_http_app() -> FastAPI:
    """Redis MGET + one Triton HTTP/REST infer per request (``tritonclient.http.aio``,
    binary tensor data), the transport the gateway uses for an ``http://`` URL."""
    import tritonclient.http.aio as httpclient

    url = os.environ["MINIMAL_TRITON_URL"]
    model_name = os.environ.get("MINIMAL_MODEL_NAME", "ctr")

    async def make() -> tuple[Infer, Close]:
        client = httpclient.InferenceServerClient(url)  # its aiohttp session: this loop's
        outputs = [httpclient.InferRequestedOutput(SCHEMA.output_name, binary_data=True)]

        async def infer(matrix: np.ndarray) -> np.ndarray:
            inp = httpclient.InferInput(SCHEMA.input_name, list(matrix.shape), "FP32")
            inp.set_data_from_numpy(matrix, binary_data=True)
            result = await client.infer(model_name, [inp], outputs=outputs)
            return result.as_numpy(SCHEMA.output_name)[:, 0]

        return infer, client.close

    return _app(make)


def create_cpu_app() -> FastAPI:
    """Redis MGET + onnxruntime inline on the event loop."""
    import onnxruntime as ort

    path = os.environ.get("MINIMAL_MODEL_PATH", str(CPU_MODEL))
    opts = ort.SessionOptions()
    # One thread, as the embedded gateway's session: the other core serves the loop.
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    names = [SCHEMA.output_name]

    async def make() -> tuple[Infer, Close]:
        async def infer(matrix: np.ndarray) -> np.ndarray:
            out: np.ndarray = session.run(names, {SCHEMA.input_name: matrix})[0]
            return out[:, 0]

        async def close() -> None:
            return None

        return infer, close

    return _app(make)
