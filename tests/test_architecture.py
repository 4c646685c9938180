"""The package's import graph: no module imports another that (through any
chain) imports it back, and the command-line modules are imported only by
command-line modules (docs/architecture.md, "Rules").

The graph is read from the source with ast, every import counted wherever it
stands (module level or inside a function), so a circle hidden in a
function-level import is caught too. An import of ``a.b.c`` is an edge to
``a.b.c`` only: Python runs the parent packages' ``__init__`` first, but that is
how packages work, not a dependency the importing module chose.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "escape_fast"
# installed as escape_fast.kernels (pyproject.toml's package-dir)
KERNELS = ROOT / "kernels"

# Modules a user runs (python -m ...), and cli.py, which only they may import.
ENTRY_POINTS = {
    "escape_fast.eval.__main__",
    "escape_fast.train",
    "escape_fast.predict.__main__",
    "escape_fast.track.__main__",
    "escape_fast.plot",
    "escape_fast.convert",
    "escape_fast.demo.server",
    "escape_fast.demo.__main__",
    "escape_fast.demo.make_samples",
    "escape_fast.data.synthetic.__main__",
    "escape_fast.data.check.__main__",
}
COMMAND_LINE = ENTRY_POINTS | {"escape_fast.cli"}


def _module_name(path: Path) -> str:
    if path.is_relative_to(KERNELS):
        parts = ["escape_fast", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules that the module at ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from a import b" imports the module a.b when there is one, else the name b of a
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted([*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")])
    # the compiled extension escape_fast._C imports nothing of the package
    modules = {_module_name(p) for p in paths} | {"escape_fast._C"}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    graph["escape_fast._C"] = set()
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "escape_fast.errors" in graph["escape_fast.cli"]  # from escape_fast.errors import ...
    assert "escape_fast.cli" in graph["escape_fast.eval.__main__"]  # from escape_fast import cli
    assert "escape_fast.predict" in graph["escape_fast.plot"]  # inside a function
    assert "escape_fast.models.escape" in graph["escape_fast.models.training"]
    assert "escape_fast._C" in graph["escape_fast._extension"]  # the compiled extension
    assert "escape_fast.registry" in graph["escape_fast.kernels.heatmap"]  # kernels/ is escape_fast.kernels
    assert graph["escape_fast.errors"] == set()  # every module may import it


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(import_graph()) == []


@pytest.mark.parametrize("module", sorted(COMMAND_LINE))
def test_command_line_modules_exist(module):
    assert module in import_graph()


def test_command_line_modules_are_imported_only_by_command_line_modules():
    graph = import_graph()
    wrong = sorted(f"{m} imports {t}" for m, targets in graph.items() for t in targets
                   if t in COMMAND_LINE and m not in ENTRY_POINTS)
    assert wrong == []


def test_every_package_and_asset_is_installed():
    """A regular (non-editable) install takes what pyproject.toml lists: every
    package folder and every file the package reads at run time."""
    import tomllib

    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {_module_name(p.parent / "__init__.py") for p in PACKAGE.rglob("__init__.py")}
    assert set(setup["packages"]) == folders | {"escape_fast.kernels"}
    data = setup["package-data"]
    for package, folder in (("escape_fast", PACKAGE), ("escape_fast.demo", PACKAGE / "demo")):
        files = {p for pattern in data[package] for p in folder.glob(pattern) if p.is_file()}
        wanted = {p for sub in ("assets", "static", "samples") for p in (folder / sub).rglob("*") if p.is_file()}
        assert wanted <= files, sorted(str(p.relative_to(ROOT)) for p in wanted - files)
