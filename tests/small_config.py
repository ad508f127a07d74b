"""Hand-sized DPN configs shared by the tests: one for the model-level tests (no tokenizer, no checkpoint) and one
that matches `build_tokenizer()` for the processor-level tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dpn_model import DPNConfig

VOCAB, IMAGE, ROUTER, PAD = 120, 98, 99, 0
IMAGE_SIDE, PATCH = 32, 8  # the processor config: 16 visual tokens


def make_config(**overrides) -> DPNConfig:
    """Hidden 64, 4 decoder layers pooling after 1, 2, 3; an 8x8 grid of 64 visual tokens (ids below)."""
    fields = dict(
        text_config=dict(
            model_type="llama", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, pad_token_id=PAD,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, image_size=32, patch_size=4, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=64,
        ),
        image_token_id=IMAGE,
        router_token_id=ROUTER,
        pooling_layers=[1, 2, 3],
        min_visual_tokens=4,
    )  # fmt: skip
    fields.update(overrides)
    return DPNConfig(**fields)


def make_processor_config(tokenizer) -> DPNConfig:
    """Hidden 32, 2 decoder layers pooling after 1; a 32px image in 8px patches (16 visual tokens); ids from `tokenizer`."""
    return DPNConfig(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64,
        ),
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=32, image_size=IMAGE_SIDE, patch_size=PATCH,
            num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        router_token_id=tokenizer.convert_tokens_to_ids("<router>"),
        pooling_layers=[1],
    )  # fmt: skip


def set_constant_router(model, expert_weights: Sequence[float]) -> None:
    """Make every router of `model` (a `DPNForConditionalGeneration`) read the same input whatever the sample
    (its norm outputs its bias, 1; `down` averages it), so expert `e`'s logit is `expert_weights[e]` times one
    fixed positive sum: a router as sure, or as indifferent, as a test needs."""
    with torch.no_grad():
        for stage in model.model.pyramid:
            router = stage.router
            router.norm.weight.zero_()
            router.norm.bias.fill_(1.0)
            router.down.weight.fill_(1.0 / router.down.weight.shape[1])
            for expert, weight in enumerate(expert_weights):
                router.out.weight[expert] = weight
