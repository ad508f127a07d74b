"""A training worker loads the weights in the dtype DeepSpeed trains in (issue 27, item 4: scale-out memory).

DeepSpeed casts every parameter to bf16 / fp16 when that mode is on, so a worker that loaded fp32 first held fp32
weights until then (a 7B model's: 28 GB instead of 14 GB) and upcast bf16 checkpoints for nothing. These tests load a
small checkpoint through the worker's own model setup (`DPNTrainRecipe._setup_model`, no Ray) with the
`WorkerSpec` the driver builds (`jobs.training.driver.build_loop_spec`), so the dtype comes from where the precision
is resolved. dpn_model keeps no module in fp32 by design (no `_keep_in_fp32_modules`; DeepSpeed would cast it
anyway), so every parameter is expected in the training dtype; buffers (rotary frequencies) stay as saved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from jobs.config import load_config
from jobs.training.config import TrainConfig
from jobs.training.driver import build_loop_spec
from jobs.training.loop import DPNTrainRecipe, WorkerSpec, precision_dtype, training_dtype


def worker_spec(precision: str, use_gpu: bool, model_dir: str = "model") -> WorkerSpec:
    """What the driver hands a worker for `deepspeed.precision=<precision>`, `run.use_gpu=<use_gpu>`."""
    data = {"deepspeed": {"precision": precision}, "run": {"use_gpu": use_gpu}}
    return build_loop_spec(load_config(TrainConfig, data=data), model_dir, 2, "", "")


def worker_model(model_dir: Path, precision: str) -> torch.nn.Module:
    """The model a CPU worker builds before DeepSpeed wraps it."""
    recipe = DPNTrainRecipe(worker_spec(precision, use_gpu=False, model_dir=str(model_dir)))
    recipe.model_dir = str(model_dir)  # what setup() takes from _local_model_dir
    model, _ = recipe._setup_model()
    return model


@pytest.mark.parametrize(
    ("precision", "use_gpu", "expected"),
    [
        ("auto", False, torch.float32),
        ("auto", True, torch.bfloat16),
        ("bf16", False, torch.bfloat16),
        ("bf16", True, torch.bfloat16),
        ("fp16", True, torch.float16),
        ("fp32", False, torch.float32),
        ("fp32", True, torch.float32),
    ],
)
def test_worker_dtype_follows_the_resolved_precision(precision: str, use_gpu: bool, expected: torch.dtype):
    """Each `deepspeed.precision` (auto = bf16 on GPU, fp32 on CPU) gives the worker the dtype DeepSpeed will
    train in, read from the DeepSpeed config the driver built."""
    spec = worker_spec(precision, use_gpu)
    assert training_dtype(spec.ds_config) == expected
    assert (
        training_dtype(WorkerSpec.from_config(spec.to_config()).ds_config) == expected
    )  # as Ray hands it on


def test_precision_dtype_maps_resolved_values_and_refuses_the_rest():
    assert precision_dtype("bf16") == torch.bfloat16
    assert precision_dtype("fp16") == torch.float16
    assert precision_dtype("fp32") == torch.float32
    for unresolved in ("auto", "float8", ""):
        with pytest.raises(ValueError, match="not resolved"):
            precision_dtype(unresolved)
    with pytest.raises(ValueError, match="both bf16 and fp16"):
        training_dtype({"bf16": {"enabled": True}, "fp16": {"enabled": True}})


def test_worker_loads_bf16_for_bf16_and_fp32_for_auto_on_cpu(small_checkpoint: Path):
    bf16 = worker_model(small_checkpoint, "bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    auto = worker_model(small_checkpoint, "auto")  # auto on CPU resolves to fp32
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    # buffers keep their saved dtype in both (DeepSpeed's cast leaves them alone too)
    assert {n: b.dtype for n, b in bf16.named_buffers()} == {n: b.dtype for n, b in auto.named_buffers()}


def test_bf16_load_equals_fp32_load_then_cast(small_checkpoint: Path):
    """Loading in bf16 loses nothing beyond the cast DeepSpeed would have made of the fp32 load: every parameter
    is bit-identical to the fp32 one cast to bf16, and every buffer equals the fp32 load's."""
    bf16 = worker_model(small_checkpoint, "bf16")
    fp32 = worker_model(small_checkpoint, "fp32")
    fp32_params = dict(fp32.named_parameters())
    assert fp32_params.keys() == dict(bf16.named_parameters()).keys()
    for name, p in bf16.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, fp32_params[name].to(torch.bfloat16)), name
        assert p.requires_grad == fp32_params[name].requires_grad, name
    fp32_buffers = dict(fp32.named_buffers())
    for name, b in bf16.named_buffers():
        assert b.dtype == fp32_buffers[name].dtype and torch.equal(b, fp32_buffers[name]), name
