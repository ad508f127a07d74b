"""MLflow for every stage: runs and step metrics, logged models and model references, the model registry.

The ground floor under the jobs and serving: it imports ``dpn_model`` and ``pipelines`` (and MLflow), never
``jobs``, ``serve_apps`` or ``dpn_cli``.

- :mod:`tracking.runs`: the tracking store, one run per job (resumable, leased to the process that runs it),
  exactly-once step metrics, leases in MLflow tags.
- :mod:`tracking.models`: a trained checkpoint as a registered MLflow model; the one resolver of a model
  reference (:class:`dpn_base.model_ref.ModelRef`: preset, directory, ``runs:/``, ``models:/``,
  ``mlflow-artifacts:/``) -> local checkpoint directory, MLflow's through an atomic, download-once cache.
- :mod:`tracking.registry`: champion / challenger aliases (promotion as a compare-and-set), the retrain
  lease and the retraining tags on model versions.
- :mod:`tracking.pyfunc_model`: the MLflow pyfunc flavour of a DPN model (logged as code, never imported).
"""

from tracking.models import (
    HF_ARTIFACT,
    MODEL_ARTIFACT_PATH,
    fetch_once,
    load_model_and_processor_from_ref,
    log_hf_model,
    model_cache_dir,
    resolve_model_dir,
)
from tracking.registry import ChampionMoved, Registry
from tracking.runs import (
    JOB_TAG,
    Lease,
    LeaseHeld,
    LeaseLost,
    LeaseOwner,
    StepMetricLogger,
    end_run,
    find_job_run,
    run_lease,
    setup_tracking,
    start_or_resume_run,
    system_facts,
    tracking_uri,
)

__all__ = [
    "HF_ARTIFACT",
    "JOB_TAG",
    "MODEL_ARTIFACT_PATH",
    "ChampionMoved",
    "Lease",
    "LeaseHeld",
    "LeaseLost",
    "LeaseOwner",
    "Registry",
    "StepMetricLogger",
    "end_run",
    "fetch_once",
    "find_job_run",
    "load_model_and_processor_from_ref",
    "log_hf_model",
    "model_cache_dir",
    "resolve_model_dir",
    "run_lease",
    "setup_tracking",
    "start_or_resume_run",
    "system_facts",
    "tracking_uri",
]
