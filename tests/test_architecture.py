"""The import graph of the package: the toy world apart, no circle, no module importing the package's __init__."""

import ast
import os

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
PACKAGE = "diffusers_innercontrol"


def _graph(root=SRC):
    """`{module: {imported package modules}}` from the source, with relative imports resolved."""
    graph = {}
    for folder, _, files in os.walk(os.path.join(root, PACKAGE)):
        for file in files:
            if not file.endswith(".py"):
                continue
            path = os.path.join(folder, file)
            parts = os.path.relpath(path, root)[:-3].split(os.sep)
            is_init = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_init else parts)
            package = name if is_init else name.rsplit(".", 1)[0]
            deps = set()
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package.split(".")[: len(package.split(".")) - node.level + 1]
                        target = ".".join(base + ([node.module] if node.module else []))
                    else:
                        target = node.module or ""
                    if target.startswith(PACKAGE):
                        # `from pkg import name` may name a submodule: count it as that module when it is one
                        for alias in node.names:
                            sub = f"{target}.{alias.name}"
                            exists = os.path.exists(os.path.join(root, *sub.split("."))) or os.path.isfile(
                                os.path.join(root, *sub.split(".")) + ".py")
                            deps.add(sub if exists else target)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names if a.name.startswith(PACKAGE))
            graph[name] = deps - {name}
    return graph


def toy_importers(graph):
    toy = f"{PACKAGE}.toy"
    in_toy = lambda m: m == toy or m.startswith(toy + ".")  # noqa: E731
    return {m: sorted(d for d in deps if in_toy(d)) for m, deps in graph.items()
            if m != PACKAGE and not in_toy(m) and any(in_toy(d) for d in deps)}


def init_importers(graph):
    return sorted(m for m, deps in graph.items() if PACKAGE in deps and m != PACKAGE)


def cycles(graph):
    modules = {m: {d for d in deps if d in graph and d != PACKAGE} for m, deps in graph.items() if m != PACKAGE}
    state, found = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(modules.get(m, ())):
            if state.get(d) == "open":
                found.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    return found


@pytest.fixture(scope="module")
def graph():
    return _graph()


def test_the_graph_reads_the_package(graph):
    assert {f"{PACKAGE}.training", f"{PACKAGE}.toy.shapesworld", f"{PACKAGE}.models.readout_probe"} <= set(graph)
    assert f"{PACKAGE}.features" in graph[f"{PACKAGE}.models.readout_probe"]
    assert f"{PACKAGE}.models.readout_probe" in graph[f"{PACKAGE}.convert"]


def test_the_core_imports_nothing_of_the_toy_world(graph):
    assert toy_importers(graph) == {}


def test_no_module_imports_the_package_init(graph):
    assert init_importers(graph) == []


def test_the_import_graph_has_no_circle(graph):
    assert cycles(graph) == []


def test_the_checks_can_fail(tmp_path):
    """A core module importing the toy world, two modules importing each other and an import of the package's
    __init__ are each caught."""
    pkg = tmp_path / PACKAGE
    (pkg / "toy").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "toy" / "__init__.py").write_text("")
    (pkg / "toy" / "world.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\nfrom .toy import world\n")
    (pkg / "b.py").write_text("from .a import y\nimport diffusers_innercontrol\n")
    g = _graph(str(tmp_path))
    assert g[f"{PACKAGE}.a"] == {f"{PACKAGE}.b", f"{PACKAGE}.toy.world"}
    assert toy_importers(g) == {f"{PACKAGE}.a": [f"{PACKAGE}.toy.world"]}
    assert init_importers(g) == [f"{PACKAGE}.b"]
    assert cycles(g) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]]
