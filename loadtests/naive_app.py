"""The "before" picture: the same /predict, written the way a first version often is.

Used only by the benchmark, as the baseline the gateway is compared against. What
makes it naive, each a common first-version choice:

- a plain ``def`` route, so FastAPI runs it on its thread pool with blocking clients;
- a new Redis client (and TCP connection) per request, and one ``GET`` per entity:
  1 + N round trips instead of one ``MGET``;
- features decoded and assembled with Python loops;
- a new Triton HTTP client per request (tritonclient's defaults), one infer call;
- the response rendered by FastAPI's default JSON encoder (pydantic + stdlib json);
- no budgets, retries, breakers or fallback: an upstream failure is a 500.

It reads the same Redis layout and the same model on the same Triton as the gateway,
so it answers the same scores.
"""

from __future__ import annotations

import os

import numpy as np
import redis
import tritonclient.http as httpclient
from fastapi import FastAPI
from pydantic import BaseModel

from gateway.features import codec
from gateway.schema import SCHEMA

REDIS_URL = os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0")
TRITON_HTTP = os.environ.get("NAIVE_TRITON_HTTP", "127.0.0.1:8000")
MODEL_NAME = os.environ.get("NAIVE_MODEL_NAME", "ctr")

app = FastAPI(title="naive predict")


class Context(BaseModel):
    hour: int | None = None
    device: str | None = None


class PredictRequest(BaseModel):
    user_id: str
    item_ids: list[str]
    context: Context | None = None
    request_id: str | None = None


def _vector(raw: bytes | None, view) -> list[float]:  # type: ignore[no-untyped-def]
    if raw is None or len(raw) != view.nbytes:
        return [float(f.default) for f in view.features]
    return [float(x) for x in np.frombuffer(raw, dtype=view.dtype)]


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(req: PredictRequest) -> dict[str, object]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        # The generation the store's pointer names (features/codec.py).
        gen, _ = codec.parse_pointer(r.get(codec.POINTER_KEY) or b"")
        user = _vector(r.get(codec.user_key(req.user_id, gen)), SCHEMA.user)
        items = [_vector(r.get(codec.item_key(i, gen)), SCHEMA.item) for i in req.item_ids]
    finally:
        r.close()
    context = req.context.model_dump() if req.context else None
    ctx = [float(x) for x in SCHEMA.encode_context(context)]
    rows = [user + item + ctx for item in items]
    matrix = np.array(rows, dtype=np.float32)

    client = httpclient.InferenceServerClient(TRITON_HTTP)
    try:
        inp = httpclient.InferInput(SCHEMA.input_name, list(matrix.shape), "FP32")
        inp.set_data_from_numpy(matrix)
        result = client.infer(MODEL_NAME, [inp])
    finally:
        client.close()
    scores = result.as_numpy(SCHEMA.output_name)[:, 0]
    return {
        "request_id": req.request_id or "",
        "model": {"name": MODEL_NAME, "version": "1"},
        "scores": [
            {"item_id": i, "score": round(float(s), 6)}
            for i, s in zip(req.item_ids, scores, strict=True)
        ],
        "fallback": None,
    }
