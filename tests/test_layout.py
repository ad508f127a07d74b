"""The code's shape, checked on the source (ast, no imports): layering, function length, one owner of the prompt
and of model references.

The packages' imports point one way (README.md, section "Layout"), checked on every import of every module.
Layers, bottom first: a package may import the packages before it and itself, never one after it.
Imports inside functions (the lazy ones), under ``if TYPE_CHECKING:`` and ``importlib.import_module("...")``
with a literal name count like top-level ones: they are dependencies all the same. The jobs' entry points
(``python -m jobs.train|evaluate|retrain``) only launch their job: nothing imports them, so every import names
the module's home (``jobs.training.job``, ...).

No function of ``dpn_model``, ``serve_apps``, ``jobs`` or ``pipelines`` is longer than ``MAX_FUNCTION_LINES``
(the project's code standard), and the vicuna-v1 chat text (``USER:``, ``ASSISTANT:``, the default system
prompt) is spelled only in ``dpn_model/processing.py``: every other module builds prompts through it. Likewise
a model reference's schemes (``preset:``, ``runs:/``, ``models:/``, ``mlflow-artifacts:/``) are tested only in
``dpn_base/model_ref.py``: every other module parses references with its ``ModelRef``.
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
        ("jobs/training/job.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import dpn_cli\n",
         "jobs/training/job.py:3: jobs imports dpn_cli (nothing imports dpn_cli, it sits on top)"),
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
            "import mlflow\nimport dpn_model\nfrom dpn_base.cli_harness import run_module\n",
        ),
        (
            "dpn_cli/__init__.py",
            "import importlib\nimport jobs.training.job\nimportlib.import_module('jobs.retraining.job')\n",
        ),
        ("dpn_model/commands/info.py", "from .. import presets\nfrom . import convert\n"),
        ("jobs/retraining/job.py", "from ..training import job\nfrom . import gate\n"),  # nested: resolved
        ("benchmarks/x.py", "from jobs.training.job import train\nimport ray\n"),
    ],
)
def test_the_checker_lets_imports_that_point_down_pass(path, source):
    assert forbidden_imports(source, path) == []


# ------------------------------------------------------------------------------------------ job entry points
ENTRY_POINTS = {"jobs.train": "jobs.training.job", "jobs.evaluate": "jobs.evaluation.job",
                "jobs.retrain": "jobs.retraining.job"}  # fmt: skip


def _imported(tree: ast.AST, package: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """What :func:`_imports` yields, plus ``module.name`` for each name of a ``from module import name``."""
    yield from _imports(tree, package)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield from ((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)


def entry_point_problems(source: str, path: str) -> list[str]:
    """``"path:line: ..."`` for each import of an entry point in ``source``, and, when ``path`` is an entry
    point, each import but ``sys`` and its job's ``main``."""
    parts = Path(path).with_suffix("").parts
    module = ".".join(parts)
    imported = sorted(set(_imported(ast.parse(source, path), parts[:-1])))
    if module in ENTRY_POINTS:
        home = ENTRY_POINTS[module]
        return [
            f"{path}:{line}: the entry point imports {name}; it imports only sys and {home}.main"
            for line, name in imported
            if name not in ("sys", home, f"{home}.main")
        ]
    return [
        f"{path}:{line}: imports the entry point {name}; import from {ENTRY_POINTS[name]}"
        for line, name in imported
        if name in ENTRY_POINTS
    ]


def test_the_job_entry_points_only_launch_their_job():
    assert all((ROOT / f"{name.replace('.', '/')}.py").is_file() for name in ENTRY_POINTS)
    problems = [
        problem
        for package in (*LAYERS, *SCRIPTS, "tests")
        for file in _modules(package)
        for problem in entry_point_problems(file.read_text(), str(file.relative_to(ROOT)))
    ]
    assert not problems, "`python -m jobs.X` modules only launch a job:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("jobs/train.py", "import sys\n\nfrom jobs.training.job import main\n", []),
        ("jobs/train.py", "from jobs.training.job import main, train\n",
         ["jobs/train.py:1: the entry point imports jobs.training.job.train; it imports only sys and "
          "jobs.training.job.main"]),
        ("jobs/retrain.py", "from jobs.retraining.job import *\n",
         ["jobs/retrain.py:1: the entry point imports jobs.retraining.job.*; it imports only sys and "
          "jobs.retraining.job.main"]),
        ("tests/test_x.py", "from jobs.evaluate import evaluate\n",
         ["tests/test_x.py:1: imports the entry point jobs.evaluate; import from jobs.evaluation.job"]),
        ("jobs/quickstart.py", "def f():\n    from jobs import train\n",
         ["jobs/quickstart.py:2: imports the entry point jobs.train; import from jobs.training.job"]),
        ("dpn_cli/__init__.py", "import importlib\nimportlib.import_module('jobs.retrain')\n",
         ["dpn_cli/__init__.py:2: imports the entry point jobs.retrain; import from jobs.retraining.job"]),
        ("benchmarks/x.py", "from jobs.training.job import train\nfrom jobs.training import driver\n", []),
    ],
)  # fmt: skip
def test_the_entry_point_checker_flags_an_import_of_an_entry_point(path, source, expected):
    assert entry_point_problems(source, path) == expected


# ------------------------------------------------------------------------------------------- function length
MAX_FUNCTION_LINES = 60
LENGTH_CHECKED = ("dpn_model", "serve_apps", "jobs", "pipelines")


def _functions(
    node: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """``(qualified name, node)`` of every function under ``node``: methods as ``Class.name``, nested ones too."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def long_functions(source: str, path: str, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"path:line: name is N lines ..."`` for each function longer than ``limit`` lines.

    A function's length runs from its ``def`` line to its last line, docstring included, decorators not.
    """
    problems = []
    for name, node in _functions(ast.parse(source, path)):
        length = node.end_lineno - node.lineno + 1
        if length > limit:
            problems.append(f"{path}:{node.lineno}: {name} is {length} lines (limit {limit})")
    return problems


@pytest.mark.parametrize("package", LENGTH_CHECKED)
def test_no_function_is_longer_than_the_limit(package):
    problems = [
        problem
        for file in _modules(package)
        for problem in long_functions(file.read_text(), str(file.relative_to(ROOT)))
    ]
    assert not problems, (
        f"functions over {MAX_FUNCTION_LINES} lines: split each into named steps that read top to bottom:\n"
        + "\n".join(problems)
    )


def _function_source(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_the_length_checker_names_each_long_function():
    source = (
        "import functools\n"
        + _function_source("short", MAX_FUNCTION_LINES)
        + "@functools.cache\n"  # decorators do not count
        + _function_source("long", MAX_FUNCTION_LINES + 1)
        + "class Model:\n"
        + "    async def forward(self):\n"
        + _function_source("inner", MAX_FUNCTION_LINES + 2, indent="        ")
    )
    # lines: 1 import, 2-61 short, 62 the decorator, 63-123 long, 124 the class, 125-187 forward, 126-187 inner
    assert long_functions(source, "serve_apps/x.py") == [
        "serve_apps/x.py:63: long is 61 lines (limit 60)",
        "serve_apps/x.py:125: Model.forward is 63 lines (limit 60)",
        "serve_apps/x.py:126: Model.forward.inner is 62 lines (limit 60)",
    ]


# --------------------------------------------------------------------------------- the chat template's owner
PROMPT_OWNER = "dpn_model/processing.py"


def _owner_constants() -> dict[str, str]:
    """The owner's module-level string constants, read from its source (the markers follow any change to them)."""
    tree = ast.parse((ROOT / PROMPT_OWNER).read_text(), PROMPT_OWNER)
    constants = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if isinstance(value, str):
                constants[node.targets[0].id] = value
    return constants


def template_markers() -> tuple[str, ...]:
    """Text that only a writer of the vicuna-v1 prompt spells: ``USER:``, ``ASSISTANT:`` and each sentence of the
    default system prompt."""
    constants = _owner_constants()
    sentences = [s.strip() for s in constants["DEFAULT_SYSTEM_PROMPT"].split(". ") if s.strip()]
    return (f"{constants['USER_ROLE']}:", f"{constants['ASSISTANT_ROLE']}:", *sentences)


def _docstrings(tree: ast.AST) -> set[int]:
    """``id``s of the string constants that are documentation (a bare string statement), not values."""
    return {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    }


def template_spellings(source: str, path: str, markers: tuple[str, ...]) -> list[str]:
    """``"path:line: ..."`` for each string value in ``source`` (f-string parts too) that holds a marker.

    Comments and docstrings may name the format; only values build prompts.
    """
    tree = ast.parse(source, path)
    docs = _docstrings(tree)
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            for marker in markers:
                if marker in node.value:
                    problems.append(
                        f"{path}:{node.lineno}: spells the chat template ({marker[:40]!r}); build prompts with "
                        f"{PROMPT_OWNER} (render_turns, build_prompt, DPNProcessor.encode)"
                    )
    return problems


def _found_outside(owner: str, check) -> list[str]:
    """What `check(source, path)` reports in every production module but `owner`, the one allowed to do it."""
    return [
        problem
        for package in LAYERS
        for file in _modules(package)
        if str(file.relative_to(ROOT)) != owner
        for problem in check(file.read_text(), str(file.relative_to(ROOT)))
    ]


def test_the_chat_template_is_spelled_only_in_the_processor():
    markers = template_markers()
    owner = (ROOT / PROMPT_OWNER).read_text()
    assert template_spellings(owner, PROMPT_OWNER, markers), (
        "the markers no longer match the owner's template"
    )
    problems = _found_outside(PROMPT_OWNER, lambda source, path: template_spellings(source, path, markers))
    assert not problems, "the chat template has one writer, dpn_model/processing.py:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ('def prompt(q):\n    return f"USER: {q} ASSISTANT:"\n', 2),  # both roles, in one f-string part each
        ('SYSTEM = (\n    "A chat between a curious human and an artificial intelligence assistant. "\n'
         '    "The assistant gives helpful, detailed, and polite answers to the human\'s questions."\n)\n', 2),
        ('def stop():\n    return ["</s>", " ASSISTANT:"]\n', 1),
        ('"""Renders `USER: ...` turns."""\n# USER: in a comment\n', 0),  # documentation may name the format
        ('TURN = 32\n"""Bytes per turn (`USER: `, ` ASSISTANT: `)."""\n', 0),
        ('ROLE = "user"\nprint(f"{ROLE}: hi")\n', 0),
    ],
)  # fmt: skip
def test_the_template_checker_flags_a_copy(source, flagged):
    assert len(template_spellings(source, "serve_apps/x.py", template_markers())) == flagged


# ------------------------------------------------------------------------------- the model reference's owner
MODEL_REF_OWNER = "dpn_base/model_ref.py"
MODEL_REF_SCHEMES = ("preset:", "runs:", "models:", "mlflow-artifacts:")  # "runs:/", "models:/", ... start so
_TEXT_TESTS = frozenset({
    "startswith", "endswith", "removeprefix", "partition", "rpartition", "split", "rsplit", "find", "rfind",
    "index", "rindex", "count", "replace", "len",
})  # fmt: skip


def _scheme_literals(nodes: list[ast.expr]) -> Iterator[ast.Constant]:
    """The string constants among ``nodes`` (tuples, lists and sets opened) that start with a scheme."""
    for node in nodes:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            yield from _scheme_literals(node.elts)
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(MODEL_REF_SCHEMES)
        ):
            yield node


def model_ref_scheme_tests(source: str, path: str) -> list[str]:
    """``"path:line: ..."`` for each place in ``source`` that parses a model reference by its scheme: a scheme
    literal (``"models:/"``, ``"preset:"``, ...) given to a text test (``startswith``, ``partition``, ``len``, ...)
    or compared (``==``, ``in``), and a bare scheme (``"runs:/"``: a scheme list's item, a prefix constant).

    Documentation, messages and f-strings that build a reference (``f"models:/{name}/{version}"``) may spell them.
    """
    tree = ast.parse(source, path)
    skipped = _docstrings(tree) | {
        id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values
    }
    found: dict[int, tuple[ast.Constant, str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in _TEXT_TESTS:
                for literal in _scheme_literals(node.args):
                    found.setdefault(id(literal), (literal, f"tests text with {name}()"))
        elif isinstance(node, ast.Compare):
            for literal in _scheme_literals([node.left, *node.comparators]):
                found.setdefault(id(literal), (literal, "compares text with it"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skipped
            and node.value.rstrip("/") in MODEL_REF_SCHEMES
        ):
            found.setdefault(id(node), (node, "spells a bare scheme"))
    return [
        f"{path}:{literal.lineno}: {literal.value!r}: {why}; parse model references with "
        f"{MODEL_REF_OWNER} (ModelRef.parse, ref.kind, ref.is_preset, ref.is_mlflow)"
        for literal, why in sorted(found.values(), key=lambda item: (item[0].lineno, item[0].col_offset))
    ]


def test_model_references_are_parsed_only_by_their_owner():
    owner = (ROOT / MODEL_REF_OWNER).read_text()
    assert model_ref_scheme_tests(owner, MODEL_REF_OWNER), (
        "the checker no longer sees the owner's scheme tests"
    )
    problems = _found_outside(MODEL_REF_OWNER, model_ref_scheme_tests)
    assert not problems, f"a model reference has one parser, {MODEL_REF_OWNER}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        ('def f(init):\n    return init.startswith("preset:")\n', ["2: 'preset:': tests text with startswith()"]),
        ('def f(t):\n    return t.startswith(("runs:/", "models:/"))\n',
         ["2: 'runs:/': tests text with startswith()", "2: 'models:/': tests text with startswith()"]),
        ('_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")\n',
         ["1: 'models:/': spells a bare scheme", "1: 'runs:/': spells a bare scheme",
          "1: 'mlflow-artifacts:/': spells a bare scheme"]),
        ('def f(t):\n    return t[len("models:/"):]\n', ["2: 'models:/': tests text with len()"]),
        ('def f(t):\n    return t.partition("@")[0] == "models:/dpn"\n', ["2: 'models:/dpn': compares text with it"]),
        ('def f(t):\n    return "mlflow-artifacts:/" in t\n', ["2: 'mlflow-artifacts:/': compares text with it"]),
        ('def f(name, v):\n    return f"models:/{name}/{v}"\n', []),  # building a reference is fine
        ('"""Give ``runs:/<id>/model`` or ``preset:tiny``."""\n', []),  # so is documenting one
        ('HELP = "a checkpoint directory, runs:/<run_id>/<path> or models:/<name>@<alias>"\n', []),
        ('def f(key):\n    return key == "models"\n', []),  # a word, not a scheme
    ],
)  # fmt: skip
def test_the_model_ref_checker_flags_a_scheme_test(source, flagged):
    problems = model_ref_scheme_tests(source, "serve_apps/x.py")
    assert [p.removeprefix("serve_apps/x.py:").split("; parse")[0] for p in problems] == flagged
    assert all(p.endswith(f"parse model references with {MODEL_REF_OWNER} (ModelRef.parse, ref.kind, "
                          "ref.is_preset, ref.is_mlflow)") for p in problems)  # fmt: skip
