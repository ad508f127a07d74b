"""`dpn stack up|down|status|env|start|stop`: the production stack on one machine, every service on loopback.

PostgreSQL + an MLflow server on it, an S3-protocol server (moto), a Ray cluster of two nodes with token auth and
Prometheus, started and stopped by ``deploy/local/stack.py`` (which this command runs; it documents every
service, port and file). ``up`` installs what is missing (Debian's and PyPI's packages, as root) and ends by
printing the variables to export; ``env`` prints them again::

    dpn stack up && eval "$(dpn stack env)"
    python deploy/local/e2e.py            # the main job end to end through the cluster's interfaces
    dpn stack down

The stack is a development and CI tool: it needs the repository checkout (``deploy/local/``), as
``ray job submit --working-dir .`` does.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "local" / "stack.py"
MODULE_NAME = "dpn_local_stack"


def _script() -> ModuleType:
    """``deploy/local/stack.py``, loaded from the checkout (it is a script, not part of the installed package)."""
    if not SCRIPT.is_file():
        raise SystemExit(
            f"dpn stack: {SCRIPT} not found; run it from a checkout of the repository (`pip install -e .`)"
        )
    if MODULE_NAME in sys.modules:
        return sys.modules[MODULE_NAME]
    spec = importlib.util.spec_from_file_location(MODULE_NAME, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[MODULE_NAME] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The script's own flags and subcommands: one definition, shared with ``python deploy/local/stack.py``."""
    _script().add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``dpn stack ...``: 0 on success, 1 when ``status`` finds a service down, 2 when one failed to start/stop."""
    return _script().run(args)


__all__ = ["add_arguments", "run"]
