"""The `dpn` command line: one entry point, one module per subcommand.

Each subcommand lives in its own package's module, which exposes ``add_arguments(parser)`` and
``run(args) -> int`` (:mod:`dpn_base.cli_harness` runs it, here and under ``python -m``).
Modules are imported only when their subcommand runs, so `dpn info` never pays for importing Ray.
This package sits on top: it may import every package, and none imports it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpn_base.cli_harness import add_log_level, mount, run_parsed

# name -> (module, one-line help). Keep the list sorted by the order a newcomer meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("jobs.quickstart", "the whole system end to end on a laptop: data, train, eval, registry, serve"),
    "info": ("dpn_model.commands.info", "parameters and prefill FLOPs of a preset or checkpoint"),
    "convert": ("dpn_model.commands.convert", "convert a llava-hf checkpoint, or LLaVA-1.5 stage-1 parts, to DPN"),
    "serve": ("serve_apps.commands", "serve a model behind an OpenAI-compatible Ray Serve endpoint"),
    "train": ("jobs.training.job", "train DPN on Ray Train + DeepSpeed, tracked in MLflow (resumable)"),
    "data": ("pipelines.commands", "datasets: `data inspect PATH`, `data synth OUT`"),
    "eval": ("jobs.evaluation.job", "evaluate accuracy against prefill FLOPs per compression mode (Ray Data batch inference)"),
    "retrain": ("jobs.retraining.job", "scheduled retraining: new shards -> challenger -> gate -> champion alias"),
    "stack": ("jobs.stack", "the production stack on one machine: Ray (2 nodes), MLflow + PostgreSQL, S3, Prometheus"),
}  # fmt: skip


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpn",
        description="Dynamic Pyramid Network on Ray: data, training, evaluation, serving, retraining.",
    )
    add_log_level(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_log_level(sub_parser, hidden=True)  # also accepted after the subcommand
        if name == command:  # only the chosen subcommand's module is imported
            mount(sub_parser, importlib.import_module(module_name))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)  # the first one: `--log-level DEBUG train` too
    parser = _build_parser(command)
    return run_parsed(parser.parse_args(argv))


__all__ = ["COMMANDS", "main"]
