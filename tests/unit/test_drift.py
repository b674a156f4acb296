"""Drift counting and PSI (gateway/drift.py) against direct NumPy computations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from gateway.config import load_settings
from gateway.drift import (
    EPSILON,
    SCORE_COLUMN,
    BinCounter,
    ColumnProfile,
    DriftObserver,
    Profile,
    build_profile,
    category_columns,
    counts_from_samples,
    psi,
)
from gateway.errors import ConfigError
from gateway.features import codec
from gateway.metrics import Metrics
from gateway.names import FallbackReason, Stage
from gateway.observe import Fallback, Prediction
from gateway.schema import SCHEMA

COLUMNS = SCHEMA.input_columns


def reference_counts(profile: Profile, matrix: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The obvious computation: np.searchsorted per column in float64, np.bincount."""
    out = []
    for j, c in enumerate(profile.columns):
        values = scores if c.name == SCORE_COLUMN else matrix[:, j]
        idx = np.searchsorted(np.asarray(c.edges, np.float64), values.astype(np.float64), "right")
        out.append(np.bincount(idx, minlength=c.bins))
    return np.concatenate(out)


def reference_psi(counts: np.ndarray, shares: tuple[float, ...]) -> float:
    served = counts / counts.sum()
    total = 0.0
    for a, e in zip(served, shares, strict=True):
        a, e = max(a, EPSILON), max(e, EPSILON)
        total += (a - e) * np.log(a / e)
    return total


def training_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(COLUMNS))).astype(np.float32)
    x[:, 0] = rng.integers(0, 4, n)  # few distinct values: fewer bins
    hours = rng.integers(0, 24, n)
    devices = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    x[:, -5:] = SCHEMA.encode_context_columns({"hour": hours, "device": devices})
    return x, rng.random(n).astype(np.float32)


@pytest.fixture(scope="module")
def profile() -> Profile:
    x, s = training_like(20_000)
    return build_profile("ctr", "1", x, s, COLUMNS, category_columns(SCHEMA))


def test_profile_bins(profile: Profile) -> None:
    assert profile.names == (*COLUMNS, SCORE_COLUMN)
    by = {c.name: c for c in profile.columns}
    # Continuous: deciles, ten bins of a tenth each.
    assert by["user.emb_0"].bins == 10
    assert np.allclose(by["user.emb_0"].shares, 0.1, atol=1e-3)
    # Four distinct values: the edges are the values above the minimum, no empty bin.
    assert by["user.activity_log"].edges == (1.0, 2.0, 3.0)
    assert min(by["user.activity_log"].shares) > 0.2
    # One-hot: one bin per category value (off, on), the training shares.
    tablet = by["context.device_tablet"]
    assert tablet.kind == "category" and tablet.edges == (0.5,)
    assert tablet.shares[1] == pytest.approx(0.1, abs=0.01)
    for c in profile.columns:
        assert sum(c.shares) == pytest.approx(1.0) and all(s > 0 for s in c.shares)


def test_counts_equal_numpy_over_many_matrices(profile: Profile) -> None:
    counter = BinCounter(profile)
    rng = np.random.default_rng(1)
    x, s = training_like(5_000, seed=2)
    # Values exactly on edges must land in the bin above, as searchsorted(side="right").
    for j, c in enumerate(profile.columns[:-1]):
        x[:100, j] = np.asarray(c.edges, np.float32)[rng.integers(0, len(c.edges), 100)]
    for _ in range(200):
        idx = rng.integers(0, len(x), rng.integers(1, 120))
        m, sc = np.ascontiguousarray(x[idx]), s[idx]
        assert (counter.count(m, sc) == reference_counts(profile, m, sc)).all()


def test_edges_not_float32_still_count_exactly() -> None:
    # 0.1 as a float64 edge: float32(0.1) lies above it, its float32 neighbour below.
    p = Profile(
        "m",
        "1",
        1,
        (
            ColumnProfile("c", "quantile", (0.1,), (0.5, 0.5)),
            ColumnProfile(SCORE_COLUMN, "quantile", (0.5,), (0.5, 0.5)),
        ),
    )
    below = np.nextafter(np.float32(0.1), np.float32(0))
    values = np.array([[np.float32(0.1)], [below], [0.0]], np.float32)
    scores = np.zeros(3, np.float32)
    assert (BinCounter(p).count(values, scores) == reference_counts(p, values, scores)).all()
    assert (BinCounter(p).count(values, scores)[:2] == [2, 1]).all()


def test_psi_matches_the_formula(profile: Profile) -> None:
    counter = BinCounter(profile)
    x, s = training_like(3_000, seed=5)
    x[:, -5:] = SCHEMA.encode_context({"hour": 3, "device": "tablet"})  # shifted context
    flat = counter.count(x, s)
    report = counter.report(flat)
    assert report["rows"] == 3_000
    per = counter.split(flat)
    for c in profile.columns[:-1]:
        assert abs(report["features"][c.name] - reference_psi(per[c.name], c.shares)) < 1e-9
    assert (
        abs(report["score"] - reference_psi(per[SCORE_COLUMN], profile.columns[-1].shares)) < 1e-9
    )
    assert report["features"]["context.device_tablet"] > 0.2
    assert report["features"]["context.hour_sin"] > 0.2
    assert report["features"]["user.emb_3"] < 0.1
    # Empty bins are floored at epsilon, not infinite; nothing counted is no number.
    assert psi(np.array([0, 10]), (0.5, 0.5)) == pytest.approx(
        reference_psi(np.array([0, 10]), (0.5, 0.5))
    )
    assert psi(np.array([0, 0]), (0.5, 0.5)) is None


def _prediction(
    matrix: np.ndarray, scores: np.ndarray, fallback: Fallback | None = None
) -> Prediction:
    return Prediction(
        user_id="u1", n_items=len(scores), matrix=matrix, scores=scores, model_name="ctr",
        model_version="1", fallback=fallback, missing_user=False, missing_items=0, corrupt=0,
        features_s=0.001, inference_s=0.001, postprocess_s=0.0001,
    )  # fmt: skip


def test_observer_counts_model_rows_only_and_flushes(profile: Profile) -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    obs = DriftObserver(profile, lambda col, b: m.drift_bin_rows.labels("ctr", "1", col, b))
    x, s = training_like(500, seed=7)
    batches = [(x[k : k + 50], s[k : k + 50]) for k in range(0, 500, 50)]
    for mx, sc in batches:
        obs(_prediction(mx, sc))
    # A fallback answer: its rows were not scored by the model; not counted.
    obs(_prediction(x[:50], s[:50], Fallback(FallbackReason.TIMEOUT, Stage.INFERENCE)))
    assert obs.flush() == 500
    assert obs.flush() == 0  # nothing new
    samples = [(s.name, s.labels, s.value) for f in registry.collect() for s in f.samples]
    flat = counts_from_samples(samples, obs.counter, "ctr")
    assert (flat == reference_counts(profile, x, s)).all()
    # Every bin's series exists, the empty ones at 0.
    n_series = sum(1 for n, lab, _ in samples if n == "gateway_drift_bin_rows_total")
    assert n_series == obs.counter.size


def test_sample_rate_uses_the_random_source(profile: Profile) -> None:
    draws = iter([0.05, 0.5, 0.2, 0.09])
    obs = DriftObserver(profile, lambda col, b: _Sink(), 0.1, random_source=lambda: next(draws))
    x, s = training_like(50, seed=9)
    for _ in range(4):
        obs(_prediction(x, s))
    assert obs.flush() == 100  # the draws under 0.1: two of four


class _Sink:
    def inc(self, amount: float = 1) -> None:
        pass


def test_profile_file_round_trip_and_errors(profile: Profile, tmp_path: Path) -> None:
    assert Profile.from_json(profile.to_json()) == profile
    with pytest.raises(ConfigError, match=r"^drift profile x\.json: not readable: ") as exc:
        Profile.from_json('{"format": 1, "columns": [{"name": "a"}]}', "x.json")
    assert "\n" not in str(exc.value)


def test_meta_value_round_trip() -> None:
    assert codec.parse_meta(codec.meta_value(1_700_000_000.25)) == 1_700_000_000.25
    assert codec.parse_meta(None) is None
    assert codec.parse_meta(b"not json") is None
    assert codec.parse_meta(b'{"written_at": "soon"}') is None


def test_settings() -> None:
    assert load_settings().drift_sample_rate == 0.5
    with pytest.raises(ConfigError, match="GATEWAY_DRIFT_SAMPLE_RATE"):
        load_settings(drift_sample_rate=1.5)
    with pytest.raises(ConfigError, match="GATEWAY_FEATURE_MAX_AGE_S"):
        load_settings(feature_max_age_s=0)
