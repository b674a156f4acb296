from gateway.policy.budget import BudgetPolicy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def policy() -> BudgetPolicy:
    return BudgetPolicy.from_ms(50, features=15, inference=30, postprocess=5)


def test_stage_timeout_is_the_stage_limit_while_total_has_room() -> None:
    clock = Clock()
    b = policy().start(clock=clock)
    assert b.stage_timeout("features") == 0.015
    clock.t += 0.010
    assert abs(b.remaining() - 0.040) < 1e-12
    assert b.stage_timeout("inference") == 0.030


def test_stage_timeout_shrinks_to_what_is_left_of_the_total() -> None:
    clock = Clock()
    b = policy().start(clock=clock)
    clock.t += 0.035
    assert abs(b.stage_timeout("inference") - 0.015) < 1e-12
    clock.t += 0.020
    assert b.remaining() == 0.0
    assert b.expired()
    assert b.stage_timeout("postprocess") == 0.0


def test_header_tightens_but_never_loosens() -> None:
    clock = Clock()
    assert policy().start(5, clock=clock).total_s == 0.005
    assert policy().start(500, clock=clock).total_s == 0.050
    b = policy().start(5, clock=clock)
    assert abs(b.stage_timeout("features") - 0.005) < 1e-9


def test_unknown_stage_is_rejected() -> None:
    import pytest

    with pytest.raises(ValueError, match="unknown stages"):
        BudgetPolicy.from_ms(50, decode=3)


def test_client_deadline_counts_from_arrival_and_upload_time_is_its_own() -> None:
    clock = Clock()
    arrival = clock.t
    clock.t += 0.030  # the body took 30 ms to arrive
    # No header: the gateway's own 50 ms start now; the upload did not eat them.
    assert policy().start(arrival=arrival, clock=clock).total_s == 0.050
    # A 40 ms client deadline: 10 ms are left of it.
    b = policy().start(40, arrival=arrival, clock=clock)
    assert abs(b.total_s - 0.010) < 1e-9
    # A deadline already gone: nothing left, never negative.
    assert policy().start(20, arrival=arrival, clock=clock).total_s == 0.0
