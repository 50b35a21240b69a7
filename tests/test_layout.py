"""The package's folders keep their order: the neutral core at the top, then `procedure`
and `compression`, then the two Keras worlds, each importing only what lies below it."""
import ast
import os

import tf_stdprune

PACKAGE = os.path.dirname(tf_stdprune.__file__)
# Higher imports lower, never the other way round; the two worlds never import each other.
RANK = {"": 0, "procedure": 1, "compression": 1, "keras2": 2, "keras3": 2}
API = {"tf_stdprune", "tf_stdprune.__main__"}  # the public surface may name any module


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3]
                module = relative.replace(os.sep, ".").removesuffix(".__init__")
                yield module, path


def _imports(path, module):
    """Every ``tf_stdprune`` module that ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("tf_stdprune")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tf_stdprune"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
    found.discard(module)
    return found


def _is_module(name):
    path = os.path.join(os.path.dirname(PACKAGE), *name.split("."))
    return os.path.exists(path + ".py") or os.path.isdir(path)


def _folder(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in RANK else ""


GRAPH = {module: _imports(path, module) for module, path in _modules()}


def test_no_module_imports_one_of_a_higher_or_sibling_layer():
    upward = [(module, target) for module, targets in GRAPH.items() if module not in API
              for target in targets
              if target not in API and _folder(target) != _folder(module)
              and RANK[_folder(target)] >= RANK[_folder(module)]]
    assert upward == []


def test_the_import_graph_has_no_cycle():
    state, cycles = {}, []

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_every_world_has_the_same_module_names_for_what_both_do():
    names = {world: {m.split(".")[-1] for m in GRAPH if _folder(m) == world}
             for world in ("keras2", "keras3")}
    assert {"wrapper", "prune", "iterative", "quantize", "export"} <= names["keras2"] & names["keras3"]
