"""Evaluation job: accuracy against prefill compute, per compression mode, with Ray Data batch inference.

Launch (embedded local Ray, or ``ray job submit --working-dir . -- python -m jobs.evaluate ...``)::

    dpn eval --model models:/dpn@champion --data data/synthetic --compression auto,1,2,4 --json eval.json
    python -m jobs.evaluate --model dense=runs/dense/model --model dpn=runs:/<run_id>/model \\
        --compression dense=1 --compression dpn=auto,1,2,4 --data my_eval.jsonl
    dpn eval --config configs/eval_tiny.yaml batch_size=8 --max-samples 50   # YAML < flags < key=value

The flags and ``configs/eval_*.yaml`` hold the same settings (:class:`jobs.evaluation.config.EvalConfig`).

Pipeline (one pass over the data per model):

1. ``pipelines.datasets.build_eval_dataset``: read any supported format (synthetic benchmark root in
   LLaVA JSON / WebDataset / Parquet, or LLaVA-style evaluation JSONL with ``question_id``,
   ``image``, ``question``/``text``, ``answer``), tokenise prompts, decode images; bad samples are
   skipped and counted (the job fails past ``--max-bad-fraction``).
2. ``map_batches(Predictor, compute=ActorPoolStrategy(size=--num-actors), num_gpus=1 per actor when the
   cluster has GPUs)`` (:mod:`jobs.evaluation.predictor`): each actor loads the model once (bf16 on GPU, fp32
   on CPU), pads prompts on the left and runs greedy ``generate(compression=mode)`` for every
   requested mode on the same batch, then scores answers with ``--task`` (:mod:`jobs.evaluation.tasks`;
   default exact match, :mod:`jobs.evaluation.scoring`). The prefill's own outputs (analytic
   ``prefill_flops``, ``expert_choices``, ``visual_tokens``, ``router_probs``) are read with a
   forward hook on the first (prefill) forward call of ``generate`` - no second forward. The dense
   reference FLOPs of each sample come from ``dpn_model.flops`` (compression 1, no routers, the
   lm_head on the one position ``generate`` keeps); at compression 1 both must agree, and the
   report records the largest relative difference.
3. The driver streams per-sample results into one row per (model, mode) (schema:
   :mod:`jobs.evaluation.report`), prints the tables, writes the JSON report, PNG plots and a
   ``predictions.jsonl``, and logs everything to one MLflow run (params, metrics, artifacts;
   :mod:`jobs.evaluation.mlflow_log`). With ``--oracle``, every static path runs in the same pass
   (:mod:`jobs.evaluation.oracle`).

This module is the orchestration and the CLI; the parts live in :mod:`jobs.evaluation`.

``MODEL`` is a local Hugging Face directory, an MLflow run artifact (``runs:/<id>/model``) or a
registry reference (``models:/dpn@champion``, ``models:/dpn/3``), resolved with
``tracking.resolve_model_dir``; MLflow's tracking URI defaults to ``tracking.tracking_uri()``
(``$MLFLOW_TRACKING_URI`` or a local SQLite file ``./mlflow.db``). Several ``--model LABEL=MODEL`` are evaluated one after the
other into the same report; ``--baseline REPORT.json`` adds rows of earlier reports to the table and
plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpn_base.cli_harness import run_module
from dpn_base.console import active_console, add_console_arguments
from dpn_base.ray_session import connect_ray
from dpn_base.redact import redact
from jobs.console import JobFailed, ProgressView, job_console
from jobs.evaluation import oracle
from jobs.evaluation import report as eval_report
from jobs.evaluation.config import (  # EvalConfig, ModelSpec, parse_compressions: also imported from here
    DEFAULT_COMPRESSIONS,
    DEFAULT_EXPERIMENT,
    EvalConfig,
    ModelSpec,
    load_eval_config,
    parse_compressions,
)
from jobs.evaluation.mlflow_log import log_run
from jobs.evaluation.predictor import load_model_config, predict
from jobs.evaluation.resources import use_gpus
from jobs.evaluation.tasks import task_names

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A flag value that does not fit the model (found once the model's config is read): exit code 2."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def parse_model_specs(models: Sequence[str], compressions: Sequence[str] | None) -> list[ModelSpec]:
    """``--model [LABEL=]URI`` and ``--compression [LABEL=]MODES`` flags -> model specs.

    A ``--compression`` without a label is the default for every model (``auto,1,2,4`` if none);
    ``LABEL=MODES`` overrides it for one model (:func:`set_compressions`). A model without a label is
    labelled by its URI's last path component.
    """
    if not models:
        raise ValueError(
            "give at least one --model (a local directory, runs:/<id>/model or models:/name@alias)"
        )
    specs: list[ModelSpec] = []
    for text in models:
        label, sep, uri = text.partition("=")
        if not sep or "/" in label or ":" in label:  # "models:/x" or a path, not "label=uri"
            label, uri = "", text
        label = label or (uri.rstrip("/").rsplit("/", 1)[-1].replace("@", "_") or "model")
        if any(s.label == label for s in specs):
            raise ValueError(f"two models are labelled {label!r}; label them: --model NAME=URI")
        specs.append(ModelSpec(label=label, uri=uri))  # modes: the default, auto,1,2,4
    return set_compressions(specs, compressions)


def set_compressions(specs: list[ModelSpec], compressions: Sequence[str] | None) -> list[ModelSpec]:
    """Apply ``--compression [LABEL=]MODES`` flags to ``specs`` (in place; returned): one without a label sets
    every model's modes, ``LABEL=MODES`` one model's; a model no flag names keeps its modes."""
    default, per_label = None, {}
    for text in compressions or []:
        label, sep, modes = text.partition("=")
        if sep and ":" not in label:  # LABEL=MODES (labels hold no ":"; "auto:lambda=1" is a mode)
            if label not in {s.label for s in specs}:
                raise ValueError(
                    f"--compression {text!r} names no model; labels are {[s.label for s in specs]}"
                )
            per_label[label] = modes
        else:
            default = text
    for spec in specs:
        modes = per_label.get(spec.label, default)
        if modes is None:
            continue
        try:
            spec.compressions = parse_compressions(modes)
        except ValueError as err:
            raise ValueError(f"--compression: {err}") from None
    return specs


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _predictions_record(batch: dict[str, np.ndarray], i: int, label: str) -> dict[str, Any]:
    return {
        "label": label,
        "id": str(batch["id"][i]),
        "compression": str(batch["compression"][i]),
        "family": str(batch["family"][i]),
        "kind": str(batch["kind"][i]),
        "question": str(batch["question"][i]),
        "answer": str(batch["answer"][i]),
        "prediction": str(batch["prediction"][i]),
        "correct": bool(batch["correct"][i]),
        "prefill_flops": float(batch["prefill_flops"][i]),
        "dense_flops": float(batch["dense_flops"][i]),  # the FLOPs ratio's denominator, per sample
        "expert_choices": [int(c) for c in batch["expert_choices"][i]],
    }


def _model_modes(spec: ModelSpec, config: Any, cfg: EvalConfig) -> list[str | int]:
    """Validate the model's modes against its config; returns every mode to run: the requested ones (with
    ``--dial``, a model evaluated in ``auto`` also at each ``auto:lambda=X``), then the oracle's static paths
    that are not among them (``--oracle``)."""
    dial = [f"auto:lambda={x:g}" for x in cfg.dial] if "auto" in [str(c) for c in spec.compressions] else []
    try:
        spec.compressions = parse_compressions(
            ",".join([*(str(c) for c in spec.compressions), *dial]), config
        )
    except ValueError as err:
        raise UsageError(f"--compression for model {spec.label!r}: {err}") from None
    requested = {str(c) for c in spec.compressions}
    paths = oracle.path_labels(config) if cfg.oracle else []
    return [*spec.compressions, *(p for p in paths if p not in requested)]


def _consume(
    ds: Any, spec: ModelSpec, cfg: EvalConfig, sinks: dict[str, Any], predictions: Any, num_modes: int
) -> None:
    """Stream the result rows into the mode accumulators, the oracle's path collector and the predictions
    file (requested modes only). The samples' progress goes to the job's console (stderr without one)."""
    accumulators, collector = sinks["accumulators"], sinks["collector"]
    first = accumulators[str(spec.compressions[0])].total
    console = active_console() or sys.stderr
    with ProgressView(console, cfg.max_samples, unit="sample", label=f"eval {spec.label}") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            modes = np.asarray(batch["compression"]).astype(str)
            for mode, acc in accumulators.items():
                sel = modes == mode
                if sel.any():
                    acc.add({k: np.asarray(v)[sel] for k, v in batch.items()})
            if collector is not None:
                collector.add(batch)
            for i in np.flatnonzero(np.isin(modes, list(accumulators))):
                predictions.write(json.dumps(_predictions_record(batch, i, spec.label)) + "\n")
            bar.update_to(bar.n + len(modes) // num_modes, acc=f"{first.correct / max(first.n, 1):.3f}")


def evaluate_model(
    spec: ModelSpec, cfg: EvalConfig, predictions: Any
) -> tuple[list[dict[str, Any]], dict[str, Any], Any]:
    """Evaluate one model in all its modes (and, with ``--oracle``, every static path in the same pass);
    write the requested modes' predictions to the open file ``predictions``.

    Returns:
        ``(rows, info, table)``: one report row per requested mode, facts about the model (directory,
        counts), and the oracle's :class:`jobs.evaluation.oracle.PathTable` (None without ``--oracle``).
    """
    from tracking import resolve_model_dir

    model_dir = resolve_model_dir(spec.ref, cfg.tracking_uri)
    config = load_model_config(model_dir)
    run_modes = _model_modes(spec, config, cfg)
    accumulators = {
        str(mode): eval_report.ModeAccumulator(
            spec.label, spec.uri, mode, config.compression_factors, len(config.pooling_layers)
        )
        for mode in spec.compressions
    }
    collector = oracle.PathCollector(oracle.path_labels(config)) if cfg.oracle else None
    logger.info(
        "evaluating %s (%s) in modes %s%s on %s", spec.label, model_dir, spec.compressions,
        f" and {len(collector.paths)} static paths (oracle)" if collector else "", cfg.data,
    )  # fmt: skip
    ds, accountant = predict(spec, model_dir, cfg, run_modes)
    start = time.perf_counter()
    sinks = {"accumulators": accumulators, "collector": collector}
    _consume(ds, spec, cfg, sinks, predictions, len(run_modes))
    bad = accountant.check()  # exact bad-sample threshold over the whole pass
    rows = [acc.row() for acc in accumulators.values()]
    if not rows or rows[0]["num_samples"] == 0:
        raise ValueError(f"no evaluable sample in {cfg.data} (split {cfg.split!r}): {bad.summary()}")
    for row in rows:
        err = row.get("dense_flops_max_rel_error")
        if err is not None and err > 1e-6:
            logger.warning(
                "%s: the model's prefill_flops at compression 1 differ from dpn_model.flops by up to %.2e "
                "(relative); the FLOPs ratios may be off", spec.label, err,
            )  # fmt: skip
    info = {
        "label": spec.label,
        "uri": spec.uri,
        "model_dir": model_dir,
        "compressions": [str(c) for c in spec.compressions],
        "num_samples": rows[0]["num_samples"],
        "num_generation_modes": len(run_modes),
        "bad_samples": bad.to_dict(),
        "wall_s": time.perf_counter() - start,
    }
    return rows, info, collector.table() if collector else None


def _output_dir(cfg: EvalConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs") / "eval" / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run the evaluation job; returns the report (``{"version", "meta", "rows"}``, and ``"oracle"``:
    ``{label: section}`` with ``cfg.oracle``, see :mod:`jobs.evaluation.oracle`)."""
    import ray

    from tracking import tracking_uri

    uri = cfg.tracking_uri = tracking_uri(cfg.tracking_uri)  # also what models:/ and runs:/ resolve against
    out_dir = _output_dir(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    connect_ray()  # $RAY_ADDRESS (`ray job submit`) names a cluster; otherwise a new local one
    baseline_rows = [{**r, "baseline": True} for r in eval_report.load_rows(cfg.baselines)]
    rows: list[dict[str, Any]] = []
    infos = []
    oracles: dict[str, dict[str, Any]] = {}
    path_tables: dict[str, Any] = {}
    start = time.perf_counter()
    predictions_path = out_dir / "predictions.jsonl"
    with predictions_path.open("w") as predictions:
        for spec in cfg.models:
            model_rows, info, path_table = evaluate_model(spec, cfg, predictions)
            rows += model_rows
            infos.append(info)
            if path_table is not None:
                oracles[spec.label] = oracle.analyse(path_table, model_rows)
                path_tables[spec.label] = path_table
    meta = {
        "data": cfg.data,
        "split": cfg.split,
        "models": infos,
        "config": cfg.model_dump(exclude={"models"}),
        "device": "cuda" if use_gpus(cfg.device) else "cpu",
        "ray_version": ray.__version__,
        "wall_s": time.perf_counter() - start,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tracking_uri": redact(uri) if cfg.mlflow else None,  # eval.json is logged as an artifact
    }
    report = eval_report.make_report(baseline_rows + rows, meta)
    all_rows = report["rows"]
    table = eval_report.format_table(all_rows)
    families = eval_report.format_family_table(all_rows)
    text = f"{table}\n\naccuracy per question family (%; routed modes: accuracy/visual tokens kept)\n{families}\n"
    plots = eval_report.write_plots(all_rows, out_dir / "plots", cfg.title)
    if oracles:
        report["oracle"] = oracles
        text += "".join(f"\n{oracle.format_section(label, s)}\n" for label, s in oracles.items())
        plots += oracle.write_outputs(oracles, path_tables, out_dir, cfg.title)
    print(f"\n{text}")
    (out_dir / "table.txt").write_text(text)
    json_path = eval_report.write_json(report, out_dir / "eval.json")
    if cfg.mlflow:
        run_id = log_run(cfg, report, [json_path, out_dir / "table.txt", predictions_path, *plots])
        report["meta"]["mlflow_run_id"] = run_id
        logger.info("logged to MLflow run %s (%s)", run_id, uri)
        eval_report.write_json(report, json_path)
    if cfg.json_path:
        eval_report.write_json(report, cfg.json_path)
        logger.info("wrote %s", cfg.json_path)
    logger.info("report, plots and predictions in %s", out_dir)
    return report


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dpn eval`` / ``python -m jobs.evaluate``: ``--config`` YAML and ``key=value`` overrides of
    :class:`EvalConfig`, and a flag per key. A flag left out keeps the file's value (or the default), so the
    flags default to None here and the defaults live in :class:`EvalConfig`."""
    _add_what_arguments(parser)
    _add_resource_arguments(parser)
    _add_output_arguments(parser)
    add_console_arguments(parser, "<output dir>/logs/eval-<time>.log")


def _add_what_arguments(parser: argparse.ArgumentParser) -> None:
    """The config and what it evaluates: models, data, compression modes, scoring, reports to compare."""
    parser.add_argument(
        "--config", help="evaluation config YAML (configs/eval_*.yaml); the flags given override it"
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the config, applied last, e.g. batch_size=8 max_samples=50")  # fmt: skip
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--model", action="append", metavar="[LABEL=]MODEL",
                        help="model directory, runs:/<run_id>/<path> or models:/<name>@<alias>; repeat to compare "
                        "(replaces the config's models)")  # fmt: skip
    parser.add_argument("--data",
                        help="dataset root / file / glob (synthetic benchmark in any format, LLaVA JSON, "
                        "evaluation JSONL, WebDataset, Parquet; local or s3://, gs://)")  # fmt: skip
    parser.add_argument("--split", help="split of a dataset root ('none' = every file; default eval)")
    parser.add_argument("--compression", action="append", metavar="[LABEL=]MODES",
                        help="comma-separated modes: auto, auto:lambda=X (the cost dial), random, expert factors "
                        "(1 dense, 2, 4) and schedules, "
                        "one factor per pooling layer as 1-2-4 or [1,2,4] (e.g. auto,1,4,1-2-4); default "
                        f"{DEFAULT_COMPRESSIONS}; LABEL=MODES sets one model's modes")  # fmt: skip
    parser.add_argument("--oracle", action="store_true",
                        help="also evaluate every static path (one expert per pooling layer: 27 by default) in "
                        "the same pass and report the oracle router (per sample the cheapest correct path), the "
                        "paths' Pareto frontier and each mode's regret (jobs/evaluation/oracle.py)")  # fmt: skip
    parser.add_argument("--dial", type=lambda s: [float(x) for x in s.split(",")], metavar="LAMBDAS",
                        help="the cost dial's sweep: every model evaluated in auto is also evaluated at each "
                        "auto:lambda=X, X from this comma-separated list (e.g. -2,-1,1,2,4,8): one trained model's "
                        "accuracy-vs-FLOPs curve")  # fmt: skip
    parser.add_argument("--task",
                        help=f"how answers are scored: one of {', '.join(task_names())} (jobs/evaluation/tasks.py; "
                        "default exact_match)")  # fmt: skip
    parser.add_argument("--json", dest="json_path", help="write the JSON report here")
    parser.add_argument("--baseline", action="append", metavar="REPORT.json",
                        help="add the rows of an earlier report to the table and plots")  # fmt: skip


def _add_resource_arguments(parser: argparse.ArgumentParser) -> None:
    """How the evaluation runs: batch and generation sizes, sample limits, actors and their devices."""
    parser.add_argument("--batch-size", type=int, help="samples per generation batch (default 16)")
    parser.add_argument("--num-actors", type=int, help="inference actors (one GPU each on GPU clusters)")
    parser.add_argument("--max-new-tokens", type=int, help="generation budget per answer (default 8)")
    parser.add_argument("--max-samples", type=int, help="evaluate only the first N samples")
    parser.add_argument(
        "--max-length", type=int, help="longest prompt in tokens (longer: skipped; default 2048)"
    )
    parser.add_argument(
        "--max-bad-fraction", type=float, help="fail past this fraction of bad samples (default 0.01)"
    )
    parser.add_argument(
        "--image-folder", help="folder relative image paths resolve against (default: the file's)"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"),
                        help="auto (default): one GPU per actor when the cluster has GPUs")  # fmt: skip
    parser.add_argument("--cpus-per-actor", type=float,
                        help="CPUs reserved per inference actor (default: 1 on GPU; on CPU, a share that leaves "
                        "one CPU for reading)")  # fmt: skip


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the results go: the output folder, the MLflow run (or none) and the plot's title."""
    parser.add_argument(
        "--output-dir", help="where the report, plots and predictions go (default runs/eval/<time>)"
    )
    parser.add_argument("--experiment", help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or ./mlflow.db)"
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--title", help="title of the accuracy-vs-FLOPs plot")


# flags whose dest is the EvalConfig key they set (the others: --model, --compression, --baseline, --no-mlflow)
_FLAG_KEYS = (
    "data", "split", "json_path", "batch_size", "num_actors", "max_new_tokens", "max_samples", "max_length",
    "max_bad_fraction", "image_folder", "device", "cpus_per_actor", "output_dir", "experiment", "run_name",
    "tracking_uri", "title", "task", "dial",
)  # fmt: skip


def _given_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as :class:`EvalConfig` keys."""
    given = {key: getattr(args, key) for key in _FLAG_KEYS if getattr(args, key, None) is not None}
    if str(given.get("split", "")).lower() == "none":
        given["split"] = None
    if getattr(args, "baseline", None):
        given["baselines"] = list(args.baseline)
    if getattr(args, "no_mlflow", False):
        given["mlflow"] = False
    if getattr(args, "oracle", False):
        given["oracle"] = True
    return given


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    """Parsed flags -> :class:`EvalConfig`: the ``--config`` file (if any), the flags given over it, then the
    ``key=value`` overrides. ``--model`` replaces the file's models; ``--compression`` alone sets their modes.

    Raises:
        ValueError: a ``--model`` / ``--compression`` value that is not understood (naming the flag), or a
            :class:`jobs.config.ConfigError` naming the key (missing, unknown, wrong type, out of range).
    """
    path, overrides = getattr(args, "config", None), getattr(args, "overrides", None) or []
    data = _given_flags(args)
    if args.model or path is None:
        data["models"] = parse_model_specs(args.model, args.compression)
    cfg = load_eval_config(path, overrides, data)
    if args.compression and not args.model:
        set_compressions(cfg.models, args.compression)
    return cfg


def run(args: argparse.Namespace) -> int:
    """``dpn eval``: run the job; 0 on success, 2 on a usage error, 1 when the job failed (the console shows the
    error and the log's last lines). The tables end on stdout, after the console's lines."""
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        logger.error("%s", err)
        return 2
    if getattr(args, "print_config", False):
        from jobs.config import dump_config

        sys.stdout.write(dump_config(cfg))
        return 0
    cfg.output_dir = str(_output_dir(cfg))  # the log's folder too: fixed before the job starts
    try:
        with job_console("eval", args, cfg.output_dir, expected=(UsageError,)) as log_path:
            evaluate(cfg)
    except UsageError as err:  # a mode that does not fit the model, found once its config is read
        logger.error("%s", err)
        return 2
    except JobFailed as failed:
        return failed.exit_code
    if log_path is not None:  # the tables evaluate() printed went to the log: the result on stdout too
        sys.stdout.write("\n" + (Path(cfg.output_dir) / "table.txt").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.evaluate ...`: the same as `dpn eval ...`."""
    return run_module("jobs.evaluation.job", argv, prog="python -m jobs.evaluate")
