"""How a command module runs, as `dpn <name>` or as `python -m <module>`: one harness for both.

A command module (``jobs.training.job``, ``pipelines.commands``, ``serve_apps.commands``, ...) exposes
``add_arguments(parser)`` and ``run(args) -> int``. The `dpn` CLI (:mod:`dpn_cli`) mounts it as a
subcommand; a job that is also launched on its own (``ray job submit -- python -m jobs.train ...``) has a
``main`` that returns ``run_module("jobs.training.job", prog="python -m jobs.train")``, which the entry-point
module (``jobs/train.py``) exits with. Both ways take ``--log-level`` and set up logging alike.
Jobs configured by one YAML file share their flags and their ``run`` too: :func:`add_config_arguments`,
:func:`run_config_job`.

It lives in ``dpn_base``, below every layer, so that every package's commands can use it without importing
the CLI or a package above them, and `dpn --help` stays instant: it imports only the standard library and
:mod:`dpn_base.redact`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from dpn_base.redact import install_log_redaction

C = TypeVar("C")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_log_level(parser: argparse.ArgumentParser, *, hidden: bool = False) -> None:
    """``--log-level``. ``hidden``: a second spelling after a subcommand, without a second help line."""
    if hidden:
        parser.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
        parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")


def mount(parser: argparse.ArgumentParser, module: Any) -> None:
    """Give ``parser`` the command module's flags and make :func:`run_parsed` run the module."""
    module.add_arguments(parser)
    parser.set_defaults(_run=module.run)


def run_parsed(args: argparse.Namespace) -> int:
    """Set up logging at ``args.log_level`` (every handler redacts credentials: :mod:`dpn_base.redact`) and
    run the mounted command; its exit status."""
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    install_log_redaction()
    return int(args._run(args) or 0)


def run_module(module_name: str, argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """`python -m <module_name> ...`: the module's command on its own, with the flags of its `dpn` subcommand.

    The module is imported by its name rather than used as ``__main__``, so that what it hands to Ray
    (e.g. ``jobs.evaluation.predictor.Predictor``) pickles by its importable name, as under `dpn`.
    ``prog``: the command line users type, when a thin entry-point module launches it
    (``python -m jobs.train`` runs :mod:`jobs.training.job`); ``python -m <module_name>`` by default.
    """
    module = importlib.import_module(module_name)
    summary = (module.__doc__ or "").strip().split("\n", 1)[0]
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module_name}", description=summary or None)
    add_log_level(parser)
    mount(parser, module)
    return run_parsed(parser.parse_args(sys.argv[1:] if argv is None else list(argv)))


# ----------------------------------------------------------------------------------------------
# Jobs configured by one YAML file: `--config FILE [KEY=VALUE ...] [--print-config]`
# ----------------------------------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, *, config_help: str, overrides_help: str) -> None:
    """``--config FILE``, dotted ``KEY=VALUE`` overrides and ``--print-config``."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run_config_job(
    args: argparse.Namespace,
    *,
    load: Callable[[str, list[str]], C],
    dump: Callable[[C], str],
    job: Callable[[C], Mapping[str, Any]],
    invalid: type[Exception] = ValueError,
) -> int:
    """Load ``args.config`` with ``args.overrides``, then print it (``--print-config``) or run ``job`` on it.

    Args:
        load: ``(path, overrides) -> config``; raises ``invalid`` on a bad file or override.
        dump: the resolved config as YAML text.
        job: runs the job; returns the summary printed as ``key=value`` lines (what scripts parse).

    Returns:
        0 when the job ran (or the config was printed), 2 on an invalid config (logged, no traceback).
    """
    try:
        cfg = load(args.config, args.overrides)
    except invalid as err:
        logging.getLogger(job.__module__).error("invalid config: %s", err)  # logged as the job's own
        return 2
    if args.print_config:
        sys.stdout.write(dump(cfg))
        return 0
    summary = job(cfg)
    sys.stdout.write("".join(f"{key}={value}\n" for key, value in summary.items()))
    return 0


__all__ = [
    "LOG_FORMAT",
    "add_config_arguments",
    "add_log_level",
    "mount",
    "run_config_job",
    "run_module",
    "run_parsed",
]
