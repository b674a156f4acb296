"""A rollout's state, as one Redis hash holds it, and sticky user assignment.

All pure: no I/O. The hash is ``gw:rollout:{model}:state`` (store.py); every field is a
string there. ``rev`` grows by one on every change, so a writer that read revision
*r* changes the state only if it is still *r* (compare-and-set, store.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import Any

# Assignment resolution: users fall in 10,000 buckets, so a weight has 0.01 % steps.
BUCKETS = 10_000


class Mode(StrEnum):
    NONE = "none"
    SHADOW = "shadow"
    CANARY = "canary"


class Phase(StrEnum):
    """The rollout's ``state`` field (``Phase`` here: ``state`` names the whole record)."""

    IDLE = "idle"
    RUNNING = "running"
    ROLLED_BACK = "rolled_back"
    PROMOTED = "promoted"


class Variant(StrEnum):
    """Which arm served an answer (``"variant"`` in the /predict response)."""

    PRIMARY = "primary"
    CANDIDATE = "candidate"


class Action(StrEnum):
    """What a decision did (``gateway_rollout_decisions_total{action}``)."""

    START = "start"
    ADVANCE = "advance"
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    ABORT = "abort"


class Reason(StrEnum):
    """Why (``gateway_rollout_decisions_total{reason}``); the log line says more."""

    OPERATOR = "operator"
    STEP_PASSED = "step_passed"
    LAST_STEP_PASSED = "last_step_passed"
    FAILURE_RATE = "failure_rate"
    LATENCY = "latency"


@dataclass(frozen=True)
class Decision:
    at: float  # epoch seconds
    action: Action
    reason: str  # a Reason, then ": " and the detail

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at, "action": str(self.action), "reason": self.reason}


@dataclass(frozen=True)
class RolloutState:
    """One model's rollout. ``primary``/``candidate`` are version strings ("" = none)."""

    mode: Mode = Mode.NONE
    phase: Phase = Phase.IDLE
    primary: str = ""
    candidate: str = ""
    steps: tuple[float, ...] = ()
    step: int = 0  # index into steps
    step_seconds: float = 60.0
    step_started: float = 0.0  # epoch seconds
    rollout_id: str = ""  # names this rollout's count keys
    baseline_p99_ms: float = 0.0  # the primary's P99 at the last step it had traffic
    last: Decision | None = None
    rev: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def weight(self) -> float:
        """Percent of users on the candidate now."""
        if self.mode is Mode.CANARY and self.phase is Phase.RUNNING and self.steps:
            return self.steps[min(self.step, len(self.steps) - 1)]
        return 0.0

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING and self.mode is not Mode.NONE

    @property
    def counts_token(self) -> str:
        """The suffix of this step's count key: ``counts:{rollout_id}.{step}``."""
        return f"{self.rollout_id}.{self.step}"

    def to_fields(self) -> dict[str, str]:
        """The Redis hash fields (every value a string)."""
        last = self.last
        return {
            "mode": str(self.mode),
            "state": str(self.phase),
            "primary": self.primary,
            "candidate": self.candidate,
            "steps": ",".join(_num(s) for s in self.steps),
            "step": str(self.step),
            "step_seconds": _num(self.step_seconds),
            "step_started": repr(self.step_started),
            "id": self.rollout_id,
            "baseline_p99_ms": repr(self.baseline_p99_ms),
            "last_at": repr(last.at) if last else "",
            "last_action": str(last.action) if last else "",
            "last_reason": last.reason if last else "",
            "rev": str(self.rev),
        }

    @classmethod
    def from_fields(cls, f: dict[str, str]) -> RolloutState:
        """Parse the hash; an empty one is the idle state. ValueError if malformed."""
        if not f:
            return cls()
        last = None
        if f.get("last_action"):
            last = Decision(float(f["last_at"]), Action(f["last_action"]), f.get("last_reason", ""))
        steps = tuple(float(s) for s in f.get("steps", "").split(",") if s)
        return cls(
            mode=Mode(f.get("mode", "none")),
            phase=Phase(f.get("state", "idle")),
            primary=f.get("primary", ""),
            candidate=f.get("candidate", ""),
            steps=steps,
            step=int(f.get("step") or 0),
            step_seconds=float(f.get("step_seconds") or 60),
            step_started=float(f.get("step_started") or 0),
            rollout_id=f.get("id", ""),
            baseline_p99_ms=float(f.get("baseline_p99_ms") or 0),
            last=last,
            rev=int(f.get("rev") or 0),
        )

    def with_decision(self, at: float, action: Action, reason: str, **changes: Any) -> RolloutState:
        return replace(self, last=Decision(at, action, reason), **changes)

    def public(self, model: str) -> dict[str, Any]:
        """The ``GET /rollout`` and ``gateway rollout status --json`` body."""
        cand = {"name": model, "version": self.candidate} if self.candidate else None
        return {
            "model": model,
            "mode": str(self.mode),
            "state": str(self.phase),
            "primary": {"name": model, "version": self.primary} if self.primary else None,
            "candidate": cand,
            "weight": self.weight,
            "steps": list(self.steps),
            "step": self.step + 1 if self.steps else 0,
            "step_seconds": self.step_seconds,
            "step_started_at": self.step_started or None,
            "last_decision": self.last.as_dict() if self.last else None,
            "rev": self.rev,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def parse_steps(text: str) -> tuple[float, ...]:
    """``"5,20,50,100"`` -> (5.0, 20.0, 50.0, 100.0); ValueError (one line) if bad.

    Steps are percents, increasing, in (0, 100], and the last is 100: a canary that
    passes every step is promoted, so it must have served everyone once.
    """
    try:
        steps = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"steps must be comma-separated percents, got {text!r}") from None
    if not steps:
        raise ValueError("steps must name at least one percent")
    if any(not 0 < s <= 100 for s in steps):
        raise ValueError(f"every step must be in (0, 100], got {text!r}")
    if any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
        raise ValueError(f"steps must increase, got {text!r}")
    if steps[-1] != 100:
        raise ValueError(f"the last step must be 100, got {text!r}")
    return steps


class Assigner:
    """Sticky assignment: a user is on the candidate iff its bucket < weight x 100.

    bucket = blake2b("{model}:{candidate}:{user_id}") mod 10,000, so it depends on the
    user and the rollout only: every worker and replica agrees, and raising the weight
    only adds users (those on the candidate at 5 % stay on it at 20 %). A new candidate
    version reshuffles, so one rollout's early users are not always the next one's.
    """

    __slots__ = ("_prefix", "_threshold")

    def __init__(self, model: str, candidate: str, weight: float) -> None:
        h = hashlib.blake2b(digest_size=8)
        h.update(f"{model}:{candidate}:".encode())
        self._prefix = h
        self._threshold = round(weight * BUCKETS / 100)

    def bucket(self, user_id: str) -> int:
        h = self._prefix.copy()
        h.update(user_id.encode())
        return int.from_bytes(h.digest(), "big") % BUCKETS

    def variant(self, user_id: str) -> Variant:
        if self._threshold <= 0:
            return Variant.PRIMARY
        if self._threshold >= BUCKETS or self.bucket(user_id) < self._threshold:
            return Variant.CANDIDATE
        return Variant.PRIMARY
