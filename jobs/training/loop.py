"""The per-worker training loop (runs inside each Ray Train worker) and its building blocks.

One worker = one DeepSpeed rank. Ray Train creates the torch process group (gloo on CPU, NCCL on
GPU); :func:`setup_engine` attaches DeepSpeed to it and wraps the model with a client AdamW and a
warmup + cosine schedule. :class:`DPNTrainRecipe` is one worker's run (setup -> train -> cleanup) over
these builders, configured by a :class:`WorkerSpec` from the driver.

Checkpoints (every ``checkpoint.every_steps`` optimizer steps and at the end) are written through
``ray.train.report`` and hold::

    deepspeed/          engine.save_checkpoint(tag="state"): module, optimizer (ZeRO shards of
                        every rank), LR scheduler, DeepSpeed step counters
    train_state.json    TrainState: step, epoch, batches_in_epoch, samples_seen, mlflow_run_id
    hf_model/           the model in Hugging Face format (if checkpoint.save_hf_model): loads with
                        DPNForConditionalGeneration.from_pretrained

Data position on resume: ``batches_in_epoch`` counts the micro-batches *each worker* took from its
shard in the current epoch (all workers take the same number: the shards are equal-sized and
batches drop the remainder). On restore each worker re-opens its shard of that epoch and skips that
many micro-batches, so the epoch's sample count is exact and training resumes at step ``step + 1``
with the same schedule. Ray Data hands blocks to the shards dynamically, so the skipped batches are
the same number but not guaranteed to be the very same samples as before the failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from dpn_base.model_ref import HF_MODEL_DIR  # where a checkpoint holds its HF model (what resolvers look for)
from jobs.config import ConfigModel
from jobs.training.config import CheckpointConfig, ModelConfig, OptimConfig, TrainLoopConfig

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
DS_DIR = "deepspeed"
DS_TAG = "state"


@dataclass
class TrainState:
    """Progress saved with every checkpoint.

    Attributes:
        step: optimizer steps completed (the checkpoint holds the weights after this step).
        epoch: epoch in progress (0-based).
        batches_in_epoch: micro-batches each worker consumed in ``epoch``.
        samples_seen: samples consumed by all workers together.
        mlflow_run_id: the MLflow run this training writes to.
    """

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    samples_seen: int = 0
    mlflow_run_id: str = ""

    def save(self, directory: str | Path) -> None:
        (Path(directory) / STATE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        return cls(**json.loads((Path(directory) / STATE_FILE).read_text()))


# ----------------------------------------------------------------------------------------------
# Model, optimizer, schedule, DeepSpeed config
# ----------------------------------------------------------------------------------------------


def load_train_model(
    model_dir: str, config_overrides: dict[str, Any] | None = None, torch_dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """``DPNForConditionalGeneration.from_pretrained(model_dir)`` with DPNConfig fields overridden (validated
    like constructor arguments; an unknown key raises ValueError naming it), its parameters in ``torch_dtype``
    (None = fp32). A worker passes :func:`training_dtype`: loading in the dtype DeepSpeed trains in holds one
    copy of the weights in host memory at that size, not an fp32 copy for DeepSpeed to cast."""
    from dpn_model import DPNForConditionalGeneration
    from dpn_model.loading import load_dpn_config

    config = load_dpn_config(model_dir, config_overrides)
    return DPNForConditionalGeneration.from_pretrained(
        model_dir, config=config, dtype=torch_dtype or torch.float32
    )


def apply_freezing(
    model: torch.nn.Module, freeze_vision_tower: bool, freeze_projector: bool, freeze_language_model: bool
) -> dict[str, int]:
    """Set ``requires_grad`` per part: a part whose ``freeze_*`` is True is frozen, the others train (the
    language model's freeze covers the lm head). Returns trainable and total parameter counts."""
    parts = (
        (model.model.vision_tower, freeze_vision_tower),
        (model.model.multi_modal_projector, freeze_projector),
        (model.model.language_model, freeze_language_model),
    )
    for module, frozen in parts:
        for p in module.parameters():
            p.requires_grad_(not frozen)
    if freeze_language_model:
        model.lm_head.weight.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise ValueError("every parameter is frozen: unfreeze the language model, projector or vision tower")
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def make_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: list[float],
    eps: float,
    router_lr_scale: float = 1.0,
):
    """AdamW over the trainable parameters; no weight decay on biases and norms (1-D tensors).

    The routers' parameters form their own groups (marked ``"router": True``) so that their learning
    rate can start later than the rest's (:func:`delayed_start`, for ``model.dense_warmup_steps``) and be
    ``router_lr_scale`` times the rest's (``optim.router_lr_scale``; 1 = the reference's one rate).
    """
    from dpn_model.pooling import DPNRouter

    routers = {id(p) for m in model.modules() if isinstance(m, DPNRouter) for p in m.parameters()}
    groups = [
        {
            "params": [],
            "weight_decay": decay,
            "router": router,
            "lr": lr * (router_lr_scale if router else 1.0),
        }
        for router in (False, True)
        for decay in (weight_decay, 0.0)
    ]
    for p in model.parameters():
        if p.requires_grad:
            groups[2 * (id(p) in routers) + (p.ndim < 2)]["params"].append(p)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(betas), eps=eps)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LR multiplier: linear warmup from 1/warmup to 1 over ``warmup_steps``, then cosine to ``min_ratio``."""

    def factor(step: int) -> float:  # step = optimizer steps already taken
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def delayed_start(factor, start: int, betas: list[float]):
    """LR multiplier for parameters that get their first gradient at optimizer step ``start + 1`` (the
    routers after a dense warm-up): 0 before, ``factor`` scaled so that their AdamW updates are those of
    a fresh AdamW after.

    Until ``start`` their gradients are zero (DeepSpeed's ZeRO optimizers step every parameter group at
    every step, with zeros where no gradient flowed), so their moments stay zero while AdamW's step
    count ``t`` grows; its bias correction for ``t`` would then make their first updates 3-6x larger
    than a fresh optimizer's, enough to collapse a new router to the highest compression. Multiplying
    the rate by ``(1 - b1^t) / (1 - b1^k) * sqrt((1 - b2^k) / (1 - b2^t))``, ``k`` their own step count,
    replaces that correction with the one for ``k``. With ``start`` 0 it is 1.
    """
    beta1, beta2 = betas

    def delayed(step: int) -> float:  # step = optimizer steps already taken
        if step < start:
            return 0.0
        t, k = step + 1, step + 1 - start  # AdamW's step count at this update, and the routers' own
        correction = (1 - beta1**t) / (1 - beta1**k) * math.sqrt((1 - beta2**k) / (1 - beta2**t))
        return factor(step) * correction

    return delayed


def deepspeed_config(
    base: dict[str, Any],
    *,
    micro_batch_size: int,
    grad_accum_steps: int,
    world_size: int,
    precision: str,
    grad_clip: float,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict: the JSON's ZeRO settings + batch sizes, clipping and precision.

    ``precision`` is bf16 / fp16 / fp32 (``auto`` must be resolved by the caller).
    """
    from dpn_base.config_models import merge_dicts

    cfg = merge_dicts(base, {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,  # our client torch AdamW under ZeRO
        "steps_per_print": 10**9,  # progress is ours
        "wall_clock_breakdown": False,
    })  # fmt: skip
    return merge_dicts(cfg, overrides or {})


def precision_dtype(precision: str) -> torch.dtype:
    """The parameter dtype of a resolved precision (bf16 / fp16 / fp32, as :func:`deepspeed_config` takes it).

    ``auto`` is the driver's to resolve (``jobs.training.driver.resolve_precision``: it knows whether the run
    has GPUs), so it is refused here rather than guessed from this process's devices.
    """
    from dpn_model.loading import pick_dtype

    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(
            f"precision {precision!r} is not resolved: pass bf16, fp16 or fp32 "
            "(the driver resolves auto with jobs.training.driver.resolve_precision)"
        )
    return pick_dtype(precision, "cpu")


def training_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    """The dtype DeepSpeed trains the module's parameters in, read from the worker's DeepSpeed config.

    DeepSpeed casts every parameter to bf16 / fp16 when that mode is enabled (and leaves buffers alone), then
    builds its fp32 master weights from the cast parameters; loading in this dtype gives it the same parameters
    without an fp32 copy first. It is read from the config, not the training config's ``deepspeed.precision``,
    because that is what DeepSpeed obeys: :func:`deepspeed_config` writes the resolved precision into it and
    ``deepspeed.overrides`` may change it after.
    """
    bf16 = bool(ds_config.get("bf16", {}).get("enabled", False))
    fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))
    if bf16 and fp16:
        raise ValueError(
            "the DeepSpeed config enables both bf16 and fp16: keep one (deepspeed.precision, deepspeed.overrides)"
        )
    return precision_dtype("bf16" if bf16 else "fp16" if fp16 else "fp32")


def setup_engine(
    model: torch.nn.Module,
    ds_config: dict[str, Any],
    optim: OptimConfig | Mapping[str, Any],
    total_steps: int,
    dist_backend: str,
    router_start: int = 0,
):
    """Attach DeepSpeed to Ray Train's process group and wrap model, AdamW and the schedule.

    ``optim``: the ``optim`` section (:class:`jobs.training.config.OptimConfig`) or a mapping of its keys
    (validated into one; ``grad_clip`` is DeepSpeed's, from ``ds_config``). ``router_start``: optimizer steps
    before the routers train (the dense warm-up).
    """
    import deepspeed

    if isinstance(optim, Mapping):
        optim = OptimConfig.model_validate(dict(optim))
    deepspeed.init_distributed(dist_backend=dist_backend)  # reuses the initialised torch process group
    optimizer = make_optimizer(
        model, optim.lr, optim.weight_decay, optim.betas, optim.eps, optim.router_lr_scale
    )
    warmup = int(round(optim.warmup_ratio * total_steps))
    schedule = warmup_cosine(total_steps, warmup, optim.min_lr_ratio)
    router_schedule = delayed_start(schedule, router_start, optim.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [router_schedule if g["router"] else schedule for g in optimizer.param_groups]
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions (collective)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    ctx = (
        deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage3 else contextlib.nullcontext()
    )
    with ctx:
        if torch.distributed.get_rank() != 0:
            return None
        return {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}


def save_hf_model(engine, processor_dir: str, out_dir: str | Path) -> None:
    """Write the engine's model + the processor as a Hugging Face checkpoint (rank 0 writes; collective)."""
    state = full_state_dict(engine)
    if state is None:
        return
    engine.module.save_pretrained(str(out_dir), state_dict=state)  # safetensors: the only format 5.x writes
    from pipelines.preprocess import load_processor

    load_processor(processor_dir).save_pretrained(str(out_dir))


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


@dataclass
class StepSums:
    """Sums over the micro-batches of one optimizer step, on one worker or on all (:meth:`StepStats.reduce`).

    The scalars are named fields; with the per-layer compression sums they travel as one float64 tensor
    (:meth:`pack`, :meth:`unpack`), so that a logged step costs one ``all_reduce`` whatever is counted.

    Attributes:
        loss, lm_loss, routing_loss, reinforce_loss: summed over micro-batches (a loss the model did not
            compute counts 0; ``reinforce_loss`` is 0 unless ``router_estimator="reinforce"``).
        micro_batches, samples, tokens: counted (tokens: attention-mask ones, image tokens included).
        compression_sum: ``(L,)``, per pooling layer, the sum of the compression factors of the samples pooled
            there.
        compression_count: ``(L,)``, per pooling layer, the samples pooled there (``-1`` choices are not).
    """

    compression_sum: torch.Tensor
    compression_count: torch.Tensor
    loss: float = 0.0
    lm_loss: float = 0.0
    routing_loss: float = 0.0
    reinforce_loss: float = 0.0
    micro_batches: float = 0.0
    samples: float = 0.0
    tokens: float = 0.0

    @classmethod
    def zeros(cls, num_pool_layers: int) -> StepSums:
        return cls(*(torch.zeros(num_pool_layers, dtype=torch.float64) for _ in PER_LAYER_FIELDS))

    def pack(self) -> torch.Tensor:
        """``[scalars in field order, compression_sum, compression_count]``: one float64 tensor."""
        scalars = torch.tensor([getattr(self, name) for name in SCALAR_FIELDS], dtype=torch.float64)
        return torch.cat([scalars, self.compression_sum, self.compression_count])

    @classmethod
    def unpack(cls, packed: torch.Tensor, num_pool_layers: int) -> StepSums:
        """The inverse of :meth:`pack`."""
        scalars, sums, counts = packed.split([len(SCALAR_FIELDS), num_pool_layers, num_pool_layers])
        return cls(sums.clone(), counts.clone(), **dict(zip(SCALAR_FIELDS, scalars.tolist(), strict=True)))


PER_LAYER_FIELDS = ("compression_sum", "compression_count")
# the other fields of StepSums, the scalars, in the order pack() lays them out (derived once, from the class)
SCALAR_FIELDS = tuple(f.name for f in fields(StepSums) if f.name not in PER_LAYER_FIELDS)


def _summed(loss: torch.Tensor | None) -> float:
    """A loss of one micro-batch as a number to add up (0 for a loss the model did not compute)."""
    return float(loss.detach()) if loss is not None else 0.0


class StepStats:
    """Sums over the micro-batches of one optimizer step (:class:`StepSums`), reduced over workers before
    logging, and the metrics logged from them."""

    def __init__(self, num_pool_layers: int, factors: list[int]):
        self.factors = torch.tensor(factors, dtype=torch.float64)
        self.n_layers = num_pool_layers
        self.reset()

    def reset(self) -> None:
        self.sums = StepSums.zeros(self.n_layers)
        self.data_wait = 0.0

    def add(self, out, batch_size: int, tokens: int) -> None:
        """Count one micro-batch: the model's output ``out`` (losses, ``expert_choices``) and its size."""
        s = self.sums
        s.loss += float(out.loss.detach())
        s.lm_loss += _summed(out.lm_loss)
        s.routing_loss += _summed(out.routing_loss)
        s.reinforce_loss += _summed(out.reinforce_loss)
        s.micro_batches += 1
        s.samples += batch_size
        s.tokens += tokens
        if out.expert_choices is not None:
            choices = out.expert_choices.detach().cpu()  # (B, L); -1 = not pooled
            pooled = choices >= 0
            factor = self.factors[choices.clamp(min=0)]
            s.compression_sum += (factor * pooled).sum(0)
            s.compression_count += pooled.sum(0)

    def reduce(self) -> StepSums:
        """The sums over all workers (collective: one ``all_reduce``)."""
        packed = self.sums.pack()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(packed)
        return StepSums.unpack(packed, self.n_layers)

    def metrics(self, total: StepSums, step_time: float, lr: float) -> dict[str, float]:
        """The logged metrics of a step: mean losses per micro-batch, throughput, and per pooling layer the
        mean compression of the samples pooled there (``compression_layer<i>``, absent when none was)."""
        n = max(total.micro_batches, 1)
        out = {
            "loss": total.loss / n,
            "lm_loss": total.lm_loss / n,
            "routing_loss": total.routing_loss / n,
            "reinforce_loss": total.reinforce_loss / n,  # router_estimator="reinforce" only (0 otherwise)
            "samples_per_s": total.samples / step_time,
            "tokens_per_s": total.tokens / step_time,
            "lr": lr,
            "step_time_s": step_time,
        }
        for i in range(self.n_layers):
            if total.compression_count[i] > 0:
                out[f"compression_layer{i}"] = (total.compression_sum[i] / total.compression_count[i]).item()
        return out


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# ----------------------------------------------------------------------------------------------
# What a worker is given
# ----------------------------------------------------------------------------------------------


class WorkerSpec(ConfigModel):
    """Everything a Ray Train worker needs, built on the driver by :func:`jobs.training.driver.build_loop_spec`:
    the training config's sections the loop reads, as validated on the driver, and what only the driver derives.

    Ray hands it to the workers as plain JSON data (:meth:`to_config`); :meth:`from_config` validates it again
    into the same sections, so a worker reads exactly the config's keys (``spec.model.seed``,
    ``spec.optim.lr``), never a hand-kept copy of them, and a section that does not fit fails naming its key.

    Attributes:
        model: ``model.*``: the initial model (``init``, ``seed``, ``config_overrides``), ``compression``
            (checked against the loaded model's experts by ``parse_compression``), the dense warm-up, paths
            per sample, freezing and gradient checkpointing.
        optim: ``optim.*``: AdamW and its warmup + cosine schedule (``grad_clip`` is applied by DeepSpeed,
            from ``ds_config``).
        train: ``train.*``: the micro-batch size, epochs and ``log_every`` (``grad_accum_steps`` is in
            ``ds_config``, ``max_steps`` in ``total_steps``).
        checkpoint: ``checkpoint.*``: ``every_steps`` and ``save_hf_model`` (``keep`` is Ray Train's, on the
            driver).
        model_dir: the initial model on the driver's node (weights + processor).
        ds_config: the DeepSpeed config dict (:func:`deepspeed_config`, precision resolved).
        dist_backend: ``nccl`` (GPU) or ``gloo`` (CPU).
        total_steps: optimizer steps of the run (the schedule's length).
        mlflow_run_id: the MLflow run this training writes to.
        tracking_uri: the MLflow tracking URI.
    """

    model: ModelConfig
    optim: OptimConfig
    train: TrainLoopConfig
    checkpoint: CheckpointConfig
    model_dir: str
    ds_config: dict[str, Any]
    dist_backend: str
    total_steps: int
    mlflow_run_id: str
    tracking_uri: str

    def to_config(self) -> dict[str, Any]:
        """The ``train_loop_config`` Ray passes to :func:`train_loop_per_worker`: plain JSON data."""
        return self.model_dump(mode="json")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> WorkerSpec:
        """The spec :meth:`to_config` gave, validated again (a pydantic ``ValidationError`` names a wrong
        key, e.g. ``optim.lr``)."""
        return cls.model_validate(dict(config))


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


def _local_model_dir(spec: WorkerSpec) -> str:
    """The initial model directory on this node: the driver's, or re-created here (multi-node): a preset with
    the driver's seed and overrides, anything else resolved (downloaded) as the driver did."""
    if os.path.isdir(spec.model_dir):
        return spec.model_dir
    from tracking import resolve_model_dir

    return resolve_model_dir(
        spec.model.init,
        tracking=spec.tracking_uri,
        preset_dir=spec.model_dir,
        preset_seed=spec.model.seed,
        preset_overrides=dict(spec.model.config_overrides),
    )


def _save_checkpoint(engine, state: TrainState, processor_dir: str, save_hf: bool) -> str:
    """Write this rank's part of a checkpoint to a fresh local folder (collective)."""
    rank = torch.distributed.get_rank()
    folder = tempfile.mkdtemp(prefix=f"dpn-ckpt-r{rank}-")
    engine.save_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG)
    if save_hf:
        save_hf_model(engine, processor_dir, os.path.join(folder, HF_MODEL_DIR))
    if rank == 0:
        state.save(folder)
    return folder


class DPNTrainRecipe:
    """One worker's training: :meth:`setup`, then :meth:`train`, then :meth:`cleanup`.

    ``setup`` builds the model, the DeepSpeed engine and the data shard and resumes from the last Ray
    Train checkpoint; ``train`` runs epochs of :meth:`train_step` and writes checkpoints with :meth:`save`.
    Rank 0 logs the metrics to MLflow and the progress lines to the console.
    """

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.state = TrainState(mlflow_run_id=spec.mlflow_run_id)
        self.resumed = False  # restored from a checkpoint in this attempt
        self.metric_logger = None
        self.last_metrics: dict[str, float] = {}
        self.step_times: list[float] = []

    # ---- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        if self.spec.dist_backend == "nccl":
            torch.cuda.set_device(ray.train.torch.get_device())
        self.model_dir = _local_model_dir(self.spec)
        model, counts = self._setup_model()
        self.engine = setup_engine(
            model,
            self.spec.ds_config,
            self.spec.optim,
            self.spec.total_steps,
            self.spec.dist_backend,
            self.spec.model.dense_warmup_steps,
        )
        self.device = self.engine.device
        self.dtype = next(self.engine.module.parameters()).dtype
        self.resumed = self.resume()
        # router sampling, resumable
        torch.manual_seed(self.spec.model.seed * 1009 + self.rank * 7919 + self.state.step)
        self._setup_metric_logger()
        cfg = model.config
        self.stats = StepStats(len(cfg.pooling_layers), cfg.compression_factors)
        if self.rank == 0:
            logger.info(
                "training %s (%d / %d params trainable) on %d workers, %d steps, global batch %d",
                self.model_dir, counts["trainable"], counts["total"], self.world, self.spec.total_steps,
                self.spec.ds_config["train_batch_size"],
            )  # fmt: skip
        self._setup_data()
        # the checkpoint this attempt holds already (-1: none) and whether it has the HF model
        self.saved_step = self.state.step if self.resumed else -1
        self.saved_hf = self.spec.checkpoint.save_hf_model

    def _setup_model(self) -> tuple[torch.nn.Module, dict[str, int]]:
        """The model to train, loaded in the dtype DeepSpeed trains it in and frozen per ``model.freeze_*``;
        also its trainable and total parameter counts."""
        from dpn_model.configuration import parse_compression

        cfg = self.spec.model
        model = load_train_model(self.model_dir, cfg.load_overrides, training_dtype(self.spec.ds_config))
        # "auto", "random", a factor or a schedule, checked against this model's experts and pooling layers
        self.routed_compression = parse_compression(cfg.compression, model.config)
        if cfg.paths_per_sample > 1 and model.config.router_estimator != "reinforce":
            raise ValueError(
                f"model.paths_per_sample={cfg.paths_per_sample} needs router_estimator 'reinforce' (the model's "
                f"is {model.config.router_estimator!r}): set model.config_overrides.router_estimator=reinforce "
                f"or paths_per_sample to 1"
            )
        counts = apply_freezing(
            model,
            freeze_vision_tower=cfg.freeze_vision_tower,
            freeze_projector=cfg.freeze_projector,
            freeze_language_model=cfg.freeze_language_model,
        )
        if cfg.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        model.config.text_config.use_cache = False
        return model, counts

    def resume(self) -> bool:
        """Load the engine and :class:`TrainState` from Ray Train's last checkpoint. False if there is none."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as ckpt_dir:
            self.state = TrainState.load(ckpt_dir)
            load_path, _ = self.engine.load_checkpoint(os.path.join(ckpt_dir, DS_DIR), tag=DS_TAG)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed found no state in checkpoint {ckpt_dir}")
        if self.rank == 0:
            s = self.state
            logger.info(
                "resumed from checkpoint at step %d (epoch %d, %d batches into it, %d samples seen)",
                s.step, s.epoch, s.batches_in_epoch, s.samples_seen,
            )  # fmt: skip
        return True

    def _setup_metric_logger(self) -> None:
        """MLflow logging on rank 0; tags the run with the processes of this attempt (collective)."""
        from tracking import StepMetricLogger

        run_id = self.state.mlflow_run_id
        if self.rank == 0:
            self.metric_logger = StepMetricLogger(run_id, uri=self.spec.tracking_uri)
        # which processes run this attempt (host:pid per rank), for operators chasing a failure
        where = [None] * self.world
        torch.distributed.all_gather_object(where, f"{socket.gethostname()}:{os.getpid()}")
        if self.metric_logger is None:
            return
        self.metric_logger.client.set_tag(run_id, "sys.worker_pids", ",".join(where))
        if self.resumed:
            self.metric_logger.log(
                {"resumed_from_step": self.state.step}, step=self.state.step
            )  # per restart

    def _setup_data(self) -> None:
        import ray.train

        from pipelines.preprocess import Collator

        self.shard = ray.train.get_dataset_shard("train")
        self.collate = Collator(self.model_dir)
        warmup = self.spec.model.dense_warmup_steps
        if self.rank == 0 and self.state.step < warmup:
            logger.info("dense warm-up: steps 1-%d train with compression 1, routing starts at step %d",
                        warmup, warmup + 1)  # fmt: skip

    def _epoch_batches(self):
        """This worker's micro-batches of the current epoch, past those it already trained on."""
        iterator = iter(
            self.shard.iter_torch_batches(
                batch_size=self.spec.train.micro_batch_size,
                collate_fn=self.collate,
                drop_last=True,
                prefetch_batches=2,
            )
        )
        for _ in range(self.state.batches_in_epoch):  # data position on resume
            if next(iterator, None) is None:
                break
        return iterator

    # ---- train ---------------------------------------------------------------------------------

    def train(self) -> None:
        """Epochs until ``total_steps`` optimizer steps (or the data runs out), checkpointing on the way."""
        state, total_steps = self.state, self.spec.total_steps
        self.engine.train()
        self.step_start = time.perf_counter()
        self.run_start, self.run_start_step = self.step_start, state.step
        done = state.step >= total_steps
        while not done and state.epoch < self.spec.train.epochs:
            done = self._train_epoch()
            if not done:
                state.epoch += 1
                state.batches_in_epoch = 0
        if not done:
            # the data ran out before total_steps (bad samples dropped, uneven tail): finish here
            if self.rank == 0:
                logger.info("data exhausted after %d steps (planned %d)", state.step, total_steps)
            self.save(True, self.last_metrics)
        elif self.resumed and state.step == self.run_start_step and self.rank == 0:
            # restored from the final checkpoint (the job died after training): nothing left to do
            logger.info("training had already finished at step %d", state.step)

    def _train_epoch(self) -> bool:
        """Train on the rest of the current epoch. True when the run's last optimizer step is done."""
        batches = self._epoch_batches()
        while True:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            self.stats.data_wait += time.perf_counter() - wait_start
            if batch is None:
                return False
            if self.train_step(batch) and self._finish_step():
                return True

    def train_step(self, batch: dict[str, torch.Tensor]) -> bool:
        """Forward and backward one micro-batch. True when it completed an optimizer step."""
        batch.pop("image_mask", None)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        compression = 1 if self.state.step < self.spec.model.dense_warmup_steps else self.routed_compression
        samples, tokens = int(batch["input_ids"].shape[0]), int(batch["attention_mask"].sum())
        k = self.spec.model.paths_per_sample
        if k > 1 and compression == "auto":
            # each sample k times, one group per sample: its paths are judged against each other (RLOO)
            batch = {name: t.repeat_interleave(k, dim=0) for name, t in batch.items()}
            batch["reinforce_groups"] = torch.arange(samples, device=self.device).repeat_interleave(k)
        out = self.engine(**batch, compression=compression)
        self.engine.backward(out.loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        self.stats.add(out, samples, tokens)
        self.state.batches_in_epoch += 1
        return boundary

    def _finish_step(self) -> bool:
        """After an optimizer step: metrics, logs, checkpoint. True when it was the run's last step."""
        state, stats = self.state, self.stats
        state.step += 1
        total = stats.reduce()
        state.samples_seen += int(total.samples)
        now = time.perf_counter()
        step_time = now - self.step_start
        self.step_times.append(step_time)
        metrics = stats.metrics(total, step_time, self.engine.get_lr()[0])
        metrics["data_wait_fraction"] = stats.data_wait / step_time
        metrics["epoch"] = state.epoch
        self.last_metrics = metrics
        stats.reset()
        done = state.step >= self.spec.total_steps
        if self.rank == 0 and (state.step % self.spec.train.log_every == 0 or done):
            self._log_step(metrics, now)
        if done or state.step % self.spec.checkpoint.every_steps == 0:
            self.save(done, metrics)
        self.step_start = time.perf_counter()
        return done

    def _log_step(self, metrics: dict[str, float], now: float) -> None:
        """The step's metrics to MLflow and a progress line to the console (rank 0)."""
        step, total_steps = self.state.step, self.spec.total_steps
        self.metric_logger.log(metrics, step=step)
        recent = self.step_times[-20:]
        eta = (total_steps - step) * sum(recent) / len(recent)
        rate = (step - self.run_start_step) / max(now - self.run_start, 1e-9)
        logger.info(
            "step %d/%d loss %.4f (lm %.4f, routing %.4f, reinforce %.4f) lr %.2e | %.1f samples/s "
            "%.0f tokens/s | %.2f steps/s, data wait %.0f%% | eta %s",
            step, total_steps, metrics["loss"], metrics["lm_loss"], metrics["routing_loss"], metrics["reinforce_loss"],
            metrics["lr"], metrics["samples_per_s"], metrics["tokens_per_s"], rate,
            100 * metrics["data_wait_fraction"], _fmt_eta(eta),
        )  # fmt: skip

    # ---- checkpoint ----------------------------------------------------------------------------

    def save(self, final: bool, metrics: dict[str, float]) -> None:
        """Checkpoint the current step through ``ray.train.report`` (collective).

        A step that is checkpointed already is skipped, unless this is the final checkpoint and the earlier
        one lacks the Hugging Face model: then it is written again as ``checkpoint_<step>_final``.
        """
        import ray.train

        step, save_hf = self.state.step, self.spec.checkpoint.save_hf_model or final
        if self.saved_step == step and (self.saved_hf or not final):
            return  # this step is checkpointed already
        name = f"checkpoint_{step:08d}" + ("_final" if self.saved_step == step else "")
        folder = _save_checkpoint(self.engine, self.state, self.model_dir, save_hf)
        try:
            ray.train.report(
                {**metrics, "step": step, "epoch": self.state.epoch},
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                checkpoint_dir_name=name,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.saved_step, self.saved_hf = step, save_hf

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.flush()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker function. ``config`` is :meth:`WorkerSpec.to_config` (see ``jobs.training.driver.build_trainer``)."""
    recipe = DPNTrainRecipe(WorkerSpec.from_config(config))
    recipe.setup()
    recipe.train()
    recipe.cleanup()


__all__ = [
    "DPNTrainRecipe",
    "StepStats",
    "StepSums",
    "TrainState",
    "WorkerSpec",
    "apply_freezing",
    "deepspeed_config",
    "delayed_start",
    "full_state_dict",
    "load_train_model",
    "make_optimizer",
    "precision_dtype",
    "save_hf_model",
    "setup_engine",
    "train_loop_per_worker",
    "training_dtype",
    "warmup_cosine",
]
