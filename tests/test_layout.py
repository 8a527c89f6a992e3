"""The house rules that code can check: imports only go downwards, no module imports itself back
through others, and CI runs the README's test command.

Every `import` and `from ... import` counts, wherever it stands in a file (inside functions and
`if TYPE_CHECKING:` blocks too), relative imports resolved.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fitting", "trainer", "pipeline")
# rooms, lowest first: a module belongs to the longest room name that prefixes it
RANK = {"fitting": 0, "trainer.data": 1, "trainer": 2, "pipeline": 3}


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def _with_parents(name: str) -> list[str]:
    """'a.b.c' -> ['a', 'a.b', 'a.b.c']: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a project module, or None for other packages."""
    for candidate in reversed(_with_parents(name)):
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that module `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` imports the module a.b when there is one, else a name in a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            known = _known(target, modules)
            if known:
                # a package of this module's own is already imported when the module runs
                found.update(m for m in _with_parents(known) if not name.startswith(m + "."))
    found.discard(name)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def room(module: str) -> str:
    return max((r for r in RANK if module == r or module.startswith(r + ".")), key=len)


def upward_imports(root: Path = ROOT) -> list[str]:
    bad = []
    for module, targets in sorted(import_graph(root).items()):
        for target in sorted(targets):
            if RANK[room(target)] > RANK[room(module)]:
                bad.append(f"{module} imports {target}")
    return bad


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """One cycle (a list of modules, the first repeated at the end) per strongly connected group of
    modules that import each other (Tarjan's algorithm)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_through(sorted(group)[0], group, graph) for group in groups]


def _cycle_through(start: str, group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside `group` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & group):
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def test_imports_only_go_downwards():
    assert upward_imports() == []


def test_no_import_cycles():
    assert [" -> ".join(cycle) for cycle in import_cycles()] == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
        (tmp_path / package / "__init__.py").touch()
    (tmp_path / "trainer" / "data").mkdir()
    (tmp_path / "trainer" / "data" / "__init__.py").touch()
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_the_check_catches_an_upward_import(tmp_path):
    root = _tree(tmp_path, {
        "fitting/ok.py": "import numpy\n",
        "trainer/data/bad.py": "def f():\n    from ..model import x\n",
        "trainer/model.py": "from fitting import ok\nfrom trainer.data import good\n",
        "trainer/data/good.py": "from fitting.ok import y\nfrom . import bad\n",
        "fitting/bad.py": "from pipeline.cli import main\n",
        "pipeline/cli.py": "from trainer.data import bad\n",
    })
    assert upward_imports(root) == ["fitting.bad imports pipeline", "fitting.bad imports pipeline.cli",
                                    "trainer.data.bad imports trainer.model"]


def test_the_check_catches_an_import_cycle(tmp_path):
    root = _tree(tmp_path, {
        "pipeline/a.py": "from pipeline import b\n",
        "pipeline/b.py": "def later():\n    from .c import run\n",
        "pipeline/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.a import x\n",
        "pipeline/d.py": "import pipeline.a\n",
    })
    assert import_cycles(root) == [["pipeline.a", "pipeline.b", "pipeline.c", "pipeline.a"]]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash")[1:]
    return [block.split("```")[0].strip() for block in blocks]


def test_ci_calls_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_the_readme_stays_a_front_door():
    """At most 200 lines, the two commands first: the rest belongs in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail to docs/"
    first, second = readme_commands()[:2]
    assert "spin-pipeline demo" in first and "pytest" in second
