import numpy as np

from gateway.fallback import FallbackScorer
from gateway.features import codec
from gateway.schema import GLOBAL_CTR_PRIOR, SCHEMA
from gateway.synth import Impressions, design_matrix, make_world


def _row(ctr=0.05, pop=0.0, act=0.0, hour=None, device=None) -> np.ndarray:
    user = SCHEMA.user.default_vector()
    user[0] = act
    item = SCHEMA.item.default_vector()
    item[0], item[1] = pop, ctr
    ctx = SCHEMA.encode_context({"hour": hour, "device": device})
    return SCHEMA.assemble(user, item[None, :], ctx)


def test_fallback_rules_order_items_by_prior_ctr_and_popularity() -> None:
    f = FallbackScorer()
    low, high = f.score(_row(ctr=0.01))[0], f.score(_row(ctr=0.2))[0]
    assert high > low
    assert f.score(_row(ctr=0.05, pop=8.0))[0] > f.score(_row(ctr=0.05, pop=0.0))[0]
    assert f.score(_row(act=5.0))[0] > f.score(_row(act=0.0))[0]


def test_fallback_context_rules() -> None:
    f = FallbackScorer()
    assert f.score(_row(hour=20))[0] > f.score(_row(hour=8))[0]
    assert f.score(_row(device="mobile"))[0] > f.score(_row(device="desktop"))[0]
    assert f.score(_row(device="desktop"))[0] > f.score(_row(device="tablet"))[0]


def test_fallback_with_no_features_is_the_static_prior() -> None:
    s = FallbackScorer().score(np.vstack([_row(), _row(), _row()]))
    assert np.allclose(s, GLOBAL_CTR_PRIOR, atol=1e-6)
    assert len(set(s.tolist())) == 1


def test_fallback_is_deterministic() -> None:
    x = np.random.default_rng(0).random((50, SCHEMA.input_width), dtype=np.float32)
    assert np.array_equal(FallbackScorer().score(x), FallbackScorer().score(x))


def test_context_encoding_matches_training_encoding() -> None:
    for hour in range(24):
        for d, name in enumerate(("mobile", "desktop", "tablet")):
            serve = SCHEMA.encode_context({"hour": hour, "device": name})
            train = SCHEMA.encode_context_columns(
                {"hour": np.array([hour]), "device": np.array([d])}
            )
            assert serve.tobytes() == train[0].tobytes()


def test_unknown_context_encodes_as_zeros() -> None:
    assert not SCHEMA.encode_context(None).any()
    assert not SCHEMA.encode_context({"device": "watch"}).any()


def test_assembly_equals_training_design_matrix_byte_for_byte() -> None:
    w = make_world(30, 20, seed=1)
    items = np.array([3, 0, 19, 7])
    imps = Impressions(np.full(4, 5), items, np.full(4, 21), np.full(4, 2), np.zeros(4, np.float32))
    train = design_matrix(w, imps)
    serve = SCHEMA.assemble(
        w.user_vectors[5],
        w.item_vectors[items],
        SCHEMA.encode_context({"hour": 21, "device": "tablet"}),
    )
    assert serve.tobytes() == train.tobytes()


def test_codec_round_trip_and_corrupt_values() -> None:
    w = make_world(3, 4, seed=2)
    user = codec.encode(SCHEMA.user, w.user_vectors[1])
    items = [codec.encode(SCHEMA.item, v) for v in w.item_vectors]
    b = codec.decode(user, items)
    assert np.array_equal(b.user, w.user_vectors[1]) and np.array_equal(b.items, w.item_vectors)
    assert (b.user_missing, b.items_missing, b.corrupt) == (False, 0, 0)

    nan = np.full(SCHEMA.item.width, np.nan, np.float32).tobytes()
    b = codec.decode(b"short", [items[0], None, b"\x00" * 3, nan])
    assert b.user_missing and b.items_missing == 3 and b.corrupt == 3
    assert np.array_equal(b.user, SCHEMA.user.default_vector())
    assert np.array_equal(b.items[0], w.item_vectors[0])
    for k in (1, 2, 3):
        assert np.array_equal(b.items[k], SCHEMA.item.default_vector())


def test_schema_fingerprint_changes_with_layout() -> None:
    from dataclasses import replace

    from gateway.schema import Feature

    other = replace(
        SCHEMA, item=replace(SCHEMA.item, features=SCHEMA.item.features + (Feature("x"),))
    )
    assert other.store_version != SCHEMA.store_version
    assert SCHEMA.input_width == 24
