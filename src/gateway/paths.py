"""Where the project's files are found when no path is given."""

from __future__ import annotations

import os
from pathlib import Path

from gateway.errors import ModelRepositoryError


def default_model_repository() -> Path:
    """``$GATEWAY_MODEL_REPOSITORY``, else ``./model_repository``, else the source checkout's."""
    env = os.environ.get("GATEWAY_MODEL_REPOSITORY")
    if env:
        return Path(env)
    for candidate in (
        Path.cwd() / "model_repository",
        Path(__file__).resolve().parents[2] / "model_repository",
    ):
        if candidate.is_dir():
            return candidate
    raise ModelRepositoryError(
        "no model repository found: pass --model-repository or set GATEWAY_MODEL_REPOSITORY"
    )
