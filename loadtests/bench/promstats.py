"""The gateway's own latency histograms, read from /metrics before and after a step.

The difference of two scrapes is the histogram of that step alone; quantiles are read
from it by linear interpolation inside the bucket (as PromQL's histogram_quantile
does), so they are as fine as the gateway's buckets (0.5 ms steps up to 5 ms).
"""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Hist = dict[str, dict[float, float]]  # label value -> {upper bound: cumulative count}


def scrape(url: str, timeout: float = 5.0) -> dict[str, Hist]:
    """``{metric family: {label value: {le: count}, label value + '#sum': {0: sum}}}``."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    out: dict[str, Hist] = defaultdict(lambda: defaultdict(dict))
    for fam in text_string_to_metric_families(text):
        if fam.type == "counter" and fam.name == "gateway_fallback":
            # Fallback answers by reason: kept as a one-bucket "histogram" per reason.
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out["fallback_reasons"][s.labels.get("reason", "")][0.0] = s.value
            continue
        if fam.type != "histogram":
            continue
        for s in fam.samples:
            label = s.labels.get("stage") or s.labels.get("outcome") or ""
            if s.name.endswith("_bucket"):
                out[fam.name][label][float(s.labels["le"])] = s.value
            elif s.name.endswith("_sum"):
                out[fam.name][label + "#sum"][0.0] = s.value
    return out


def diff(after: Hist, before: Hist) -> Hist:
    return {
        label: {le: v - before.get(label, {}).get(le, 0.0) for le, v in buckets.items()}
        for label, buckets in after.items()
    }


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The ``q`` quantile, in seconds, of one cumulative bucket set; None when empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for le in bounds:
        c = buckets[le]
        if c >= rank:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return prev_le


def summary(h: Hist, label: str) -> dict[str, float | None]:
    """count, mean, p50 and p99 (milliseconds) of one labelled histogram."""
    b = h.get(label)
    if not b:
        return {"count": 0, "mean_ms": None, "p50_ms": None, "p99_ms": None}
    count = b[max(b)]
    total = h.get(label + "#sum", {}).get(0.0, 0.0)
    p50, p99 = quantile(b, 0.5), quantile(b, 0.99)
    return {
        "count": count,
        "mean_ms": total / count * 1e3 if count else None,
        "p50_ms": p50 * 1e3 if p50 is not None else None,
        "p99_ms": p99 * 1e3 if p99 is not None else None,
    }
