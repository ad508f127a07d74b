"""How every command joins Ray: one rule for which cluster, and the environment its workers are given.

Which cluster: ``address`` (a job's ``run.ray_address``, a ``--address`` flag), else ``$RAY_ADDRESS`` (set by
``ray job submit`` and the local stack), else a new local Ray on this machine with ``num_cpus`` logical CPUs
(default: the machine's count). A local start is always a new cluster (``address="local"``), never an
unrelated ``ray start`` cluster Ray would otherwise find on the machine.

What the workers see: the variables in :data:`WORKER_ENV_VARS` are forwarded through the job's
``runtime_env``. Train workers, Ray Data tasks and the evaluation's actors run in processes Ray starts, on
other nodes of a cluster too: without them a worker would track to another MLflow store than the driver
(``MLFLOW_TRACKING_URI``) or reach for the Hugging Face Hub on an offline machine (``HF_HUB_OFFLINE``).

Ray is imported inside :func:`connect_ray` only, so importing :mod:`dpn_base` stays cheap and Ray-free.
"""

from __future__ import annotations

import os
from typing import Any

WORKER_ENV_VARS = ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI")


def worker_runtime_env() -> dict[str, Any]:
    """The ``runtime_env`` a job starts Ray with: the set ones of :data:`WORKER_ENV_VARS`, as this process has them."""
    return {"env_vars": {name: os.environ[name] for name in WORKER_ENV_VARS if name in os.environ}}


def connect_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    dashboard: bool = False,
    log_to_driver: bool = True,
) -> bool:
    """Connect to ``address`` / ``$RAY_ADDRESS``, or start a local Ray (see the module docstring), once.

    Args:
        address: the cluster to join (``None``: ``$RAY_ADDRESS``, else a new local Ray).
        num_cpus: logical CPUs of a local Ray (``None``: ``os.cpu_count()``); ignored when joining a cluster.
        dashboard: start the dashboard with a local Ray: Ray Train needs it (its placement-group cleaner polls
            the State API the dashboard hosts, and warns on every poll without it); other jobs do not.
        log_to_driver: show the workers' output on this console.

    Returns:
        True if this call connected (the caller then calls ``ray.shutdown()`` when it is done), False if Ray was
        already initialised in this process (its owner shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = worker_runtime_env()
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=log_to_driver)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=dashboard,
            runtime_env=runtime_env,
            log_to_driver=log_to_driver,
        )
    return True


__all__ = ["WORKER_ENV_VARS", "connect_ray", "worker_runtime_env"]
