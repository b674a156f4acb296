"""The rule-based scorer that answers when the model cannot.

It reads the same assembled feature matrix the model would have seen, so it ranks
from whatever features did arrive; entities that did not arrive carry the schema's
defaults, and with no features at all every item gets the static prior.

The rules come from the schema file's ``[fallback]`` table and are linear in log-odds
(deterministic, no training, no randomness)::

    z = logit(clip(base column)) + sum(weight * column)      score = sigmoid(z)

``base`` names a column that holds a probability (the built-in schema: the item's stored
historical CTR, whose default for an unknown item is the global average CTR); without
one, ``z`` starts at ``logit(prior)``. The built-in CTR schema (``schemas/ctr.toml``)
declares: popular items ``+0.05 * popularity_log``, active users ``+0.05 *
activity_log``, evening traffic ``+0.3 * cos(2π (hour - 20) / 24)`` (an ``hour_peak``
rule, zero when the hour is not given), device mobile ``+0.15``, tablet ``-0.15``. The
model report measures its AUC on the held-out split (floor 0.60).

**A custom schema** gets the rules its file declares. A file without ``[fallback]``
gets a constant: every item scores ``prior`` (0.5), so a fallback answer keeps the
request's item order; the answer still says ``fallback`` with its reason.
"""

from __future__ import annotations

import numpy as np

from gateway.schema import SCHEMA, FeatureSchema


class FallbackScorer:
    """Scores an assembled feature matrix with the schema's fallback rules."""

    def __init__(self, schema: FeatureSchema = SCHEMA) -> None:
        rules = schema.fallback
        cols = schema.input_columns
        self._base = cols.index(rules.base) if rules.base is not None else None
        p = rules.prior
        self._z0 = float(np.log(p / (1.0 - p)))
        self._weights = np.zeros(len(cols), dtype=np.float64)
        for col, w in rules.weights:
            self._weights[cols.index(col)] += w
        self._linear = bool(self._weights.any())

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Return one score per row of ``matrix`` (float32, in (0, 1))."""
        m = matrix.astype(np.float64, copy=False)
        if self._base is not None:
            p = np.clip(m[:, self._base], 1e-4, 1.0 - 1e-4)
            z = np.log(p / (1.0 - p))
        else:
            z = np.full(len(m), self._z0)
        if self._linear:
            z = z + m @ self._weights
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
