"""Analytic prefill FLOPs of a LLaVA / DPN model, the way `torch.utils.flop_counter.FlopCounterMode` counts them.

Counting rules (the same as `FlopCounterMode`, so the two can be compared directly):

- a multiply-add is 2 FLOPs; a linear layer on `T` tokens mapping `d_in -> d_out` costs `2 * T * d_in * d_out`
  (the bias add is not counted); a convolution costs `2 * out_positions * C_out * C_in / groups * kh * kw`.
- attention counts `Q @ K^T` and `attn @ V` over the full `L x L` score matrix of every query head,
  `2 * 2 * L * L * head_dim * num_heads`, exactly as `FlopCounterMode` counts `scaled_dot_product_attention`
  (and the two `matmul`s of eager attention). The causal mask is NOT used to halve it, and grouped-query
  attention costs the same as full multi-head attention here (KV heads are broadcast to the query heads).
- caveat: on CPU, `torch.nn.functional.scaled_dot_product_attention` runs the fused kernel
  `aten._scaled_dot_product_flash_attention_for_cpu`, which plain `FlopCounterMode` does not know and counts as 0.
  Use [`flop_counter`] to measure: it adds that kernel with the same formula the GPU SDPA kernels have.
- norms, rotary embeddings, softmax, activations, residual adds, embedding lookups and max/avg pooling are not
  counted: they are not matmuls and `FlopCounterMode` ignores them too.

Prefill means one forward over the whole prompt without a KV cache. All public functions return exact Python ints,
except `prefill_flops_batch`, which returns a `float64` tensor so the model can call it every forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from dpn_model.pooling import pooled_grid

# ----------------------------------------------------------------------------- building blocks


def _linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def _head_dim(text_config: Any) -> int:
    # Llama configs may set head_dim explicitly (it need not equal hidden_size / num_attention_heads).
    head_dim = getattr(text_config, "head_dim", None)
    return int(head_dim) if head_dim else text_config.hidden_size // text_config.num_attention_heads


def _decoder_coefficients(text_config: Any) -> tuple[int, int]:
    """FLOPs of one decoder layer as `linear * L + quadratic * L**2` for a sequence of `L` tokens."""
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = _head_dim(text_config)
    q_o = 2 * _linear(1, hidden, heads * head_dim)  # q_proj and o_proj
    k_v = 2 * _linear(1, hidden, kv_heads * head_dim)  # k_proj and v_proj
    mlp = 3 * _linear(1, hidden, text_config.intermediate_size)  # gate, up, down
    attention = 2 * 2 * head_dim * heads  # Q @ K^T and attn @ V, times L * L
    return q_o + k_v + mlp, attention


def vision_tower_flops(vision_config: Any, layers_run: int | None = None) -> int:
    """FLOPs of the CLIP vision tower on one image.

    Counts the patch-embedding convolution and, for every encoder layer that runs, the q/k/v/out projections,
    attention and the fc1/fc2 MLP on `num_patches + 1` tokens (the CLS token included). LLaVA reads its features
    from `vision_feature_layer` (-2 by default), but Hugging Face's `CLIPVisionModel` still runs every encoder
    layer, so by default all `num_hidden_layers` are counted.

    Args:
        vision_config (`CLIPVisionConfig`):
            The vision tower's configuration.
        layers_run (`int`, *optional*):
            Number of encoder layers that actually run, for an implementation that stops at the feature layer.
            Defaults to `vision_config.num_hidden_layers`.
    """
    layers = vision_config.num_hidden_layers if layers_run is None else int(layers_run)
    if not 0 <= layers <= vision_config.num_hidden_layers:
        raise ValueError(f"layers_run must be in 0..{vision_config.num_hidden_layers}, got {layers_run}")
    hidden = vision_config.hidden_size
    patch = vision_config.patch_size
    num_patches = (vision_config.image_size // patch) ** 2
    tokens = num_patches + 1  # CLS token
    # Conv2d(C, hidden, kernel=stride=patch): one patch_size^2 * C dot product per patch and output channel.
    embed = _linear(num_patches, vision_config.num_channels * patch * patch, hidden)
    heads = vision_config.num_attention_heads
    head_dim = hidden // heads
    per_layer = (
        4 * _linear(tokens, hidden, hidden)  # q, k, v, out_proj
        + 2 * 2 * tokens * tokens * head_dim * heads  # Q @ K^T, attn @ V
        + 2 * _linear(tokens, hidden, vision_config.intermediate_size)  # fc1, fc2
    )
    return embed + layers * per_layer


def projector_flops(config: Any, num_tokens: int) -> int:
    """FLOPs of the 2-layer MLP projector (`linear_1`, `linear_2`) on `num_tokens` visual tokens.

    Args:
        config (`LlavaConfig` or `DPNConfig`):
            The full model configuration (the projector's input width depends on `vision_feature_layer`).
        num_tokens (`int`):
            Visual tokens fed to the projector for one image (the grid size, plus 1 for strategy `"full"`).
    """
    feature_layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
    d_in = config.vision_config.hidden_size * feature_layers
    d_out = config.text_config.hidden_size
    return _linear(num_tokens, d_in, d_out) + _linear(num_tokens, d_out, d_out)


def decoder_layer_flops(text_config: Any, seq_len: int) -> int:
    """FLOPs of one Llama decoder layer on a sequence of `seq_len` tokens.

    q/k/v/o projections (k and v sized by `num_key_value_heads * head_dim`), attention
    `2 * 2 * L * L * head_dim * num_heads` over the full square (no causal halving) and the gated MLP
    (gate, up, down). RMSNorm, rotary, softmax and the SiLU are not counted.

    Args:
        text_config (`LlamaConfig`):
            The decoder's configuration.
        seq_len (`int`):
            Number of tokens `L` the layer runs on.
    """
    linear, quadratic = _decoder_coefficients(text_config)
    return linear * seq_len + quadratic * seq_len * seq_len


def lm_head_flops(text_config: Any, num_tokens: int) -> int:
    """FLOPs of the `hidden_size -> vocab_size` output projection on `num_tokens` positions."""
    return _linear(num_tokens, text_config.hidden_size, text_config.vocab_size)


def router_flops(hidden_size: int, num_experts: int) -> int:
    """FLOPs of one router call on one token: `Linear(h, h // 4, no bias)` then `Linear(h // 4, num_experts)`.

    The LayerNorm before, the GELU between the linears, an output bias (`router_bias`) and the mean over the
    `<router>` positions (elementwise) are not counted, as `FlopCounterMode` does not count them.
    """
    bottleneck = hidden_size // 4
    return _linear(1, hidden_size, bottleneck) + _linear(1, bottleneck, num_experts)


# ----------------------------------------------------------------------------- whole model


def _image_tokens(config: Any) -> int:
    """Visual tokens per image entering the projector (and the decoder, before any pooling)."""
    num_patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    # Strategy "default" drops the CLS token, "full" keeps it.
    return num_patches + (1 if getattr(config, "vision_feature_select_strategy", "default") == "full" else 0)


def _num_experts(config: Any) -> int:
    return len(getattr(config, "expert_strides", ()) or ())


def _default_routed_layers(config: Any) -> int:
    # The router runs once per pooling layer on samples that have an image.
    return len(getattr(config, "pooling_layers", ()) or ())


def prefill_flops(
    config: Any,
    layer_seq_lens: Sequence[int],
    num_images: int = 1,
    lm_head_tokens: int | None = None,
    num_routed_layers: int | None = None,
) -> int:
    """Total prefill FLOPs of one sample.

    Vision tower and projector per image, each decoder layer on its own sequence length, routers, lm_head.

    Args:
        config (`LlavaConfig` or `DPNConfig`):
            The model configuration. A plain `LlavaConfig` has no routers.
        layer_seq_lens (`list[int]`):
            Sequence length each decoder layer runs on, one entry per layer (`num_hidden_layers`).
        num_images (`int`):
            Images in the sample (0 for text only).
        lm_head_tokens (`int`, *optional*):
            Positions the lm_head runs on. Defaults to every token of the last layer, as a plain forward does;
            pass 1 for generation's prefill (`logits_to_keep=1`).
        num_routed_layers (`int`, *optional*):
            Router calls (one token each). Defaults to `len(config.pooling_layers)` when the sample has an image,
            0 otherwise.
    """
    text_config = config.text_config
    if len(layer_seq_lens) != text_config.num_hidden_layers:
        raise ValueError(
            f"layer_seq_lens needs one length per decoder layer: {text_config.num_hidden_layers} layers, "
            f"got {len(layer_seq_lens)} lengths"
        )
    if lm_head_tokens is None:
        lm_head_tokens = layer_seq_lens[-1]
    if num_routed_layers is None:
        num_routed_layers = _default_routed_layers(config) if num_images > 0 else 0
    image = vision_tower_flops(config.vision_config) + projector_flops(config, _image_tokens(config))
    decoder = sum(decoder_layer_flops(text_config, int(length)) for length in layer_seq_lens)
    routers = num_routed_layers * router_flops(text_config.hidden_size, _num_experts(config))
    return num_images * image + decoder + routers + lm_head_flops(text_config, lm_head_tokens)


def prefill_flops_batch(
    config: Any,
    layer_seq_lens: torch.Tensor,
    has_image: torch.Tensor,
    lm_head_tokens: torch.Tensor | None = None,
    num_routed_layers: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Prefill FLOPs of every sample of a batch, vectorised (no Python loop over the batch).

    Same accounting as [`prefill_flops`] with at most one image per sample.

    Args:
        config (`LlavaConfig` or `DPNConfig`):
            The model configuration.
        layer_seq_lens (`torch.Tensor` of shape `(B, num_layers)`):
            Sequence length each decoder layer runs on, per sample (padding excluded).
        has_image (`torch.Tensor` of shape `(B,)`, bool):
            Whether the sample has an image (vision tower, projector and routers run).
        lm_head_tokens (`torch.Tensor` of shape `(B,)`, *optional*):
            Positions the lm_head runs on per sample. Defaults to the last layer's length.
        num_routed_layers (`torch.Tensor` of shape `(B,)` or `int`, *optional*):
            Router calls per sample. Defaults to `len(config.pooling_layers)` for samples with an image, else 0.

    Returns:
        `torch.Tensor` of shape `(B,)`, `float64`, on the device of `layer_seq_lens`.
    """
    text_config = config.text_config
    if layer_seq_lens.dim() != 2 or layer_seq_lens.shape[1] != text_config.num_hidden_layers:
        raise ValueError(
            f"layer_seq_lens must have shape (B, {text_config.num_hidden_layers}), got {tuple(layer_seq_lens.shape)}"
        )
    lengths = layer_seq_lens.to(torch.float64)  # float64 is exact for integers below 2**53
    image = has_image.to(lengths)
    linear, quadratic = _decoder_coefficients(text_config)
    # Every decoder layer has the same weights' shapes, so the sum over layers factorises.
    total = linear * lengths.sum(dim=1) + quadratic * (lengths * lengths).sum(dim=1)
    per_image = vision_tower_flops(config.vision_config) + projector_flops(config, _image_tokens(config))
    total = total + per_image * image
    head_tokens = lengths[:, -1] if lm_head_tokens is None else lm_head_tokens.to(lengths)
    total = total + lm_head_flops(text_config, 1) * head_tokens
    if num_routed_layers is None:
        routed = _default_routed_layers(config) * image
    elif isinstance(num_routed_layers, torch.Tensor):
        routed = num_routed_layers.to(lengths)
    else:
        routed = torch.full_like(image, float(num_routed_layers))
    return total + router_flops(text_config.hidden_size, _num_experts(config)) * routed


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    # (B, H, Lq, D) @ (B, H, D, Lk) and (B, H, Lq, Lk) @ (B, H, Lk, Dv); KV heads broadcast to the query heads.
    batch, heads, q_len, head_dim = query_shape
    k_len, v_dim = key_shape[2], value_shape[3]
    return 2 * batch * heads * q_len * k_len * (head_dim + v_dim)


def flop_counter(display: bool = False, depth: int = 2) -> FlopCounterMode:
    """`FlopCounterMode` that also counts CPU's fused SDPA kernel, so CPU measurements match this module.

    Plain `FlopCounterMode` counts the GPU SDPA kernels (flash, efficient, cuDNN) but not
    `aten._scaled_dot_product_flash_attention_for_cpu`, so on CPU it silently leaves out all attention FLOPs.
    """
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    return FlopCounterMode(display=display, depth=depth, custom_mapping=mapping)


# ----------------------------------------------------------------------------- DPN sequence lengths


def _strides_per_pooling_layer(config: Any, compression: Any) -> list[tuple[int, int]]:
    """Stride of the expert each pooling layer applies under a forced `compression` (a factor or a schedule)."""
    from dpn_model.configuration import forced_expert_indices

    experts = forced_expert_indices(compression, config)
    if experts is None:
        raise ValueError(
            f"compression {compression!r} routes per sample, so its FLOPs depend on the data; give a factor or a "
            "schedule here, or pass the layer lengths the model reports (`layer_seq_lens`) to prefill_flops"
        )
    return [tuple(config.expert_strides[expert]) for expert in experts]


def visual_tokens_per_layer(config: Any, compression: Any) -> list[int]:
    """Visual tokens each decoder layer sees under a forced compression.

    Pooling happens after decoder layer `p` (1-based) for `p` in `config.pooling_layers`, with the expert of
    `compression` (one factor for every pooling layer, or a schedule such as `[1, 2, 4]` / `"1,2,4"`: one factor
    per pooling layer), and is skipped once fewer than `config.min_visual_tokens` visual tokens remain. The token
    floors do not apply: they restrict the router and random routing, not a forced compression.
    """
    strides = dict(zip(config.pooling_layers, _strides_per_pooling_layer(config, compression)))
    grid = tuple(config.vision_grid)
    counts = []
    for layer in range(1, config.text_config.num_hidden_layers + 1):
        counts.append(grid[0] * grid[1])
        if layer in strides and grid[0] * grid[1] >= config.min_visual_tokens:
            grid = pooled_grid(grid, strides[layer])
    return counts


def layer_seq_lens_for(config: Any, text_len: int, compression: Any) -> list[int]:
    """Sequence length of each decoder layer for one sample: `text_len` non-image tokens plus one image.

    Args:
        config (`DPNConfig`):
            Supplies `vision_grid`, `pooling_layers`, `expert_strides` and `min_visual_tokens`.
        text_len (`int`):
            Non-image tokens of the sample (text, special and router tokens); never pooled.
        compression (`int`, `str` or `Sequence[int]`):
            Compression factor `h * w` of the expert every pooling layer applies (1, 2 or 4 by default), or a
            schedule with one factor per pooling layer (`[1, 2, 4]`, `"1,2,4"`); see `parse_compression`.

    Returns:
        `list[int]` of length `num_hidden_layers`.
    """
    return [text_len + visual for visual in visual_tokens_per_layer(config, compression)]


def estimate(
    config: Any, text_len: int, compression: Any, lm_head_tokens: int | None = None, routed: bool = False
) -> dict[str, Any]:
    """Prefill FLOPs of one sample (one image + `text_len` other tokens) at a forced compression, with a breakdown.

    Args:
        config (`DPNConfig`):
            The model configuration.
        text_len (`int`):
            Non-image tokens of the sample.
        compression (`int`, `str` or `Sequence[int]`):
            Compression factor of the expert every pooling layer applies (one of `config.compression_factors`),
            or a schedule with one factor per pooling layer (`[1, 2, 4]`).
        lm_head_tokens (`int`, *optional*):
            Positions the lm_head runs on; defaults to every token of the last layer.
        routed (`bool`, *optional*, defaults to `False`):
            Count the routers, as when the router chose this expert everywhere; a forced compression runs none.

    Returns:
        `dict` with `total`, `vision`, `projector`, `decoder`, `router`, `lm_head` (ints), `dense_total` (the same
        sample through plain LLaVA: no pooling, no routers), `saving` (`1 - total / dense_total`),
        `layer_seq_lens` and `visual_tokens_per_layer` (lists, one entry per decoder layer).
    """
    visual = visual_tokens_per_layer(config, compression)
    lengths = [text_len + v for v in visual]
    text_config = config.text_config
    parts = {
        "vision": vision_tower_flops(config.vision_config),
        "projector": projector_flops(config, _image_tokens(config)),
        "decoder": sum(decoder_layer_flops(text_config, length) for length in lengths),
        "router": routed
        * _default_routed_layers(config)
        * router_flops(text_config.hidden_size, _num_experts(config)),
        "lm_head": lm_head_flops(text_config, lengths[-1] if lm_head_tokens is None else lm_head_tokens),
    }
    total = sum(parts.values())
    dense_lengths = [text_len + visual[0]] * text_config.num_hidden_layers
    dense_head = dense_lengths[-1] if lm_head_tokens is None else lm_head_tokens
    dense = prefill_flops(config, dense_lengths, lm_head_tokens=dense_head, num_routed_layers=0)
    return {
        "total": total,
        **parts,
        "dense_total": dense,
        "saving": 1.0 - total / dense,
        "layer_seq_lens": lengths,
        "visual_tokens_per_layer": visual,
    }


__all__ = [
    "decoder_layer_flops",
    "estimate",
    "flop_counter",
    "layer_seq_lens_for",
    "lm_head_flops",
    "pooled_grid",
    "prefill_flops",
    "prefill_flops_batch",
    "projector_flops",
    "router_flops",
    "vision_tower_flops",
    "visual_tokens_per_layer",
]
