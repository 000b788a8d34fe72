"""The import graph of the package: the toy world apart, no circle, no module importing the package's __init__."""

import ast
import os
import subprocess
import sys

import pytest

SRC = os.path.join(os.path.dirname(__file__), "..", "src")
REPO = os.path.join(os.path.dirname(__file__), "..")
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


HEAVY = ("torch", "diffusers", "transformers", "accelerate", "datasets")
_RUN_AND_LIST_IMPORTS = """
import runpy, sys
sys.argv = [sys.argv[1], "--task", "canny"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    print("exit", exit.code, "heavy:", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("script", ["train_innercontrol.py", "train_probe.py"])
def test_bad_task_is_refused_before_the_heavy_imports(script):
    """argparse refuses `--task canny` before torch, diffusers, transformers, accelerate or datasets load (the
    package's __init__ and the scripts import them on first use)."""
    path = os.path.join(REPO, "examples", "innercontrol", script)
    code = _RUN_AND_LIST_IMPORTS.format(heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "argument --task: invalid choice: 'canny'" in done.stderr, done.stderr[-2000:]
    assert done.stdout.strip() == "exit 2 heavy: []", done.stdout + done.stderr[-2000:]


def test_package_names_load_on_first_use():
    """The lazy __init__ still gives every public name (and diffusers' loader its `ModelMixin`), and refuses others."""
    import diffusers_innercontrol as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None
    from diffusers.models.modeling_utils import ModelMixin

    assert pkg.ModelMixin is ModelMixin and pkg.ReadoutProbe.__module__ == "diffusers_innercontrol.models.readout_probe"
    assert set(pkg.__all__) <= set(dir(pkg))
    with pytest.raises(AttributeError, match="has no attribute 'NoSuchThing'"):
        pkg.NoSuchThing
