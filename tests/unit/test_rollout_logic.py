"""Rollouts, the pure parts: sticky assignment, the state's Redis form, the canary's
verdict, fleet P99 from bucket counts, rank agreement, the compare-and-set contract."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.rollout.analysis import (
    CanaryPolicy,
    VariantCounts,
    bucket_index,
    counts_from_fields,
    judge,
    merge,
)
from gateway.rollout.runtime import promoted, started
from gateway.rollout.shadow import spearman
from gateway.rollout.state import (
    Action,
    Assigner,
    Mode,
    Phase,
    RolloutState,
    Variant,
    parse_steps,
)
from gateway.rollout.store import Conflict, MemoryRolloutStore

USERS = [f"u{i}" for i in range(20_000)]


def on_candidate(weight: float, candidate: str = "2") -> set[str]:
    a = Assigner("ctr", candidate, weight)
    return {u for u in USERS if a.variant(u) is Variant.CANDIDATE}


def test_assignment_is_monotone_in_the_weight_and_close_to_it() -> None:
    previous: set[str] = set()
    for weight in (5, 20, 50, 100):
        users = on_candidate(weight)
        assert previous <= users  # on the candidate at 5 %: still on it at 20 %
        assert abs(len(users) / len(USERS) - weight / 100) < 0.015
        previous = users
    assert on_candidate(0) == set()
    assert on_candidate(100) == set(USERS)


def test_assignment_depends_on_the_rollout_and_the_user_only() -> None:
    assert on_candidate(20) == on_candidate(20)  # a fresh object: the same answer
    # Another candidate version reshuffles users (a different 20 %).
    overlap = len(on_candidate(20) & on_candidate(20, candidate="3")) / len(on_candidate(20))
    assert overlap < 0.4


def test_state_round_trips_through_its_redis_hash() -> None:
    s = started(RolloutState(), 1000.5, "1", "2", Mode.CANARY, (5.0, 20.0, 100.0), 30)
    s2 = RolloutState.from_fields(s.to_fields())
    assert s2 == s
    assert s.weight == 5 and s.running and s.last is not None and s.last.action is Action.START
    p = promoted(s, 1010.0, "operator: promoted")
    assert (p.primary, p.candidate, p.phase, p.mode, p.weight) == (
        "2",
        "",
        Phase.PROMOTED,
        Mode.NONE,
        0,
    )
    assert RolloutState.from_fields({}) == RolloutState()


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("5,3,100", "increase"),
        ("5,20", "last step must be 100"),
        ("0,100", "(0, 100]"),
        ("a,100", "comma-separated"),
        ("", "at least one"),
    ],
)
def test_bad_steps_are_refused_with_the_reason(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(").replace("]", r"\]")):
        parse_steps(text)


def test_embedded_rollout_settings_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_ROLLOUT_CANDIDATE_VERSION"):
        load_settings(rollout_mode="canary")
    with pytest.raises(ConfigError, match="increase"):
        load_settings(rollout_mode="canary", rollout_candidate_version="2", rollout_steps="50,5")
    s = load_settings(rollout_mode="shadow", rollout_candidate_version="2")
    assert s.rollout_mode == "shadow"


def counts(
    cand: tuple[int, int, float], prim: tuple[int, int, float]
) -> dict[Variant, VariantCounts]:
    """{variant: (requests, failures, latency_s of every answered one)}."""
    fields: dict[str, int] = {}
    for variant, (n, fail, lat) in ((Variant.CANDIDATE, cand), (Variant.PRIMARY, prim)):
        for i in range(n):
            failed = i < fail
            merge(fields, variant, failed, None if failed else lat)
    return counts_from_fields({k: str(v) for k, v in fields.items()})


POLICY = CanaryPolicy(min_requests=100)


def test_a_failing_candidate_is_rolled_back_before_its_step_ends() -> None:
    v = judge(counts((100, 2, 0.002), (400, 0, 0.002)), POLICY, 1.0, 60, False)
    assert v.action is Action.ROLLBACK and v.reason.startswith("failure_rate")
    # Under 1 % but over the primary's rate + 0.5 pp.
    v = judge(counts((1000, 8, 0.002), (1000, 1, 0.002)), POLICY, 1.0, 60, False)
    assert v.action is Action.ROLLBACK and "primary" in v.reason
    # Too few requests to judge yet: keep going, whatever the rate.
    v = judge(counts((99, 50, 0.002), (400, 0, 0.002)), POLICY, 1.0, 60, False)
    assert v.action is None


def test_latency_is_judged_at_the_end_of_the_step() -> None:
    slow = counts((200, 0, 0.009), (800, 0, 0.003))  # 9 ms > 1.2 x 3 + 2 = 5.6 ms
    assert judge(slow, POLICY, 10, 60, False).action is None
    v = judge(slow, POLICY, 60, 60, False)
    assert v.action is Action.ROLLBACK and v.reason.startswith("latency")
    ok = counts((200, 0, 0.005), (800, 0, 0.003))  # 5 ms <= 5.6 ms
    assert judge(ok, POLICY, 60, 60, False).action is Action.ADVANCE
    assert judge(ok, POLICY, 60, 60, True).action is Action.PROMOTE
    # At 100 % the primary has no traffic: the last P99 measured for it is the bar.
    alone = counts((200, 0, 0.009), (0, 0, 0.0))
    assert judge(alone, POLICY, 60, 60, True, baseline_p99_ms=3.0).action is Action.ROLLBACK
    assert judge(alone, POLICY, 60, 60, True, baseline_p99_ms=8.0).action is Action.PROMOTE


def test_a_step_waits_for_its_minimum_of_candidate_requests() -> None:
    v = judge(counts((50, 0, 0.002), (400, 0, 0.002)), POLICY, 120, 60, False)
    assert v.action is None and "waiting for 100" in v.reason


def test_fleet_p99_is_the_upper_bound_of_its_bucket() -> None:
    c = VariantCounts()
    for s in [0.0011] * 98 + [0.0049, 0.2]:
        c.buckets[bucket_index(s)] += 1
    assert c.quantile_ms(0.5) == pytest.approx(1.5)
    assert c.quantile_ms(0.99) == pytest.approx(5.0)
    assert VariantCounts().quantile_ms(0.99) is None


def test_spearman() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9], dtype=np.float32)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a[:1], a[:1]) is None


def test_memory_store_compare_and_set() -> None:
    async def go() -> None:
        store = MemoryRolloutStore()
        s = await store.read()
        new = await store.write(started(s, 1.0, "1", "2", Mode.SHADOW, (), 1), s.rev)
        assert new.rev == 1 and (await store.read()).candidate == "2"
        with pytest.raises(Conflict):
            await store.write(s, s.rev)  # written from a stale read
        await store.add_counts({"a.0": {"primary:n": 2}})
        await store.add_counts({"a.0": {"primary:n": 3}})
        assert await store.counts("a.0") == {"primary:n": "5"}

    asyncio.run(go())
