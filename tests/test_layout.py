"""The package's layout, read from its source: the programs stay in cli/, imports run downwards only
(layers <- sparo <- models <- methods <- train; evaluation never imports methods or train), there are
no import cycles, and no function outgrows a screen or two."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dino_sparo"
FLOORS = ("layers", "sparo", "models", "methods", "train")  # each may import only those before it
MAX_FUNCTION_LINES = 100


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in MODULES.items()}


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (top level or inside a function)."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}


def unit(name: str) -> str:
    """``dino_sparo.models.vit`` -> ``models``; ``dino_sparo.train`` -> ``train``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_only_the_programs_parse_arguments():
    offenders = [name for name, tree in TREES.items() if unit(name) != "cli"
                 and any(isinstance(n, (ast.Import, ast.ImportFrom)) and "argparse" in
                         ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])
                         for n in ast.walk(tree))]
    assert offenders == [], f"argparse outside dino_sparo/cli/: {offenders}"
    users = {name: sorted(t for t in targets if unit(t) == "cli") for name, targets in GRAPH.items()
             if unit(name) != "cli"}
    assert {k: v for k, v in users.items() if v} == {}, "modules outside cli/ import cli/"


@pytest.mark.parametrize("lower", FLOORS[:-1])
def test_imports_run_downwards(lower):
    higher = set(FLOORS[FLOORS.index(lower) + 1:])
    upward = {name: sorted(t for t in targets if unit(t) in higher)
              for name, targets in GRAPH.items() if unit(name) == lower}
    assert {k: v for k, v in upward.items() if v} == {}


def test_evaluation_does_not_import_training():
    upward = {name: sorted(t for t in targets if unit(t) in {"methods", "train", "cli", "demo", "study", "bench"})
              for name, targets in GRAPH.items() if unit(name) == "evaluation"}
    assert {k: v for k, v in upward.items() if v} == {}


def test_no_import_cycles():
    """Tarjan's strongly connected components of the module graph: every one a single module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
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
                cycles.append(sorted(component))

    for name in GRAPH:
        if name not in index:
            visit(name)
    # a package's __init__ naming its own submodules is not a cycle of ideas
    cycles = [c for c in cycles if not all(m == c[0] or m.startswith(c[0] + ".") for m in c)]
    assert cycles == []


def test_no_function_is_longer_than_a_limit():
    long = [f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
            for name, tree in TREES.items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_the_checks_see_the_package():
    """The checks above read real modules and real imports (a wrong root would pass them vacuously)."""
    assert "dino_sparo.evaluation.knn" in MODULES and "dino_sparo.cli.knn" in MODULES
    assert "dino_sparo.evaluation.knn_search" in GRAPH["dino_sparo.evaluation.knn"]
    assert "dino_sparo.sparo" in GRAPH["dino_sparo.models.vit"]


def test_transforms_all_lists_what_the_module_defines():
    """``data.transforms.__all__``: every public name the module defines, nothing else."""
    from dino_sparo.data import transforms

    tree = TREES["dino_sparo.data.transforms"]
    defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    defined |= {target.id for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
                if isinstance(target, ast.Name) and target.id != "__all__"}
    assert sorted(transforms.__all__) == sorted(name for name in defined if not name.startswith("_"))


def test_methods_are_imported_by_name_not_looked_up_by_string():
    """methods/__init__.py builds its registry from imports (no importlib look-up by a dotted string)."""
    assert "importlib" not in MODULES["dino_sparo.methods"].read_text()
    from dino_sparo.methods import METHODS
    from dino_sparo.methods.clip import ClipMethod
    from dino_sparo.methods.dino import DinoMethod

    assert METHODS == {"dino": DinoMethod, "clip": ClipMethod}


def test_no_evaluation_function_takes_more_than_14_parameters():
    """Protocols take option objects (evaluation.options) rather than long parameter lists."""
    long = [f"{name}.{node.name}: {count}" for name, tree in TREES.items() if unit(name) == "evaluation"
            for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
            for count in [len(node.args.args) + len(node.args.kwonlyargs) + len(node.args.posonlyargs)
                          - (1 if node.args.args and node.args.args[0].arg in ("self", "cls") else 0)]
            if count > 14]
    assert long == []
def test_the_text_tower_builds_on_layers_not_on_the_vit():
    """Both towers share their block and read-out builder from the floors below (layers/, sparo)."""
    source = (Path(__file__).resolve().parents[1] / "dino_sparo" / "models" / "text.py").read_text()
    assert "models.vit" not in source and "layers.block import Block" in source and "create_readout" in source
