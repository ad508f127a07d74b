"""Model loading for serving: one function, `load_model(model_ref) -> (model, processor)`, that tests can replace.

`model_ref` is a local Hugging Face checkpoint directory (safetensors, as `dpn_model.presets.create_checkpoint`
or training writes it) or an MLflow model URI (`models:/dpn@champion`, `models:/dpn/3`, `runs:/<id>/model`),
resolved to a local directory by `tracking.resolve_model_dir` (imported only for such refs, so serving a
local directory needs no MLflow). `preset:tiny` serves a random model of that preset (seed 0), created in a temporary
directory: a way to try the endpoint before any training.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from dpn_model.loading import pick_device, pick_dtype

logger = logging.getLogger(__name__)

_MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_model_ref(model_ref: str) -> str:
    """A local checkpoint directory for `model_ref` (downloads MLflow models to a local cache)."""
    if model_ref.startswith("preset:"):
        import tempfile

        from dpn_model.presets import create_checkpoint

        name = model_ref.split(":", 1)[1]
        out_dir = os.path.join(tempfile.gettempdir(), f"dpn-serve-preset-{name}-{os.getpid()}")
        logger.info(
            "creating a random %s model in %s (preset ref: for trying the endpoint, not for answers)",
            name,
            out_dir,
        )
        return create_checkpoint(name, out_dir, seed=0)
    if model_ref.startswith(_MLFLOW_SCHEMES):
        from tracking import resolve_model_dir  # lazy: MLflow only for registry refs

        return str(resolve_model_dir(model_ref))
    path = os.path.expanduser(model_ref)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        # an MLflow model folder or a training checkpoint (hf_model/ inside): let the tracking module find it
        from tracking import resolve_model_dir

        return str(resolve_model_dir(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"model {model_ref!r} is neither a local checkpoint directory nor an MLflow URI "
            f"({', '.join(s + '...' for s in _MLFLOW_SCHEMES)}) nor preset:NAME; create one with "
            "`dpn_model.presets.create_checkpoint('tiny', DIR)` or train one"
        )
    return path


def load_model(
    model_ref: str, device: str = "auto", dtype: str = "auto", encoder_cache_bytes: int = 0
) -> tuple[Any, Any]:
    """Load a DPN model (eval mode, on `device`, in `dtype`) and its processor from `model_ref`.

    Args:
        model_ref: local checkpoint directory or MLflow model URI.
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
