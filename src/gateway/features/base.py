"""The feature-store seam: what the pipeline needs from a store, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class FeatureBatch:
    """One request's user and item vectors in schema order; unknown entities on defaults."""

    user: np.ndarray  # (user width,)
    items: np.ndarray  # (n items, item width)
    user_missing: bool
    items_missing: int
    corrupt: int = 0  # values present but unusable (wrong length, NaN); served on defaults


class FeatureStore(Protocol):
    """Fetches features for one user and many items in one round trip."""

    name: str

    async def fetch(self, user_id: str, item_ids: list[str]) -> FeatureBatch:
        """Return the batch; raise a ``FeatureStoreError`` when the store fails."""
        ...

    async def check(self) -> None:
        """Raise a ``FeatureStoreError`` unless the store is reachable and on our schema."""
        ...

    async def close(self) -> None: ...
