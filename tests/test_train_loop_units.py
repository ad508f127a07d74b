"""The training loop's pieces that need no Ray (issue 28, item 3): a step's named sums and the worker's spec.

`StepStats` counts one optimizer step in named fields (`StepSums`) and reduces them over the workers with
one `all_reduce`; `WorkerSpec` carries the training config's own validated sections to the workers, as plain
JSON data that the worker validates again.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from jobs.config import load_config
from jobs.training.config import TrainConfig
from jobs.training.driver import build_loop_spec
from jobs.training.loop import SCALAR_FIELDS, DPNTrainRecipe, StepStats, StepSums, WorkerSpec

# ------------------------------------------------------------------------------------------------- StepStats


def model_output(loss: float, choices: list[list[int]] | None, **losses: float | None) -> SimpleNamespace:
    """What the model's forward gives `StepStats.add`: losses as 0-d tensors (None: not computed)."""
    named = {"lm_loss": None, "routing_loss": None, "reinforce_loss": None, **losses}
    return SimpleNamespace(
        loss=torch.tensor(loss),
        **{k: None if v is None else torch.tensor(v) for k, v in named.items()},
        expert_choices=None if choices is None else torch.tensor(choices),
    )


def two_micro_batches() -> StepStats:
    """Two pooling layers, experts of factors 1, 2, 4: one routed micro-batch and one dense (no choices)."""
    stats = StepStats(num_pool_layers=2, factors=[1, 2, 4])
    # layer 0: factors 1, 4, 2; layer 1: 4, not pooled, not pooled
    stats.add(model_output(3.0, [[0, 2], [2, -1], [1, -1]], lm_loss=2.0, routing_loss=1.0), 3, 40)
    stats.add(model_output(1.0, None, lm_loss=1.0, reinforce_loss=0.5), 2, 20)
    return stats


def test_step_stats_sums_each_quantity_in_its_named_field():
    sums = two_micro_batches().sums
    assert (sums.loss, sums.lm_loss, sums.routing_loss, sums.reinforce_loss) == (4.0, 3.0, 1.0, 0.5)
    assert (sums.micro_batches, sums.samples, sums.tokens) == (2, 5, 60)
    assert sums.compression_sum.tolist() == [1 + 4 + 2, 4]
    assert sums.compression_count.tolist() == [3, 1]


def test_step_stats_metrics_are_the_means_and_rates_of_the_step():
    stats = two_micro_batches()
    metrics = stats.metrics(stats.reduce(), step_time=2.0, lr=0.1)
    assert metrics == pytest.approx({
        "loss": 2.0,  # per micro-batch
        "lm_loss": 1.5,
        "routing_loss": 0.5,
        "reinforce_loss": 0.25,
        "samples_per_s": 2.5,
        "tokens_per_s": 30.0,
        "lr": 0.1,
        "step_time_s": 2.0,
        "compression_layer0": 7 / 3,  # per sample pooled at the layer
        "compression_layer1": 4.0,
    })  # fmt: skip


def test_a_layer_no_sample_was_pooled_at_logs_no_compression():
    stats = StepStats(num_pool_layers=2, factors=[1, 2, 4])
    stats.add(model_output(1.0, [[1, -1]]), 1, 10)
    metrics = stats.metrics(stats.reduce(), step_time=1.0, lr=0.0)
    assert metrics["compression_layer0"] == 2.0 and "compression_layer1" not in metrics


def test_reset_starts_the_next_step_from_zero():
    stats = two_micro_batches()
    stats.data_wait = 1.5
    stats.reset()
    assert stats.sums.pack().tolist() == [0.0] * (len(SCALAR_FIELDS) + 2 * 2) and stats.data_wait == 0.0


def test_step_sums_pack_into_one_tensor_and_back():
    sums = two_micro_batches().sums
    packed = sums.pack()
    assert packed.dtype == torch.float64 and packed.shape == (len(SCALAR_FIELDS) + 2 * 2,)
    assert SCALAR_FIELDS == (
        "loss", "lm_loss", "routing_loss", "reinforce_loss", "micro_batches", "samples", "tokens"
    )  # fmt: skip
    back = StepSums.unpack(packed, 2)
    assert [getattr(back, name) for name in SCALAR_FIELDS] == [getattr(sums, name) for name in SCALAR_FIELDS]
    assert torch.equal(back.compression_sum, sums.compression_sum)
    assert torch.equal(back.compression_count, sums.compression_count)


def test_reduce_sums_over_workers_in_one_all_reduce(monkeypatch):
    """Two workers that counted the same: every sum doubles, the means stay, the rates double; one
    collective."""
    calls = []

    def all_reduce(tensor):  # what gloo's SUM gives two workers holding equal tensors
        calls.append(tensor.clone())
        tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stats = two_micro_batches()
    total = stats.reduce()
    assert len(calls) == 1 and torch.equal(calls[0], stats.sums.pack())
    assert (total.samples, total.micro_batches, total.compression_count.tolist()) == (10, 4, [6, 2])
    metrics = stats.metrics(total, step_time=2.0, lr=0.1)
    assert (
        metrics["loss"] == 2.0 and metrics["samples_per_s"] == 5.0 and metrics["compression_layer0"] == 7 / 3
    )
    assert stats.sums.samples == 5  # the worker's own sums are left alone


# ------------------------------------------------------------------------------------------------ WorkerSpec

CONFIG = {
    "model": {
        "compression": "1,2,4",
        "seed": 7,
        "freeze_vision_tower": False,
        "freeze_projector": True,
        "config_overrides": {"routing_loss_weight": 0.5},
    },
    "optim": {"lr": 3e-4, "betas": [0.8, 0.99], "router_lr_scale": 2.0, "warmup_ratio": 0.1},
    "train": {"micro_batch_size": 2, "grad_accum_steps": 3, "log_every": 5},
    "checkpoint": {"every_steps": 4, "save_hf_model": False},
    "run": {"use_gpu": False, "num_workers": 2},
}


def spec_for(data: dict, model_dir: str = "model") -> tuple[TrainConfig, WorkerSpec]:
    cfg = load_config(TrainConfig, data=data)
    return cfg, build_loop_spec(cfg, model_dir, 12, "run-1", "sqlite:///mlflow.db")


def test_the_spec_holds_the_configs_validated_sections_and_what_the_driver_derives():
    cfg, spec = spec_for(CONFIG)
    assert (spec.model, spec.optim, spec.train, spec.checkpoint) == (
        cfg.model,
        cfg.optim,
        cfg.train,
        cfg.checkpoint,
    )
    assert (spec.model_dir, spec.total_steps, spec.mlflow_run_id, spec.tracking_uri) == (
        "model", 12, "run-1", "sqlite:///mlflow.db"
    )  # fmt: skip
    assert spec.dist_backend == "gloo"
    ds = spec.ds_config
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 2 * 3 * 2  # micro batch x accumulation x workers


def test_to_config_is_plain_json_data_that_rebuilds_the_spec():
    _, spec = spec_for(CONFIG)
    config = spec.to_config()
    assert json.loads(json.dumps(config)) == config  # nothing but JSON types
    assert config["optim"]["lr"] == 3e-4 and config["model"]["compression"] == "1,2,4"
    assert WorkerSpec.from_config(config) == spec
    assert WorkerSpec.from_config(json.loads(json.dumps(config))) == spec


@pytest.mark.parametrize(
    ("section", "change", "key"),
    [
        ("optim", {"lr": 0}, "optim.lr"),
        ("train", {"micro_batch_size": "two"}, "train.micro_batch_size"),
        ("checkpoint", {"every_step": 4}, "checkpoint.every_step"),  # a misspelt key is refused, not dropped
        ("model", {"compression": "fast"}, "model.compression"),
    ],
)
def test_a_bad_section_fails_on_the_worker_naming_its_key(section, change, key):
    _, spec = spec_for(CONFIG)
    config = spec.to_config()
    config[section] = {**config[section], **change}
    with pytest.raises(ValidationError, match=rf"(?m)^{key}$"):
        WorkerSpec.from_config(config)


def test_a_missing_section_fails_naming_it():
    _, spec = spec_for(CONFIG)
    config = spec.to_config()
    del config["checkpoint"]
    with pytest.raises(ValidationError, match=r"(?m)^checkpoint\n  Field required"):
        WorkerSpec.from_config(config)


def test_a_preset_is_loaded_without_the_overrides_it_was_built_with():
    _, spec = spec_for(CONFIG)  # init: preset:tiny
    assert spec.model.load_overrides == {}
    assert spec.model.config_overrides == {
        "routing_loss_weight": 0.5
    }  # to re-create the preset on other nodes


def test_the_worker_builds_its_model_from_the_sections_it_was_handed(small_checkpoint: Path):
    """A checkpoint's overrides applied at load time, freezing per `model.freeze_*`, compression parsed
    against the loaded model: from the spec as Ray hands it over."""
    data = {**CONFIG, "model": {**CONFIG["model"], "init": str(small_checkpoint)}}
    _, spec = spec_for(data, model_dir=str(small_checkpoint))
    recipe = DPNTrainRecipe(WorkerSpec.from_config(spec.to_config()))
    recipe.model_dir = str(small_checkpoint)  # what setup() takes from _local_model_dir
    model, counts = recipe._setup_model()
    assert model.config.routing_loss_weight == 0.5
    assert recipe.routed_compression == (1, 2, 4)
    projector = list(model.model.multi_modal_projector.parameters())
    assert not any(p.requires_grad for p in projector)
    assert all(p.requires_grad for p in model.model.vision_tower.parameters())
    assert counts["trainable"] == counts["total"] - sum(p.numel() for p in projector)
