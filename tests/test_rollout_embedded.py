"""Embedded mode (no Redis, in-process onnxruntime): a rollout set from settings at start,
served by the embedded backend from sibling version folders. In-process, real models."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from gateway.config import load_settings
from gateway.pipeline import PredictInput
from gateway.rollout.state import Assigner
from gateway.runtime import Gateway
from tests.procs import MODEL_REPOSITORY
from tests.rollout_models import add_nan_version


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("embedded-rollout") / "repo"
    shutil.copytree(MODEL_REPOSITORY / "ctr", repo / "ctr")
    shutil.copytree(repo / "ctr" / "1", repo / "ctr" / "2")  # a "retrained" copy
    add_nan_version(repo, 3)
    return repo


async def _answers(repo: Path, candidate: str, steps: str, users: list[str]) -> list:
    settings = load_settings(
        model_repository=repo,
        rollout_mode="canary",
        rollout_candidate_version=candidate,
        rollout_steps=steps,
        embedded_users=1000,
        embedded_items=500,
    )
    gw = Gateway(settings)
    await gw.start()
    try:
        out = []
        for u in users:
            req = PredictInput(f"r-{u}", u, ["i1", "i2", "i3"], None)
            out.append(await gw.pipeline.predict(req, gw.budget_policy.start()))
        assert gw.rollout is not None
        return [out, gw.rollout.view()]
    finally:
        await gw.stop()


def test_embedded_canary_serves_the_candidate_version_to_its_users(repo: Path) -> None:
    users = [f"u{i}" for i in range(200)]
    answers, view = asyncio.run(_answers(repo, "2", "20,100", users))
    assert view["mode"] == "canary" and view["weight"] == 20
    assert view["serving"] == {
        "primary": "1",
        "candidate": "2",
        "shadow": False,
        "decision_maker": False,
    }
    want = Assigner("ctr", "2", 20)
    for u, r in zip(users, answers, strict=True):
        assert r.fallback is None
        assert (str(r.variant), r.model_version) == (
            ("candidate", "2") if want.variant(u).value == "candidate" else ("primary", "1")
        )
    assert 20 < sum(r.variant == "candidate" for r in answers) < 70


def test_embedded_broken_candidate_is_answered_for_by_the_primary(repo: Path) -> None:
    answers, _ = asyncio.run(_answers(repo, "3", "100", [f"u{i}" for i in range(50)]))
    # Every user is on the NaN candidate; every answer is the primary's, none a fallback.
    assert all((r.variant, r.model_version, r.fallback) == ("primary", "1", None) for r in answers)
