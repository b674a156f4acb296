"""One worker's view of the rollout: follow the state, assign users, count, decide.

Every worker polls the state every ``poll_s`` (0.5 s by default, so the fleet follows a
change within a second) and flushes its per-variant counts on the same beat: one
pipelined HINCRBY round trip per worker per beat, never one per request. The worker
holding the lease (store.py) also judges the canary (analysis.py) and writes the
decision. Nothing here is awaited on the request path: a request reads the last
snapshot (:meth:`RolloutRuntime.assign`) and adds to an in-process dict
(:meth:`RolloutRuntime.count`); if Redis is down the worker keeps its last state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import replace

from gateway.errors import InferenceError
from gateway.inference.base import InferenceBackend
from gateway.metrics import Metrics
from gateway.policy.budget import Budget, BudgetPolicy
from gateway.policy.guard import GuardedCall
from gateway.rollout.analysis import CanaryPolicy, counts_from_fields, judge, merge, reason_label
from gateway.rollout.state import Action, Assigner, Mode, Phase, Reason, RolloutState, Variant
from gateway.rollout.store import RolloutStore, RolloutStoreError

log = logging.getLogger("gateway.rollout")

# The state read before serving: a restarted pod resumes the rollout at its first
# request. Bounded, so an unreachable Redis delays the start by at most this.
INITIAL_READ_TIMEOUT_S = 0.5
PHASES = tuple(Phase)


class RolloutRuntime:
    """The rollout as this worker follows it (see the module docstring)."""

    def __init__(
        self,
        store: RolloutStore,
        model: str,
        backend: InferenceBackend,
        candidate_call: Callable[[], GuardedCall],
        metrics: Metrics,
        policy: CanaryPolicy,
        candidate_inference_s: float,
        budget_total_s: float,
        poll_s: float = 0.5,
        lease_ms: int = 3_000,
        default_primary: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.model = model
        self.backend = backend
        # A fresh GuardedCall (breaker) for each candidate: a new version does not
        # inherit the last one's open breaker, and a rolled-back candidate's open
        # breaker does not stay in gateway_circuit_state.
        self._make_candidate_call = candidate_call
        self.candidate_call = candidate_call()
        self.metrics = metrics
        self.policy = policy
        self.poll_s = poll_s
        self.lease_ms = lease_ms
        self._clock = clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.default_primary = default_primary
        # The candidate gets its own share of the inference stage, so the primary still
        # has time to answer a request the candidate failed (see pipeline.py).
        self._cand_policy = BudgetPolicy(budget_total_s, {"inference": candidate_inference_s})
        self.state = RolloutState()
        self.primary_version: str | None = default_primary or None
        self.candidate_version: str | None = None  # set while the candidate may serve
        self.shadowing = False
        self._assigner: Assigner | None = None
        self._counting: str | None = None  # the count token while a canary runs
        self._pending: dict[str, dict[str, int]] = {}
        self._loaded: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.leader = False
        m = metrics
        self._req = {
            (v, ok): m.variant_requests.labels(str(v), "ok" if ok else "failed").inc
            for v in Variant
            for ok in (True, False)
        }
        self._lat = {v: m.variant_inference.labels(str(v)).observe for v in Variant}

    # -- the request path (no await, no I/O) ---------------------------------------------

    def assign(self, user_id: str) -> Variant:
        a = self._assigner
        return Variant.PRIMARY if a is None else a.variant(user_id)

    def candidate_budget(self, budget: Budget) -> Budget:
        """The candidate's budget: its own inference limit, inside what the request has left."""
        return Budget(self._cand_policy, budget.remaining(), time.perf_counter(), budget._clock)

    def shadow_budget(self) -> Budget:
        """A shadow call's budget: the candidate's inference limit, from now."""
        return self._cand_policy.start()

    def count(self, variant: Variant, failed: bool, seconds: float | None) -> None:
        """One call of ``variant``'s model: for the canary's analysis and the metrics."""
        token = self._counting
        if token is None and not self.shadowing:
            return
        self._req[variant, not failed]()
        if seconds is not None:
            self._lat[variant](seconds)
        if token is not None:
            pending = self._pending.get(token)
            if pending is None:
                pending = self._pending[token] = {}
            merge(pending, variant, failed, seconds)

    def view(self) -> dict[str, object]:
        """``GET /rollout``: the state this worker follows, and what it serves now."""
        body = self.state.public(self.model)
        if body["primary"] is None and self.primary_version:
            body["primary"] = {"name": self.model, "version": self.primary_version}
        body["serving"] = {
            "primary": self.primary_version or self.backend.model_version,
            "candidate": self.candidate_version,
            "shadow": self.shadowing,
            "decision_maker": self.leader,
        }
        return body

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        failing = False
        try:
            state = await asyncio.wait_for(self.store.read(), INITIAL_READ_TIMEOUT_S)
            await self._apply(state)
        except (RolloutStoreError, TimeoutError) as exc:
            log.warning("rollout state not read at start (%s); following it when it can be", exc)
            failing = True  # said once: the loop speaks again only when it recovers
        self._task = asyncio.get_running_loop().create_task(self._loop(failing), name="rollout")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(RolloutStoreError, TimeoutError):
            await asyncio.wait_for(self._flush(), INITIAL_READ_TIMEOUT_S)
        await self.store.close()

    async def _loop(self, failing: bool = False) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.tick()
                if failing:
                    log.info("rollout state readable again")
                failing = False
            except (RolloutStoreError, TimeoutError) as exc:
                if not failing:
                    log.warning("rollout state: %s (keeping the last one)", exc)
                failing = True
            except Exception:  # noqa: BLE001 - a bug here must not stop following the rollout
                log.exception("rollout tick failed")

    async def tick(self) -> None:
        """One beat: flush counts, read the state, and judge the canary if we hold the lease."""
        await self._flush()
        state = await self.store.read()
        await self._apply(state)
        if state.mode is Mode.CANARY and state.phase is Phase.RUNNING:
            self.leader = await self.store.hold_lease(self.owner, self.lease_ms)
            if self.leader:
                await self._decide(state)
        else:
            self.leader = False

    async def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        try:
            await self.store.add_counts(pending)
        except RolloutStoreError:
            # Put them back: the next beat tries again (a step decided meanwhile just
            # misses them).
            for token, fields in pending.items():
                into = self._pending.setdefault(token, {})
                for f, n in fields.items():
                    into[f] = into.get(f, 0) + n
            raise

    # -- following the state ---------------------------------------------------------------

    async def _ensure(self, version: str) -> bool:
        if version in self._loaded:
            return True
        try:
            await self.backend.load_version(version)
        except InferenceError as exc:
            log.warning("model %s version %s cannot serve: %s", self.model, version, exc)
            return False
        self._loaded.add(version)
        return True

    async def _apply(self, state: RolloutState) -> None:
        if state.rev == self.state.rev and state.rev != 0:
            return
        old = self.state
        primary = state.primary or self.default_primary
        if primary and primary != self.primary_version and await self._ensure(primary):
            self.primary_version = primary
        cand = state.candidate if state.running else ""
        if cand != (self.candidate_version or ""):
            self.candidate_call = self._make_candidate_call()
        if cand:
            # A candidate that cannot be loaded still gets its traffic: every call fails,
            # is counted, and the canary rolls it back.
            await self._ensure(cand)
        self.candidate_version = cand or None
        self.shadowing = bool(cand) and state.mode is Mode.SHADOW
        weight = state.weight
        self._assigner = Assigner(self.model, cand, weight) if cand and weight > 0 else None
        self._counting = state.counts_token if state.running and state.mode is Mode.CANARY else None
        self.state = state
        self.metrics.rollout_weight.set(weight)
        for p in PHASES:
            self.metrics.rollout_state.labels(str(p)).set(1 if p is state.phase else 0)
        if (old.phase, old.mode, old.step, old.candidate, old.primary) != (
            state.phase,
            state.mode,
            state.step,
            state.candidate,
            state.primary,
        ):
            log.info(
                "rollout of %s: %s %s, primary %s, candidate %s at %g %%%s",
                self.model,
                state.mode,
                state.phase,
                state.primary or "-",
                state.candidate or "-",
                weight,
                f" ({state.last.action}: {state.last.reason})" if state.last else "",
            )

    # -- the decision-maker ------------------------------------------------------------------

    async def _decide(self, state: RolloutState) -> None:
        fields = await self.store.counts(state.counts_token)
        now = self._clock()
        last_step = state.step >= len(state.steps) - 1
        verdict = judge(
            counts_from_fields(fields),
            self.policy,
            now - state.step_started,
            state.step_seconds,
            last_step,
            state.baseline_p99_ms,
        )
        if verdict.action is None:
            return
        baseline = verdict.primary_p99_ms or state.baseline_p99_ms
        if verdict.action is Action.ROLLBACK:
            new = state.with_decision(now, Action.ROLLBACK, verdict.reason, phase=Phase.ROLLED_BACK)
        elif verdict.action is Action.PROMOTE:
            new = promoted(state, now, verdict.reason)
        else:
            new = state.with_decision(
                now,
                Action.ADVANCE,
                verdict.reason,
                step=state.step + 1,
                step_started=now,
                baseline_p99_ms=baseline,
            )
        new = await self.store.write(new, state.rev)
        self.metrics.rollout_decisions.labels(
            str(verdict.action), reason_label(verdict.reason)
        ).inc()
        level = logging.WARNING if verdict.action is Action.ROLLBACK else logging.INFO
        log.log(
            level,
            "rollout decision for %s version %s: %s (%s)",
            self.model,
            state.candidate,
            verdict.action,
            verdict.reason,
        )
        await self._apply(new)


def promoted(state: RolloutState, now: float, reason: str) -> RolloutState:
    """The candidate becomes the primary; no rollout runs any more."""
    return state.with_decision(
        now,
        Action.PROMOTE,
        reason,
        mode=Mode.NONE,
        phase=Phase.PROMOTED,
        primary=state.candidate,
        candidate="",
    )


def started(
    state: RolloutState,
    now: float,
    primary: str,
    candidate: str,
    mode: Mode,
    steps: tuple[float, ...],
    step_seconds: float,
) -> RolloutState:
    """A new rollout from ``state`` (which must not be running)."""
    return replace(
        state,
        mode=mode,
        phase=Phase.RUNNING,
        primary=primary,
        candidate=candidate,
        steps=steps if mode is Mode.CANARY else (),
        step=0,
        step_seconds=step_seconds,
        step_started=now,
        rollout_id=str(int(now * 1000)),
        baseline_p99_ms=0.0,
    ).with_decision(now, Action.START, f"{Reason.OPERATOR}: {mode} of version {candidate}")
