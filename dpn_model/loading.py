"""Loading a saved DPN checkpoint: `load_model_and_processor(path, device, dtype)`, the one local loader.

Evaluation, serving and the MLflow pyfunc all load through it; references that are not local directories
(`runs:/`, `models:/`) are resolved first by `tracking.models.load_model_and_processor_from_ref`. A checkpoint's
config with fields overridden (training's `model.config_overrides`) comes from [`load_dpn_config`].
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

import torch

from dpn_model.configuration import DPNConfig

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str = "auto") -> str:
    """`auto` = the GPU when there is one, else the CPU; anything else as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto` = bf16 on GPU, fp32 on CPU; names as `float32`/`fp32`, `bfloat16`/`bf16`, `float16`/`fp16`."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_dpn_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> DPNConfig:
    """The `DPNConfig` of a checkpoint directory with `overrides` (DPNConfig fields) applied and validated.

    Each override is checked as a constructor argument is ([`DPNConfig.from_dict`]). A key that is no field or
    attribute of the config raises: transformers would drop it silently, and a typo'd override (say
    `routing_los_weight`) would train with the saved value while the run's config shows the intended one.

    Raises:
        `ValueError`: an invalid value, or a key the config does not have (named, with close field names).
    """
    config, unused = DPNConfig.from_pretrained(
        os.fspath(path), return_unused_kwargs=True, **(overrides or {})
    )
    if unused:
        fields = DPNConfig.override_fields()
        hints = {key: difflib.get_close_matches(key, fields, n=2) for key in sorted(unused)}
        named = ", ".join(
            f"{key!r} (did you mean {' or '.join(h)}?)" if h else repr(key) for key, h in hints.items()
        )
        raise ValueError(
            f"config override(s) {named} name no DPNConfig field; fix or remove them "
            f"(LLaVA and DPN fields: {', '.join(fields)})"
        )
    return config


def load_model_and_processor(
    path: str | os.PathLike, device: str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load a DPN model (eval mode, safetensors only) and its processor from a local checkpoint directory.

    Args:
        path: directory written by `save_pretrained` (training, `dpn_model.presets.create_checkpoint`).
        device: `auto` (GPU when present), `cpu`, `cuda`, `cuda:1`, ...; `None` leaves the model where it loads.
        dtype: a `torch.dtype` or a name (`auto` = bf16 on GPU, fp32 on CPU, see [`pick_dtype`]); `None` loads
            with transformers' default.

    Returns:
        `(DPNForConditionalGeneration, DPNProcessor)`
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import dpn_model  # noqa: F401 - registers dpn_llava with the Auto classes

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a checkpoint directory; create one with dpn_model.presets.create_checkpoint('tiny', "
            "DIR) or train one (MLflow references: "
            "tracking.models.load_model_and_processor_from_ref)"
        )
    resolved_device = None if device is None else pick_device(device)
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = pick_dtype(dtype, resolved_device or "cpu")
    logger.info("loading model %s on %s (%s)", path, resolved_device or "default device", kwargs.get("dtype"))
    model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    if resolved_device is not None:
        model = model.to(resolved_device)
    return model.eval(), AutoProcessor.from_pretrained(path)


__all__ = ["load_dpn_config", "load_model_and_processor", "pick_device", "pick_dtype"]
