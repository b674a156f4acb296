"""A real Feast for the tests: its own virtualenv, a repository, apply and materialize.

Feast cannot share the test environment: feast 0.67 needs numpy >= 2 and redis-py < 8,
nvidia-pytriton 0.7 pins numpy < 2 and the gateway runs redis-py 8. So the tests keep a
second virtualenv, ``.venv-feast`` at the repository root (ignored by git), made on first
use with ``pip install 'feast[redis]==0.67.0'`` (about 20 s from pip's cache, 600 MB),
and run Feast's CLI and SDK there as child processes. The gateway side runs in the test
environment, as in production.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.procs import PYTHON, ROOT

FEAST_VERSION = "0.67.0"
VENV = ROOT / ".venv-feast"
EXAMPLE = ROOT / "docs" / "examples" / "feast"
_MARKER = VENV / f".feast-{FEAST_VERSION}"


def ensure_venv() -> Path:
    """The Feast virtualenv's python, created if missing."""
    python = VENV / "bin" / "python"
    if not _MARKER.exists():
        shutil.rmtree(VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"feast[redis]=={FEAST_VERSION}"],
            check=True,
            timeout=600,
            capture_output=True,
        )
        _MARKER.touch()
    return python


def feast(python: Path, repo: Path, *args: str) -> str:
    """Run the ``feast`` CLI in ``repo``; its output, or an AssertionError with it."""
    proc = subprocess.run(
        [str(python.parent / "feast"), *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def make_repo(
    folder: Path, redis_port: int, python: Path, users: int = 2_000, items: int = 1_000
) -> Path:
    """The example repository, with data (some nulls), applied and materialized."""
    repo = folder / "feature_repo"
    shutil.copytree(EXAMPLE, repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
    cfg = repo / "feature_store.yaml"
    cfg.write_text(cfg.read_text().replace("127.0.0.1:6379", f"127.0.0.1:{redis_port}"))
    subprocess.run(
        [PYTHON, str(repo / "make_data.py"), "--users", str(users), "--items", str(items),
         "--nulls", "--out", str(repo / "data")],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    feast(python, repo, "apply")
    end = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    feast(python, repo, "materialize", "2000-01-01T00:00:00", end)
    return repo


_SDK = """
import json, sys
from feast import FeatureStore
req = json.load(sys.stdin)
fs = FeatureStore(repo_path=req["repo"])
out = fs.get_online_features(features=req["features"], entity_rows=req["rows"]).to_dict()
json.dump(out, sys.stdout)
"""


def online_features(
    python: Path, repo: Path, features: list[str], rows: list[dict[str, Any]]
) -> dict[str, list[Any]]:
    """``FeatureStore.get_online_features(...).to_dict()`` from the Feast SDK."""
    proc = subprocess.run(
        [str(python), "-c", _SDK],
        input=json.dumps({"repo": str(repo), "features": features, "rows": rows}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
