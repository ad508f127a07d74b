"""The retraining job's configuration (``configs/retrain_*.yaml``), as pydantic models.

Loaded with :func:`jobs.config.load_config` (unknown keys, wrong types and values out of range are errors naming
the key; ``key=value`` overrides on the command line). The training itself is configured by a training config
(``training.config``, e.g. ``configs/train_tiny.yaml``) plus ``training.overrides``; the job fills in
what retraining decides (initial model, data, run name, MLflow experiment and tags).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from jobs.config import ConfigModel, compression_choices, load_config
from jobs.training.config import SyntheticConfig
from pipelines.policy import ReadPolicy


class RetrainDataConfig(ReadPolicy):
    """Where new data lands, and what of it may be read: the keys of :class:`pipelines.formats.ReadPolicy`
    (``allowed_image_roots``, ``tar_compression``, byte and pixel caps, ``image_formats``, ...) apply to counting
    the shards, building the mix, and training on it.

    Attributes:
        root: folder (local, NFS, ``s3://``, ``gs://``) whose top-level entries are shards.
        include: glob patterns a shard name must match (any of them).
        exclude: glob patterns that exclude names (the held-out evaluation files).
        min_new_samples: fewer new samples than this: log it and exit 0 without training.
        image_folder: where relative image paths of LLaVA JSON shards resolve (default: next to
            each JSON file); a ref must stay inside it unless ``allowed_image_roots`` or
            ``allowed_image_schemes`` name more.
        synthetic: if set and a local ``root`` does not exist yet, write the synthetic benchmark there
            first (the embedded default works on a fresh checkout); ``null``: a missing root is an error.
    """

    root: str = "work/data/synthetic"
    include: list[str] = Field(default_factory=lambda: ["train*"])
    exclude: list[str] = Field(default_factory=lambda: ["eval*"])
    min_new_samples: int = Field(1, ge=1)
    image_folder: str | None = None
    synthetic: SyntheticConfig | None = None


class ReplayConfig(ConfigModel):
    """Replay of earlier data (shards of versions that were not rejected), mixed into the new data.

    Attributes:
        fraction: fraction of the earlier samples to replay (0 = fine-tune on new data only).
        max_samples: at most this many replayed samples (0 = no cap).
        seed: seed of the replay sample and the shuffle of the mix.
    """

    fraction: float = Field(0.2, ge=0, le=1)
    max_samples: int = Field(0, ge=0)
    seed: int = 0


class TrainingConfig(ConfigModel):
    """How the challenger is trained.

    Attributes:
        config: training config YAML (``configs/train_*.yaml``); its ``run`` section (Ray address,
            workers, storage, work dir) is also where this job runs.
        overrides: nested mapping merged over it (e.g. ``{optim: {lr: 1e-4}, train: {epochs: 1}}``).
        initial_model: the first champion's initialisation when the registry has none (``null``: the
            training config's ``model.init``, e.g. ``preset:tiny`` or a converted checkpoint).
        initial_overrides: merged over ``overrides`` for that first training only (e.g. more steps
            and a higher learning rate from scratch than for a fine-tune).
    """

    config: str = "configs/train_tiny.yaml"
    overrides: dict[str, Any] = Field(default_factory=dict)
    initial_model: str | None = None
    initial_overrides: dict[str, Any] = Field(default_factory=dict)


class RetrainEvalConfig(ConfigModel):
    """The held-out evaluation both models run on (:mod:`jobs.evaluation.job`).

    Attributes:
        data: evaluation dataset (``null``: ``data.root``, split ``split``).
        split: split of a dataset root (``null``: every file under ``data``).
        compression: the mode both models are compared in (``auto``: the router decides), one mode of
            ``dpn eval --compression`` (a schedule written ``1-2-4``).
        batch_size, num_actors, cpus_per_actor, max_new_tokens, max_samples, device: as ``dpn eval``.
    """

    data: str | None = None
    split: str | None = "eval"
    compression: str = "auto"
    batch_size: int = Field(16, ge=1)
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = 1.0
    max_new_tokens: int = Field(8, ge=1)
    max_samples: int | None = Field(None, ge=1)
    device: str = "auto"

    @field_validator("compression")
    @classmethod
    def _one_mode(cls, value: str) -> str:
        from jobs.evaluation.config import parse_compressions

        try:
            one = len(parse_compressions(value)) == 1  # the evaluation's parser: parse_compression per mode
        except ValueError:
            one = False
        if not one:
            raise ValueError(f"must be one mode: one of {compression_choices('-')}, got {value!r}")
        return value


class GateConfig(ConfigModel):
    """When a challenger replaces the champion.

    Attributes:
        accuracy_tolerance: the challenger may be at most this much (absolute accuracy, 0.01 = one
            point) below the champion.
        flops_tolerance: its mean prefill FLOPs may be at most this fraction above the champion's.
        min_accuracy: absolute floor every challenger (and the first champion) must reach.
    """

    accuracy_tolerance: float = Field(0.01, ge=0)
    flops_tolerance: float = Field(0.05, ge=0)
    min_accuracy: float = Field(0.0, ge=0, le=1)


class LeaseConfig(ConfigModel):
    """The retrain job's lease on the registered model: one retrain at a time per registry, whatever started it
    (cron, a CronJob, ``kubectl create job --from=cronjob/...``, a person). See ``tracking.runs.Lease``.

    Attributes:
        ttl_s: how long the lease lasts unrenewed (the job renews it every ``ttl_s / 3``): how long a retrain
            that died without releasing it keeps the next one out.
        settle_s: the lease protocol's wait between writing the lease and reading it back (also for the
            alias moves of a promotion): longer than any pause of a process between its read and its write.
    """

    ttl_s: float = Field(600.0, gt=0)
    settle_s: float = Field(2.0, ge=0)

    @model_validator(mode="after")
    def _ttl_exceeds_settle(self) -> LeaseConfig:
        if self.ttl_s <= 3 * self.settle_s:
            raise ValueError(f"ttl_s ({self.ttl_s}) must exceed 3 x settle_s ({self.settle_s})")
        return self


class RegistryConfig(ConfigModel):
    """MLflow tracking and the model registry.

    Attributes:
        tracking_uri: explicit tracking URI (default: $MLFLOW_TRACKING_URI, else ``./mlflow.db``).
        experiment: experiment of the retrain runs (and of their training and evaluation runs).
        model_name: registered model.
        champion_alias / previous_alias: the production alias and the one the replaced champion keeps.
        ready_timeout_s: how long to wait for a new version to become READY.
    """

    tracking_uri: str | None = None
    experiment: str = "dpn-retrain"
    model_name: str = "dpn"
    champion_alias: str = "champion"
    previous_alias: str = "previous"
    ready_timeout_s: float = 300.0


class RetrainConfig(ConfigModel):
    """The whole retraining job. YAML sections: data, replay, training, eval, gate, lease, mlflow."""

    data: RetrainDataConfig = Field(default_factory=RetrainDataConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: RetrainEvalConfig = Field(default_factory=RetrainEvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    mlflow: RegistryConfig = Field(default_factory=RegistryConfig)


def load_retrain_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RetrainConfig:
    """Load a retrain config file with ``key=value`` overrides (see :func:`jobs.config.load_config`)."""
    return load_config(RetrainConfig, path, overrides)


__all__ = [
    "GateConfig",
    "LeaseConfig",
    "RegistryConfig",
    "ReplayConfig",
    "RetrainConfig",
    "RetrainDataConfig",
    "RetrainEvalConfig",
    "TrainingConfig",
    "load_retrain_config",
]
