"""The training job's configuration (``configs/train_*.yaml``), as pydantic models.

Every section and key, with its default and its constraints, is listed here; :func:`jobs.config.load_config`
rejects anything else, naming the key. Load with :func:`load_train_config`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dpn_base.model_ref import ModelRef
from jobs.config import Compression, ConfigModel, load_config
from pipelines.policy import ReadPolicy


class ModelConfig(ConfigModel):
    """What to train.

    Attributes:
        init: ``preset:<name>`` (random weights of a ``dpn_model.presets`` preset: tiny, mid,
            llava-1.5-7b needs a converted checkpoint instead), a converted DPN checkpoint directory
            (``dpn convert``), or any model reference :class:`dpn_base.model_ref.ModelRef` parses
            (``runs:/<id>/model``, ``models:/dpn@champion``, ``models:/dpn/3``, ``mlflow-artifacts:/...``): dense
            -> DPN. Parsed when the config loads (a bad form or an unknown preset is an error naming this key) and
            kept as its canonical text; :attr:`init_ref` is the parsed reference.
        compression: ``"auto"`` trains DPN (router + routing loss); ``"random"`` routes each sample
            to a uniformly drawn expert per pooling layer (no router; the paper's random-routing
            ablation; the training token floor applies); 1 (dense), 2 or 4 force that expert at every
            pooling layer; a schedule (``[1, 2, 4]`` or ``"1,2,4"``) forces one factor per pooling
            layer, a static pyramid as PyramidDrop uses (the baselines). Parsed by
            ``dpn_model.configuration.parse_compression``; the factors are the model's experts'.
        dense_warmup_steps: with ``compression: auto``, train the first this-many optimizer steps
            dense (compression 1, no routing) and route after that. The paper trains DPN from the
            stage-1 model (LLM + projector), routers from step 0 (``init`` from a dense model and 0 here);
            a model trained from random weights needs the dense phase, or its router collapses to the
            heaviest pooling before the visual features are worth keeping (BENCHMARKS_HISTORY.md).
        paths_per_sample: with ``compression: auto`` and ``router_estimator: reinforce``, route each
            training sample this many times in one forward (its rows repeated, each path sampled on its
            own; the decoder trains on every path) and judge each path against the sample's other paths
            (RLOO) instead of against the batch. 1: off. Costs that many times the compute per step.
        seed: seed of the random preset weights and of the router's sampling.
        config_overrides: DPNConfig fields applied to the model before training (e.g.
            ``routing_loss_weight``, ``pooling_layers``); for presets also the architecture.
        freeze_vision_tower: keep the CLIP tower fixed (LLaVA recipe: frozen).
        freeze_projector: keep the projector fixed.
        freeze_language_model: keep the decoder (and embeddings / lm head) fixed.
        gradient_checkpointing: recompute decoder activations in the backward pass.
    """

    init: str = "preset:tiny"
    compression: Compression = "auto"
    dense_warmup_steps: int = Field(0, ge=0)
    paths_per_sample: int = Field(1, ge=1)
    seed: int = 0
    config_overrides: dict[str, Any] = Field(default_factory=dict)
    freeze_vision_tower: bool = True
    freeze_projector: bool = False
    freeze_language_model: bool = False
    gradient_checkpointing: bool = False

    @field_validator("init")
    @classmethod
    def _parse_init(cls, value: str) -> str:
        from dpn_model.presets import PRESETS

        return str(ModelRef.parse(value).check_preset(PRESETS))

    @property
    def init_ref(self) -> ModelRef:
        """``init``, parsed (:class:`dpn_base.model_ref.ModelRef`)."""
        return ModelRef.parse(self.init)

    @property
    def load_overrides(self) -> dict[str, Any]:
        """The ``config_overrides`` to apply when the initial model is loaded: none for a preset, which is
        built with them already (architecture included), all of them for a checkpoint."""
        return {} if self.init_ref.is_preset else dict(self.config_overrides)

    @model_validator(mode="after")
    def _check_compression(self) -> ModelConfig:
        from dpn_model.configuration import CompressionSpec

        # the form is checked by the field; the factors against the model's experts when the config tells them
        spec = CompressionSpec.parse(self.compression, self.known_pyramid())
        if spec.mode == "auto" and spec.cost:
            raise ValueError(
                f"compression {self.compression}: the cost dial (auto:lambda=X) is an inference-time knob; training "
                "samples the router's experts whatever it is: train with compression auto, and pass the dial to "
                "dpn eval, generate() or a serving request"
            )
        if self.dense_warmup_steps and spec.label != "auto":
            raise ValueError(
                f"dense_warmup_steps only applies to compression 'auto' (there is no router to warm up "
                f"with compression {self.compression}); set it to 0"
            )
        if self.paths_per_sample > 1 and spec.label != "auto":
            raise ValueError(
                f"paths_per_sample only applies to compression 'auto' (compression {self.compression} routes "
                f"every sample one way); set it to 1"
            )
        estimator = self.config_overrides.get(
            "router_estimator"
        )  # else the model's own: checked in the worker
        if self.paths_per_sample > 1 and estimator not in (None, "reinforce"):
            raise ValueError(
                f"paths_per_sample={self.paths_per_sample} needs router_estimator 'reinforce' (the overrides set "
                f"{estimator!r}): its paths are judged against each other by the REINFORCE term; set it to 1"
            )
        return self

    def known_pyramid(self) -> SimpleNamespace | None:
        """`expert_strides` and `pooling_layers` of the model to train, when the config alone tells them (a
        preset, or overrides naming both); None for a checkpoint, whose config is read when it is loaded."""
        from dpn_model.configuration import DEFAULT_EXPERT_STRIDES
        from dpn_model.presets import PRESETS

        overrides = self.config_overrides
        preset = self.init_ref.preset_name
        layers = overrides.get("pooling_layers")
        if layers is None and preset is not None:
            layers = PRESETS.get(preset, {}).get("pooling_layers")
        strides = overrides.get("expert_strides")
        if strides is None and preset is not None:
            strides = DEFAULT_EXPERT_STRIDES
        if layers is None or strides is None:
            return None
        return SimpleNamespace(expert_strides=strides, pooling_layers=layers)


class SyntheticConfig(ConfigModel):
    """The synthetic benchmark to write into ``data.path`` (``pipelines.synthetic``).

    A root that already holds a synthetic dataset is reused only when its manifest matches every key below;
    otherwise the job says what differs and writes the one asked for in its place.

    Attributes:
        benchmark: ``cells`` (default: the one on which per-sample routing can win) or ``tiles`` (the earlier one).
        format: on-disk format of the files.
        num_train, num_dev, num_eval: samples per split (``dev`` chooses settings, ``eval`` is the test split).
        seed: generation seed.
    """

    benchmark: Literal["cells", "tiles"] = "cells"
    format: Literal["llava", "webdataset", "parquet"] = "parquet"
    num_train: int = Field(2000, ge=0)
    num_dev: int = Field(0, ge=0)
    num_eval: int = Field(200, ge=0)
    seed: int = 0

    def manifest_settings(self) -> dict[str, Any]:
        """The settings a root's manifest must match to be reused (``manifest_differences``): these keys, and
        the generator's image size and every family of the benchmark, which is what the job writes."""
        from pipelines.synthetic import DEFAULT_IMAGE_SIZE, get_benchmark

        families = list(get_benchmark(self.benchmark).families)
        return {**self.model_dump(), "image_size": DEFAULT_IMAGE_SIZE, "families": families}


class DataConfig(ReadPolicy):
    """Training data (read by ``pipelines.datasets.build_dataset``).

    What the readers may open and hold is this section's share of :class:`pipelines.formats.ReadPolicy`
    (``allowed_image_roots``, ``allowed_image_schemes``, ``tar_compression``, ``max_member_bytes``,
    ``max_sample_bytes``, ``image_formats``, ``max_image_pixels``: keys of this section, documented there);
    ``read_policy()`` is what the job hands the readers.

    Attributes:
        path: dataset file/folder/root, local or ``s3://``/``gs://`` (LLaVA JSON, WebDataset, Parquet).
            A relative path is taken relative to ``run.work_dir``.
        split: split of a dataset root (``null``: every file under ``path``).
        image_folder: where relative LLaVA image paths resolve (default: next to the JSON); a ref must stay
            inside it (``allowed_image_roots`` and ``allowed_image_schemes`` name more places).
        synthetic: if set and ``path`` does not exist, write the synthetic benchmark there first.
        max_length: longest token sequence (image tokens included).
        max_bad_fraction: fail past this fraction of bad samples.
        preprocess_concurrency: Ray Data preprocessing actors.
        preprocess_num_cpus: CPUs per preprocessing actor.
        num_samples: samples per epoch for the schedule; 0 = count the raw rows once on the driver.
    """

    path: str = "data/synthetic"
    split: str | None = "train"
    image_folder: str | None = None
    synthetic: SyntheticConfig | None = None
    max_length: int = 2048
    max_bad_fraction: float = 0.01
    preprocess_concurrency: int = 1
    preprocess_num_cpus: float = 1.0
    num_samples: int = 0


class OptimConfig(ConfigModel):
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; gradient accumulation.

    ``router_lr_scale`` multiplies the routers' learning rate (1 = the authors' one rate for everything).
    """

    lr: float = Field(2e-5, gt=0)
    weight_decay: float = 0.0
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2)
    eps: float = 1e-8
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    router_lr_scale: float = Field(1.0, gt=0)


class TrainLoopConfig(ConfigModel):
    """Batching and length of training.

    Attributes:
        micro_batch_size: samples per worker per forward pass (per-device batch).
        grad_accum_steps: micro-batches per optimizer step.
        epochs: passes over the data (ignored when ``max_steps`` > 0 ends training earlier).
        max_steps: stop after this many optimizer steps (0 = ``epochs`` full passes).
        log_every: log metrics every this many optimizer steps.
    """

    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int = Field(0, ge=0)
    log_every: int = Field(1, ge=1)


class DeepSpeedConfig(ConfigModel):
    """DeepSpeed inside each worker.

    Attributes:
        config: JSON file (relative paths: the repository's ``configs/deepspeed/``) with the ZeRO
            settings; batch sizes, clipping and precision are filled in from this config.
        precision: ``auto`` = bf16 on GPU, fp32 on CPU.
        overrides: extra keys merged into the JSON (nested mappings merge).
    """

    config: str = "zero2.json"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    overrides: dict[str, Any] = Field(default_factory=dict)


class CheckpointConfig(ConfigModel):
    """Checkpoints through ``ray.train.report`` (DeepSpeed state + data position + MLflow run id).

    Attributes:
        every_steps: checkpoint every this many optimizer steps (and always at the end).
        keep: keep the last this many checkpoints in storage.
        save_hf_model: also write the model in Hugging Face format into each checkpoint
            (``hf_model/``), so any checkpoint loads with ``from_pretrained``.
    """

    every_steps: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)
    save_hf_model: bool = True


class MlflowConfig(ConfigModel):
    """MLflow tracking (default store: ``sqlite:///<cwd>/mlflow.db`` unless MLFLOW_TRACKING_URI is set).

    Attributes:
        tracking_uri: explicit tracking URI (overrides the environment).
        experiment: experiment name.
        registered_model: register the final model as a new version of this model ("" = don't).
        tags: extra run tags.
    """

    tracking_uri: str | None = None
    experiment: str = "dpn-train"
    registered_model: str = "dpn"
    tags: dict[str, str] = Field(default_factory=dict)


class RunConfigSection(ConfigModel):
    """Where and how the job runs.

    Attributes:
        name: run name: Ray Train run folder ``<storage_path>/<name>`` and MLflow run name.
            Submitting the same name again resumes it from its latest checkpoint.
        storage_path: Ray Train storage (local dir, NFS, or ``s3://``): checkpoints live here.
        work_dir: local scratch for generated data and the initial model (shared storage on
            multi-node clusters, or every node re-creates it).
        ray_address: cluster to join (``null``: $RAY_ADDRESS, or start a local Ray).
        local_num_cpus: logical CPUs of a locally started Ray (``null``: the machine's count);
            training workers and data preprocessing each reserve CPUs, so on a small machine
            give more logical CPUs than cores.
        num_workers: Ray Train workers (one per GPU on GPU clusters).
        use_gpu: one GPU per worker (NCCL + bf16) instead of CPU (gloo + fp32).
        cpus_per_worker: CPUs reserved by each training worker.
        resources_per_worker: extra custom resources per worker (e.g. ``{"accelerator_type:H100": 0.01}``).
        max_failures: restarts from the latest checkpoint after worker failures (-1 = unlimited).
        export_dir: if set, the final model (Hugging Face format: safetensors, tokenizer, processor) is also
            copied to this local folder, replacing what it held (e.g. the shipped ``checkpoints/tiny-dense``).
    """

    name: str = "dpn-train"
    storage_path: str = "runs"
    work_dir: str = "work"
    ray_address: str | None = None
    local_num_cpus: int | None = None
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = 3
    export_dir: str | None = None

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str) -> str:
        if not name or "/" in name:
            raise ValueError(f"must be a non-empty folder name without '/', got {name!r}")
        return name


class TrainConfig(ConfigModel):
    """The whole training job. YAML sections: model, data, optim, train, deepspeed, checkpoint, mlflow, run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    run: RunConfigSection = Field(default_factory=RunConfigSection)


def load_train_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Load a training config file with ``key=value`` overrides (see :func:`jobs.config.load_config`)."""
    return load_config(TrainConfig, path, overrides)


__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "MlflowConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfigSection",
    "SyntheticConfig",
    "TrainConfig",
    "TrainLoopConfig",
    "load_train_config",
]
