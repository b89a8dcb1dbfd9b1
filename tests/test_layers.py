"""The package's import graph: dependencies point one way, and it is visible at the top of each module.

Layers, lowest first: ``cascadelab.operators`` -> ``cascadelab.cascade`` -> ``cascadelab.platform`` ->
``cascadelab.jobs`` (and ``cascadelab.cli``). A module may import its own layer and the layers below it,
never one above, whether the import sits at the top of the module, inside a function, or is a string
handed to ``importlib.import_module``. Imports inside functions are kept for Ray, MLflow and
matplotlib, which are slow to import and not needed by every caller.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cascadelab"
LAYERS = ("cascadelab.operators", "cascadelab.cascade", "cascadelab.platform", "cascadelab.jobs", "cascadelab.cli")
LAZY_ROOTS = ("ray", "mlflow", "matplotlib")

# Function-local imports of other modules still to be moved to the top of their files (module path
# relative to the package -> imported modules). Temporary: each entry goes with its fix.
LOCAL_IMPORTS_TO_MOVE: dict[str, set[str]] = {
    "platform/tune/sweep.py": {"cascadelab.platform.train.run"},  # imports Ray: validation must not
}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def _layer(module: str) -> int | None:
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return i
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, ast.AST]]:
    """Every module ``tree`` imports: import statements, ``from`` imports (``from cascadelab import jobs``
    names ``cascadelab.jobs``; relative ones resolved against ``module``) and constant strings passed to
    ``importlib.import_module``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(f"{base}.{alias.name}", node) for alias in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, node))
    return found


def _local_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every import statement inside a function or class body."""
    found = []
    for scope in ast.walk(tree):
        if not isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(scope):
            if isinstance(node, ast.Import):
                found += [(alias.name, node.lineno) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                found.append(("." * node.level + (node.module or ""), node.lineno))
    return sorted(set(found), key=lambda t: t[1])


def against_the_grain(source: str, module: str, is_package: bool = False) -> list[str]:
    """``"<line>: <module> imports <target>"`` for each import of ``source`` from a higher layer."""
    own = _layer(module)
    if own is None:
        return []
    bad = []
    for target, node in _imports(ast.parse(source), module, is_package):
        layer = _layer(target)
        if layer is not None and layer > own:
            bad.append(f"{node.lineno}: {module} imports {target}")
    return bad


def unexpected_local_imports(source: str) -> list[tuple[str, int]]:
    """Function-local imports of ``source`` other than Ray, MLflow and matplotlib (and their submodules)."""
    return [(name, line) for name, line in _local_imports(ast.parse(source))
            if name.split(".")[0] not in LAZY_ROOTS]


def test_dependencies_point_one_way():
    bad = []
    for module, path in _modules():
        bad += against_the_grain(path.read_text(), module, path.name == "__init__.py")
    assert bad == [], "imports against jobs -> platform -> cascade -> operators:\n" + "\n".join(bad)


def test_function_local_imports_are_only_ray_mlflow_matplotlib():
    bad = []
    for _, path in _modules():
        rel = str(path.relative_to(PACKAGE))
        allowed = LOCAL_IMPORTS_TO_MOVE.get(rel, set())
        bad += [f"{rel}:{line}: {name}" for name, line in unexpected_local_imports(path.read_text())
                if name not in allowed]
    assert bad == [], "import these at the top of the module:\n" + "\n".join(bad)


# The checks themselves, on small sources: each would fail on a checker that missed the case.

@pytest.mark.parametrize("source, module, expected", [
    ("import cascadelab.jobs.train\n", "cascadelab.platform.cluster.jobs",
     ["1: cascadelab.platform.cluster.jobs imports cascadelab.jobs.train"]),
    ("from cascadelab import jobs\n", "cascadelab.platform.x", ["1: cascadelab.platform.x imports cascadelab.jobs"]),
    ("def f():\n    from cascadelab.platform.config import load_config\n", "cascadelab.cascade.objectives",
     ["2: cascadelab.cascade.objectives imports cascadelab.platform.config.load_config"]),
    ("from ..cascade import batch\n", "cascadelab.operators.dftopk",
     ["1: cascadelab.operators.dftopk imports cascadelab.cascade.batch"]),
    ("import importlib\nimportlib.import_module('cascadelab.jobs.train')\n", "cascadelab.platform.y",
     ["2: cascadelab.platform.y imports cascadelab.jobs.train"]),
    ("from cascadelab.cli import main\n", "cascadelab.jobs.z", ["1: cascadelab.jobs.z imports cascadelab.cli.main"]),
    ("from cascadelab.operators import dftopk\nfrom cascadelab.cascade.metrics import stage_names\n",
     "cascadelab.cascade.objectives.lcron", []),
    ("from cascadelab.platform.config import load_config\n", "cascadelab.jobs.train", []),
])
def test_against_the_grain_detects(source, module, expected):
    assert against_the_grain(source, module) == expected


def test_unexpected_local_imports_detects():
    source = ("import os\n"
              "def f():\n    import ray\n    from ray.train import Checkpoint\n    import matplotlib.pyplot as plt\n"
              "    from mlflow import MlflowClient\n    import pandas as pd\n"
              "class C:\n    def g(self):\n        from cascadelab.cascade import metrics\n")
    assert unexpected_local_imports(source) == [("pandas", 7), ("cascadelab.cascade", 10)]
