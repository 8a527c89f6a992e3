"""docs/reliability.md's fault table is the tests' own: it lists exactly the faults the tests mark."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.fault_table import Case, read_table, render, rows, write_table

ROOT = Path(__file__).resolve().parents[1]


def test_table_round_trips_and_groups_cases(tmp_path):
    cases = [Case("a | b", "c", "tests/t.py::f[1]", "as expected", 1.0),
             Case("a | b", "c", "tests/t.py::f[2]", "as expected", 2.0),
             Case("d", "e", "tests/t.py::g", "**fails**")]
    table = rows(cases)
    assert [(r.test, r.observed) for r in table] == [("tests/t.py::f[2 cases]", "as expected (2 cases, 3.0 s)"),
                                                     ("tests/t.py::g", "**fails**")]
    page = tmp_path / "page.md"
    page.write_text("# Title\n\ntext\n")
    write_table(page, render(table))
    write_table(page, render(table))  # replaced, not appended
    assert page.read_text().startswith("# Title\n\ntext\n") and page.read_text().count("| fault |") == 1
    assert read_table(page) == {r.key() for r in table}


def test_docs_fault_table_matches_the_marks():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             f"--fault-table-check={ROOT / 'docs' / 'reliability.md'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
