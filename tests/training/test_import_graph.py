"""The package's import structure: no import cycles anywhere under kdtune/, shared training code never imports the
distributed code, and kdtune.training / kdtune.losses hide no cycle behind function-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "kdtune"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The kdtune module an import names (``from kdtune.a import b`` may name module ``kdtune.a.b``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for n in names:
            if n.startswith("kdtune"):
                target = _resolve(n)
                if target is not None:
                    found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # a submodule import also runs its parent packages' __init__
        deps = set()
        for d in _imports(path, top_level_only=True) - {name}:
            deps.add(d)
            parent = d.rpartition(".")[0]
            while parent and parent in MODULES and not name.startswith(parent + ".") and parent != name:
                deps.add(parent)
                parent = parent.rpartition(".")[0]
        graph[name] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if d.startswith(n + "."):  # a package importing its own submodules is how packages are built
                continue
            if state.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_shared_training_code_never_imports_distributed() -> None:
    for name, path in MODULES.items():
        if name.startswith("kdtune.training") and not name.startswith("kdtune.training.distributed"):
            bad = {d for d in _imports(path, top_level_only=False) if d.startswith("kdtune.training.distributed")}
            assert not bad, f"{name} imports {bad}: distributed code imports shared code, never the reverse"


def test_training_and_losses_have_no_function_level_kdtune_imports() -> None:
    for name, path in MODULES.items():
        if name.startswith(("kdtune.training", "kdtune.losses")):
            hidden = _imports(path, top_level_only=False) - _imports(path, top_level_only=True)
            assert not hidden, f"{name} imports {hidden} inside a function; import at module level"


def test_every_training_and_losses_module_says_what_it_holds() -> None:
    for name, path in MODULES.items():
        if name.startswith(("kdtune.training", "kdtune.losses")):
            tree = ast.parse(path.read_text())
            assert ast.get_docstring(tree), f"{name} has no module docstring"
            if not path.name == "__main__.py":
                assert any(
                    isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
                    for n in tree.body
                ), f"{name} has no __all__"
