"""Seeded synthetic users, items and impressions with a known click process.

The generating process (all draws from one ``numpy.random.Generator(seed)``):

* Users ``u`` have a taste vector ``e_u ~ N(0, I_8)`` and an activity level
  ``a_u ~ LogNormal(1, 1)``; active users click a little more (``b_u = 0.25 * z(log a_u)``).
* Items ``i`` have ``e_i ~ N(0, I_8)``, a Zipf popularity ``p_i ∝ rank^-1.1`` and an
  intrinsic appeal ``b_i ~ N(0, 0.6) + 0.35 * z(log p_i)``. The stored ``ctr_prior`` is a
  noisy historical estimate of the item's base click rate: ``sigmoid(β0 + b_i + N(0, 0.25))``.
* An impression draws a user ∝ activity, an item ∝ popularity, an hour from a diurnal
  curve and a device (mobile 60 %, desktop 30 %, tablet 10 %). Its click logit is::

      β0 + 0.9 * <e_u, e_i> / sqrt(8) + b_i + b_u + 0.45 * cos(2π (hour - 20) / 24)
         + device effect {mobile +0.2, desktop 0, tablet -0.25} + N(0, 0.3)

  and the click is Bernoulli(sigmoid(logit)), ``β0 = -3.9`` (about 18 % CTR, popular
  items being both shown more and clicked more).

The last 20 % of impressions (by a seeded permutation) are the held-out split.
Entity ids are ``u<index>`` and ``i<index>``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gateway.schema import DEVICES, EMBED_DIM, SCHEMA, FeatureSchema

BETA0 = -3.9
DEVICE_P = np.array([0.6, 0.3, 0.1])
DEVICE_EFFECT = np.array([0.2, 0.0, -0.25])
# Traffic by hour: low at night, peak in the evening.
_HOUR_W = 1.0 + 0.8 * np.cos(2.0 * np.pi * (np.arange(24) - 20) / 24.0)
HOUR_P = _HOUR_W / _HOUR_W.sum()


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def user_id(index: int) -> str:
    return f"u{index}"


def item_id(index: int) -> str:
    return f"i{index}"


@dataclass
class World:
    """Entities and their stored feature vectors (schema order, float32)."""

    seed: int
    user_vectors: np.ndarray  # (n_users, SCHEMA.user.width)
    item_vectors: np.ndarray  # (n_items, SCHEMA.item.width)
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_emb: np.ndarray
    item_emb: np.ndarray
    user_weight: np.ndarray  # sampling probability of each user
    item_weight: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_vectors)

    @property
    def n_items(self) -> int:
        return len(self.item_vectors)


@dataclass
class Impressions:
    """One row per impression: who saw what, when, on which device, and the click."""

    user: np.ndarray  # int index
    item: np.ndarray  # int index
    hour: np.ndarray  # 0..23
    device: np.ndarray  # index into DEVICES
    click: np.ndarray  # 0/1 float32

    def __len__(self) -> int:
        return len(self.click)

    def take(self, idx: np.ndarray) -> Impressions:
        return Impressions(
            self.user[idx], self.item[idx], self.hour[idx], self.device[idx], self.click[idx]
        )


def make_world(n_users: int = 10_000, n_items: int = 5_000, seed: int = 7) -> World:
    """Draw users and items. The same seed and sizes always give the same world."""
    if n_users < 1 or n_items < 1:
        raise ValueError("n_users and n_items must be at least 1")
    rng = np.random.default_rng(seed)
    user_emb = rng.standard_normal((n_users, EMBED_DIM))
    activity = rng.lognormal(1.0, 1.0, n_users)
    user_bias = 0.25 * _z(np.log(activity)) if n_users > 1 else np.zeros(1)

    item_emb = rng.standard_normal((n_items, EMBED_DIM))
    ranks = rng.permutation(n_items) + 1
    popularity = 1e5 * ranks.astype(np.float64) ** -1.1
    item_bias = rng.normal(0.0, 0.6, n_items)
    if n_items > 1:
        item_bias += 0.35 * _z(np.log(popularity))
    ctr_prior = _sigmoid(BETA0 + item_bias + rng.normal(0.0, 0.25, n_items))

    user_vectors = np.empty((n_users, SCHEMA.user.width), dtype=np.float32)
    user_vectors[:, 0] = np.log1p(activity)
    user_vectors[:, 1:] = user_emb
    item_vectors = np.empty((n_items, SCHEMA.item.width), dtype=np.float32)
    item_vectors[:, 0] = np.log1p(popularity)
    item_vectors[:, 1] = ctr_prior
    item_vectors[:, 2:] = item_emb
    return World(
        seed=seed,
        user_vectors=user_vectors,
        item_vectors=item_vectors,
        user_bias=user_bias,
        item_bias=item_bias,
        user_emb=user_emb,
        item_emb=item_emb,
        user_weight=activity / activity.sum(),
        item_weight=popularity / popularity.sum(),
    )


def click_logit(
    world: World, imp_user: np.ndarray, imp_item: np.ndarray, hour: np.ndarray, device: np.ndarray
) -> np.ndarray:
    """The true click logit without noise (what a perfect model would learn)."""
    affinity = np.einsum("ij,ij->i", world.user_emb[imp_user], world.item_emb[imp_item])
    return (
        BETA0
        + 0.9 * affinity / np.sqrt(EMBED_DIM)
        + world.item_bias[imp_item]
        + world.user_bias[imp_user]
        + 0.45 * np.cos(2.0 * np.pi * (hour - 20) / 24.0)
        + DEVICE_EFFECT[device]
    )


def make_impressions(world: World, n: int = 250_000, seed: int | None = None) -> Impressions:
    """Draw ``n`` impressions and their clicks from the process in the module docstring."""
    rng = np.random.default_rng((world.seed if seed is None else seed) + 1)
    users = rng.choice(world.n_users, size=n, p=world.user_weight)
    items = rng.choice(world.n_items, size=n, p=world.item_weight)
    hours = rng.choice(24, size=n, p=HOUR_P)
    devices = rng.choice(len(DEVICES), size=n, p=DEVICE_P)
    logit = click_logit(world, users, items, hours, devices) + rng.normal(0.0, 0.3, n)
    clicks = (rng.random(n) < _sigmoid(logit)).astype(np.float32)
    return Impressions(users, items, hours, devices, clicks)


def split(imps: Impressions, seed: int, holdout: float = 0.2) -> tuple[Impressions, Impressions]:
    """Seeded train / held-out split."""
    rng = np.random.default_rng(seed + 2)
    perm = rng.permutation(len(imps))
    cut = int(len(imps) * (1.0 - holdout))
    return imps.take(perm[:cut]), imps.take(perm[cut:])


def design_matrix(world: World, imps: Impressions, schema: FeatureSchema = SCHEMA) -> np.ndarray:
    """The training pipeline's model input for ``imps``: one row per impression."""
    ctx = schema.encode_context_columns({"hour": imps.hour, "device": imps.device})
    return schema.assemble_rows(world.user_vectors[imps.user], world.item_vectors[imps.item], ctx)
