"""Turn a llava-hf checkpoint directory into a DPN checkpoint directory.

Weights are copied unchanged (vision tower, projector, Llama decoder, lm head); `<router>` is added to the
tokenizer and, if the vocabulary has no free row for it, the embeddings grow by one row (initialised to the
mean embedding). The new router weights are freshly initialised: a converted model at `compression=1`
gives exactly the LLaVA checkpoint's outputs, and learns to route by fine-tuning (the paper's recipe).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from dpn_model.image_processing import DPNImageProcessor
from dpn_model.modeling import DPNForConditionalGeneration
from dpn_model.processing import DPNProcessor
from dpn_model.tokenization import add_dpn_special_tokens

logger = logging.getLogger(__name__)


def _image_processor_from(llava_dir: Path, image_size: int) -> DPNImageProcessor:
    """DPN image processor with the checkpoint's CLIP mean/std and sizes (defaults when not saved)."""
    kwargs: dict[str, Any] = {"size": {"shortest_edge": image_size}, "crop_size": {"height": image_size, "width": image_size}}
    path = llava_dir / "preprocessor_config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        for key in ("image_mean", "image_std", "size", "crop_size", "rescale_factor"):
            if key in saved:
                kwargs[key] = saved[key]
    return DPNImageProcessor(**kwargs)


def convert_llava_checkpoint(llava_dir: str | Path, out_dir: str | Path, **dpn_options: Any) -> Path:
    """Convert a local llava-hf checkpoint directory (weights + tokenizer) to DPN and save it.

    Args:
        llava_dir (`str` or `Path`): directory with a LLaVA `config.json`, weights and tokenizer files.
        out_dir (`str` or `Path`): where the DPN checkpoint (model, tokenizer, processor) is written.
        **dpn_options: DPNConfig pooling fields, e.g. `pooling_layers=[8, 16, 24]`, `pooling_type="max"`.

    Returns:
        `Path`: `out_dir`.
    """
    llava_dir, out_dir = Path(llava_dir), Path(out_dir)
    if not (llava_dir / "config.json").exists():
        raise FileNotFoundError(f"{llava_dir} is not a checkpoint directory: it has no config.json")
    logger.info("loading LLaVA checkpoint from %s", llava_dir)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    ids = add_dpn_special_tokens(tokenizer)
    if ids["image_token_id"] != llava.config.image_token_id:
        raise ValueError(
            f"the tokenizer's <image> id {ids['image_token_id']} differs from the model's image_token_id "
            f"{llava.config.image_token_id}: tokenizer and weights do not belong together"
        )
    router_id = ids["router_token_id"]
    vocab = llava.config.text_config.vocab_size
    model = DPNForConditionalGeneration.from_llava(
        llava, router_token_id=router_id if router_id < vocab else None, **dpn_options
    )
    if model.config.router_token_id != router_id:
        raise ValueError(f"router token id mismatch: tokenizer {router_id}, model {model.config.router_token_id}")
    image_processor = _image_processor_from(llava_dir, model.config.vision_config.image_size)
    processor = DPNProcessor(image_processor, tokenizer, image_seq_length=model.config.image_seq_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    logger.info(
        "wrote DPN checkpoint to %s (router token id %d, pooling after layers %s)",
        out_dir, router_id, model.config.pooling_layers,
    )
    return out_dir


__all__ = ["convert_llava_checkpoint"]
