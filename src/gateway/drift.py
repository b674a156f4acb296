"""Drift: how far the rows the model is fed, and the scores it returns, have moved from
the rows it was trained on, measured as the Population Stability Index (PSI).

::

    gateway model build ──> model_repository/{model}/{version}/drift_profile.json
                            (per input column and for the score: bin edges, training shares)
    /predict ──> DriftObserver (observe.py hook): rows the model scored -> bin counts,
                 vectorized, in a local array; flushed every 2 s to
                 gateway_drift_bin_rows_total{model,version,column,bin}
    Prometheus ──> PSI per column over a window, fleet-wide (deploy/prometheus/rules/
                   gateway-drift.yml);  GET /drift ──> the same PSI for one pod

**Bins.** A continuous column has the deciles of its training values as inner edges
(duplicates dropped, so a column with few distinct values has fewer bins), and open
outer bins: bin ``k`` holds the values ``v`` with ``edges[k-1] <= v < edges[k]``
(``np.searchsorted(edges, v, side="right")``). A one-hot (category) column has the
single edge 0.5: one bin per category value, off and on.

**PSI.** With ``a_b`` the served share and ``e_b`` the training share of bin ``b``,
both raised to at least :data:`EPSILON` so an empty bin stays finite::

    PSI = sum_b (a_b - e_b) * ln(a_b / e_b)

The usual reading: under 0.1 stable, 0.1 to 0.2 moderate shift, over 0.2 a shift to act
on (docs/drift.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client import multiprocess as prom_mp

from gateway.errors import ConfigError
from gateway.metrics import MULTIPROC_ENV, Metrics
from gateway.schema import FeatureSchema

log = logging.getLogger("gateway.drift")

PROFILE_FILE = "drift_profile.json"
# The pseudo-column of the model's scores, beside the schema's input columns.
SCORE_COLUMN = "score"
# Floor of a bin's share in the PSI (served and training alike). 1e-4 is the common
# choice: one bin empty on one side adds (share) * ln(share / 1e-4), about 0.46 for a
# bin holding 10 %, so an emptied decile alone is a shift to act on, and never infinite.
EPSILON = 1e-4
# Deciles: ten bins per continuous column, the usual resolution for PSI; 25 columns
# times at most ten bins is 250 series per model version and pod.
QUANTILES = tuple(k / 10 for k in range(1, 10))
PROFILE_FORMAT = 1


@dataclass(frozen=True)
class ColumnProfile:
    """One column's bins: inner edges (ascending) and the training share of each bin."""

    name: str
    kind: str  # "quantile" or "category"
    edges: tuple[float, ...]
    shares: tuple[float, ...]  # len(edges) + 1, summing to 1

    @property
    def bins(self) -> int:
        return len(self.edges) + 1


@dataclass(frozen=True)
class Profile:
    """A model version's reference: every input column in model-input order, then the score."""

    model: str
    version: str
    rows: int
    columns: tuple[ColumnProfile, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def to_json(self) -> str:
        doc = {
            "format": PROFILE_FORMAT,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "epsilon": EPSILON,
            "columns": [
                {"name": c.name, "kind": c.kind, "edges": list(c.edges), "shares": list(c.shares)}
                for c in self.columns
            ],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> Profile:
        """Parse a profile file; ConfigError (one line) if it is not one."""
        try:
            doc = json.loads(text)
            if doc.get("format") != PROFILE_FORMAT:
                raise ValueError(f"format {doc.get('format')!r}, expected {PROFILE_FORMAT}")
            columns = []
            for c in doc["columns"]:
                edges = tuple(float(e) for e in c["edges"])
                shares = tuple(float(s) for s in c["shares"])
                if len(shares) != len(edges) + 1 or list(edges) != sorted(set(edges)):
                    raise ValueError(f"column {c['name']!r}: edges and shares do not fit")
                columns.append(ColumnProfile(str(c["name"]), str(c["kind"]), edges, shares))
            return cls(str(doc["model"]), str(doc["version"]), int(doc["rows"]), tuple(columns))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"drift profile {source}: not readable: {exc}") from None


def profile_path(repository: Path, model: str, version: str) -> Path:
    return repository / model / version / PROFILE_FILE


def load_profile(repository: Path, model: str, version: str) -> Profile | None:
    """The profile stored beside ``model``'s ``version``; None if there is none."""
    path = profile_path(repository, model, version)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return Profile.from_json(text, str(path))


# -- building a profile (gateway model build) ---------------------------------------------


def category_columns(schema: FeatureSchema) -> set[str]:
    """The one-hot input columns of ``schema`` (its ``category`` context fields)."""
    return {f"context.{col}" for c in schema.context if c.kind == "category" for col in c.columns}


def quantile_edges(values: np.ndarray) -> tuple[float, ...]:
    """Decile inner edges of ``values``, each an attained value, duplicates dropped.

    Quantiles by ``inverted_cdf`` are values of the data, so the bin ``[e_k, e_k+1)``
    holds at least ``e_k`` itself; an edge equal to the minimum is dropped, as the bin
    below it would be empty.
    """
    qs = np.unique(np.quantile(values, QUANTILES, method="inverted_cdf"))
    qs = qs[qs > values.min()]
    return tuple(float(q) for q in qs)


def build_profile(
    model: str,
    version: str,
    matrix: np.ndarray,
    scores: np.ndarray,
    columns: Sequence[str],
    categories: Iterable[str] = (),
) -> Profile:
    """The reference of a model version from its training rows and its scores on them."""
    cats = set(categories)
    x = np.asarray(matrix, dtype=np.float32)
    s = np.asarray(scores, dtype=np.float32).reshape(-1)
    if x.shape != (len(s), len(columns)):
        raise ValueError(f"matrix {x.shape} does not fit {len(s)} scores, {len(columns)} columns")
    out = []
    for name, values in [*zip(columns, x.T, strict=True), (SCORE_COLUMN, s)]:
        kind = "category" if name in cats else "quantile"
        edges = (0.5,) if kind == "category" else quantile_edges(values)
        counts = np.bincount(
            np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1
        )
        shares = tuple(float(c) for c in counts / counts.sum())
        out.append(ColumnProfile(name, kind, edges, shares))
    return Profile(model, version, len(s), tuple(out))


# -- PSI ------------------------------------------------------------------------------------


def psi(counts: np.ndarray, reference: Sequence[float], epsilon: float = EPSILON) -> float | None:
    """PSI of served bin ``counts`` against training shares; None when nothing was counted."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return None
    a = np.maximum(c / total, epsilon)
    e = np.maximum(np.asarray(reference, dtype=np.float64), epsilon)
    return float(np.sum((a - e) * np.log(a / e)))


# -- counting (the request path) -----------------------------------------------------------


class BinCounter:
    """Counts rows per column and bin of a profile, vectorized over a whole matrix.

    For every column and inner edge it counts the rows at or above the edge (one
    broadcast comparison over the matrix and its scores, one sum over the rows); a
    bin's count is the difference of its two edges' counts (the rows at or above -inf
    are all of them, those at or above +inf none). Against ``np.searchsorted`` per column
    plus one ``np.bincount`` with per-column offsets, measured here for 50 rows of 25
    columns: 17 µs against 60 µs (the Python loop over 25 columns costs more than the
    arithmetic; at this size every NumPy call's fixed cost counts, so the whole request
    is a handful of calls). Exact for float32 inputs: each edge is rounded up to the
    nearest float32, and for a float32 ``v``, ``v >= e`` exactly when ``v >= ceil32(e)``.

    Counts come out flat in profile order: column ``j``'s bins start at ``offsets[j]``.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        cols = profile.columns
        width = len(cols)
        self.width = width - 1  # input columns; the score is the last
        depth = max(1, max(len(c.edges) for c in cols))
        # Edges as (depth, column), padded with +inf (no row reaches it).
        edges = np.full((depth, width), np.inf, dtype=np.float32)
        for j, c in enumerate(cols):
            edges[: len(c.edges), j] = _ceil32(c.edges)
        self._edges = edges
        nbins = np.array([c.bins for c in cols])
        self.offsets = np.concatenate([[0], np.cumsum(nbins)[:-1]]).astype(np.intp)
        self.size = int(nbins.sum())
        # Rows at or above each edge, flat: [all rows, none, then (edge d, column j) at
        # 2 + d * width + j]. Bin b of column j = at_or_above[lo] - at_or_above[hi].
        lo, hi = [], []
        for j, c in enumerate(cols):
            k = len(c.edges)
            for b in range(k + 1):
                lo.append(0 if b == 0 else 2 + (b - 1) * width + j)
                hi.append(1 if b == k else 2 + b * width + j)
        self._lo, self._hi = np.array(lo, dtype=np.intp), np.array(hi, dtype=np.intp)
        self._at_or_above = np.zeros(2 + depth * width, dtype=np.int32)
        self._ge = self._at_or_above[2:].reshape(depth, width)

    def count(self, matrix: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Rows per flat bin index for one float32 matrix (rows, columns) and its scores."""
        n = matrix.shape[0]
        x = np.empty((n, self.width + 1), dtype=np.float32)
        x[:, :-1] = matrix
        x[:, -1] = scores.reshape(-1)
        ge = x[:, None, :] >= self._edges  # (rows, depth, columns)
        np.add.reduce(ge.view(np.uint8), axis=0, dtype=np.int32, out=self._ge)
        a = self._at_or_above
        a[0] = n
        return a[self._lo] - a[self._hi]

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Flat counts -> column name -> counts per bin."""
        return {
            c.name: flat[o : o + c.bins]
            for c, o in zip(self.profile.columns, self.offsets, strict=True)
        }

    def report(self, flat: np.ndarray) -> dict[str, Any]:
        """PSI per input column and of the score, and the rows counted."""
        per = self.split(flat)
        refs = {c.name: c.shares for c in self.profile.columns}
        score = per.pop(SCORE_COLUMN)
        return {
            "rows": int(score.sum()),
            "features": {name: psi(counts, refs[name]) for name, counts in per.items()},
            "score": psi(score, refs[SCORE_COLUMN]),
        }


class DriftObserver:
    """Counts the rows the model scored (observe.py's hook) for the profile's version.

    Only predictions the model answered are counted: a fallback answer's rows were not
    scored by the model (or not even sent), and its scores are the rules'. Counts go to
    a local array on the request path and reach Prometheus in :meth:`flush`, which the
    gateway calls every :data:`FLUSH_INTERVAL_S` off the request path: incrementing 220
    multiprocess counters per request would cost more than the counting itself.
    """

    def __init__(
        self,
        profile: Profile,
        counter_for: Callable[[str, str], Any],
        sample_rate: float = 1.0,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        self.counter = BinCounter(profile)
        self.profile = profile
        self.sample_rate = sample_rate
        self._random = random_source
        self._pending = np.zeros(self.counter.size, dtype=np.int64)
        self._incs: list[Callable[[float], None]] = []
        for c in profile.columns:
            for b in range(c.bins):
                # Created up front so every bin's series exists (at 0) from the start:
                # PSI needs the empty bins too.
                self._incs.append(counter_for(c.name, str(b)).inc)

    def __call__(self, p: Any) -> None:
        if p.fallback is not None or p.model_version != self.profile.version:
            return
        if self.sample_rate < 1.0 and self._random() >= self.sample_rate:
            return
        self._pending += self.counter.count(p.matrix, p.scores)

    def flush(self) -> int:
        """Add the counts since the last flush to the Prometheus counters; rows flushed."""
        pending = self._pending
        nz = np.flatnonzero(pending)
        if not len(nz):
            return 0
        rows = int(pending[-self.profile.columns[-1].bins :].sum())
        for k, v in zip(nz.tolist(), pending[nz].tolist(), strict=True):
            self._incs[k](v)
        pending[:] = 0
        return rows


def _ceil32(edges: Sequence[float]) -> np.ndarray:
    """Each edge rounded up to the nearest float32."""
    e64 = np.asarray(edges, dtype=np.float64)
    e32 = e64.astype(np.float32)
    below = e32.astype(np.float64) < e64
    e32[below] = np.nextafter(e32[below], np.float32(np.inf))
    return e32


def counts_from_samples(
    samples: Iterable[tuple[str, dict[str, str], float]], counter: BinCounter, model: str
) -> np.ndarray:
    """Flat counts of ``model`` / the counter's version from scraped counter samples."""
    index = {
        (c.name, str(b)): int(o) + b
        for c, o in zip(counter.profile.columns, counter.offsets, strict=True)
        for b in range(c.bins)
    }
    out = np.zeros(counter.size, dtype=np.float64)
    version = counter.profile.version
    for name, labels, value in samples:
        if not name.endswith("_total"):
            continue
        if labels.get("model") != model or labels.get("version") != version:
            continue
        k = index.get((labels.get("column", ""), labels.get("bin", "")))
        if k is not None:
            out[k] += value
    return out


def window_seconds(since: float | None, now: float | None = None) -> float:
    if since is None or not math.isfinite(since) or since <= 0:
        return 0.0
    return max(0.0, (time.time() if now is None else now) - since)


# -- the gateway's side: profile per served version, flushing, the /drift report ----------

# How often counts reach Prometheus: well under a scrape interval (15 s), so a scrape
# is at most 2 s behind the requests. A flush increments ~220 multiprocess counters,
# 0.4 ms of CPU (loadtests/results/drift-observer.json): every 2 s, 0.02 % of a core.
FLUSH_INTERVAL_S = 2.0


def _families(registry: Any) -> Iterable[Any]:
    """Metric families of this pod: every worker's files in multiprocess mode."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        merged = CollectorRegistry()
        prom_mp.MultiProcessCollector(merged, path)
        return merged.collect()
    return registry.collect()


class DriftMonitor:
    """Drift counting for the model version the gateway serves (one per process).

    :meth:`on_model` (the health check, when the served version changes) loads that
    version's profile from the model repository, publishes its training shares and
    starts counting; :meth:`observe` is the pipeline's observer; a background task
    flushes counts every :data:`FLUSH_INTERVAL_S`; :meth:`report` is ``GET /drift``.
    """

    def __init__(self, metrics: Metrics, repository: Path | None, sample_rate: float) -> None:
        self.metrics = metrics
        self.repository = repository
        self.sample_rate = sample_rate
        self.model: tuple[str, str] = ("", "")
        self.observer: DriftObserver | None = None
        self._task: asyncio.Task[None] | None = None

    def on_model(self, name: str, version: str) -> None:
        """Count for ``name``/``version`` from now on (its profile), or stop counting."""
        if (name, version) == self.model:
            return
        if self.observer is not None:
            self.observer.flush()
        self.model, self.observer = (name, version), None
        if self.sample_rate <= 0 or not version or self.repository is None:
            return
        try:
            profile = load_profile(self.repository, name, version)
        except ConfigError as exc:
            log.warning("drift not counted: %s", exc)
            return
        if profile is None:
            log.warning(
                "drift not counted: no %s for model %s version %s in %s "
                "(write it with `gateway model profile --version %s`)",
                PROFILE_FILE, name, version, self.repository, version,
            )  # fmt: skip
            return
        m = self.metrics
        share = m.drift_reference_share
        for c in profile.columns:
            for b, s in enumerate(c.shares):
                share.labels(name, version, c.name, str(b)).set(s)
        m.drift_counting_since.labels(name, version).set(time.time())
        rows = m.drift_bin_rows
        self.observer = DriftObserver(
            profile,
            lambda column, b: rows.labels(name, version, column, b),
            self.sample_rate,
        )
        log.info("drift: counting model %s version %s (sample rate %s)", name, version,
                 self.sample_rate)  # fmt: skip

    def observe(self, p: Any) -> None:
        obs = self.observer
        if obs is not None:
            obs(p)

    def flush(self) -> None:
        if self.observer is not None:
            self.observer.flush()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="drift")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - a bug here must not stop the flushing
                log.exception("drift flush failed")

    def report(self) -> dict[str, Any]:
        """``GET /drift``: PSI per input column and of the score over every row this pod's
        workers counted for the served version since they began (``window_s``)."""
        name, version = self.model
        out: dict[str, Any] = {
            "model": {"name": name, "version": version},
            "profile": self.observer is not None,
            "window_s": 0.0,
            "rows": 0,
            "features": {},
            "score": None,
        }
        obs = self.observer
        if obs is None:
            return out
        self.flush()
        samples: list[tuple[str, dict[str, str], float]] = []
        since: float | None = None
        for fam in _families(self.metrics.registry):
            if fam.name == "gateway_drift_bin_rows":
                samples += [(s.name, s.labels, s.value) for s in fam.samples]
            elif fam.name == "gateway_drift_counting_since_timestamp_seconds":
                for s in fam.samples:
                    if s.labels.get("model") == name and s.labels.get("version") == version:
                        since = s.value if since is None else min(since, s.value)
        counts = counts_from_samples(samples, obs.counter, name)
        out.update(obs.counter.report(counts), window_s=round(window_seconds(since), 3))
        return out
