"""The packages import one way and never in a circle.

Layers, lowest first (a module may import its own layer and the ones below):

0. leaves: ``train.errors``, ``train.schema``, ``train.safe_load`` (import only each other)
1. ``adapters.*``   model types, their registry and contract
2. ``losses.*``     loss families (they use the adapters' registry and contract)
3. the rest of ``train.*``: config, validation, trainer, commands

Every ``import`` statement counts, at module level and inside functions alike (an import
tucked into a function still ties the two modules together).
"""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("adapters", "losses", "train")
LEAVES = ("train.errors", "train.schema", "train.safe_load")


def project_modules():
    found = {}
    for package in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, package))):
            if name.endswith(".py"):
                module = package if name == "__init__.py" else f"{package}.{name[:-3]}"
                found[module] = os.path.join(ROOT, package, name)
    return found


def layer(module):
    if module in LEAVES:
        return 0
    return {"adapters": 1, "losses": 2, "train": 3}[module.split(".")[0]]


def imports_of(path, modules):
    """Project modules that the file at ``path`` imports, anywhere in it."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from adapters import registry" imports the submodule adapters.registry.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                targets.add(name)
    return targets


def import_graph():
    modules = project_modules()
    return {m: imports_of(path, modules) - {m} for m, path in modules.items()}


def test_no_upward_imports():
    wrong = [f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
             for src, targets in import_graph().items() for dst in sorted(targets) if layer(dst) > layer(src)]
    assert not wrong, "upward imports:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ importing its own submodules is how registration happens; a
    # submodule must not import its package back (that would be a cycle).
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node):      # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_walker_sees_imports_inside_functions(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from losses.gan import hinge_d_loss\n    import train.config\n")
    assert imports_of(str(path), project_modules()) == {"losses.gan", "train.config"}


@pytest.mark.parametrize("entry", ["train", "adapters", "losses"])
def test_each_package_imports_alone(entry):
    """A fresh interpreter imports each package first without a partially initialised module."""
    code = f"import {entry}; import train.cli, train.fit, train.evaluate, train.migrate, train.validate"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
