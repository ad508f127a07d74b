"""Model loading for serving: one function, `load_model(model_ref) -> (model, processor)`, that tests can replace.

`model_ref` is any model reference (`dpn_base.model_ref.ModelRef`, parsed once here): a local Hugging Face
checkpoint directory (safetensors, as `dpn_model.presets.create_checkpoint` or training writes it, or a folder
holding one), an MLflow reference (`models:/dpn@champion`, `models:/dpn/3`, `runs:/<id>/model`,
`mlflow-artifacts:/...`) or `preset:tiny`. Everything but a local directory is resolved by
`tracking.resolve_model_dir`, imported only then, so serving a local directory needs no MLflow. `preset:tiny` serves
a random model of that preset (seed 0), created in a temporary directory: a way to try the endpoint before any
training.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from dpn_base.model_ref import ModelRef
from dpn_model.loading import pick_device, pick_dtype

logger = logging.getLogger(__name__)


def resolve_model_ref(model_ref: str | ModelRef) -> str:
    """A local checkpoint directory for `model_ref` (downloads MLflow models to a local cache).

    Raises:
        ValueError: a reference that does not parse (the message lists the accepted forms), or an unknown preset.
        FileNotFoundError: it names nothing loadable.
    """
    ref = ModelRef.parse(model_ref)
    if ref.is_local:
        return ref.hf_dir()  # the one kind that needs no MLflow import
    from tracking import resolve_model_dir

    preset_dir = None
    if ref.is_preset:
        preset_dir = os.path.join(tempfile.gettempdir(), f"dpn-serve-preset-{ref.preset_name}-{os.getpid()}")
        logger.info(
            "serving a random %s model from %s (preset ref: for trying the endpoint, not for answers)",
            ref.preset_name,
            preset_dir,
        )
    return resolve_model_dir(ref, preset_dir=preset_dir, preset_seed=0)


def load_model(
    model_ref: str, device: str = "auto", dtype: str = "auto", encoder_cache_bytes: int = 0
) -> tuple[Any, Any]:
    """Load a DPN model (eval mode, on `device`, in `dtype`) and its processor from `model_ref`.

    Args:
        model_ref: a model reference (see :func:`resolve_model_ref`).
        device: `auto` (GPU when present), `cpu`, `cuda`, `cuda:1`, ...
        dtype: `auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`, `float16`.
        encoder_cache_bytes: bytes of the vision-encoder cache attached to the model (`dpn_model.EncoderCache`:
            repeated images skip the vision tower); 0 attaches none.

    Returns:
        `(DPNForConditionalGeneration, DPNProcessor)`
    """
    from dpn_model.loading import load_model_and_processor

    path = resolve_model_ref(model_ref)
    logger.info("loading model %s from %s", model_ref, path)
    model, processor = load_model_and_processor(path, device=device, dtype=dtype)
    if encoder_cache_bytes:
        from dpn_model.encoder_cache import EncoderCache

        model.set_encoder_cache(EncoderCache(encoder_cache_bytes))
    return model, processor


__all__ = ["load_model", "pick_device", "pick_dtype", "resolve_model_ref"]
