"""No import cycles in the package: a static graph of every `import stepdistill...` (module level and inside
functions alike, since a deferred import still ties two modules together) must be acyclic, with the miniature
data layer below evaluation; and every module imports in a fresh interpreter, in reverse name order."""
import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import stepdistill

PACKAGE = Path(stepdistill.__file__).parent


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (`from a.b import c` counts as a.b.c when c is a module)."""
    files = module_files()

    def owner(name: str) -> str:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        deps = set()
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "stepdistill"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                if base.split(".")[0] != "stepdistill":
                    continue
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else owner(base) for a in node.names}
        graph[module] = deps - {module, ""}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_package_import_graph_is_acyclic():
    graph = import_graph()
    assert "stepdistill.evaluation.miniature" in graph and "stepdistill.miniature.teacher" in graph
    assert cycles(graph) == []


def test_miniature_data_layer_sits_below_evaluation():
    graph = import_graph()
    for module in ("dataset", "digits", "shapes", "classifier"):
        assert not any(d.startswith("stepdistill.evaluation") for d in graph[f"stepdistill.miniature.{module}"])
    assert not any(d.startswith("stepdistill.miniature") for d in graph["stepdistill.evaluation.fid"])
    assert "stepdistill.evaluation.miniature" in graph["stepdistill.miniature.teacher"]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], "stepdistill."))
    assert "stepdistill.evaluation.command" in names and "stepdistill.miniature.shapes" in names
    assert not any(n.startswith("stepdistill.metrics") or n in ("stepdistill.digits", "stepdistill.demo",
                                                                "stepdistill.evaluate") for n in names)
    code = ("import importlib, json, sys\nfailed = {}\nfor name in json.loads(sys.argv[1]):\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as e:\n        failed[name] = repr(e)\nprint(json.dumps(failed))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(names[::-1])], capture_output=True, text=True,
                         check=True, cwd=PACKAGE.parent)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}
