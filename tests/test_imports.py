"""The minillm package's import graph, read from the source, has no cycle.

Every `import` and `from ... import` of a minillm module counts, at module level or inside
a function: an import moved into a function to dodge a circle still ties the two modules.
Importing minillm.a.b also runs the package minillm.a, so that is an edge too (except to
the importer's own packages, which are already running). Imports of other packages
(numpy, cupy, matplotlib, ...) are not part of the graph.
"""

import ast
from pathlib import Path

import minillm

PACKAGE = Path(minillm.__file__).parent


def module_name(path):
    parts = ("minillm",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name, modules):
    return any(other.startswith(name + ".") for other in modules)


def imported_modules(tree, name, modules):
    """The minillm modules that the module `name` (parsed as `tree`) imports, anywhere in its code."""
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from minillm.x import y` imports the module minillm.x.y when there is one, else minillm.x.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    targets = set()
    for target in found:
        if target != "minillm" and not target.startswith("minillm."):
            continue
        parts = target.split(".")
        # The target and the packages above it that the importer is not already inside.
        for i in range(2, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            if ancestor in modules and ancestor != name and not name.startswith(ancestor + "."):
                targets.add(ancestor)
    return targets


def import_graph():
    paths = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}
    return {
        name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), name, paths)
        for name, path in paths.items()
    }


def find_cycle(graph):
    """One cycle as [a, b, ..., a], or None."""
    state = {}  # absent: not visited; 1: on the current path; 2: done, no cycle through it
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                cycle = visit(succ)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_imports_inside_functions():
    tree = ast.parse("def f():\n    from minillm import hf\n    from minillm.layers import lora\n")
    modules = {"minillm.hf", "minillm.layers", "minillm.layers.lora", "minillm.x"}
    assert imported_modules(tree, "minillm.x", modules) == {"minillm.hf", "minillm.layers", "minillm.layers.lora"}


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "minillm.model" in graph and graph["minillm.model"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_errors_and_infrastructure_do_not_import_the_model():
    graph = import_graph()
    for name in ("minillm.errors", "minillm.memory", "minillm.options", "minillm.files", "minillm.backend"):
        assert "minillm.model" not in graph[name], f"{name} imports minillm.model"
