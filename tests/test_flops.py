"""Analytic FLOPs (`dpn_model.flops`) against `FlopCounterMode` on real tiny models, and DPN sequence-length rules."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dpn_model import DPNConfig
from dpn_model.flops import (
    decoder_layer_flops,
    estimate,
    flop_counter,
    layer_seq_lens_for,
    lm_head_flops,
    pooled_grid,
    prefill_flops,
    prefill_flops_batch,
    projector_flops,
    router_flops,
    vision_tower_flops,
)

IMAGE_TOKEN_ID = 100
ROUTER_TOKEN_ID = 101


def _vision_config(**overrides) -> dict:
    # 32px image, patch 4 -> 8x8 grid of 64 visual tokens (65 with CLS inside the tower).
    cfg = dict(
        model_type="clip_vision_model",
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
    )
    cfg.update(overrides)
    return cfg


def _text_config(**overrides) -> dict:
    # Grouped-query attention and a head_dim that is NOT hidden / heads, so a formula that ignores either is caught.
    cfg = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        vocab_size=128,
    )
    cfg.update(overrides)
    return cfg


def _tiny_llava(attn_implementation: str, **text_overrides) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=_vision_config(),
        text_config=_text_config(**text_overrides),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=64,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def _counted_flops(model: torch.nn.Module, **inputs) -> int:
    counter = flop_counter()  # plain FlopCounterMode misses CPU's fused SDPA kernel
    with torch.no_grad(), counter:
        model(**inputs)
    return counter.get_total_flops()


def _prompt(num_text: int, with_image: bool) -> torch.Tensor:
    text = torch.randint(0, IMAGE_TOKEN_ID, (num_text,))
    if not with_image:
        return text[None]
    image = torch.full((64,), IMAGE_TOKEN_ID)
    return torch.cat([text[:3], image, text[3:]])[None]  # (1, num_text + 64)


@pytest.mark.parametrize("is_causal", [False, True])
def test_flop_counter_counts_sdpa_like_eager_matmuls(is_causal: bool) -> None:
    # GQA shapes: 4 query heads, 2 KV heads; the counter must broadcast KV heads like the GPU formula does.
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    counter = flop_counter()
    with counter:
        F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    eager = FlopCounterMode(display=False)
    with eager:
        scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)
        scores.softmax(-1) @ v.repeat_interleave(2, dim=1)
    assert counter.get_total_flops() == eager.get_total_flops() == 2 * 2 * 2 * 4 * 7 * 7 * 8


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("text_overrides", [{}, {"num_key_value_heads": 4, "head_dim": 16}])
def test_dense_prefill_matches_flop_counter(attn_implementation: str, text_overrides: dict) -> None:
    model = _tiny_llava(attn_implementation, **text_overrides)
    input_ids = _prompt(num_text=11, with_image=True)
    pixel_values = torch.randn(1, 3, 32, 32)
    counted = _counted_flops(model, input_ids=input_ids, pixel_values=pixel_values)

    seq_len = input_ids.shape[1]
    analytic = prefill_flops(model.config, [seq_len] * model.config.text_config.num_hidden_layers)
    # Same counting rules, so the match is exact; the 5% tolerance is the contract, not the expectation.
    assert analytic == pytest.approx(counted, rel=0.05)
    assert analytic == counted


def test_text_only_prefill_and_lm_head_tokens_match_flop_counter() -> None:
    model = _tiny_llava("sdpa")
    input_ids = _prompt(num_text=17, with_image=False)
    counted = _counted_flops(model, input_ids=input_ids, logits_to_keep=1)
    layers = model.config.text_config.num_hidden_layers
    assert prefill_flops(model.config, [17] * layers, num_images=0, lm_head_tokens=1) == counted
    # Counting the image when none ran must be caught.
    assert prefill_flops(model.config, [17] * layers, num_images=1, lm_head_tokens=1) > counted


def test_vision_tower_counts_every_layer_that_runs() -> None:
    model = _tiny_llava("sdpa")
    vision_config = model.config.vision_config
    counted = _counted_flops(model.model.vision_tower, pixel_values=torch.randn(1, 3, 32, 32))
    assert vision_tower_flops(vision_config) == counted
    assert vision_tower_flops(vision_config, layers_run=2) < counted
    with pytest.raises(ValueError, match="layers_run"):
        vision_tower_flops(vision_config, layers_run=4)


def test_component_formulas_by_hand() -> None:
    text = LlavaConfig(text_config=_text_config()).text_config
    # q, o: 2 * 64*96; k, v: 2 * 64*48; MLP: 3 * 64*96; attention: 4 * 24 * 4 per L^2.
    linear = 2 * (2 * 64 * 96) + 2 * (2 * 64 * 48) + 3 * (2 * 64 * 96)
    assert decoder_layer_flops(text, 10) == linear * 10 + 4 * 24 * 4 * 100
    assert lm_head_flops(text, 3) == 2 * 3 * 64 * 128
    assert router_flops(64, 3) == 2 * 64 * 16 + 2 * 16 * 3
    config = LlavaConfig(vision_config=_vision_config(), text_config=_text_config())
    assert projector_flops(config, 5) == 2 * 5 * 32 * 64 + 2 * 5 * 64 * 64


def _dpn_config(**overrides) -> DPNConfig:
    # 20px image, patch 4 -> 5x5 grid: odd, so ceil-mode pooling matters.
    kwargs = dict(
        vision_config=_vision_config(image_size=20),
        text_config=_text_config(num_hidden_layers=5),
        image_token_id=IMAGE_TOKEN_ID,
        router_token_id=ROUTER_TOKEN_ID,
        pooling_layers=[1, 2, 3],
        min_visual_tokens=5,
    )
    kwargs.update(overrides)
    return DPNConfig(**kwargs)


def test_pooled_grid_is_ceil_mode() -> None:
    assert pooled_grid((5, 5), (2, 2)) == (3, 3)
    assert pooled_grid((5, 5), (1, 2)) == (5, 3)
    assert pooled_grid((24, 24), (2, 2)) == (12, 12)
    assert pooled_grid((3, 1), (2, 2)) == (2, 1)
    assert pooled_grid((7, 4), (1, 1)) == (7, 4)


def test_layer_seq_lens_on_odd_grid_with_min_visual_tokens_skip() -> None:
    config = _dpn_config()
    assert config.vision_grid == (5, 5)
    # 4x: 25 -(after 1)-> 3x3=9 -(after 2)-> 2x2=4 -(after 3: 4 < 5, skipped)-> 4.
    assert layer_seq_lens_for(config, 10, 4) == [35, 19, 14, 14, 14]
    # 2x with stride (1, 2): 5x5 -> 5x3 -> 5x2 -> 5x1.
    assert layer_seq_lens_for(config, 10, 2) == [35, 25, 20, 15, 15]
    assert layer_seq_lens_for(config, 10, 1) == [35] * 5
    # At exactly min_visual_tokens the pooling still happens: 4 >= 4 -> 1x1.
    assert layer_seq_lens_for(_dpn_config(min_visual_tokens=4), 10, 4) == [35, 19, 14, 11, 11]
    with pytest.raises(ValueError, match="compression 3"):
        layer_seq_lens_for(config, 10, 3)


def test_estimate_breakdown_adds_up() -> None:
    config = _dpn_config()
    result = estimate(config, text_len=10, compression=4)
    parts = ("vision", "projector", "decoder", "router", "lm_head")
    assert result["total"] == sum(result[p] for p in parts)
    assert result["total"] == prefill_flops(config, result["layer_seq_lens"], num_routed_layers=0)
    assert result["visual_tokens_per_layer"] == [25, 9, 4, 4, 4]
    assert 0 < result["saving"] < 1
    # At 1x the decoder runs at full length: forced, it costs what plain LLaVA costs; routed, the routers add.
    dense = estimate(config, text_len=10, compression=1)
    assert dense["dense_total"] == result["dense_total"] == dense["total"]
    routed = estimate(config, text_len=10, compression=1, routed=True)
    assert routed["total"] - routed["dense_total"] == 3 * router_flops(64, 3) > 0


def test_batched_matches_single() -> None:
    config = _dpn_config()
    torch.manual_seed(0)
    lens = torch.randint(1, 300, (6, 5))
    has_image = torch.tensor([True, False, True, True, False, True])
    head_tokens = torch.tensor([1, 3, 7, 1, 9, 300])
    routed = torch.tensor([3, 0, 1, 2, 0, 3])

    batched = prefill_flops_batch(config, lens, has_image, head_tokens, routed)
    assert batched.shape == (6,) and batched.dtype == torch.float64
    expected = [
        prefill_flops(config, row.tolist(), int(img), int(head), int(r))
        for row, img, head, r in zip(lens, has_image, head_tokens, routed)
    ]
    assert batched.tolist() == [float(e) for e in expected]

    # Defaults: lm_head on the last layer's length, routers on the pooling layers of image samples only.
    defaults = prefill_flops_batch(config, lens, has_image)
    expected = [prefill_flops(config, row.tolist(), int(img)) for row, img in zip(lens, has_image)]
    assert defaults.tolist() == [float(e) for e in expected]

    with pytest.raises(ValueError, match="shape"):
        prefill_flops_batch(config, lens[:, :4], has_image)
