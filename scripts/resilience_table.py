#!/usr/bin/env python3
"""Render docs/resilience-results.json (written by the resilience tests) as the summary
table in docs/resilience.md, between the ``results:start``/``results:end`` markers.

The tests call :func:`render` after each scenario, so the table always shows the last
run; run this by hand after editing the document's text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "resilience-results.json"
DOC = ROOT / "docs" / "resilience.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"

# Table order: the order; scenarios not listed follow alphabetically.
ORDER = [
    "triton SIGKILL + restart",
    "triton blackholed",
    "triton slower than budget",
    "triton queue full",
    "redis SIGKILL + restart",
    "redis CLIENT PAUSE",
    "redis latency 25 ms",
    "redis latency 2-5 ms",
    "redis connection reset",
    "redis slow close",
    "redis short/corrupt values",
    "overload 3x capacity",
    "SIGTERM under load (drain 1 s)",
    "SIGTERM under load (drain 1 s), 2 workers",
]
COLUMNS = [
    ("sent", "sent"),
    ("model", "by model"),
    ("fallback", "by fallback"),
    ("shed", "shed (503)"),
    ("5xx", "5xx"),
    ("p99_ms", "P99 ms"),
    ("max_ms", "max ms"),
]


def table(results: dict) -> str:
    rows = results.get("scenarios", {})
    names = [n for n in ORDER if n in rows] + sorted(n for n in rows if n not in ORDER)
    head = "| scenario | " + " | ".join(title for _, title in COLUMNS) + " | run at (UTC) |"
    sep = "|---|" + "---:|" * len(COLUMNS) + "---|"
    lines = [head, sep]
    for name in names:
        row = rows[name]
        cells = [str(row.get(key, "")) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('at', '')} |")
    return "\n".join(lines)


def render(results_path: Path = RESULTS, doc_path: Path = DOC) -> bool:
    """Rewrite the table in ``doc_path``; False when the document or markers are missing."""
    if not results_path.exists() or not doc_path.exists():
        return False
    text = doc_path.read_text()
    if START not in text or END not in text:
        return False
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    body = table(json.loads(results_path.read_text()))
    doc_path.write_text(f"{before}{START}\n{body}\n{END}{after}")
    return True


if __name__ == "__main__":
    sys.exit(0 if render() else 1)
