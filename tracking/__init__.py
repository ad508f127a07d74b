"""MLflow for every stage: runs and step metrics, logged models and model references, the model registry.

The ground floor under the jobs and serving: it imports ``dpn_model`` and ``pipelines`` (and MLflow), never
``jobs``, ``serve_apps`` or ``dpn_cli``.

- :mod:`tracking.runs`: the tracking store, one run per job (resumable), exactly-once step metrics.
- :mod:`tracking.models`: a trained checkpoint as a registered MLflow model; a model reference (directory,
  ``runs:/``, ``models:/``) -> local checkpoint directory.
- :mod:`tracking.registry`: champion / challenger aliases and the retraining tags on model versions.
- :mod:`tracking.pyfunc_model`: the MLflow pyfunc flavour of a DPN model (logged as code, never imported).
"""

from tracking.models import (
    HF_ARTIFACT,
    MODEL_ARTIFACT_PATH,
    load_model_and_processor,
    log_hf_model,
    resolve_model_dir,
)
from tracking.registry import Registry
from tracking.runs import (
    JOB_TAG,
    StepMetricLogger,
    end_run,
    find_job_run,
    setup_tracking,
    start_or_resume_run,
    system_facts,
    tracking_uri,
)

__all__ = [
    "HF_ARTIFACT",
    "JOB_TAG",
    "MODEL_ARTIFACT_PATH",
    "Registry",
    "StepMetricLogger",
    "end_run",
    "find_job_run",
    "load_model_and_processor",
    "log_hf_model",
    "resolve_model_dir",
    "setup_tracking",
    "start_or_resume_run",
    "system_facts",
    "tracking_uri",
]
