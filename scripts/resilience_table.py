#!/usr/bin/env python3
"""Render a resilience results file as the summary tables in the docs.

    scripts/resilience_table.py .results/resilience-results.json

The resilience tests write each passing scenario's row to
``$GATEWAY_RESULTS_DIR/resilience-results.json`` (default ``.results/``, ignored by git);
the test suite never writes the docs. This script, run by hand after a run that
passed, replaces the table between the ``results:start``/``results:end`` markers in
docs/resilience.md and in README.md (its Resilience section), and copies the results
file to docs/resilience-results.json, so that the committed numbers and the committed
tables are the same run's. Rendering docs/resilience-results.json itself just redraws
the tables (after editing the documents' text, say).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS_RESULTS = ROOT / "docs" / "resilience-results.json"
DOCS = (ROOT / "docs" / "resilience.md", ROOT / "README.md")
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


class TableError(Exception):
    """A results file or a document this script cannot use; one line for the user."""


def table(results: dict) -> str:
    rows = results.get("scenarios", {})
    names = [n for n in ORDER if n in rows] + sorted(n for n in rows if n not in ORDER)
    head = "| scenario | " + " | ".join(title for _, title in COLUMNS) + " | run at (UTC) |"
    sep = "|---|" + "---:|" * len(COLUMNS) + "---|"
    lines = [head, sep]
    extra: list[str] = []
    shown = {key for key, _ in COLUMNS} | {"at"}
    for name in names:
        row = rows[name]
        more = ", ".join(f"{k} {row[k]}" for k in sorted(row) if k not in shown)
        if more:  # figures a scenario records beyond the table's columns
            extra.append(f"- {name}: {more}")
        if "sent" not in row:
            continue  # a summary without request counts: only its line below
        cells = [str(row.get(key, "")) for key, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {row.get('at', '')} |")
    if extra:
        lines += ["", "Other figures of the same run:", "", *extra]
    return "\n".join(lines)


def load_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise TableError(f"no results file {path} (run the resilience tests first)") from exc
    except (OSError, ValueError) as exc:
        raise TableError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("scenarios"), dict):
        raise TableError(f"{path} has no 'scenarios' object: not a resilience results file")
    if not data["scenarios"]:
        raise TableError(f"{path} holds no scenario")
    return data


def rendered(results: dict, doc_path: Path) -> str:
    """``doc_path``'s text with the table between its markers replaced."""
    text = doc_path.read_text()
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise TableError(f"{doc_path} needs one {START} ... {END} pair around its table")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    return f"{before}{START}\n{table(results)}\n{END}{after}"


def main(argv: list[str], docs: tuple[Path, ...] = DOCS, docs_results: Path = DOCS_RESULTS) -> int:
    if len(argv) != 2 or argv[1].startswith("-"):
        print(f"usage: {argv[0]} RESULTS_JSON  (e.g. .results/resilience-results.json)")
        return 2
    src = Path(argv[1])
    try:
        results = load_results(src)
        texts = {doc: rendered(results, doc) for doc in docs}  # all checked before any write
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for doc, text in texts.items():
        doc.write_text(text)
    if src.resolve() != docs_results.resolve():
        shutil.copyfile(src, docs_results)
    names = ", ".join(str(d) for d in docs)
    print(f"{len(results['scenarios'])} scenarios from {src} -> {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
