"""Imports point down the layers only: kernels < errors < core < {targets, models} < {distributed, toy}
< training < {apps, experiments}.

Every ``import`` and ``from ... import`` under fdpg_scale/ and kernels/ is read from the source (module level
and inside functions alike; only ``if TYPE_CHECKING:`` blocks are skipped, they never run). A module may
import its own package and anything in a lower layer; two packages of one layer (targets and models,
distributed and toy) do not import each other. kernels/ imports nothing from fdpg_scale but itself, and
neither DeepSpeed nor transformers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: package (the part after ``fdpg_scale.``) -> rank; one rank per layer, low to high.
LAYERS = {"kernels": 0, "errors": 1, "core": 2, "divergences": 2, "targets": 3, "models": 3,
          "distributed": 4, "toy": 4, "training": 5, "apps": 6, "cli": 6}
#: The two top-level shims are thin re-exports of their public paths: they sit in the layer they re-export.
#: experiments (the reproduce and sweep jobs, one job per module) sits in the command layer with apps: it runs
#: apps' jobs (pretrain-base, eval, the sweep report's plots) and apps' thin reproduce/sweep commands call it.
PACKAGE_OF = {"divergences": "core", "cli": "apps", "experiments": "apps"}
#: Libraries the kernels must not import: the ZeRO-3 handling of the lm_head lives with the distributed code,
#: and the kernels work on plain tensors, not on models.
KERNELS_MUST_NOT_IMPORT = ("deepspeed", "transformers")


def _module_name(path: Path) -> str:
    """Dotted name of a source file (kernels/ is installed as fdpg_scale.kernels)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":
        parts = ["fdpg_scale", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _package(module: str) -> str | None:
    """The layer package of ``fdpg_scale.X...`` (X itself for the shims' layer); None outside the project."""
    parts = module.split(".")
    if parts[0] != "fdpg_scale" or len(parts) < 2:
        return None
    return PACKAGE_OF.get(parts[1], parts[1])


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module) for every import that can run (``if TYPE_CHECKING:`` bodies skipped)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from fdpg_scale import kernels`` imports the subpackage: count the names too.
            names = [f"{target}.{a.name}" for a in node.names] if target == "fdpg_scale" else [target]
            for name in names:
                yield node.lineno, name
        stack.extend(ast.iter_child_nodes(node))


def layering_violations() -> list[str]:
    """One line per import that points up (or sideways between two packages of one layer)."""
    out = []
    files = sorted((ROOT / "fdpg_scale").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))
    for path in files:
        module = _module_name(path)
        here = _package(module)
        if here is None or here not in LAYERS:  # fdpg_scale/__init__.py: the version string only
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in _imports(tree, module, path.name == "__init__.py"):
            there = _package(name)
            if here == "kernels" and name.split(".")[0] in KERNELS_MUST_NOT_IMPORT:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name} (the kernels use plain tensors only)")
            if there is None or there == here:
                continue
            if there not in LAYERS:
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name}, which is in no layer")
            elif LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != here):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {name} (layer {here} → {there})")
    return out


def test_imports_point_down_the_layers():
    violations = layering_violations()
    assert not violations, "imports that point up a layer:\n" + "\n".join(violations)


def test_the_walk_sees_every_kind_of_import():
    """The checker itself: an upward import is found at module level, in a function, as a relative import and
    through ``from fdpg_scale import``; a TYPE_CHECKING import is not."""
    src = ("from typing import TYPE_CHECKING\n"
           "from fdpg_scale.core.metrics import x\n"            # down: fine
           "if TYPE_CHECKING:\n    from fdpg_scale.apps.cli import main\n"
           "def f():\n    import fdpg_scale.training.loop\n"     # up, inside a function: line 6
           "from ..apps import cli\n"                             # up, relative: line 7
           "from fdpg_scale import distributed\n")               # up, via the package: line 8
    tree = ast.parse(src)
    found = [(line, name) for line, name in _imports(tree, "fdpg_scale.targets.energy", False)
             if _package(name) not in (None, "targets") and LAYERS[_package(name)] > LAYERS["targets"]]
    assert sorted(found) == [(6, "fdpg_scale.training.loop"), (7, "fdpg_scale.apps"), (8, "fdpg_scale.distributed")]
