"""MLflow helpers shared by the jobs and by serving.

- :func:`tracking_uri` / :func:`setup_tracking`: the default store is a local SQLite file
  (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlartifacts``) unless ``MLFLOW_TRACKING_URI``
  is set (or a URI is given).
- :func:`start_or_resume_run`: one MLflow run per job, found again by its job name so that a
  resubmitted job continues the same run.
- :class:`StepMetricLogger`: step metrics logged exactly once per step, also across restarts.
- :func:`log_hf_model`: the final model as an MLflow pyfunc model whose artifacts hold the Hugging
  Face checkpoint directory, registered as a new version of a registered model.
- :func:`resolve_model_dir`: a local directory, ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>``
  or ``models:/<name>/<version>`` -> local Hugging Face checkpoint directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

HF_ARTIFACT = "hf_model"  # key in the pyfunc model's artifacts: the Hugging Face checkpoint directory
PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")  # the pyfunc model, logged as code (no pickle)

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_PATH = "model"  # name of the logged MLflow model inside its run
JOB_TAG = "dpn.job_name"  # tag that finds a job's run again on resubmission
_CACHE_ENV = "DPN_MODEL_CACHE"


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


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def log_hf_model(
    run_id: str,
    hf_dir: str | Path,
    registered_model: str | None = "dpn",
    uri: str | None = None,
) -> str | None:
    """Log ``hf_dir`` (config.json, model.safetensors, processor files) as the run's MLflow model
    (``runs:/<run_id>/model``, artifacts under ``artifacts/hf_model``) and register it.

    Returns:
        The new registered model version (as a string), or None when ``registered_model`` is empty.
    """
    setup_tracking(uri)
    import mlflow.pyfunc
    import torch
    import transformers

    import dpn_model

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"mlflow=={mlflow.__version__}",
        "safetensors",
        "pillow",
    ]
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=str(PYFUNC_CODE),  # "models from code": MLflow stores the file, never a pickle
            artifacts={HF_ARTIFACT: str(hf_dir)},
            pip_requirements=requirements,
            code_paths=[str(Path(dpn_model.__file__).parent)],
            registered_model_name=registered_model or None,
            await_registration_for=60,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_model:
        logger.info("registered %s version %s from run %s", registered_model, version, run_id)
    return str(version) if version is not None else None


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _find_hf_dir(root: Path) -> Path:
    """The Hugging Face checkpoint inside a downloaded MLflow model or artifact folder."""
    for candidate in (root, root / "artifacts" / HF_ARTIFACT, root / HF_ARTIFACT):
        if _is_hf_dir(candidate):
            return candidate
    found = sorted(p.parent for p in root.rglob("config.json"))
    if found:
        return found[0]
    raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) under {root}")


def _cache_root() -> Path:
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "dpn" / "models"))


def resolve_model_dir(
    uri: str | os.PathLike, tracking: str | None = None, cache_dir: str | None = None
) -> str:
    """Local Hugging Face checkpoint directory of a model reference.

    Args:
        uri: a local directory (a checkpoint, an MLflow model folder, or a training checkpoint with
            ``hf_model/``), ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>`` or
            ``models:/<name>/<version>``.
        tracking: tracking URI (default: :func:`tracking_uri`).
        cache_dir: where downloads go (default $DPN_MODEL_CACHE or ``~/.cache/dpn/models``); a model
            version or run artifact is downloaded once and reused.

    Returns:
        Path of a directory holding ``config.json``, ``model.safetensors`` and the processor files.

    Raises:
        FileNotFoundError / ValueError: the reference names nothing loadable (the message says why).
    """
    text = str(uri)
    if not text.startswith(("runs:/", "models:/")) and ("://" not in text or text.startswith("file://")):
        path = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {text!r} not found: give a checkpoint directory, runs:/<run_id>/model, "
                "models:/<name>@<alias> or models:/<name>/<version>"
            )
        return str(_find_hf_dir(path))
    if not (text.startswith("runs:/") or text.startswith("models:/")):
        raise ValueError(f"unsupported model URI {text!r}: use a local directory, runs:/... or models:/...")
    uri_in_effect = tracking_uri(tracking)
    client = MlflowClient(uri_in_effect)
    key = text
    if text.startswith("models:/"):
        # Resolve aliases / versions to a fixed version, so the cache never serves a moved alias.
        ref = text[len("models:/") :].strip("/")
        name, _, rest = ref.partition("@") if "@" in ref else (ref.split("/")[0], "", "")
        try:
            if "@" in ref:
                version = client.get_model_version_by_alias(name, rest).version
            else:
                parts = ref.split("/")
                if len(parts) != 2:
                    raise ValueError(
                        f"model URI {text!r} must be models:/<name>@<alias> or models:/<name>/<version>"
                    )
                version = client.get_model_version(name, parts[1]).version
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(
                f"model {text!r} not found in the registry at {uri_in_effect}: {err}"
            ) from err
        key = f"models:/{name}/{version}"
    digest = hashlib.sha256(f"{uri_in_effect}|{key}".encode()).hexdigest()[:16]
    target = (Path(cache_dir) if cache_dir else _cache_root()) / digest
    done = target / ".complete"
    if not done.exists():
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        logger.info("downloading %s to %s", key, target)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=key, dst_path=str(target), tracking_uri=uri_in_effect
            )
        except mlflow.exceptions.MlflowException as err:
            shutil.rmtree(target, ignore_errors=True)
            raise FileNotFoundError(f"could not download {text!r} from {uri_in_effect}: {err}") from err
        done.write_text(key + "\n")
    return str(_find_hf_dir(target))


__all__ = [
    "HF_ARTIFACT",
    "JOB_TAG",
    "StepMetricLogger",
    "end_run",
    "find_job_run",
    "log_hf_model",
    "resolve_model_dir",
    "setup_tracking",
    "start_or_resume_run",
    "system_facts",
    "tracking_uri",
]
