"""``gateway serve``: uvicorn with uvloop and httptools."""

from __future__ import annotations

import os
import shutil
import tempfile

from gateway.config import load_settings
from gateway.metrics import MULTIPROC_ENV


def serve(host: str, port: int, workers: int = 1) -> int:
    import uvicorn

    settings = load_settings()  # fail fast, with one clear line per bad value
    mp_dir = None
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        # Multiprocess metrics: every worker writes here, /metrics merges them.
        mp_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ[MULTIPROC_ENV] = mp_dir
    try:
        if workers > 1:
            uvicorn.run(
                "gateway.api.app:create_app",
                factory=True,
                host=host,
                port=port,
                workers=workers,
                loop="uvloop",
                http="httptools",
                access_log=False,
                log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10,
            )
        else:
            from gateway.api.app import create_app

            uvicorn.run(
                create_app(settings),
                host=host,
                port=port,
                loop="uvloop",
                http="httptools",
                access_log=False,
                log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=10,
            )
    finally:
        if mp_dir:
            shutil.rmtree(mp_dir, ignore_errors=True)
    return 0
