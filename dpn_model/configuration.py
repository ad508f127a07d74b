"""`DPNConfig`: a LLaVA configuration plus the Dynamic Pyramid Network's pooling settings."""

from __future__ import annotations

from transformers import LlavaConfig

POOLING_TYPES = ("max", "avg", "conv")


class DPNConfig(LlavaConfig):
    r"""Configuration of [`DPNForConditionalGeneration`].

    Everything LLaVA has (``vision_config``, ``text_config``, projector, ``image_token_id``) plus the
    Dynamic Pooling Experts placed after some decoder layers.

    Args:
        router_token_id (`int`):
            Id of the `<router>` token whose hidden state at a pooling layer feeds that layer's router.
        pooling_layers (`list[int]`):
            Pool visual tokens after these decoder layers, counted from 1 (LLaVA-1.5-7B recipe: 8, 16, 24).
        expert_strides (`list[list[int]]`):
            Kernel = stride (height, width) of each expert; `[1, 1]` keeps every token.
        pooling_type (`str`):
            `"max"` (default), `"avg"` or `"conv"` (depthwise, kernel = stride, initialised as averaging).
        router_temperature (`float`):
            Router logits are divided by this before the softmax (paper: 10).
        min_visual_tokens (`int`):
            Pooling is skipped once fewer visual tokens than this remain.
        routing_loss_target (`float`):
            Target of the expected compression scale (paper: 1.5).
        routing_loss_scales (`list[float]`):
            Scale of each expert in the routing loss (paper: 0, 1, 2 for 1x, 2x, 4x).
        routing_loss_weight (`float`):
            Weight of the routing loss added to the language-modelling loss.
    """

    model_type = "dpn_llava"

    router_token_id: int = 32001
    pooling_layers: list[int] | tuple[int, ...] = (8, 16, 24)
    expert_strides: list[list[int]] | tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2))
    pooling_type: str = "max"
    router_temperature: float = 10.0
    min_visual_tokens: int = 16
    routing_loss_target: float = 1.5
    routing_loss_scales: list[float] | tuple[float, ...] = (0.0, 1.0, 2.0)
    routing_loss_weight: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.pooling_layers = [int(x) for x in self.pooling_layers]
        self.expert_strides = [[int(s) for s in stride] for stride in self.expert_strides]
        self.routing_loss_scales = [float(x) for x in self.routing_loss_scales]
        self._check_dpn()
        # The processor expands `<image>` into this many placeholder tokens: one per visual grid cell.
        self.image_seq_length = self.num_visual_tokens

    def _check_dpn(self) -> None:
        num_layers = self.text_config.num_hidden_layers
        if sorted(set(self.pooling_layers)) != self.pooling_layers:
            raise ValueError(f"pooling_layers must be strictly increasing, got {self.pooling_layers}")
        for layer in self.pooling_layers:
            if not 1 <= layer < num_layers:
                raise ValueError(
                    f"pooling_layers entries count decoder layers from 1 and must leave at least one layer "
                    f"after them: got {layer} for a decoder of {num_layers} layers (valid: 1..{num_layers - 1})"
                )
        if not self.expert_strides:
            raise ValueError("expert_strides must name at least one expert, e.g. [[1, 1], [1, 2], [2, 2]]")
        for stride in self.expert_strides:
            if len(stride) != 2 or min(stride) < 1:
                raise ValueError(f"each expert stride must be two positive integers (h, w), got {stride}")
        factors = [h * w for h, w in self.expert_strides]
        if len(set(factors)) != len(factors):
            raise ValueError(f"experts must keep distinct fractions of the tokens, got strides {self.expert_strides}")
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature}")
        if self.min_visual_tokens < 1:
            raise ValueError(f"min_visual_tokens must be >= 1, got {self.min_visual_tokens}")
        if len(self.routing_loss_scales) != len(self.expert_strides):
            raise ValueError(
                f"routing_loss_scales needs one scale per expert: {len(self.expert_strides)} experts, "
                f"{len(self.routing_loss_scales)} scales"
            )
        if self.routing_loss_weight < 0:
            raise ValueError(f"routing_loss_weight must be >= 0, got {self.routing_loss_weight}")
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "router_token_id"):
            token_id = getattr(self, name)
            if not 0 <= token_id < vocab:
                raise ValueError(f"{name}={token_id} is outside the text vocabulary (size {vocab})")
        if self.image_token_id == self.router_token_id:
            raise ValueError("image_token_id and router_token_id must differ")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError("DPN supports a single vision_feature_layer (an int), as LLaVA-1.5 uses")
        if self.vision_feature_select_strategy != "default":
            raise ValueError(
                "DPN pools a square grid of patch tokens, so vision_feature_select_strategy must be 'default' "
                f"(drop CLS), got {self.vision_feature_select_strategy!r}"
            )

    @property
    def compression_factors(self) -> list[int]:
        """Fraction of visual tokens each expert removes: 1 (keep all), 2, 4 for the default experts."""
        return [h * w for h, w in self.expert_strides]

    @property
    def vision_grid(self) -> tuple[int, int]:
        """(rows, cols) of the visual token grid the vision tower produces."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return side, side

    @property
    def num_visual_tokens(self) -> int:
        rows, cols = self.vision_grid
        return rows * cols


__all__ = ["DPNConfig", "POOLING_TYPES"]
