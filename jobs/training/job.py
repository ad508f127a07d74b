"""Train DPN on Ray Train with DeepSpeed, tracked in MLflow: setup -> train -> cleanup.

    dpn train --config configs/train_tiny.yaml [key=value ...]                 # local Ray
    ray job submit --working-dir . -- python -m jobs.train --config configs/train_llava7b.yaml

The console shows the job's stages, a progress bar of the steps and the result lines (``run_id=``,
``model_uri=``, ... on stdout, what scripts parse); Ray, DeepSpeed and MLflow print to a log beside the
checkpoints (:mod:`jobs.console`; ``--log-file PATH`` elsewhere, ``-v`` everything on the console).

The job is resumable: a worker failure restarts the workers from the latest checkpoint (up to
``run.max_failures`` times); submitting the same ``run.name`` again after the whole job died resumes
from the latest checkpoint under ``<run.storage_path>/<run.name>`` and continues the same MLflow run.
At the end the model is logged to MLflow (``runs:/<run_id>/model``) and registered.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import tracking
from dpn_base.cli_harness import add_config_arguments, run_config_job, run_module
from dpn_base.console import active_console, add_console_arguments
from dpn_base.model_ref import HF_MODEL_DIR, ModelRef, RefKind
from jobs.config import ConfigError, dump_config, flatten
from jobs.console import JobFailed, TrainingProgress, job_console
from jobs.training import driver as builders
from jobs.training.config import TrainConfig, load_train_config
from jobs.training.loop import TrainState

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training job produced.

    Attributes:
        run_id: the MLflow run.
        model_uri: ``runs:/<run_id>/model`` (pass to :func:`tracking.resolve_model_dir`).
        registered_version: version of ``mlflow.registered_model`` ("" when not registered).
        model_dir: local Hugging Face checkpoint of the final model (inside the final Ray checkpoint).
        checkpoint_path: the final Ray Train checkpoint (storage path or URI).
        steps: optimizer steps completed.
        metrics: the last reported metrics.
        seconds: wall-clock time of the job.
    """

    run_id: str
    model_uri: str
    registered_version: str
    model_dir: str
    checkpoint_path: str
    steps: int
    metrics: dict
    seconds: float


def train(cfg: TrainConfig, progress: TextIO | None = None) -> TrainResult:
    """Run (or resume) the training job described by ``cfg``; see the module docstring.

    Args:
        cfg: the validated training config.
        progress: if given, a progress bar of the steps (read back from MLflow) is drawn on this stream;
            default: the console of the job running now (:func:`dpn_base.console.active_console`), if any.
    """
    start = time.time()
    progress = progress if progress is not None else active_console()
    # ---- setup ----------------------------------------------------------------------------------
    paths = builders.resolve_paths(cfg)
    paths.work_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.setup_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    builders.ensure_synthetic_data(cfg.data.synthetic, paths.data_path)
    started_ray = builders.init_ray(cfg)
    run_id = ""
    try:
        model_dir = builders.prepare_initial_model(cfg, paths, uri)
        num_samples = builders.count_samples(cfg, paths.data_path)
        total_steps = builders.plan_steps(cfg, num_samples)
        derived = builders.steps_summary(cfg, num_samples, total_steps)
        run_id, resumed = tracking.start_or_resume_run(
            cfg.mlflow.experiment,
            cfg.run.name,
            params={**flatten(cfg), **derived, "derived.init_model_dir": model_dir},
            tags={**tracking.system_facts(cfg.run.num_workers, cfg.run.use_gpu), **cfg.mlflow.tags,
                  "dpn.storage_path": paths.run_dir},
            uri=uri,
        )  # fmt: skip
        logger.info(
            "%s run %s: %d samples/epoch -> %d steps (global batch %d); checkpoints in %s; MLflow %s at %s",
            "resuming" if resumed else "starting", cfg.run.name, num_samples, total_steps,
            derived["derived.global_batch_size"], paths.run_dir, run_id, uri,
        )  # fmt: skip
        spec = builders.build_loop_spec(cfg, model_dir, total_steps, run_id, uri)
        dataset = builders.build_train_dataset(cfg, paths.data_path, model_dir)
        trainer = builders.build_trainer(cfg, spec, dataset, paths.storage_path)

        # ---- train ------------------------------------------------------------------------------
        with TrainingProgress(run_id, total_steps, uri, progress) if progress else contextlib.nullcontext():
            result = trainer.fit()

        # ---- cleanup: the final model to MLflow ---------------------------------------------------
        return _finish_run(cfg, result, run_id, uri, start)
    except BaseException:
        if run_id:
            tracking.end_run(run_id, "FAILED", uri=uri)  # resubmitting the same run.name resumes it
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def _finish_run(cfg: TrainConfig, result: Any, run_id: str, uri: str, start: float) -> TrainResult:
    """Log the fitted model of ``result`` (a Ray Train result) to MLflow, end the run, and say what was made.

    The model is logged from inside ``as_directory`` because on remote storage that folder is a temporary
    copy; the run is marked FINISHED only once the model is logged, so a failure here leaves it resumable.
    """
    if result.checkpoint is None:
        raise RuntimeError(f"training of {cfg.run.name} ended without a checkpoint")
    with result.checkpoint.as_directory() as ckpt:
        state = TrainState.load(ckpt)
        hf_dir = str(Path(ckpt) / HF_MODEL_DIR)
        version = tracking.log_hf_model(run_id, hf_dir, cfg.mlflow.registered_model, uri=uri)
        if cfg.run.export_dir:
            export_model(hf_dir, cfg.run.export_dir)
    tracking.end_run(run_id, "FINISHED", uri=uri)
    model_dir_out, checkpoint_uri = checkpoint_location(result.checkpoint, hf_dir)
    out = TrainResult(
        run_id=run_id,
        model_uri=str(ModelRef(RefKind.RUN, run_id=run_id, path=tracking.MODEL_ARTIFACT_PATH)),
        registered_version=version or "",
        model_dir=model_dir_out,
        checkpoint_path=checkpoint_uri,
        steps=state.step,
        metrics=dict(result.metrics or {}),
        seconds=time.time() - start,
    )
    logger.info(
        "finished %s: %d steps in %.0f s, final loss %s; model %s (registered %s version %s)",
        cfg.run.name, out.steps, out.seconds, out.metrics.get("loss"), out.model_uri,
        cfg.mlflow.registered_model or "-", out.registered_version or "-",
    )  # fmt: skip
    return out


def checkpoint_location(checkpoint: Any, hf_dir: str) -> tuple[str, str]:
    """``(local model dir, checkpoint URI)`` of the final checkpoint. Ray gives a checkpoint's path without its
    scheme (``bucket/runs/...`` on S3) beside its pyarrow filesystem: the URI gets the scheme back, and the model
    dir is the checkpoint's own folder only on a local filesystem (on S3, ``as_directory`` was a temporary copy,
    gone now: use the returned URI or the MLflow model)."""
    import pyarrow.fs as pafs

    filesystem = checkpoint.filesystem
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return hf_dir, checkpoint.path
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}.get(filesystem.type_name, filesystem.type_name)
    return "", f"{scheme}://{checkpoint.path.lstrip('/')}"


def export_model(hf_dir: str, export_dir: str) -> None:
    """Copy the final Hugging Face checkpoint to ``export_dir`` (``run.export_dir``), replacing its contents."""
    out = Path(export_dir).expanduser().resolve()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(hf_dir, out)
    logger.info("exported the final model to %s", out)


# ----------------------------------------------------------------------------------------------
# Command line: `dpn train` and `python -m jobs.train`
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        config_help="training config YAML (configs/train_*.yaml)",
        overrides_help="dotted overrides, e.g. optim.lr=3e-4 run.name=exp2",
    )
    add_console_arguments(parser, "<run.storage_path>/<run.name>/logs/train-<time>.log")


def run(args: argparse.Namespace) -> int:
    """``dpn train``: 0 when training finished, 2 on a bad config, 1 when the job failed (the console shows
    the error and the log's last lines)."""
    try:
        return run_config_job(
            args, load=load_train_config, dump=dump_config, job=lambda cfg: _train_summary(cfg, args),
            invalid=ConfigError,
        )  # fmt: skip
    except JobFailed as failed:
        return failed.exit_code


def log_folder(cfg: TrainConfig) -> Path:
    """Where ``dpn train`` writes its log: the run's folder ``<run.storage_path>/<run.name>``, beside its
    checkpoints, or ``<run.work_dir>/<run.name>`` when the storage is remote (``s3://``: a log is a local file)."""
    paths = builders.resolve_paths(cfg)
    return paths.work_dir / cfg.run.name if "://" in paths.run_dir else Path(paths.run_dir)


def _train_summary(cfg: TrainConfig, args: argparse.Namespace) -> dict[str, object]:
    with job_console("train", args, log_folder(cfg)):
        result = train(cfg)
    return {
        "run_id": result.run_id,
        "model_uri": result.model_uri,
        "registered_version": result.registered_version,
        "model_dir": result.model_dir,
        "steps": result.steps,
        "seconds": f"{result.seconds:.0f}",
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.train ...`: the same as `dpn train ...`."""
    return run_module("jobs.training.job", argv, prog="python -m jobs.train")
