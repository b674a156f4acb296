"""The inference seam: score an assembled feature matrix, and say what the model takes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from gateway.schema import FeatureSchema


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: its name, Triton datatype name (``FP32``, ``INT64``, ...)
    and shape, ``-1`` for a variable dimension (the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name!r} {self.datatype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class ModelSignature:
    """What a model takes and returns, as its server (or file) declares it."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def signature_mismatch(schema: FeatureSchema, sig: ModelSignature, model: str) -> str | None:
    """One line saying how the model differs from what the schema sends, or None.

    The gateway sends one FP32 tensor ``[batch, input_width]`` named by the schema and
    reads the output the schema names, so the model must have exactly one input, of that
    name, dtype and width (a variable last dimension is accepted), and that output.
    """
    want = f"{schema.input_name!r} FP32[-1, {schema.input_width}]"
    where = f"model {model} does not match schema {schema.source}"
    if len(sig.inputs) != 1:
        got = ", ".join(t.describe() for t in sig.inputs) or "none"
        return f"{where}: it takes inputs {got}; the gateway sends one, {want}"
    inp = sig.inputs[0]
    if (
        inp.name != schema.input_name
        or inp.datatype != "FP32"
        or len(inp.shape) != 2
        or inp.shape[1] not in (-1, schema.input_width)
    ):
        return f"{where}: its input is {inp.describe()}; the gateway sends {want}"
    out = next((t for t in sig.outputs if t.name == schema.output_name), None)
    if out is None:
        got = ", ".join(t.describe() for t in sig.outputs) or "none"
        return f"{where}: it has no output {schema.output_name!r} (outputs: {got})"
    if out.datatype != "FP32":
        return f"{where}: its output is {out.describe()}; the gateway reads FP32"
    return None


class InferenceBackend(Protocol):
    """Scores rows of the model input; one call is one request to the model server."""

    name: str
    model_name: str
    model_version: str

    async def start(self) -> None:
        """Connect and learn the model's version; called once in the app's lifespan."""
        ...

    async def infer(
        self, matrix: np.ndarray, timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        """Return one score per row; raise an ``InferenceError`` on failure.

        ``timeout_s`` is what is left of the stage's budget; backends that can pass it
        downstream (Triton) do, so the server drops work nobody waits for. ``version``
        names the model version to ask (a rollout's primary or candidate); None = the
        backend's own (``model_version``).
        """
        ...

    async def ready(self) -> None:
        """Raise an ``InferenceError`` unless the model can serve now."""
        ...

    async def signature(self) -> ModelSignature:
        """The served model's inputs and outputs, as its server or file declares them.

        Called at start and by the background health check (off the request path), and
        compared with the schema by :func:`signature_mismatch`. Raise an
        ``InferenceError`` when the server cannot be asked now (it is asked again on the
        next check). A backend maps its server's names to Triton's datatype names
        (``FP32``) and a variable dimension to ``-1``: the gRPC backend reads
        ``ModelMetadata`` (the KServe v2 protocol), which the HTTP backend gets as JSON
        from ``GET /v2/models/{name}[/versions/{v}]``, with the same fields.
        """
        ...

    async def load_version(self, version: str) -> None:
        """Make ``version`` servable by :meth:`infer`; raise an ``InferenceError`` if it
        cannot be (no such version). Called off the request path when a rollout names a
        version; a model server that serves every version (Triton) has nothing to do.
        """
        ...

    async def close(self) -> None: ...
