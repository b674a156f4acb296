"""The canary's verdict, from fleet-wide counts per variant. Pure: no I/O, no clock.

Every worker counts, per variant, requests, failures (errors, timeouts, non-finite
scores, the candidate's open breaker) and inference latency in fixed buckets
(``metrics.LATENCY_BUCKETS``), and adds them to one Redis hash per step (store.py).
Fixed buckets make a fleet-wide P99 a sum of counters, the way Prometheus's
``histogram_quantile`` does it, with the same bucket resolution.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gateway.metrics import LATENCY_BUCKETS
from gateway.rollout.state import Action, Reason, Variant

N_BUCKETS = len(LATENCY_BUCKETS) + 1  # the last one is +Inf


def bucket_index(seconds: float) -> int:
    """The (non-cumulative) bucket a latency falls in: upper bounds are inclusive."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


@dataclass
class VariantCounts:
    requests: int = 0
    failures: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def quantile_ms(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-quantile of latencies; None if empty.

        The bucket's upper bound, not an interpolation: a P99 is never under-stated.
        A quantile in the +Inf bucket reads as the last finite bound.
        """
        total = sum(self.buckets)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for i, n in enumerate(self.buckets):
            seen += n
            if seen >= rank and n:
                return LATENCY_BUCKETS[min(i, len(LATENCY_BUCKETS) - 1)] * 1e3
        return LATENCY_BUCKETS[-1] * 1e3


def counts_from_fields(fields: Mapping[str, str]) -> dict[Variant, VariantCounts]:
    """Parse a count hash: ``{variant}:n``, ``{variant}:fail``, ``{variant}:b{i}``."""
    out = {v: VariantCounts() for v in Variant}
    for key, value in fields.items():
        variant, _, what = key.partition(":")
        if variant not in out:
            continue
        c = out[Variant(variant)]
        if what == "n":
            c.requests = int(value)
        elif what == "fail":
            c.failures = int(value)
        elif what.startswith("b") and what[1:].isdigit() and int(what[1:]) < N_BUCKETS:
            c.buckets[int(what[1:])] = int(value)
    return out


@dataclass(frozen=True)
class CanaryPolicy:
    """The thresholds (settings ``GATEWAY_ROLLOUT_*``)."""

    min_requests: int = 200
    max_failure_rate: float = 0.01
    failure_margin: float = 0.005  # over the primary's rate: 0.5 percentage points
    latency_ratio: float = 1.2
    latency_slack_ms: float = 2.0


@dataclass(frozen=True)
class Verdict:
    action: Action | None  # None: keep going
    reason: str
    primary_p99_ms: float | None = None


def judge(
    counts: Mapping[Variant, VariantCounts],
    policy: CanaryPolicy,
    step_elapsed_s: float,
    step_seconds: float,
    last_step: bool,
    baseline_p99_ms: float = 0.0,
) -> Verdict:
    """What to do with the current step.

    * Failures roll back as soon as the candidate has ``min_requests`` in this step: a
      broken model is taken off at once, not at the end of the step.
    * Latency is judged at the end of the step only (a P99 of a few hundred samples is
      its maximum, too noisy to act on earlier), against the primary's P99 in the same
      step, or the last one measured (``baseline_p99_ms``) at 100 %, where the primary
      has no traffic.
    * The step passes when it has lasted ``step_seconds`` with ``min_requests``
      candidate requests and neither rule fired; until then, keep going.
    """
    cand, prim = counts[Variant.CANDIDATE], counts[Variant.PRIMARY]
    enough = cand.requests >= policy.min_requests
    prim_enough = prim.requests >= policy.min_requests
    prim_p99 = prim.quantile_ms(0.99) if prim_enough else None
    if enough:
        rate = cand.failure_rate
        if rate > policy.max_failure_rate:
            return Verdict(
                Action.ROLLBACK,
                f"{Reason.FAILURE_RATE}: candidate failed {cand.failures} of {cand.requests} "
                f"({rate:.2%}) > {policy.max_failure_rate:.2%}",
                prim_p99,
            )
        if prim_enough and rate > prim.failure_rate + policy.failure_margin:
            return Verdict(
                Action.ROLLBACK,
                f"{Reason.FAILURE_RATE}: candidate {rate:.2%} > primary "
                f"{prim.failure_rate:.2%} + {policy.failure_margin:.2%}",
                prim_p99,
            )
    if step_elapsed_s < step_seconds:
        return Verdict(None, "step running", prim_p99)
    if not enough:
        return Verdict(
            None,
            f"waiting for {policy.min_requests} candidate requests, have {cand.requests}",
            prim_p99,
        )
    ref = prim_p99 if prim_p99 is not None else (baseline_p99_ms or None)
    cand_p99 = cand.quantile_ms(0.99)
    if ref is not None and cand_p99 is not None:
        limit = policy.latency_ratio * ref + policy.latency_slack_ms
        if cand_p99 > limit:
            return Verdict(
                Action.ROLLBACK,
                f"{Reason.LATENCY}: candidate P99 {cand_p99:.1f} ms > "
                f"{policy.latency_ratio:g} x primary {ref:.1f} ms + {policy.latency_slack_ms:g} ms",
                prim_p99,
            )
    detail = f"candidate {cand.failure_rate:.2%} failed, P99 {cand_p99 or 0:.1f} ms"
    if ref is not None:
        detail += f" (primary P99 {ref:.1f} ms)"
    if last_step:
        return Verdict(Action.PROMOTE, f"{Reason.LAST_STEP_PASSED}: {detail}", prim_p99)
    return Verdict(Action.ADVANCE, f"{Reason.STEP_PASSED}: {detail}", prim_p99)


def reason_label(reason: str) -> str:
    """The metric label of a decision's reason: the part before the colon."""
    return reason.split(":", 1)[0]


def merge(into: dict[str, int], variant: Variant, failed: bool, seconds: float | None) -> None:
    """Add one request to a worker's pending count fields (flushed by the runtime)."""
    v = str(variant)
    into[v + ":n"] = into.get(v + ":n", 0) + 1
    if failed:
        into[v + ":fail"] = into.get(v + ":fail", 0) + 1
    if seconds is not None:
        k = f"{v}:b{bucket_index(seconds)}"
        into[k] = into.get(k, 0) + 1


def total(fields: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Sum count hashes field by field (tests, status)."""
    out: dict[str, int] = {}
    for f in fields:
        for k, v in f.items():
            out[k] = out.get(k, 0) + int(v)
    return out
