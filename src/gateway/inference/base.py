"""The inference seam: score an assembled feature matrix."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class InferenceBackend(Protocol):
    """Scores rows of the model input; one call is one request to the model server."""

    name: str
    model_name: str
    model_version: str

    async def start(self) -> None:
        """Connect and learn the model's version; called once in the app's lifespan."""
        ...

    async def infer(self, matrix: np.ndarray, timeout_s: float) -> np.ndarray:
        """Return one score per row; raise an ``InferenceError`` on failure.

        ``timeout_s`` is what is left of the stage's budget; backends that can pass it
        downstream (Triton) do, so the server drops work nobody waits for.
        """
        ...

    async def ready(self) -> None:
        """Raise an ``InferenceError`` unless the model can serve now."""
        ...

    async def close(self) -> None: ...
