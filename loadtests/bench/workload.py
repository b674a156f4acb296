"""The traffic both load tools send: Zipf-distributed users and items, some unknown ids.

Shared by the locustfile and the benchmark so that both ask the same questions.
Popularity in a recommender is heavy-tailed: a few users and items take most of the
traffic. A bounded Zipf law over ranks with exponent 1.1 (a common fit for item
popularity) gives that; each rank maps to an id through a seeded permutation, so
the popular ids are spread over the key space as in production.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson

from gateway.schema import DEVICES
from gateway.synth import item_id, user_id

# Ids the feature loader writes (`gateway features load` defaults).
N_USERS = 10_000
N_ITEMS = 5_000
ZIPF_S = 1.1
# 2 % of ids are unknown: cold-start users and items just published, which the gateway
# serves on schema defaults (counted in `missing`), never as an error.
UNKNOWN_RATE = 0.02


def _zipf_cdf(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


@dataclass
class Workload:
    """Draws /predict bodies; deterministic for a seed."""

    seed: int = 1
    min_items: int = 10
    max_items: int = 200
    unknown_rate: float = UNKNOWN_RATE

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._user_cdf = _zipf_cdf(N_USERS, ZIPF_S)
        self._item_cdf = _zipf_cdf(N_ITEMS, ZIPF_S)
        self._user_perm = np.random.default_rng(self.seed + 1).permutation(N_USERS)
        self._item_perm = np.random.default_rng(self.seed + 2).permutation(N_ITEMS)
        self._serial = 0

    def _ranks(self, cdf: np.ndarray, k: int) -> np.ndarray:
        return np.searchsorted(cdf, self._rng.random(k))

    def _unknown(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}new{self.seed}_{self._serial}"

    def user(self) -> str:
        if self._rng.random() < self.unknown_rate:
            return self._unknown("u")
        return user_id(int(self._user_perm[self._ranks(self._user_cdf, 1)[0]]))

    def items(self, n: int) -> list[str]:
        """``n`` distinct item ids, Zipf-popular, with about ``unknown_rate`` unknown."""
        chosen: dict[str, None] = {}
        while len(chosen) < n:
            for r in self._ranks(self._item_cdf, 2 * n):
                chosen.setdefault(item_id(int(self._item_perm[r])), None)
                if len(chosen) == n:
                    break
        ids = list(chosen)
        for k in np.flatnonzero(self._rng.random(n) < self.unknown_rate):
            ids[k] = self._unknown("i")
        return ids

    def n_items(self) -> int:
        return int(self._rng.integers(self.min_items, self.max_items + 1))

    def body(self, n_items: int | None = None) -> dict[str, object]:
        """One request body; ``n_items`` fixed, or drawn from [min_items, max_items]."""
        n = n_items if n_items is not None else self.n_items()
        return {
            "user_id": self.user(),
            "item_ids": self.items(n),
            "context": {
                "hour": int(self._rng.integers(0, 24)),
                "device": DEVICES[int(self._rng.integers(0, len(DEVICES)))],
            },
        }

    def bodies(self, count: int, n_items: int | None = None) -> list[bytes]:
        return [orjson.dumps(self.body(n_items)) for _ in range(count)]
