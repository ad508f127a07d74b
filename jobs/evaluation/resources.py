"""The evaluation's Ray resources: whether actors get GPUs, and how the CPUs are shared (no model here)."""

from __future__ import annotations

from jobs.evaluation.config import EvalConfig


def use_gpus(device: str) -> bool:
    """Whether the inference actors take one GPU each: ``device`` ``auto`` when the cluster has GPUs, ``cuda``.

    Raises:
        RuntimeError: ``cuda`` on a cluster without GPUs.
    """
    import ray

    if device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    if device == "cuda" and not gpus:
        raise RuntimeError("--device cuda but the Ray cluster has no GPUs; use --device auto or cpu")
    return gpus


def cpu_budget(cfg: EvalConfig, gpus: bool) -> tuple[float, float]:
    """CPUs per inference actor and for the preprocessing actor.

    Ray Data also needs one CPU for its read tasks; on a small CPU-only cluster (a laptop, 2 cores)
    whole-CPU actors would take every CPU and the read would never be scheduled. Without an explicit
    ``--cpus-per-actor``, the CPUs left after one for reading are shared by the actors (at most one
    each).
    """
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    share = min(1.0, max(total - 1.0, 0.25) / (cfg.num_actors + 1))
    if gpus:
        return (cfg.cpus_per_actor or 1.0), 1.0 if total >= 3 else share
    return (cfg.cpus_per_actor or share), share
