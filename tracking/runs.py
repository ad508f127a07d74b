"""MLflow runs of the jobs: where the tracking store is, one run per job, exactly-once step metrics.

- :func:`tracking_uri` / :func:`setup_tracking`: the default store is a local SQLite file
  (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlartifacts``) unless ``MLFLOW_TRACKING_URI``
  is set (or a URI is given).
- :func:`start_or_resume_run`: one MLflow run per job, found again by its job name so that a
  resubmitted job continues the same run.
- :class:`StepMetricLogger`: step metrics logged exactly once per step, also across restarts.

Models (logging, resolving references) are in :mod:`tracking.models`, registry aliases in
:mod:`tracking.registry`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

JOB_TAG = "dpn.job_name"  # tag that finds a job's run again on resubmission


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in effect: ``uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def setup_tracking(uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store (and create/select ``experiment``). Returns the URI.

    With the default SQLite store, new experiments keep their artifacts in ``<db folder>/mlartifacts``
    (not MLflow's relative ``./mlruns``, so a job started from another folder finds them).
    """
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if experiment:
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
                client.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    return uri


def system_facts(num_workers: int, use_gpu: bool) -> dict[str, str]:
    """Versions and machine facts worth a run tag."""
    import deepspeed
    import ray
    import torch
    import transformers

    facts = {
        "sys.workers": str(num_workers),
        "sys.device": "cuda" if use_gpu else "cpu",
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.torch": torch.__version__,
        "sys.transformers": transformers.__version__,
        "sys.ray": ray.__version__,
        "sys.deepspeed": deepspeed.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.driver_cpus": str(os.cpu_count()),
    }
    if use_gpu and torch.cuda.is_available():
        facts["sys.gpu"] = torch.cuda.get_device_name(0)
    return facts


def find_job_run(experiment: str, job_name: str, uri: str | None = None) -> Any | None:
    """The newest MLflow run of ``experiment`` tagged with this job name, or None."""
    client = MlflowClient(tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(
    experiment: str,
    job_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
) -> tuple[str, bool]:
    """Create the job's MLflow run, or find the unfinished run of the same job name to continue.

    Params are logged only for a new run (MLflow params are immutable); tags are (re)set either way.

    Returns:
        ``(run_id, resumed)``.

    Raises:
        ValueError: the job name's run already finished (choose a new ``run.name``).
    """
    uri = setup_tracking(uri, experiment)
    client = MlflowClient(uri)
    existing = find_job_run(experiment, job_name, uri)
    if existing is not None and existing.info.status == "FINISHED":
        raise ValueError(
            f"the MLflow run of job {job_name!r} ({existing.info.run_id}) already finished; "
            "choose a new run.name to train again (or use model.init to start from its model)"
        )
    if existing is not None:
        run_id = existing.info.run_id
        client.update_run(run_id, status="RUNNING")
        resumed = True
        logger.info("resuming MLflow run %s of job %s", run_id, job_name)
    else:
        exp = client.get_experiment_by_name(experiment)
        run = client.create_run(exp.experiment_id, run_name=job_name, tags={JOB_TAG: job_name})
        run_id = run.info.run_id
        resumed = False
        if params:
            items = [mlflow.entities.Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        logger.info("started MLflow run %s for job %s", run_id, job_name)
    if tags:
        client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, str(v)) for k, v in tags.items()])
    return run_id, resumed


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark the run FINISHED / FAILED / KILLED."""
    MlflowClient(tracking_uri(uri)).set_terminated(run_id, status=status)


class StepMetricLogger:
    """Log per-step metrics of one run so that each (key, step) is written exactly once.

    MLflow is the record of what was logged: on creation, the highest step already logged for each
    key is read back, and entries at or below it are dropped. So after a restart from a checkpoint
    at step ``s``, the re-run steps ``s+1 ..`` that were logged before the crash are not logged a
    second time (their first values stay), and steps never logged are logged now: no gaps, no
    duplicates. Metrics are written with one ``log_batch`` call per flush (one transaction).
    """

    def __init__(self, run_id: str, uri: str | None = None, keys: list[str] | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri(uri))
        self._last: dict[str, int] = {}
        self._pending: list[mlflow.entities.Metric] = []
        for key in keys or self.client.get_run(run_id).data.metrics.keys():
            history = self.client.get_metric_history(run_id, key)
            if history:
                self._last[key] = max(m.step for m in history)

    def last_step(self, key: str) -> int:
        """Highest step logged for ``key`` (-1 if none)."""
        return self._last.get(key, -1)

    def log(self, metrics: Mapping[str, float], step: int, flush: bool = True) -> None:
        """Queue ``metrics`` at ``step`` (dropping keys already logged at this step or later)."""
        import time

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._last.get(key, -1):
                continue
            self._pending.append(mlflow.entities.Metric(key, float(value), now, step))
            self._last[key] = step
        if flush:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending = []


__all__ = [
    "JOB_TAG",
    "StepMetricLogger",
    "end_run",
    "find_job_run",
    "setup_tracking",
    "start_or_resume_run",
    "system_facts",
    "tracking_uri",
]
