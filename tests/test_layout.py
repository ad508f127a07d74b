"""The packages' imports point one way (README.md, section "Layout"), checked on every import of every module.

Layers, bottom first: a package may import the packages before it and itself, never one after it.
Imports inside functions (the lazy ones), under ``if TYPE_CHECKING:`` and ``importlib.import_module("...")``
with a literal name count like top-level ones: they are dependencies all the same.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

LAYERS = ("dpn_base", "dpn_model", "pipelines", "tracking", "serve_apps", "jobs", "dpn_cli")
SCRIPTS = ("benchmarks",)  # may import any package but the CLI
FORBIDDEN_LIBRARIES = {"dpn_model": {"ray": "Ray", "mlflow": "MLflow"}}  # dpn_model runs anywhere


def _allowed(package: str) -> tuple[str, ...]:
    if package in LAYERS:
        return LAYERS[: LAYERS.index(package) + 1]
    return tuple(p for p in LAYERS if p != "dpn_cli")


def _imports(tree: ast.AST, package: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` for every import in ``tree``; ``package``: the file's package, as name parts."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the file's package
                base = package[: len(package) - node.level + 1]
                yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])
            elif node.module:
                yield node.lineno, node.module
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Attribute):
        return func.attr == "import_module"
    return isinstance(func, ast.Name) and func.id in ("import_module", "__import__")


def forbidden_imports(source: str, path: str) -> list[str]:
    """``"path:line: ..."`` for each import in ``source`` that the layering forbids; ``path`` relative to the root."""
    parts = Path(path).with_suffix("").parts
    package = parts[0]
    allowed = _allowed(package)
    problems = []
    for line, name in _imports(ast.parse(source, path), parts[:-1]):
        top = name.split(".")[0]
        if top in LAYERS and top not in allowed:
            why = (
                "nothing imports dpn_cli, it sits on top"
                if top == "dpn_cli"
                else f"{package} may import only {', '.join(allowed)}"
            )
            problems.append(f"{path}:{line}: {package} imports {name} ({why})")
        library = FORBIDDEN_LIBRARIES.get(package, {}).get(top)
        if library:
            problems.append(f"{path}:{line}: {package} imports {name} ({package} imports no {library})")
    return problems


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_has_a_layer_and_is_installed():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), (
        f"place every package in LAYERS (and README.md, section 'Layout'): {sorted(packages)}"
    )
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {p.rstrip("*") for p in include} == set(LAYERS)
    assert pyproject["project"]["scripts"]["dpn"] == "dpn_cli:main"


@pytest.mark.parametrize("package", LAYERS + SCRIPTS)
def test_imports_point_one_way(package):
    files = _modules(package)
    assert files, f"no modules found under {package}/"
    problems = [
        problem
        for file in files
        for problem in forbidden_imports(file.read_text(), str(file.relative_to(ROOT)))
    ]
    assert not problems, "imports against the layering (README.md, section 'Layout'):\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        (
            "serve_apps/loading.py",
            "def load(ref):\n    from jobs.tracking import resolve_model_dir\n",
            "serve_apps/loading.py:2: serve_apps imports jobs.tracking "
            "(serve_apps may import only dpn_base, dpn_model, pipelines, tracking, serve_apps)",
        ),
        ("dpn_model/modeling.py", "import torch\nimport ray.train\n",
         "dpn_model/modeling.py:2: dpn_model imports ray.train (dpn_model imports no Ray)"),
        ("dpn_model/x.py", "def f():\n    from mlflow import MlflowClient\n",
         "dpn_model/x.py:2: dpn_model imports mlflow (dpn_model imports no MLflow)"),
        ("pipelines/x.py", "import tracking\n",
         "pipelines/x.py:1: pipelines imports tracking (pipelines may import only dpn_base, dpn_model, pipelines)"),
        ("tracking/x.py", "from serve_apps.app import build_app\n",
         "tracking/x.py:1: tracking imports serve_apps.app "
         "(tracking may import only dpn_base, dpn_model, pipelines, tracking)"),
        ("jobs/train.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dpn_cli\n",
         "jobs/train.py:3: jobs imports dpn_cli (nothing imports dpn_cli, it sits on top)"),
        ("jobs/x.py", "import importlib\nimportlib.import_module('dpn_cli')\n",
         "jobs/x.py:2: jobs imports dpn_cli (nothing imports dpn_cli, it sits on top)"),
        ("benchmarks/x.py", "from dpn_cli import main\n",
         "benchmarks/x.py:1: benchmarks imports dpn_cli (nothing imports dpn_cli, it sits on top)"),
    ],
)  # fmt: skip
def test_the_checker_flags_an_import_against_the_layering(path, source, expected):
    assert forbidden_imports(source, path) == [expected]


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("jobs/quickstart.py", "def serve():\n    from serve_apps.app import build_app\n"),
        ("serve_apps/loading.py", "def load():\n    from tracking import resolve_model_dir\n"),
        (
            "tracking/models.py",
            "import mlflow\nimport dpn_model\nfrom pipelines.cli_harness import run_module\n",
        ),
        (
            "dpn_cli/__init__.py",
            "import importlib\nimport jobs.train\nimportlib.import_module('jobs.retrain')\n",
        ),
        ("dpn_model/commands/info.py", "from .. import presets\nfrom . import convert\n"),
        ("benchmarks/x.py", "from jobs.train import train\nimport ray\n"),
    ],
)
def test_the_checker_lets_imports_that_point_down_pass(path, source):
    assert forbidden_imports(source, path) == []
