"""The retraining job's configuration (``configs/retrain_*.yaml``), as typed dataclasses.

Loaded with :func:`jobs.config.load_config` (unknown keys and wrong types are errors; ``key=value``
overrides on the command line). The training itself is configured by a training config
(``training.config``, e.g. ``configs/train_tiny.yaml``) plus ``training.overrides``; the job fills in
what retraining decides (initial model, data, run name, MLflow experiment and tags).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.config import load_config
from jobs.train_config import SyntheticConfig


@dataclass
class RetrainDataConfig:
    """Where new data lands.

    Attributes:
        root: folder (local, NFS, ``s3://``, ``gs://``) whose top-level entries are shards.
        include: glob patterns a shard name must match (any of them).
        exclude: glob patterns that exclude names (the held-out evaluation files).
        min_new_samples: fewer new samples than this: log it and exit 0 without training.
        image_folder: where relative image paths of LLaVA JSON shards resolve (default: next to
            each JSON file).
        synthetic: if set and a local ``root`` does not exist yet, write the synthetic benchmark there
            first (the embedded default works on a fresh checkout); ``null``: a missing root is an error.
    """

    root: str = "work/data/synthetic"
    include: list[str] = field(default_factory=lambda: ["train*"])
    exclude: list[str] = field(default_factory=lambda: ["eval*"])
    min_new_samples: int = 1
    image_folder: str | None = None
    synthetic: SyntheticConfig | None = None

    def validate(self) -> None:
        if self.min_new_samples < 1:
            raise ValueError(f"min_new_samples must be >= 1, got {self.min_new_samples}")


@dataclass
class ReplayConfig:
    """Replay of earlier data (shards of versions that were not rejected), mixed into the new data.

    Attributes:
        fraction: fraction of the earlier samples to replay (0 = fine-tune on new data only).
        max_samples: at most this many replayed samples (0 = no cap).
        seed: seed of the replay sample and the shuffle of the mix.
    """

    fraction: float = 0.2
    max_samples: int = 0
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.fraction <= 1:
            raise ValueError(f"fraction must be in [0, 1], got {self.fraction}")
        if self.max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {self.max_samples}")


@dataclass
class TrainingConfig:
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
    overrides: dict[str, Any] = field(default_factory=dict)
    initial_model: str | None = None
    initial_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RetrainEvalConfig:
    """The held-out evaluation both models run on (``jobs.evaluate``).

    Attributes:
        data: evaluation dataset (``null``: ``data.root``, split ``split``).
        split: split of a dataset root (``null``: every file under ``data``).
        compression: the mode both models are compared in (``auto``: the router decides).
        batch_size, num_actors, cpus_per_actor, max_new_tokens, max_samples, device: as ``dpn eval``.
    """

    data: str | None = None
    split: str | None = "eval"
    compression: str = "auto"
    batch_size: int = 16
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    max_new_tokens: int = 8
    max_samples: int | None = None
    device: str = "auto"


@dataclass
class GateConfig:
    """When a challenger replaces the champion.

    Attributes:
        accuracy_tolerance: the challenger may be at most this much (absolute accuracy, 0.01 = one
            point) below the champion.
        flops_tolerance: its mean prefill FLOPs may be at most this fraction above the champion's.
        min_accuracy: absolute floor every challenger (and the first champion) must reach.
    """

    accuracy_tolerance: float = 0.01
    flops_tolerance: float = 0.05
    min_accuracy: float = 0.0

    def validate(self) -> None:
        if self.accuracy_tolerance < 0 or self.flops_tolerance < 0:
            raise ValueError("accuracy_tolerance and flops_tolerance must be >= 0")
        if not 0 <= self.min_accuracy <= 1:
            raise ValueError(f"min_accuracy must be in [0, 1], got {self.min_accuracy}")


@dataclass
class RegistryConfig:
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


@dataclass
class RetrainConfig:
    """The whole retraining job. YAML sections: data, replay, training, eval, gate, mlflow."""

    data: RetrainDataConfig = field(default_factory=RetrainDataConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: RetrainEvalConfig = field(default_factory=RetrainEvalConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    mlflow: RegistryConfig = field(default_factory=RegistryConfig)


def load_retrain_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> RetrainConfig:
    """Load a retrain config file with ``key=value`` overrides (see :func:`jobs.config.load_config`)."""
    return load_config(RetrainConfig, path, overrides)


__all__ = [
    "GateConfig",
    "RegistryConfig",
    "ReplayConfig",
    "RetrainConfig",
    "RetrainDataConfig",
    "RetrainEvalConfig",
    "TrainingConfig",
    "load_retrain_config",
]
