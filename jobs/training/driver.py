"""Driver side of the training job: resolve paths, data and the initial model, build the TorchTrainer.

The recipe in :mod:`jobs.training.job` calls these in order; the workers run :mod:`jobs.training.loop`.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpn_base.ray_session import connect_ray
from jobs.config import ConfigError
from jobs.training.config import SyntheticConfig, TrainConfig

if TYPE_CHECKING:
    from jobs.training.loop import WorkerSpec

logger = logging.getLogger(__name__)

# <repo>/configs/deepspeed (this file is <repo>/jobs/training/driver.py)
DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class Paths:
    """Absolute locations of one job."""

    work_dir: Path
    storage_path: str  # local absolute path or a URI
    data_path: str
    run_dir: str  # <storage_path>/<name>: Ray Train's run folder (checkpoints)


def resolve_paths(cfg: TrainConfig) -> Paths:
    """Absolute work dir, storage path and data path (relative data paths live in the work dir)."""
    work_dir = Path(cfg.run.work_dir).expanduser().resolve()
    storage = cfg.run.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    data = cfg.data.path
    if "://" not in data and not Path(data).expanduser().is_absolute():
        data = str(work_dir / data)
    return Paths(work_dir, storage, data, f"{storage.rstrip('/')}/{cfg.run.name}")


def ensure_synthetic_data(synthetic: SyntheticConfig | None, data_path: str, replace: bool = True) -> str:
    """Write the synthetic benchmark to ``data_path`` when ``synthetic`` is set, unless the root already holds
    exactly that dataset; returns what was done (``"reused"``, ``"written"``, ``"replaced: <why>"``, ``""`` when
    there is nothing to do).

    A root is reused only when its manifest matches the benchmark, version, format, seed and split sizes asked
    for; any other synthetic root there is replaced (with a warning naming what differed), so a run never trains
    on a dataset other than its config's. Shared by training and retraining (``data.synthetic``), so the
    embedded defaults of both jobs work on a fresh checkout. Retraining passes ``replace=False``: its root holds
    the shards earlier versions were trained on, so a mismatch is an error naming what differs; a root with
    retraining shards is never replaced.
    """
    if synthetic is None or "://" in data_path:
        return ""
    from pipelines.synthetic import (
        MANIFEST_NAME,
        manifest_differences,
        remove_synthetic_dataset,
        write_synthetic_dataset,
    )

    root = Path(data_path)
    action = "written"
    if (root / MANIFEST_NAME).exists():
        manifest = json.loads((root / MANIFEST_NAME).read_text())
        differences = manifest_differences(manifest, synthetic.manifest_settings())
        if not differences:
            return "reused"
        if not replace or manifest.get("shards"):
            raise ValueError(
                f"the synthetic dataset at {root} is not the one data.synthetic asks for ({'; '.join(differences)}), "
                "and it holds data this job must not delete: point data.path elsewhere or fix data.synthetic"
            )
        action = f"replaced: {'; '.join(differences)}"
        logger.warning(
            "the synthetic dataset at %s is not the one asked for (%s): writing it anew", root, action
        )
        remove_synthetic_dataset(root)
    logger.info("writing the synthetic benchmark %s to %s", synthetic.model_dump(), root)
    write_synthetic_dataset(
        root,
        synthetic.format,
        num_train=synthetic.num_train,
        num_eval=synthetic.num_eval,
        seed=synthetic.seed,
        benchmark=synthetic.benchmark,
        num_dev=synthetic.num_dev,
    )
    return action


def prepare_initial_model(cfg: TrainConfig, paths: Paths, tracking_uri: str) -> str:
    """Local directory of the model training starts from (weights + processor).

    ``model.init`` is resolved by :func:`tracking.resolve_model_dir`; a preset's seeded random model is written
    under the work dir (``<run.name>/init_model``, reused by a restarted job), so every worker loads the same
    weights.
    """
    from tracking import resolve_model_dir

    init = cfg.model.init_ref
    model_dir = resolve_model_dir(
        init,
        tracking=tracking_uri,
        preset_dir=paths.work_dir / cfg.run.name / "init_model",
        preset_seed=cfg.model.seed,
        preset_overrides=preset_overrides(cfg),
    )
    if "://" not in model_dir:
        model_dir = str(Path(model_dir).resolve())  # workers run in another directory
    model_type = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if model_type != "dpn_llava":
        raise ConfigError(
            f"model.init {str(init)!r} is a {model_type!r} checkpoint, not DPN: convert a llava-hf checkpoint "
            "first with `dpn convert <llava dir> <out dir>` and point model.init at the output"
        )
    return model_dir


def preset_overrides(cfg: TrainConfig) -> dict[str, Any]:
    """DPNConfig fields given to a preset (architecture included), from ``model.config_overrides``."""
    return dict(cfg.model.config_overrides)


def count_samples(cfg: TrainConfig, data_path: str) -> int:
    """Samples per epoch: ``data.num_samples`` or the raw row count (one cheap pass, no preprocessing)."""
    if cfg.data.num_samples > 0:
        return cfg.data.num_samples
    manifest = Path(data_path) / "synthetic.json"
    if "://" not in data_path and manifest.exists() and cfg.data.split == "train":
        info = json.loads(manifest.read_text())
        return info["splits"]["train"]["num_samples"] + sum(s["num_samples"] for s in info.get("shards", []))
    from pipelines.formats import read_rows

    n = read_rows(
        data_path, cfg.data.split, image_folder=cfg.data.image_folder, policy=cfg.data.read_policy()
    ).count()
    if n == 0:
        raise ValueError(f"no training samples found at {data_path} (split {cfg.data.split!r})")
    return n


def plan_steps(cfg: TrainConfig, num_samples: int) -> int:
    """Optimizer steps of the whole run (the LR schedule's length)."""
    world, t = cfg.run.num_workers, cfg.train
    batches_per_worker = (num_samples // world) // t.micro_batch_size
    steps = (t.epochs * batches_per_worker) // t.grad_accum_steps
    if steps < 1:
        raise ValueError(
            f"{num_samples} samples give no full optimizer step with {world} workers x micro batch "
            f"{t.micro_batch_size} x {t.grad_accum_steps} accumulation: use more data or smaller batches"
        )
    steps = min(steps, t.max_steps) if t.max_steps else steps
    if cfg.model.dense_warmup_steps >= steps:
        raise ValueError(
            f"model.dense_warmup_steps={cfg.model.dense_warmup_steps} leaves none of the run's {steps} steps "
            f"to train the router: lower it or train longer"
        )
    return steps


def resolve_precision(cfg: TrainConfig) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if cfg.run.use_gpu else "fp32"


def load_deepspeed_json(cfg: TrainConfig) -> dict[str, Any]:
    path = Path(cfg.deepspeed.config)
    if not path.is_absolute() and not path.exists():
        path = DEEPSPEED_CONFIG_DIR / path
    if not path.is_file():
        raise ConfigError(
            f"deepspeed.config: {cfg.deepspeed.config!r} not found (looked in the working dir and {DEEPSPEED_CONFIG_DIR}); "
            f"available: {sorted(p.name for p in DEEPSPEED_CONFIG_DIR.glob('*.json'))}"
        )
    return json.loads(path.read_text())


def build_loop_spec(
    cfg: TrainConfig, model_dir: str, total_steps: int, run_id: str, tracking_uri: str
) -> WorkerSpec:
    """Everything a worker needs (see :class:`jobs.training.loop.WorkerSpec`): the config's validated ``model``,
    ``optim``, ``train`` and ``checkpoint`` sections, with what is derived here from the whole config."""
    from jobs.training.loop import WorkerSpec, deepspeed_config

    precision = resolve_precision(cfg)
    # DeepSpeed's CPU accelerator runs bf16 (ZeRO keeps fp32 master weights): the GPU recipe's precision can be
    # checked on CPU (tests/test_bf16.py, benchmarks/gpu_check.sh --dry-run); fp16 with loss scaling is GPU-only here
    if precision == "fp16" and not cfg.run.use_gpu:
        raise ConfigError(
            "deepspeed.precision=fp16 needs GPUs (run.use_gpu=true); CPU training runs fp32 (auto) or bf16"
        )
    ds = deepspeed_config(
        load_deepspeed_json(cfg),
        micro_batch_size=cfg.train.micro_batch_size,
        grad_accum_steps=cfg.train.grad_accum_steps,
        world_size=cfg.run.num_workers,
        precision=precision,
        grad_clip=cfg.optim.grad_clip,
        overrides=cfg.deepspeed.overrides,
    )
    return WorkerSpec(
        model=cfg.model,
        optim=cfg.optim,
        train=cfg.train,
        checkpoint=cfg.checkpoint,
        model_dir=model_dir,
        ds_config=ds,
        dist_backend="nccl" if cfg.run.use_gpu else "gloo",
        total_steps=total_steps,
        mlflow_run_id=run_id,
        tracking_uri=tracking_uri,
    )


def build_train_dataset(cfg: TrainConfig, data_path: str, model_dir: str):
    """The training job's Ray Data dataset: ``pipelines.datasets.build_dataset`` with the options of
    ``cfg.data`` (streams; preprocessed by ``pipelines``)."""
    import ray.data

    from pipelines.datasets import build_dataset

    # progress bars only on a terminal: in job logs they are thousands of lines
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    return build_dataset(
        data_path,
        model_dir,
        split=cfg.data.split,
        max_length=cfg.data.max_length,
        max_bad_fraction=cfg.data.max_bad_fraction,
        image_folder=cfg.data.image_folder,
        policy=cfg.data.read_policy(),
        concurrency=cfg.data.preprocess_concurrency,
        num_cpus=cfg.data.preprocess_num_cpus,
    )


def build_trainer(cfg: TrainConfig, spec: WorkerSpec, dataset, storage_path: str):
    """``TorchTrainer`` with scaling, run (name, storage, keep-last-K checkpoints) and failure configs."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.loop import train_loop_per_worker

    resources = {"CPU": cfg.run.cpus_per_worker, **cfg.run.resources_per_worker}
    if cfg.run.use_gpu:
        resources.setdefault("GPU", 1)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.to_config(),  # plain values; the workers rebuild the WorkerSpec
        torch_config=TorchConfig(backend=spec.dist_backend),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
        ),
        datasets={"train": dataset},
    )


def init_ray(cfg: TrainConfig) -> bool:
    """Join ``run.ray_address`` / $RAY_ADDRESS, or start a local Ray of ``run.local_num_cpus`` CPUs with the
    dashboard Ray Train needs (:func:`dpn_base.ray_session.connect_ray`). Returns True if connected here."""
    return connect_ray(cfg.run.ray_address, num_cpus=cfg.run.local_num_cpus, dashboard=True)


def steps_summary(cfg: TrainConfig, num_samples: int, total_steps: int) -> dict[str, Any]:
    """Derived numbers worth logging as params."""
    t = cfg.train
    global_batch = t.micro_batch_size * t.grad_accum_steps * cfg.run.num_workers
    return {
        "derived.num_samples": num_samples,
        "derived.total_steps": total_steps,
        "derived.global_batch_size": global_batch,
        "derived.warmup_steps": int(round(cfg.optim.warmup_ratio * total_steps)),
        "derived.epochs_planned": round(total_steps * global_batch / max(num_samples, 1), 3),
        "derived.precision": resolve_precision(cfg),
    }


__all__ = [
    "Paths",
    "build_loop_spec",
    "build_train_dataset",
    "build_trainer",
    "count_samples",
    "ensure_synthetic_data",
    "init_ray",
    "load_deepspeed_json",
    "plan_steps",
    "prepare_initial_model",
    "resolve_paths",
    "steps_summary",
]
