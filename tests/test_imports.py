"""The import graph of engine/ and kernels/, read from the source (every import statement, at module level or
inside a function, except under TYPE_CHECKING): which module imports which. No cycle anywhere, and flux_kernels
imports nothing of engine."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROOTS = {"engine": "engine", "kernels": "flux_kernels"}  # folder -> import name


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(REPO / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = (path, path.name == "__init__.py")
    return found


def _targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module
    else:
        parts = module.split(".")[: None if is_package else -1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from package import name` imports the submodule `name` when there is one, else only the package
    return [f"{base}.{alias.name}" for alias in node.names] + ([base] if node.module else [])


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def import_graph(module_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if module_level_only else ast.walk(tree)
        skipped = {id(n) for s in ast.walk(tree) if _is_type_checking(s) for n in ast.walk(s)}
        for node in nodes:
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
                graph[name] |= {t for t in _targets(name, is_package, node) if t in modules and t != name}
        # a package's own __init__ is not a dependency of its children for the loop we look for
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_at_all():
    # function-level imports count too: a loop that only a deferred import hides is still a loop
    assert cycles(import_graph(module_level_only=False)) == []


def test_the_kernels_import_nothing_of_the_engine():
    graph = import_graph(module_level_only=False)
    assert {(m, t) for m, targets in graph.items() if m.startswith("flux_kernels") for t in targets
            if t.startswith("engine")} == set()  # fmt: skip


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    offenders = []
    for name, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = _targets(name, is_package, node)[-1] if node.module else None
                ours = base is not None and base.startswith(("engine", "flux_kernels"))
                offenders += [f"{name}: {alias.name}" for alias in node.names if ours and alias.name.startswith("_")]
    assert offenders == []
