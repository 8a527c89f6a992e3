"""The house rules that code can check: imports only go downwards, and CI runs the README's
test command."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RANK = {"fitting": 0, "trainer": 1, "pipeline": 2}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(RANK)


def upward_imports() -> list[str]:
    bad = []
    for package, rank in RANK.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for target in imported_packages(path):
                if RANK[target] > rank:
                    bad.append(f"{path.relative_to(ROOT)} imports {target}")
    return bad


def test_imports_only_go_downwards():
    assert upward_imports() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    (tmp_path / "fitting").mkdir()
    (tmp_path / "trainer").mkdir()
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "fitting" / "bad.py").write_text("from pipeline.cli import main\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports() == ["fitting/bad.py imports pipeline"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_calls_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()
