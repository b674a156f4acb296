"""Resilience results: rows of passing tests only, outside tracked files; the docs tables
are rendered from a results file by scripts/resilience_table.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests import loadgen
from tests.procs import ROOT


def _table_script():
    spec = importlib.util.spec_from_file_location(
        "resilience_table", ROOT / "scripts" / "resilience_table.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_are_written_only_when_the_test_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("GATEWAY_RESULTS_OFF", raising=False)
    path = tmp_path / "resilience-results.json"
    loadgen.record("a failing scenario", {"sent": 1})
    loadgen.settle(passed=False)
    assert not path.exists()
    loadgen.record("a passing scenario", {"sent": 2})
    loadgen.settle(passed=True)
    loadgen.record("another one", {"sent": 3})
    loadgen.settle(passed=True)
    rows = json.loads(path.read_text())["scenarios"]
    assert set(rows) == {"a passing scenario", "another one"}
    assert rows["a passing scenario"]["sent"] == 2 and rows["a passing scenario"]["at"]


def test_default_results_file_is_ignored_by_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_RESULTS_DIR", raising=False)
    path = loadgen.results_path()
    assert path == ROOT / ".results" / "resilience-results.json"
    assert "/.results/" in (ROOT / ".gitignore").read_text().splitlines()


def test_table_script_renders_every_document_from_the_given_file(tmp_path: Path) -> None:
    script = _table_script()
    doc = tmp_path / "doc.md"
    readme = tmp_path / "README.md"
    for p in (doc, readme):
        p.write_text(f"intro\n{script.START}\nold table\n{script.END}\noutro\n")
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"scenarios": {"redis CLIENT PAUSE": {"sent": 7, "5xx": 0}}}))
    copy = tmp_path / "docs-results.json"
    assert script.main(["t", str(results)], docs=(doc, readme), docs_results=copy) == 0
    for p in (doc, readme):
        text = p.read_text()
        assert text.startswith("intro\n") and text.endswith("outro\n")
        assert "old table" not in text and "| redis CLIENT PAUSE | 7 |" in text
    assert copy.read_text() == results.read_text()


def test_table_script_refuses_a_document_without_markers(tmp_path: Path, capsys) -> None:
    script = _table_script()
    doc = tmp_path / "doc.md"
    doc.write_text("no markers\n")
    results = tmp_path / "run.json"
    results.write_text(json.dumps({"scenarios": {"x": {"sent": 1}}}))
    assert script.main(["t", str(results)], docs=(doc,), docs_results=tmp_path / "c") == 1
    assert doc.read_text() == "no markers\n"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "results:start" in err[0], err
