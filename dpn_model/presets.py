"""Named model sizes. The tiny preset is the 7B model's code with a smaller config: nothing special-cased.

- `tiny`: trains on 2 CPU cores in minutes; 64 px images, patch 4, a 16x16 visual grid.
- `mid`: a mid-size model for benchmarks (CLIP-B-like tower, 8-layer decoder of width 512).
- `llava-1.5-7b`: the exact shapes of LLaVA-1.5-7B (CLIP-L/336, Llama-2-7B), pooling after 8, 16, 24.
"""

from __future__ import annotations

from typing import Any

from dpn_model.configuration import DPNConfig

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision_config": dict(
            # a light tower, so the decoder dominates prefill FLOPs as in LLaVA-1.5-7B (vision ~4% there)
            model_type="clip_vision_model",
            image_size=64,
            patch_size=4,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        "text_config": dict(
            model_type="llama",
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        ),
        "pooling_layers": [1, 2, 3],
    },
    "mid": {
        "vision_config": dict(
            model_type="clip_vision_model",
            image_size=224,
            patch_size=14,
            hidden_size=384,
            intermediate_size=1536,
            num_hidden_layers=6,
            num_attention_heads=6,
        ),
        "text_config": dict(
            model_type="llama",
            hidden_size=512,
            intermediate_size=1376,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
        ),
        "pooling_layers": [2, 4, 6],
    },
    "llava-1.5-7b": {
        "vision_config": dict(
            model_type="clip_vision_model",
            image_size=336,
            patch_size=14,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            projection_dim=768,
        ),
        "text_config": dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
        "pooling_layers": [8, 16, 24],
        # llava-hf's vocabulary: 32000 Llama tokens, <image> = 32000, <pad> = 32001, padded to 32064;
        # `dpn convert` appends <router> = 32064.
        "token_ids": dict(
            vocab_size=32065,
            image_token_id=32000,
            router_token_id=32064,
            pad_token_id=32001,
            bos_token_id=1,
            eos_token_id=2,
        ),
    },
}


def preset_config(
    name: str,
    *,
    vocab_size: int | None = None,
    image_token_id: int | None = None,
    router_token_id: int | None = None,
    pad_token_id: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    **overrides: Any,
) -> DPNConfig:
    """The `DPNConfig` of a preset, with token ids from the tokenizer it will be used with.

    Args:
        name (`str`): one of `PRESETS`.
        vocab_size, image_token_id, router_token_id, pad_token_id, bos_token_id, eos_token_id:
            from the tokenizer (`dpn_model.tokenization`); the 7B preset has llava-hf's ids built in.
        **overrides: any other DPNConfig field (e.g. `pooling_type="avg"`).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    ids = dict(preset.get("token_ids", {}))
    given = dict(
        vocab_size=vocab_size,
        image_token_id=image_token_id,
        router_token_id=router_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    ids.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in ("vocab_size", "image_token_id", "router_token_id") if k not in ids]
    if missing:
        raise ValueError(f"preset {name!r} needs {missing} from its tokenizer (see dpn_model.tokenization)")
    text_config = dict(preset["text_config"], vocab_size=ids["vocab_size"])
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if key in ids:
            text_config[key] = ids[key]
    fields = dict(
        vision_config=dict(preset["vision_config"]),
        text_config=text_config,
        image_token_id=ids["image_token_id"],
        router_token_id=ids["router_token_id"],
        pooling_layers=list(preset["pooling_layers"]),
    )
    fields.update(overrides)
    return DPNConfig(**fields)


__all__ = ["PRESETS", "build_model", "create_checkpoint", "preset_config", "token_ids"]


def token_ids(tokenizer: Any) -> dict[str, int]:
    """The config fields a tokenizer decides: the vocabulary size and the special token ids."""
    from dpn_model.tokenization import IMAGE_TOKEN, ROUTER_TOKEN

    return dict(
        vocab_size=len(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        router_token_id=tokenizer.convert_tokens_to_ids(ROUTER_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_model(name: str, seed: int = 0, tokenizer=None, **overrides: Any):
    """A randomly initialised model of a preset, with its processor.

    The tiny and mid presets get a tokenizer trained locally (`build_tokenizer`); pass `tokenizer` to use
    another one (it must hold `<image>` and `<router>`). The 7B preset needs a real llava-hf tokenizer, so
    use `dpn convert` on a checkpoint instead; here it is only buildable without a processor.

    Returns:
        `(DPNForConditionalGeneration, DPNProcessor | None)`
    """
    import torch

    from dpn_model.modeling import DPNForConditionalGeneration
    from dpn_model.processing import DPNProcessor
    from dpn_model.tokenization import build_tokenizer

    if tokenizer is None and "token_ids" not in PRESETS[name]:
        tokenizer = build_tokenizer()
    processor = None
    if tokenizer is not None:
        config = preset_config(name, **token_ids(tokenizer), **overrides)
    else:
        config = preset_config(name, **overrides)
    torch.manual_seed(seed)
    model = DPNForConditionalGeneration(config)
    if tokenizer is not None:
        processor = DPNProcessor.from_model_config(config, tokenizer)
    return model, processor


def create_checkpoint(name: str, out_dir: str, seed: int = 0, **overrides: Any) -> str:
    """Save a random model of a preset and its processor to `out_dir` (safetensors), ready for
    `from_pretrained`, training, evaluation and serving. Returns `out_dir`."""
    model, processor = build_model(name, seed=seed, **overrides)
    model.save_pretrained(out_dir)
    if processor is not None:
        processor.save_pretrained(out_dir)
    return out_dir
