"""`DPNConfig`: a LLaVA configuration plus the Dynamic Pyramid Network's pooling settings.

The defaults are the authors' training semantics (aihao2000/DPN-LLaVA). A `config.json` written before
those fields existed has no `dpn_config_version`; [`DPNConfig.from_dict`] fills its missing keys with
the values that checkpoint was trained with ([`LEGACY_DEFAULTS`]), so old checkpoints keep behaving as
they did. Also here: [`CompressionSpec`], a `compression` value parsed once by its one parser
[`CompressionSpec.parse`] (the model's `forward`/`generate`, the training and evaluation jobs and serving all go
through it; [`parse_compression`] returns its plain form).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

from transformers import LlavaConfig, PreTrainedConfig

POOLING_TYPES = ("max", "avg", "conv")
ROUTING_LOSS_EXPERTS = ("argmax", "sampled")
ROUTING_LOSS_REDUCTIONS = ("global", "per_layer")
ROUTER_TOKEN_REDUCTIONS = ("mean", "last")
ROUTER_ESTIMATORS = ("scale", "reinforce", "outcome")
ROUTER_BASELINES = ("batch", "critic")
ROUTING_MODES = ("auto", "random")
COST_PREFIX = "auto:lambda="  # the cost dial: "auto:lambda=0.5" (see parse_compression)
DPN_CONFIG_VERSION = 2
DEFAULT_EXPERT_STRIDES = ((1, 1), (1, 2), (2, 2))
# the compression factors of the default experts (`h * w` of each stride, as `compression_factors`): 1, 2, 4
DEFAULT_COMPRESSION_FACTORS = tuple(h * w for h, w in DEFAULT_EXPERT_STRIDES)

# What a config.json without `dpn_config_version` (written before version 2) was trained with.
LEGACY_DEFAULTS: dict[str, Any] = {
    "routing_loss_weight": 1.0,
    "routing_loss_expert": "sampled",
    "routing_loss_reduction": "per_layer",
    "train_token_floor": None,
    "inference_token_floor": None,
    "router_bias": True,
    "router_token_reduction": "last",
}

# A `compression` value as written: "auto", "auto:lambda=X", "random", one factor for every pooling layer, or one
# factor per pooling layer (a schedule). The model's `forward`/`generate` take any sequence for the latter;
# `parse_compression` returns a tuple. `CompressionSpec` is the parsed, typed value.
Compression = str | int | Sequence[int]


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
            Weight of the routing loss added to the language-modelling loss (reference: 0.001, a gentle push;
            the router learns mostly from the LM loss through the probability scaling of the pooled tokens).
        routing_loss_expert (`str`):
            Expert whose `scale * p` enters the routing loss: `"argmax"` (reference: the most probable expert)
            or `"sampled"` (the expert the sample was routed to in training).
        routing_loss_reduction (`str`):
            `"global"` (reference): one hinge `max(0, target - m)` with `m` the mean over every routed
            (sample, pooling layer) pair of the batch; `"per_layer"`: one hinge per layer, averaged.
        train_token_floor (`int`, *optional*):
            In training (router and `"random"` routing) an expert that would leave fewer visual tokens than this
            is never chosen: the choice is drawn from the feasible experts only, which is what the reference's
            re-sampling amounts to (reference: 18). The expert keeping the most tokens is always allowed.
            `None`: no floor.
        inference_token_floor (`int`, *optional*):
            The same rule outside training (router argmax and `"random"`). Default 18, the training floor: the
            reference applies the floor in training only, so its argmax can reach states (e.g. 36 -> 9 tokens)
            that training never showed the decoder and that its routing loss pushes towards without the LM loss
            ever pricing them. `None` reproduces the reference's inference.
        router_bias (`bool`):
            Bias on the router's output layer (reference: none).
        router_token_reduction (`str`):
            `"mean"` (reference): the router reads the mean hidden state over all `<router>` positions of the
            sample (one per user turn); `"last"`: the last `<router>` position only.
        router_estimator (`str`):
            How the router learns in training. `"scale"` (reference): only through the language-modelling
            loss, by way of the chosen probability that scales the pooled tokens. `"reinforce"` (ours, not the
            authors'): additionally a REINFORCE (score-function) term on the chosen experts' log-probabilities,
            rewarding each sample's path with `-(its LM loss + router_cost_weight * its visual-token cost)`
            against the leave-one-out mean of the batch, so an expert that loses a sample's answer is
            penalised for that sample. The pooling, the scaling and inference are unchanged.
            `"outcome"` (ours): a contextual bandit. In training every sample takes a uniformly drawn feasible
            expert at every pooling layer (so the decoder learns every path, as with `"random"`, at one path's
            compute) and the pooled tokens are not scaled; each router predicts, per expert, the probability
            that the sample is answered when it takes that expert here (a sigmoid per expert, not a softmax),
            fitted by binary cross-entropy to the answer's probability on the path taken (`exp(-its LM loss)`,
            [`outcome_loss`]). At inference `"auto"` takes the expert most likely to answer and the cost dial
            (`"auto:lambda=X"`) the best `log p_e - X * kept_e`: the likelihood of an answer traded for tokens,
            the knob that makes the pooling per question. The paper's routing loss is not applied (it prices
            softmax probabilities, which this router does not give).
        router_baseline (`str`):
            Baseline of the REINFORCE term (`"reinforce"` only). `"batch"`: the leave-one-out mean reward of the
            batch. `"critic"`: that mean plus a learned per-sample correction, a linear head on each router's
            (detached, normalised) input that predicts how much better or worse than its batch-mates a sample
            scores; it removes the question's own difficulty from the advantage, so the router is rewarded for
            its choice, not for the question it was given. The head adds `hidden_size + 1` parameters per
            pooling layer and is used in training only.
        router_reinforce_weight (`float`):
            Weight of the router's own term in the loss: the REINFORCE term (`"reinforce"`) or the outcome
            fit (`"outcome"`); unused with `"scale"`.
        router_cost_weight (`float`):
            Price, in nats of LM loss, of a sample's visual-token cost: the mean over the pooling layers of the
            fraction of its visual tokens still kept (1 for the dense path, ~0.17 for 4x, 2x, 1x after the
            token floor on a 16x16 grid) (`"reinforce"` only).
        router_explore (`float`):
            Exploration in training (`"reinforce"` only): each expert is sampled from
            `(1 - router_explore) * q + router_explore * uniform`, `q` the router's distribution over the experts
            the token floor allows, and the REINFORCE term scores that mixture. Without it a router that commits
            early to one path leaves the decoder untrained on every other, so no other path can win later (the
            tiny router locks into one path for every question at 0). Inference takes the router's argmax.
        router_entropy_weight (`float`):
            Entropy bonus of the REINFORCE term (`"reinforce"` only): minus this weight times the mean entropy of
            the routers' distributions over the allowed experts, as in actor-critic methods. A REINFORCE
            gradient vanishes with the probability of the expert it scores, so a router that saturated on one
            expert early (before the decoder had learned the other paths) cannot come back to them even when
            they later answer a sample better at fewer tokens; the bonus keeps every allowed expert's
            probability away from 0. 0: off.
        router_imitation_weight (`float`):
            Self-imitation term of the REINFORCE estimator (`"reinforce"` only; Oh et al., 2018, "Self-Imitation
            Learning"): minus this weight times `max(advantage, 0) * log p(chosen expert)`, `p` the router's own
            distribution over the allowed experts (not the exploration mixture). A path that answered a sample
            better than its baseline is imitated at full strength even when the router gave it almost no
            probability (found by exploration), where the REINFORCE gradient, proportional to that probability,
            is ~0; a worse path is not pushed further down. 0: off.
        dpn_config_version (`int`):
            Version of these semantics; `config.json` files without it are read with [`LEGACY_DEFAULTS`].
    """

    model_type = "dpn_llava"

    router_token_id: int = 32001
    pooling_layers: list[int] | tuple[int, ...] = (8, 16, 24)
    expert_strides: list[list[int]] | tuple[tuple[int, int], ...] = DEFAULT_EXPERT_STRIDES
    pooling_type: str = "max"
    router_temperature: float = 10.0
    min_visual_tokens: int = 16
    routing_loss_target: float = 1.5
    routing_loss_scales: list[float] | tuple[float, ...] = (0.0, 1.0, 2.0)
    routing_loss_weight: float = 0.001
    routing_loss_expert: str = "argmax"
    routing_loss_reduction: str = "global"
    train_token_floor: int | None = 18
    inference_token_floor: int | None = 18
    router_bias: bool = False
    router_token_reduction: str = "mean"
    router_estimator: str = "scale"
    router_baseline: str = "batch"
    router_reinforce_weight: float = 1.0
    router_cost_weight: float = 0.5
    router_explore: float = 0.0
    router_entropy_weight: float = 0.0
    router_imitation_weight: float = 0.0
    dpn_config_version: int = DPN_CONFIG_VERSION

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DPNConfig:
        """[`PreTrainedConfig.from_dict`], with two rules of ours.

        - A dict without `dpn_config_version` (a checkpoint saved before these semantics) gets
          [`LEGACY_DEFAULTS`] for the keys it lacks, so it behaves as it was trained.
        - Keyword arguments that name fields of LLaVA or DPN (`from_pretrained(path, pooling_type="avg")`) are
          built into the config, so they are checked as constructor arguments are. The library would set them
          on the finished config instead, past every check in `__post_init__`. A sub-config given as a dict
          (`text_config={...}`) updates the saved one, as the library does.

        Other keyword arguments go to the library unchanged: it sets those that are attributes and drops (or,
        with `return_unused_kwargs=True`, returns) the rest. [`dpn_model.loading.load_dpn_config`] raises on them.
        """
        if "dpn_config_version" not in config_dict:
            config_dict = {**LEGACY_DEFAULTS, **config_dict, "dpn_config_version": 1}
        return super().from_dict(cls._with_field_overrides(config_dict, kwargs), **kwargs)

    @classmethod
    def override_fields(cls) -> list[str]:
        """The fields LLaVA and DPN add to `PreTrainedConfig` (whose own, such as `dtype`, the library handles)."""
        base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        return [f.name for f in dataclasses.fields(cls) if f.name not in base]

    @classmethod
    def _with_field_overrides(cls, config_dict: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
        """`config_dict` updated with the entries of `kwargs` that name one of [`override_fields`] (or an alias
        of one, `image_token_id`); those leave `kwargs`."""
        own = set(cls.override_fields())
        merged = dict(config_dict)
        for key in [k for k in kwargs if cls.attribute_map.get(k, k) in own]:
            name, value = cls.attribute_map.get(key, key), kwargs.pop(key)
            saved = merged.get(name)
            if name in cls.sub_configs and isinstance(value, dict) and saved is not None:
                value = {**(saved.to_dict() if isinstance(saved, PreTrainedConfig) else saved), **value}
            merged[name] = value
        return merged

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.pooling_layers = [int(x) for x in self.pooling_layers]
        self.expert_strides = [[int(s) for s in stride] for stride in self.expert_strides]
        self.routing_loss_scales = [float(x) for x in self.routing_loss_scales]
        self._check_dpn()
        # The processor expands `<image>` into this many placeholder tokens: one per visual grid cell.
        self.image_seq_length = self.num_visual_tokens

    def _check_dpn(self) -> None:
        self._check_pyramid()
        self._check_routing()
        self._check_tokens()

    def _check_pyramid(self) -> None:
        """Pooling layers, experts and pooling type."""
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
            raise ValueError(
                f"experts must keep distinct fractions of the tokens, got strides {self.expert_strides}"
            )
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling_type must be one of {POOLING_TYPES}, got {self.pooling_type!r}")
        if self.min_visual_tokens < 1:
            raise ValueError(f"min_visual_tokens must be >= 1, got {self.min_visual_tokens}")

    @property
    def router_predicts_outcome(self) -> bool:
        """Whether each router predicts, per expert, the probability of an answer (`router_estimator="outcome"`)
        instead of a softmax over the experts."""
        return self.router_estimator == "outcome"

    @property
    def uses_router_critic(self) -> bool:
        """Whether the routers carry a REINFORCE critic (`router_estimator="reinforce"`, `router_baseline="critic"`)."""
        return self.router_estimator == "reinforce" and self.router_baseline == "critic"

    def _check_routing(self) -> None:
        """Router, token floors and routing loss."""
        if not self.router_temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {self.router_temperature}")
        if len(self.routing_loss_scales) != len(self.expert_strides):
            raise ValueError(
                f"routing_loss_scales needs one scale per expert: {len(self.expert_strides)} experts, "
                f"{len(self.routing_loss_scales)} scales"
            )
        if self.routing_loss_weight < 0:
            raise ValueError(f"routing_loss_weight must be >= 0, got {self.routing_loss_weight}")
        self._check_choice("routing_loss_expert", ROUTING_LOSS_EXPERTS)
        self._check_choice("routing_loss_reduction", ROUTING_LOSS_REDUCTIONS)
        self._check_choice("router_token_reduction", ROUTER_TOKEN_REDUCTIONS)
        self._check_choice("router_estimator", ROUTER_ESTIMATORS)
        self._check_choice("router_baseline", ROUTER_BASELINES)
        for name in (
            "router_reinforce_weight",
            "router_cost_weight",
            "router_entropy_weight",
            "router_imitation_weight",
        ):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.router_explore <= 1.0:
            raise ValueError(f"router_explore must be in [0, 1], got {self.router_explore!r}")
        for name in ("train_token_floor", "inference_token_floor"):
            floor = getattr(self, name)
            if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int) or floor < 0):
                raise ValueError(f"{name} must be a non-negative integer or None (no floor), got {floor!r}")

    def _check_tokens(self) -> None:
        """Token ids and the vision features DPN can pool."""
        vocab = self.text_config.vocab_size
        for name in ("image_token_id", "router_token_id"):
            token_id = getattr(self, name)
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise ValueError(f"{name} must be an integer token id, got {token_id!r}")
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

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

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


# ----------------------------------------------------------------------------------------------------------
# compression: "auto", "random", one factor, or one factor per pooling layer
# ----------------------------------------------------------------------------------------------------------
_SCHEDULE_SEPARATOR = re.compile(r"\s*[,\-]\s*|\s+")
COMPRESSION_MODES = (*ROUTING_MODES, "forced")


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """A `compression` once parsed ([`CompressionSpec.parse`], the one parser): what it asks for, by name.

    Every form a user may write (`"auto"`, `"AUTO"`, `"auto:lambda=0.50"`, `2`, `"2"`, `[1, 2, 4]`, `"1-2-4"`,
    `"[1, 2, 4]"`) becomes one of these, so the model, the jobs and serving read the mode, the cost dial and the
    factors off it instead of re-parsing the raw value each in its own way.

    Attributes:
        mode: `"auto"` (the router, with or without the cost dial), `"random"`, or `"forced"` (a factor or one
            factor per pooling layer).
        cost: the cost dial `lambda` of `"auto:lambda=X"`, as its canonical `%g` spelling reads back (so equal
            labels mean equal dials); 0 for plain `"auto"` and every other mode.
        factors: forced only: one `int` factor for every pooling layer (`2`), or a tuple with one factor per
            pooling layer (`(1, 2, 4)`; `(4, 4, 4)` stays a tuple, as it was written); None for routed modes.
    """

    mode: str
    cost: float = 0.0
    factors: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in COMPRESSION_MODES:
            raise ValueError(f"CompressionSpec mode must be one of {COMPRESSION_MODES}, got {self.mode!r}")
        factors_misplaced = (self.mode == "forced") != (self.factors is not None)
        cost_misplaced = bool(self.cost) and self.mode != "auto"
        if factors_misplaced or cost_misplaced or not math.isfinite(self.cost):
            raise ValueError(
                f"CompressionSpec({self.mode!r}, cost={self.cost!r}, factors={self.factors!r}): factors go with "
                "mode 'forced' only, a finite cost with mode 'auto' only"
            )

    @classmethod
    def parse(cls, value: Any, config: DPNConfig | None = None) -> CompressionSpec:
        """Parse and validate a `compression` value: the one parser every entry point uses.

        Accepted forms:
            - `"auto"`: the learned router (samples in training, argmax otherwise);
            - `"auto:lambda=X"`: the router with a cost dial, an inference-time knob that trades accuracy for FLOPs
              without retraining: each sample takes `argmax_e log p_e - X * kept_e` over the feasible experts,
              `kept_e` the share of the visual tokens expert `e` keeps (1, 1/2, 1/4); `X = 0` is `"auto"`, a
              larger `X` pools harder, a negative one keeps more (training ignores it: it samples);
            - `"random"`: a uniformly drawn expert per sample and pooling layer, among the experts the token floor
              allows (the paper's random-routing ablation);
            - a factor, `2` or `"2"`: that expert at every pooling layer (1 is dense);
            - factors per layer, `[1, 2, 4]`, `(1, 2, 4)`, `"1,2,4"`, `"1-2-4"` or `"[1, 2, 4]"`: one factor per
              pooling layer, a static pyramid as PyramidDrop uses;
            - a `CompressionSpec` (checked against `config` when given).

        Args:
            value: the compression as given (YAML, command line, request field or Python).
            config (`DPNConfig`, *optional*): the model's config (or any object with its `expert_strides` and
                `pooling_layers`); when given, factors must be those of its experts (`h * w` of each expert
                stride) and factors per layer need one per pooling layer. Without it only the form is checked.

        Raises:
            `ValueError`: an unknown mode, a factor no expert has, or factors per layer of the wrong length.
        """
        if isinstance(value, CompressionSpec):
            return value if config is None else value.check(config)
        spec = cls._from_raw(_parse_syntax(value))
        return spec if config is None else spec.check(config, value)

    @classmethod
    def _from_raw(cls, raw: Compression) -> CompressionSpec:
        """The spec of a form-checked raw value (`_parse_syntax`'s output)."""
        if raw in ROUTING_MODES:
            return cls(str(raw))
        if isinstance(raw, str):  # "auto:lambda=X", canonical and X != 0
            return cls("auto", float(raw[len(COST_PREFIX) :]))
        return cls("forced", factors=raw)

    def check(self, config: DPNConfig, shown: Any = None) -> CompressionSpec:
        """`self`, once its factors are checked against `config`'s experts and pooling layers.

        `shown` is the value as the user gave it, quoted by the errors (the spec's `raw` form by default).
        """
        if self.factors is None:
            return self
        shown = self.raw if shown is None else shown
        factors = [h * w for h, w in config.expert_strides]
        schedule = self.factors if isinstance(self.factors, tuple) else (self.factors,)
        unknown = sorted({f for f in schedule if f not in factors})
        if unknown:
            raise ValueError(
                f"compression {shown!r}: factor(s) {unknown} match no pooling expert of this model; its experts "
                f"(expert_strides {config.expert_strides}) give factors {factors}"
            )
        if isinstance(self.factors, tuple) and len(self.factors) != len(config.pooling_layers):
            raise ValueError(
                f"compression schedule {shown!r} has {len(self.factors)} factor(s) but the model pools after "
                f"{len(config.pooling_layers)} layer(s) ({config.pooling_layers}): give one factor per pooling layer"
            )
        return self

    @property
    def raw(self) -> Compression:
        """The plain value [`parse_compression`] returns: `"auto"`, `"auto:lambda=X"`, `"random"`, an `int` or a
        tuple of factors per layer."""
        return self.label if self.factors is None else self.factors

    @property
    def label(self) -> str:
        """Canonical text: `"auto"`, `"auto:lambda=0.5"` (`%g`), `"random"`, `"2"`, or `"1-2-4"` for factors per
        layer. Safe inside comma-separated lists and MLflow metric names; [`CompressionSpec.parse`] reads it back."""
        if self.mode == "auto" and self.cost:
            return f"{COST_PREFIX}{self.cost:g}"
        if self.factors is None:
            return self.mode
        if isinstance(self.factors, tuple):
            return "-".join(str(f) for f in self.factors)
        return str(self.factors)

    def factors_per_layer(self, layers: int) -> tuple[int, ...] | None:
        """The factor at each of `layers` pooling layers (a tuple of factors is returned as it is); None for the
        routed modes."""
        if self.factors is None:
            return None
        return self.factors if isinstance(self.factors, tuple) else (self.factors,) * layers

    def expert_indices(self, config: DPNConfig) -> list[int] | None:
        """Index (into `config.expert_strides`) of the expert forced at each pooling layer; None for routed modes.

        Raises:
            `ValueError`: the factors do not fit `config` (see [`check`]).
        """
        self.check(config)
        per_layer = self.factors_per_layer(len(config.pooling_layers))
        if per_layer is None:
            return None
        factors = [h * w for h, w in config.expert_strides]
        return [factors.index(f) for f in per_layer]


def _as_factor(item: Any, value: Any) -> int:
    if isinstance(item, str) and item.strip().isdigit():
        item = int(item)
    if isinstance(item, bool) or not isinstance(item, numbers.Integral) or int(item) < 1:
        raise ValueError(
            f"compression {value!r}: {item!r} is not a compression factor (a positive integer such as 1, 2, 4); "
            f"a compression is one of {ROUTING_MODES}, a factor, or one factor per pooling layer ('1,2,4')"
        )
    return int(item)


def _parse_cost(text: str, value: Any) -> str:
    """`"auto:lambda=X"` in its canonical spelling (`X` as `%g`; `"auto"` itself when `X` is 0)."""
    _, _, number = text.partition("=")
    try:
        cost = float(number)
    except ValueError:
        cost = math.nan
    if not text.startswith(COST_PREFIX) or not math.isfinite(cost):
        raise ValueError(
            f"compression {value!r} is not understood: the cost dial is 'auto:lambda=X' with X a finite number "
            "(0 is the router's own choice, a larger X keeps fewer visual tokens, a negative one more)"
        )
    return "auto" if cost == 0 else f"{COST_PREFIX}{cost:g}"


def routing_mode(value: Any) -> str | None:
    """`"auto"` (the router, with or without a cost dial), `"random"`, or None for a forced factor or schedule.

    A lenient reading of an already parsed value (a report row's mode label): [`CompressionSpec.parse`]'s `mode`,
    so the syntax has one reader, but None instead of an error for a value that does not parse, since its callers
    (reports, the oracle) only ask "is this row routed?" of labels the parser wrote. To validate, parse.
    """
    try:
        mode = CompressionSpec.parse(value).mode
    except ValueError:
        return None
    return None if mode == "forced" else mode


def router_cost(value: Any) -> float:
    """The cost dial `lambda` of an `"auto:lambda=X"` compression (0 for plain `"auto"` and the other forms)."""
    return CompressionSpec.parse(value).cost


def _parse_syntax(value: Any) -> Compression:
    """`value` as "auto", "auto:lambda=X", "random", an int or a tuple of ints, checked for form only."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ROUTING_MODES:
            return text
        if text.startswith("auto:"):
            return _parse_cost(text, value)
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        parts = _SCHEDULE_SEPARATOR.split(text.strip())
        if not all(parts):
            raise ValueError(
                f"compression {value!r} is not understood; give 'auto', 'random', a factor (2) or one factor per "
                "pooling layer ('1,2,4')"
            )
        if len(parts) == 1 and "[" not in value:
            return _as_factor(parts[0], value)
        return tuple(_as_factor(p, value) for p in parts)
    if isinstance(value, Sequence):
        if not value:
            raise ValueError(
                "compression schedule is empty: give one factor per pooling layer, e.g. [1, 2, 4]"
            )
        return tuple(_as_factor(item, value) for item in value)
    return _as_factor(value, value)


def parse_compression(value: Any, config: DPNConfig | None = None) -> Compression:
    """[`CompressionSpec.parse`] (see its forms and errors), returned as the plain value callers have always had.

    Returns:
        `"auto"`, `"auto:lambda=X"` (canonical `%g` spelling), `"random"`, an `int`, or a `tuple[int, ...]`
        (one factor per pooling layer): the spec's `raw`.
    """
    return CompressionSpec.parse(value, config).raw


def forced_expert_indices(value: Any, config: DPNConfig) -> list[int] | None:
    """Expert index (into `config.expert_strides`) forced at each pooling layer, or `None` for the routed modes:
    [`CompressionSpec.expert_indices`]. Not a schedule: a schedule is factors per layer, these index the experts."""
    return CompressionSpec.parse(value, config).expert_indices(config)


def compression_label(value: Any) -> str:
    """Canonical text of a compression: `"auto"`, `"random"`, `"2"`, or `"1-2-4"`: [`CompressionSpec.label`]."""
    return CompressionSpec.parse(value).label


__all__ = [
    "COMPRESSION_MODES",
    "DEFAULT_COMPRESSION_FACTORS",
    "DEFAULT_EXPERT_STRIDES",
    "DPN_CONFIG_VERSION",
    "LEGACY_DEFAULTS",
    "POOLING_TYPES",
    "Compression",
    "CompressionSpec",
    "DPNConfig",
    "compression_label",
    "forced_expert_indices",
    "parse_compression",
    "router_cost",
    "routing_mode",
]
