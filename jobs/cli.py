"""The `dpn` command line: one entry point, one module per subcommand.

Each subcommand lives in its own module, which exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their subcommand runs, so `dpn info` never pays for importing Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help). Keep the list sorted by the order a newcomer meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("jobs.quickstart", "the whole system end to end on a laptop: data, train, eval, registry, serve"),
    "info": ("dpn_model.commands.info", "parameters and prefill FLOPs of a preset or checkpoint"),
    "convert": ("dpn_model.commands.convert", "convert a llava-hf checkpoint, or LLaVA-1.5 stage-1 parts, to DPN"),
    "serve": ("serve_apps.commands", "serve a model behind an OpenAI-compatible Ray Serve endpoint"),
    "train": ("jobs.train", "train DPN on Ray Train + DeepSpeed, tracked in MLflow (resumable)"),
    "data": ("pipelines.commands", "datasets: `data inspect PATH`, `data synth OUT`"),
    "eval": ("jobs.evaluate", "evaluate accuracy against prefill FLOPs per compression mode (Ray Data batch inference)"),
    "retrain": ("jobs.retrain", "scheduled retraining: new shards -> challenger -> gate -> champion alias"),
}


def _build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpn",
        description="Dynamic Pyramid Network on Ray: data, training, evaluation, serving, retraining.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # also accepted after the subcommand (`python -m jobs.train --log-level DEBUG ...`)
        sub_parser.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if name == command:  # only the chosen subcommand's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = _build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args._run(args) or 0)


def run_subcommand(command: str, argv: list[str] | None = None) -> int:
    """Entry of `python -m <module>` for a subcommand's module: the same as `dpn <command> ...`."""
    return main([command, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
