"""Module boundaries: no import cycles inside genflow, counting imports inside functions too (a
function-level import only hides a cycle, it does not remove it)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "genflow"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    deps.add(t)
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            # a package's __init__ importing its own submodules is not a cycle through the package
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "genflow.methods.paths" in graph and "genflow.apps.bench" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def layer(module: str) -> int:
    """0: the library (methods, nets, data, solvers, sampling, metrics, training, ...); 1: genflow.config (from
    the command line to objects); 2: the apps."""
    if module == "genflow.apps" or module.startswith("genflow.apps."):
        return 2
    if module == "genflow.config" or module.startswith("genflow.config."):
        return 1
    return 0


def test_no_import_runs_up_a_layer():
    graph = import_graph()
    assert "genflow.apps.train" in graph and "genflow.config.building" in graph
    upward = sorted(f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a))
    assert upward == [], "\n".join(upward)


def test_the_layer_check_sees_an_upward_import():
    assert layer("genflow.training.module") < layer("genflow.config.building") < layer("genflow.apps.train")
