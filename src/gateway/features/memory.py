"""In-memory feature store for the embedded default, filled from the generator."""

from __future__ import annotations

import numpy as np

from gateway.features.base import FeatureBatch
from gateway.schema import SCHEMA, FeatureSchema
from gateway.synth import World, item_id, user_id


class InMemoryFeatureStore:
    """Holds the world's vectors in two arrays; lookups are dict hits plus one gather."""

    name = "memory"

    def __init__(self, world: World, schema: FeatureSchema = SCHEMA) -> None:
        self._schema = schema
        self._users = {user_id(i): i for i in range(world.n_users)}
        self._items = {item_id(i): i for i in range(world.n_items)}
        self._user_vectors = world.user_vectors
        # One extra row at the end holds the defaults, so unknown ids gather it.
        self._item_vectors = np.vstack([world.item_vectors, schema.item.default_vector()])
        self._default_item = world.n_items

    async def fetch(self, user_id: str, item_ids: list[str]) -> FeatureBatch:
        u = self._users.get(user_id)
        user = self._user_vectors[u] if u is not None else self._schema.user.default_vector()
        get = self._items.get
        idx = np.fromiter(
            (get(i, self._default_item) for i in item_ids), dtype=np.intp, count=len(item_ids)
        )
        missing = int((idx == self._default_item).sum())
        return FeatureBatch(user, self._item_vectors[idx], u is None, missing)

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None
