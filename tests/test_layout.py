"""The package's architecture: one-way imports, and a top level that holds only what the webui loads.

Imports are read from the source (every ``import`` / ``from`` statement, including those inside
functions and ``TYPE_CHECKING`` blocks), so a cycle of type hints counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "hidiffusion_lib"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Names of the hidiffusion_lib modules that ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = {f"{base}.{alias.name}" for alias in node.names}
            found |= names
            if not all(map(_is_module, names)):  # "from . import sibling" needs the sibling, not the package
                found.add(base)
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_modules():
    # The package's __init__ only re-exports lazily: edges into it are not dependencies.
    edges = {name: targets - {"hidiffusion_lib"} for name, targets in graph().items()}
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _lazy_exports() -> dict:
    """The package's ``_EXPORTS`` table (relative module -> names), read without importing it."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))
    return next(ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_EXPORTS")


def test_top_level_holds_only_what_the_webui_script_loads():
    """Every top-level module is reached from scripts/hidiffusion.py (directly, or through the
    lazy exports of the package); the rest lives in a folder named for its purpose."""
    edges = graph()
    edges["hidiffusion_lib"] |= {f"hidiffusion_lib{module}" for module in _lazy_exports()}
    reached, todo = set(), [m for m in _imports(ROOT / "scripts" / "hidiffusion.py") if m in edges]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo += edges[name]
    top_level = {_module_name(p) for p in PACKAGE.glob("*.py")}
    assert top_level - reached == set()
