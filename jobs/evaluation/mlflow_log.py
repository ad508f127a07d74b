"""The evaluation's MLflow run: params, metrics of every report row (and the oracle's), artifacts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dpn_base.redact import redact_value
from jobs.evaluation.config import EvalConfig

_NOT_IN_METRIC_NAMES = re.compile(r"[^\w\-. :/]")  # what MLflow refuses in a metric's name


def metric_key(name: str) -> str:
    """``name`` as MLflow accepts it: the cost dial's ``auto:lambda=-4`` becomes ``auto:lambda_-4`` (MLflow refuses
    ``=`` in metric names, and one refused name fails the whole evaluation's logging)."""
    return _NOT_IN_METRIC_NAMES.sub("_", name)


def log_run(cfg: EvalConfig, report: dict[str, Any], artifacts: list[Path]) -> str:
    """Log one evaluation to one MLflow run: its settings as params, each report row's accuracy, FLOPs ratio,
    latency, per family/kind accuracy and visual tokens as metrics, the oracle's metrics and ``artifacts``.
    Returns the run's id."""
    import mlflow

    from tracking import setup_tracking

    setup_tracking(cfg.tracking_uri, cfg.experiment)
    with mlflow.start_run(run_name=cfg.run_name) as run:
        params = {
            "data": cfg.data, "split": cfg.split, "batch_size": cfg.batch_size, "num_actors": cfg.num_actors,
            "max_new_tokens": cfg.max_new_tokens, "max_samples": cfg.max_samples, "device": report["meta"]["device"],
        }  # fmt: skip
        for spec in cfg.models:
            params[f"model.{spec.label}"] = spec.uri
            params[f"compression.{spec.label}"] = ",".join(str(c) for c in spec.compressions)
        mlflow.set_tags({"job": "evaluate", **{f"model.{s.label}": s.uri for s in cfg.models}})
        metrics: dict[str, float] = {}
        for row in report["rows"]:
            if row.get("baseline"):
                continue
            prefix = f"{row['label']}/{row['compression']}"
            for key in ("accuracy", "flops_ratio", "mean_prefill_flops", "latency_ms_per_sample"):
                if row.get(key) is not None:
                    metrics[f"{prefix}/{key}"] = float(row[key])
            for name, entry in {**row["per_family"], **row["per_kind"]}.items():
                metrics[f"{prefix}/accuracy/{name}"] = float(entry["accuracy"])
            for i, tokens in enumerate(row["visual_tokens_per_layer"]):
                metrics[f"{prefix}/visual_tokens/{i}"] = float(tokens)
        if report.get("oracle"):
            from jobs.evaluation import oracle

            params["oracle"] = True
            for label, section in report["oracle"].items():
                metrics.update(oracle.mlflow_metrics(label, section))
        mlflow.log_params(redact_value(params))  # model refs and data URIs may carry credentials
        mlflow.log_metrics({metric_key(name): value for name, value in metrics.items()})
        for path in artifacts:
            mlflow.log_artifact(str(path))
        return run.info.run_id
