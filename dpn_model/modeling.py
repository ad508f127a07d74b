"""The Dynamic Pyramid Network: LLaVA whose decoder pools visual tokens with per-sample pooling experts.

Built from transformers' own LLaVA pieces (CLIP vision tower, `LlavaMultiModalProjector`, Llama decoder
layers, RMSNorm and rotary embedding); only the decoder loop is ours. The loop runs the decoder layers in
*segments*: after the last layer of a segment (the configured `pooling_layers`) the visual tokens of each
sample are pooled by the expert its router chose, and the batch is rebuilt on a shorter sequence with
contiguous positions and a fresh padding mask. Samples that choose different experts are grouped by
(grid, expert), never looped over one by one; at inference (`ragged`, the default there) each such group then runs the
rest of the prefill at its own length, so no sample pays for another's longer path, and the outputs (and the
cache) are reassembled in batch order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlavaConfig, LlavaForConditionalGeneration
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import ModelOutput
from transformers.models.llava.modeling_llava import (
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)

from dpn_model import flops as flops_lib
from dpn_model.cache import DPNCache
from dpn_model.configuration import (
    Compression,
    DPNConfig,
    compression_schedule,
    parse_compression,
    router_cost,
    routing_mode,
)
from dpn_model.encoder_cache import EncoderCache
from dpn_model.pooling import DynamicPoolingExperts, PoolingConv, RouterCritic, pooled_grid, router_input


@dataclass
class DPNModelOutput(ModelOutput):
    """Output of [`DPNModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, out_len, hidden)`):
            Final hidden states on the (possibly shortened) output sequence.
        cache (`DPNCache`, *optional*): the key/value cache, one length per segment.
        attention_mask (`torch.LongTensor` of shape `(batch, out_len)`): 1 for real output positions.
        token_positions (`torch.LongTensor` of shape `(batch, out_len)`):
            Index in the input sequence of each output position; -1 for pooled visual tokens and padding.
        expert_choices (`torch.LongTensor` of shape `(batch, num_pooling_layers)`):
            Expert chosen per sample and pooling layer; -1 where nothing was pooled (no image, or fewer
            than `min_visual_tokens` visual tokens left).
        router_probs (`torch.FloatTensor` of shape `(batch, num_pooling_layers, num_experts)`, *optional*):
            Router probabilities (`compression="auto"` only).
        router_feasible (`torch.BoolTensor` of shape `(batch, num_pooling_layers, num_experts)`, *optional*):
            Experts the token floor allowed (`compression="auto"` only).
        router_values (`torch.FloatTensor` of shape `(batch, num_pooling_layers)`, *optional*):
            The REINFORCE critic's predictions (training with `router_baseline="critic"` only).
        visual_tokens (`torch.LongTensor` of shape `(batch, num_pooling_layers + 1)`):
            Visual tokens per sample before the first pooling layer and after each one.
        layer_seq_lens (`torch.LongTensor` of shape `(batch, num_decoder_layers)`):
            Real (unpadded) sequence length each decoder layer ran on, per sample.
        routing_loss (`torch.FloatTensor`, *optional*): routing loss (`compression="auto"` only).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): per layer, lengths differ across segments.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    attention_mask: torch.LongTensor | None = None
    token_positions: torch.LongTensor | None = None
    expert_choices: torch.LongTensor | None = None
    router_probs: torch.FloatTensor | None = None
    router_feasible: torch.BoolTensor | None = None
    router_values: torch.FloatTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    layer_seq_lens: torch.LongTensor | None = None
    routing_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class DPNCausalLMOutputWithPast(ModelOutput):
    """Output of [`DPNForConditionalGeneration`].

    Args:
        loss (`torch.FloatTensor`, *optional*): `lm_loss + routing_loss_weight * routing_loss`
            (`+ router_reinforce_weight * reinforce_loss` with `router_estimator="reinforce"`).
        logits (`torch.FloatTensor` of shape `(batch, out_len, vocab)`):
            Scores on the output sequence; `token_positions` maps them back to input positions.
        lm_loss (`torch.FloatTensor`, *optional*): next-token loss over label tokens.
        routing_loss (`torch.FloatTensor`, *optional*): the paper's routing loss (auto mode).
        reinforce_loss (`torch.FloatTensor`, *optional*): the REINFORCE term ([`reinforce_loss`]; auto mode in
            training with `router_estimator="reinforce"` only).
        cache (`DPNCache`, *optional*): see [`DPNCache`].
        token_positions, expert_choices, router_probs, visual_tokens, layer_seq_lens: as in [`DPNModelOutput`].
        prefill_flops (`torch.FloatTensor` of shape `(batch,)`, *optional*):
            Analytic FLOPs of this prefill per sample (vision tower, projector, decoder, routers, lm head).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): as in [`DPNModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    routing_loss: torch.FloatTensor | None = None
    reinforce_loss: torch.FloatTensor | None = None
    cache: Cache | None = None
    token_positions: torch.LongTensor | None = None
    expert_choices: torch.LongTensor | None = None
    router_probs: torch.FloatTensor | None = None
    visual_tokens: torch.LongTensor | None = None
    layer_seq_lens: torch.LongTensor | None = None
    prefill_flops: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def routing_loss(
    probs: torch.Tensor,
    choices: torch.Tensor,
    routed: torch.Tensor,
    scales: Sequence[float],
    target: float,
    expert: str = "argmax",
    reduction: str = "global",
) -> torch.Tensor:
    """The paper's routing loss, which keeps compression up.

    Each routed (sample, pooling layer) pair contributes `scale(e) * p(e)` for one expert `e`: the most probable
    one (`expert="argmax"`, the reference) or the one the sample was routed to (`"sampled"`). With
    `reduction="global"` (the reference) the loss is one hinge `max(0, target - m)`, `m` the mean over all routed
    pairs of the batch; with `"per_layer"` each layer gets its own hinge on its own mean and the loss is their
    mean over the layers where something was routed.

    Args:
        probs (`torch.Tensor` of shape `(batch, layers, experts)`): router probabilities.
        choices (`torch.LongTensor` of shape `(batch, layers)`): chosen expert per sample and layer (-1: none);
            only read when `expert="sampled"`.
        routed (`torch.BoolTensor` of shape `(batch, layers)`): which samples were routed at each layer.
        scales (`Sequence[float]`): scale of each expert (paper: 0, 1, 2 for 1x, 2x, 4x).
        target (`float`): target expected scale (paper: 1.5).
        expert (`str`): `"argmax"` or `"sampled"`.
        reduction (`str`): `"global"` or `"per_layer"`.

    Returns:
        `torch.Tensor`: scalar loss, 0 (with a graph) when nothing was routed.
    """
    if expert not in ("argmax", "sampled") or reduction not in ("global", "per_layer"):
        raise ValueError(
            f"expert must be 'argmax' or 'sampled' and reduction 'global' or 'per_layer', got "
            f"{expert!r}, {reduction!r}"
        )
    scales = torch.as_tensor(scales, dtype=probs.dtype, device=probs.device)
    index = probs.detach().argmax(-1) if expert == "argmax" else choices.clamp(min=0)  # (B, layers)
    p_index = probs.gather(-1, index.unsqueeze(-1)).squeeze(-1)
    weighted = scales[index] * p_index * routed
    if reduction == "global":
        count = routed.sum()
        return torch.relu(target - weighted.sum() / count.clamp(min=1)) * (count > 0)
    count = routed.sum(0)
    per_layer = weighted.sum(0) / count.clamp(min=1)
    gaps = torch.relu(target - per_layer)[count > 0]
    return gaps.mean() if gaps.numel() else probs.sum() * 0.0


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each sample over its label tokens, `(batch,)` float32 (0 for a sample without any).

    Args:
        logits (`torch.Tensor` of shape `(batch, len, vocab)`), labels (`torch.LongTensor` of shape `(batch, len)`):
            aligned, not shifted (-100: no loss), as [`DPNForConditionalGeneration.forward`] has them.
    """
    targets = labels[:, 1:]
    token_loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none"
    )  # (B, len - 1)
    valid = targets != -100
    return (token_loss * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def feasible_distribution(probs: torch.Tensor, feasible: torch.Tensor) -> torch.Tensor:
    """The router's probabilities renormalised over the experts the token floor allowed, `(..., experts)`."""
    allowed = probs * feasible
    return allowed / allowed.sum(-1, keepdim=True).clamp(min=1e-12)


def exploring(q: torch.Tensor, feasible: torch.Tensor, explore: float) -> torch.Tensor:
    """`(1 - explore) * q + explore * uniform over the feasible experts` (`router_explore`), `(..., experts)`."""
    if not explore:
        return q
    uniform = feasible.float() / feasible.float().sum(-1, keepdim=True).clamp(min=1)
    return (1.0 - explore) * q + explore * uniform


def reinforce_loss(
    probs: torch.Tensor,
    feasible: torch.Tensor,
    choices: torch.Tensor,
    sample_loss: torch.Tensor,
    cost: torch.Tensor,
    cost_weight: float,
    values: torch.Tensor | None = None,
    explore: float = 0.0,
    groups: torch.Tensor | None = None,
    entropy_weight: float = 0.0,
    imitation_weight: float = 0.0,
) -> torch.Tensor:
    """REINFORCE term for the routers (`router_estimator="reinforce"`; ours, not the authors').

    A sample's reward is `-(sample_loss + cost_weight * cost)`; its advantage is the reward minus the mean reward
    of the batch's other routed samples (a leave-one-out baseline, which keeps the estimate unbiased), or, with
    `groups`, of the other routed rows of its group (RLOO: the same sample routed several times, so the baseline
    is the sample's own expected reward and the advantage says only how its path did). The term is
    `-mean(advantage * sum over layers of log q(chosen expert))`, `q` the distribution the expert was sampled
    from (the router's probabilities renormalised over the experts the token floor allowed): minimising it raises
    the probability of paths that answered a sample better than its batch-mates did, at their price in tokens.

    Args:
        probs (`torch.Tensor` of shape `(batch, layers, experts)`): router probabilities.
        feasible (`torch.BoolTensor` of shape `(batch, layers, experts)`): experts the token floor allowed.
        choices (`torch.LongTensor` of shape `(batch, layers)`): expert chosen per sample and layer, -1: not routed.
        sample_loss (`torch.Tensor` of shape `(batch,)`): each sample's LM loss (no gradient is taken through it).
        cost (`torch.Tensor` of shape `(batch,)`): each sample's visual-token cost (same).
        cost_weight (`float`): nats of LM loss one unit of cost is worth.
        values (`torch.Tensor` of shape `(batch, layers)`, *optional*): the critic's prediction, per sample and
            layer, of the sample's reward minus the leave-one-out baseline (`router_baseline="critic"`). The
            baseline becomes the batch's plus this prediction, and the term adds the critic's squared error.
        explore (`float`): the uniform share of the distribution the experts were sampled from
            (`router_explore`); the term scores that mixture.
        groups (`torch.LongTensor` of shape `(batch,)`, *optional*): group id of each row; rows of one group
            are one sample routed independently (`model.paths_per_sample` in training). The baseline is then
            the mean reward of the row's routed group-mates. Default: the whole batch is one group.
        entropy_weight (`float`): the term subtracts this times the mean entropy of the routed layers'
            distributions over the allowed experts (`router_entropy_weight`).
        imitation_weight (`float`): the term adds this times `-max(advantage, 0) * log p(chosen)` per routed
            layer, `p` the router's distribution over the allowed experts (self-imitation,
            `router_imitation_weight`); the advantage is the baseline-corrected one (the critic's too).

    Returns:
        `torch.Tensor`: scalar; 0 (with a graph) when no routed row has a routed batch- or group-mate.
    """
    routed = choices >= 0
    has = routed.any(-1)
    mates = has[:, None] & has[None, :] & ~torch.eye(has.shape[0], dtype=torch.bool, device=has.device)
    if groups is not None:
        mates &= groups[:, None] == groups[None, :]
    n_mates = mates.sum(-1)
    scored = n_mates > 0  # routed rows with a baseline
    n = int(scored.sum())
    if n == 0:
        return probs.sum() * 0.0
    p = feasible_distribution(probs, feasible)
    q = exploring(p, feasible, explore)
    chosen = q.gather(-1, choices.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    routed = routed & scored[:, None]
    log_q = torch.log(chosen.clamp(min=1e-12)) * routed  # (B, L)
    reward = -(sample_loss.float() + cost_weight * cost.float()).detach() * has
    baseline = (mates.float() @ reward) / n_mates.clamp(min=1)
    advantage = (reward - baseline) * scored
    extra = torch.zeros((), device=probs.device)
    if values is None:
        corrected = advantage[:, None] * routed  # (B, L)
    else:
        # per layer: the critic removes what the sample's own question explains of its advantage
        corrected = (advantage[:, None] - values.detach()) * routed
        extra = extra + ((values - advantage[:, None]) ** 2 * routed).sum() / routed.sum()
    if entropy_weight:
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # (B, L)
        extra = extra - entropy_weight * (entropy * routed).sum() / routed.sum()
    if imitation_weight:
        log_p = (
            torch.log(p.gather(-1, choices.clamp(min=0).unsqueeze(-1)).squeeze(-1).clamp(min=1e-12)) * routed
        )
        extra = extra - imitation_weight * (corrected.clamp(min=0) * log_p).sum() / n
    return -(corrected * log_q).sum() / n + extra


def _additive_mask(key_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + key-padding mask for the last `query_len` positions, `(batch, 1, query_len, key_len)`.

    Query i (the i-th of the new positions) sees every real cached key and the new keys up to itself.
    """
    key_len = key_mask.shape[1]
    q_pos = torch.arange(key_len - query_len, key_len, device=key_mask.device)
    k_pos = torch.arange(key_len, device=key_mask.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] & key_mask.bool()[:, None, :]  # (B, q, k)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def _positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over real tokens (0 for padding), as `generate` makes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()


@dataclass(frozen=True)
class RoutingPlan:
    """How one forward chooses its experts (from its `compression`, [`parse_compression`]).

    Attributes:
        mode: `"auto"` (the router), `"random"`, or `"forced"` (a factor or a schedule).
        schedule: expert index per pooling layer (forced only; else None).
        cost: the cost dial `lambda` of `"auto:lambda=X"` (inference: argmax of `log p - lambda * kept share`).
    """

    mode: str
    schedule: list[int] | None = None
    cost: float = 0.0


@dataclass(frozen=True)
class PrefillState:
    """What the prefill loop carries from segment to segment; each pooling stage returns a new, shorter one.

    `B` is the batch, `L` the current padded sequence length (the input length before the first pooling
    stage, shorter after each one that pooled), `D` the hidden size.

    Args:
        hidden (`torch.FloatTensor` of shape `(B, L, D)`): hidden states (the embeddings before the first layer).
        mask (`torch.LongTensor` of shape `(B, L)`): 1 for real tokens, 0 for padding.
        positions (`torch.LongTensor` of shape `(B, L)`): rotary position ids; the given `position_ids` (or
            positions from the mask) before the first pooling stage, contiguous over real tokens after one.
        is_visual (`torch.BoolTensor` of shape `(B, L)`): the sample's (possibly pooled) visual tokens.
        is_router (`torch.BoolTensor` of shape `(B, L)`): real `<router>` tokens.
        src (`torch.LongTensor` of shape `(B, L)`): index in the input sequence of each position; -1 for pooled
            visual tokens and padding (the output's `token_positions`).
        rows, cols (`torch.LongTensor` of shape `(B,)`): the sample's current visual grid; 0 without an image.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    is_visual: torch.Tensor
    is_router: torch.Tensor
    src: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def _select_rows(state: PrefillState, rows: torch.Tensor) -> PrefillState:
    """The [`PrefillState`] of some samples of a batch (`rows`, indices into it)."""
    return PrefillState(**{f.name: getattr(state, f.name)[rows] for f in fields(state)})


def _merge_rows(parts: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-group tensors `(G, ...)` in batch order; `rows` None: the whole batch, in order.

    The groups' rows partition the batch. Differentiable (a concatenation and a gather).
    """
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    order = torch.cat([rows for rows, _ in parts]).argsort()
    return torch.cat([value for _, value in parts])[order]


def _merge_padded(
    parts: list[tuple[torch.Tensor | None, torch.Tensor]], dim: int, left: bool, fill: float = 0
) -> torch.Tensor:
    """[`_merge_rows`] for tensors whose dimension `dim` (a sequence) differs between groups: each is padded
    with `fill` to the longest, on the left (`left`) or the right."""
    if len(parts) > 1:
        longest = max(value.shape[dim] for _, value in parts)
        padded = []
        for rows, value in parts:
            short = longest - value.shape[dim]
            if short:
                shape = list(value.shape)
                shape[dim] = short
                pad = value.new_full(shape, fill)
                value = torch.cat([pad, value] if left else [value, pad], dim=dim)
            padded.append((rows, value))
        parts = padded
    return _merge_rows(parts)


def _reassemble_cache(
    cache: DPNCache, runs: list, segments: list[range], left: bool, use_cache: bool
) -> None:
    """Fill `cache` from a ragged prefill: per segment, the keys and values of the groups that ran it (each in its
    own cache once the batch split) and their masks, padded to a common length in batch order.

    Args:
        runs: per segment, `[(rows, mask, cache, hidden states)]` of the groups that ran it.
    """
    for seg_runs, segment in zip(runs, segments):
        if seg_runs[0][2] is cache or not use_cache:  # the batch ran this segment as one group, into `cache`
            continue
        for i in segment:
            keys = _merge_padded([(r, c.layers[i].keys) for r, _, c, _ in seg_runs], 2, left)
            values = _merge_padded([(r, c.layers[i].values) for r, _, c, _ in seg_runs], 2, left)
            cache.update(keys, values, i)
    cache.segment_masks = [_merge_padded([(r, m) for r, m, _, _ in seg_runs], 1, left) for seg_runs in runs]


class DPNPreTrainedModel(LlavaPreTrainedModel):
    config_class = DPNConfig
    config: DPNConfig
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer"]
    # The pooled sequence has data-dependent length: no compiled full graph, no static cache.
    _can_compile_fullgraph = False
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module):
        """The library's init, then ours for DPN's own modules. Each branch dispatches on a *leaf* module (one that
        holds the parameters): transformers does not call this for a custom module without direct parameters.
        `transformers.initialization` leaves weights loaded from a checkpoint alone."""
        super()._init_weights(module)
        if isinstance(module, PoolingConv):
            init.constant_(module.weight, module.averaging_value)  # start as average pooling
        if isinstance(module, RouterCritic):
            init.zeros_(module.weight)  # start as the batch baseline
            init.zeros_(module.bias)


class DPNModel(LlavaModel, DPNPreTrainedModel):
    """Vision tower, projector and Llama decoder (as LLaVA) plus one pooling stage per pooling layer."""

    config_class = DPNConfig
    config: DPNConfig

    def __init__(self, config: DPNConfig):
        DPNPreTrainedModel.__init__(self, config)
        from transformers import AutoModel

        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.pyramid = nn.ModuleList(DynamicPoolingExperts(config) for _ in config.pooling_layers)
        self._encoder_cache: EncoderCache | None = None  # see set_encoder_cache
        self.post_init()

    # -- helpers ---------------------------------------------------------------------------------

    def _plan(self, compression: Compression) -> RoutingPlan:
        """The [`RoutingPlan`] of a `compression` (see [`parse_compression`])."""
        parsed = parse_compression(compression, self.config)
        mode = routing_mode(parsed)
        if mode:
            return RoutingPlan(mode, None, router_cost(parsed))
        return RoutingPlan("forced", compression_schedule(parsed, self.config))

    def _segments(self) -> list[range]:
        """Decoder layer indices of each segment: the layers between two pooling points."""
        bounds = [0, *self.config.pooling_layers, self.config.text_config.num_hidden_layers]
        return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def _embed(self, input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy):
        embeds = self.get_input_embeddings()(input_ids)
        is_visual = input_ids == self.config.image_token_id
        n_visual = is_visual.sum(-1)
        expected = self.config.num_visual_tokens
        bad = (n_visual != 0) & (n_visual != expected)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"sample {i} has {int(n_visual[i])} image tokens; DPN takes one image per sample, expanded to "
                f"{expected} image tokens by the processor (or none)"
            )
        if (n_visual > 0).any():
            starts = is_visual.int().argmax(-1)
            ends = input_ids.shape[1] - is_visual.flip(-1).int().argmax(-1)
            if ((ends - starts)[n_visual > 0] != expected).any():
                raise ValueError("the image tokens of a sample must form one contiguous block")
            if pixel_values is None:
                raise ValueError("input_ids contain image tokens but no pixel_values were given")
            if pixel_values.shape[0] != int((n_visual > 0).sum()):
                raise ValueError(
                    f"got {pixel_values.shape[0]} images for {int((n_visual > 0).sum())} samples with image tokens"
                )
            features = self._image_features(
                pixel_values, vision_feature_layer, vision_feature_select_strategy
            ).to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(is_visual.unsqueeze(-1), features)
        elif pixel_values is not None:
            raise ValueError("pixel_values were given but input_ids contain no image tokens")
        return embeds, is_visual

    def _tower(self, pixel_values, vision_feature_layer, vision_feature_select_strategy) -> torch.Tensor:
        """Vision tower + projector on `(n, 3, H, W)` images: `(n * num_visual_tokens, D)`."""
        features = self.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        return torch.cat(list(features), dim=0)

    def _image_features(
        self, pixel_values, vision_feature_layer, vision_feature_select_strategy
    ) -> torch.Tensor:
        """Features of every image, `(n * num_visual_tokens, D)`, through the attached [`EncoderCache`] when
        there is one and this is inference (eval mode, no gradients): the tower runs on the images it misses."""
        cache = self.encoder_cache
        if cache is None or not cache.enabled or self.training or torch.is_grad_enabled():
            return self._tower(pixel_values, vision_feature_layer, vision_feature_select_strategy)
        options = (vision_feature_layer, vision_feature_select_strategy)
        keys = [cache.key(image, *options) for image in pixel_values]
        found = {key: cache.get(key) for key in dict.fromkeys(keys)}  # an image twice in a batch runs once
        missing = [key for key, features in found.items() if features is None]
        if missing:
            first = [keys.index(key) for key in missing]
            computed = self._tower(pixel_values[first], *options)
            for key, features in zip(missing, computed.view(len(missing), -1, computed.shape[-1])):
                found[key] = features
                cache.put(key, features)
        return torch.cat([found[key].to(pixel_values.device) for key in keys], dim=0)

    @property
    def encoder_cache(self) -> EncoderCache | None:
        """The attached [`EncoderCache`] (None: every image runs through the vision tower)."""
        return self._encoder_cache

    def set_encoder_cache(self, cache: EncoderCache | None) -> None:
        """Attach a vision-encoder cache (or detach it with None): at inference, identical images (by content)
        then reuse the vision tower + projector output instead of running them again. See [`EncoderCache`]."""
        if cache is not None and not isinstance(cache, EncoderCache):
            raise TypeError(f"set_encoder_cache takes an EncoderCache or None, got {type(cache).__name__}")
        self._encoder_cache = cache

    def _route(
        self, stage: DynamicPoolingExperts, state: PrefillState, plan: RoutingPlan, forced: int | None
    ):
        """Expert per sample `(B,)`, its gate `(B,)` (the chosen probability; None when no router ran), the
        router probabilities `(B, E)` and the experts the token floor allowed `(B, E)` (auto only; else None),
        and the critic's value `(B,)` (training with `router_baseline="critic"` only; else None).

        The router and random routing choose among the experts the token floor allows (training: sampled from
        the feasible ones, as the reference's re-sampling; otherwise the feasible argmax). The gate is the
        chosen expert's probability under the full distribution, as in the reference. At inference the cost dial
        (`plan.cost`, `"auto:lambda=X"`) shifts the argmax: `log p_e - X * kept_e`, `kept_e` the share of the
        visual tokens expert `e` keeps.
        """
        hidden = state.hidden
        batch = hidden.shape[0]
        if forced is not None:
            return (
                torch.full((batch,), forced, dtype=torch.long, device=hidden.device),
                None,
                None,
                None,
                None,
            )
        cfg = self.config
        floor = cfg.train_token_floor if self.training else cfg.inference_token_floor
        feasible = stage.feasible_experts(state.rows, state.cols, floor)  # (B, E)
        if plan.mode == "random":
            return torch.multinomial(feasible.float(), 1).squeeze(-1), None, None, None, None
        features = router_input(hidden, state.is_router, cfg.router_token_reduction)
        probs = stage.router(features)  # (B, E) f32
        value = stage.router.value(features) if self.training and cfg.uses_router_critic else None
        allowed = probs.detach() * feasible
        if self.training:
            explore = cfg.router_explore if cfg.router_estimator == "reinforce" else 0.0
            sampling = allowed
            if explore:
                sampling = exploring(feasible_distribution(probs.detach(), feasible), feasible, explore)
            choice = torch.multinomial(sampling, 1).squeeze(-1)
        elif plan.cost:
            kept = torch.tensor([1.0 / (h * w) for h, w in stage.strides], device=probs.device)  # (E,)
            score = probs.detach().clamp_min(1e-30).log() - plan.cost * kept
            choice = score.masked_fill(~feasible, float("-inf")).argmax(-1)
        else:
            choice = allowed.argmax(-1)
        gate = probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        return choice, gate, probs, feasible, value

    def _pool_stage(self, s: int, state: PrefillState, plan: RoutingPlan, ragged: bool):
        """Route and pool the visual tokens after pooling layer `s`.

        With `ragged`, samples that took different experts here are split into groups (one per expert, plus
        one for the samples that were not pooled), each rebuilt on its own length, so that no sample is
        padded to another's path in the layers that follow.

        Returns:
            `(parts, choices, probs, feasible, value)`: `parts`, a list of `(rows, state)`, the states on the
            shortened sequences and the rows of `state` each one holds (`rows` None: all of them, in order; the
            one part is `state` itself when nothing was pooled); expert per sample `(B,)`, -1 where nothing was
            pooled (no image, or fewer than `min_visual_tokens` left); the router probabilities `(B, E)` and the
            experts the token floor allowed `(B, E)`, both None when no router ran, and the critic's value
            `(B,)` or None.
        """
        stage = self.pyramid[s]
        n_visual = state.rows * state.cols
        eligible = (n_visual >= self.config.min_visual_tokens) & (n_visual > 0)
        forced = plan.schedule[s] if plan.schedule is not None else None
        choice, gate, probs, feasible, value = self._route(stage, state, plan, forced)
        chosen = torch.where(eligible, choice, -1)
        identity = forced is not None and stage.strides[forced] == (1, 1)
        if not eligible.any() or identity:
            return [(None, state)], chosen, probs, feasible, value
        paths = torch.unique(chosen) if ragged else chosen[:1]
        if len(paths) == 1:
            return (
                [(None, self._pool_and_rebuild(stage, state, choice, gate, eligible))],
                chosen,
                probs,
                feasible,
                value,
            )
        parts = []
        for path in paths:
            rows = (chosen == path).nonzero().squeeze(-1)
            sub = _select_rows(state, rows)
            sub_gate = gate[rows] if gate is not None else None
            parts.append((rows, self._pool_and_rebuild(stage, sub, choice[rows], sub_gate, eligible[rows])))
        return parts, chosen, probs, feasible, value

    def _resolve_cache(self, cache: Cache | None, use_cache: bool) -> DPNCache | None:
        """The given `DPNCache`, a fresh one in place of an empty cache of another kind, or a new one if asked."""
        if cache is not None and not isinstance(cache, DPNCache):
            if cache.get_seq_length() > 0:
                raise ValueError(
                    "DPN needs a DPNCache: a non-empty cache of another kind cannot be continued"
                )
            cache = None
        if cache is None and use_cache:
            cache = DPNCache(config=self.config.text_config)
        return cache

    def _run_layers(self, segment: range, hidden, mask4d, positions, cache, use_cache: bool, all_hidden):
        """Run the decoder layers of one segment on `hidden` `(B, q, D)` with one mask and one set of positions.

        Returns:
            `(hidden, all_hidden)`: the segment's output and `all_hidden` with each layer's output appended
            (None stays None).
        """
        layers = self.language_model.layers
        pos_emb = self.language_model.rotary_emb(hidden, positions)
        for i in segment:
            hidden = layers[i](
                hidden, attention_mask=mask4d, position_ids=positions, cache=cache,
                use_cache=use_cache, position_embeddings=pos_emb,
            )  # fmt: skip
            if all_hidden is not None:
                all_hidden += (hidden,)
        return hidden, all_hidden

    def _prefill_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """The attention mask of a prefill over `mask` `(B, L)`: causal + key padding, `(B, 1, L, L)`.

        `None` only for an unpadded group under SDPA, whose attention then runs causal by itself
        (`is_causal` when given no mask) and may take its fused kernels; every other implementation (eager
        adds no mask at all when given None) gets the explicit causal mask.
        """
        if self.config.text_config._attn_implementation == "sdpa" and bool(mask.all()):
            return None
        return _additive_mask(mask, mask.shape[1], dtype)

    def _decode(self, input_ids, attention_mask, position_ids, cache: DPNCache, output_hidden_states: bool):
        """Run new tokens `(B, q)` against the cache: each segment attends to its own cached length, and the
        rotary position is that segment's count of real cached tokens (as the paper decodes)."""
        # generated ids are text, even an <image> id a model emits (as in HF LLaVA)
        hidden = self.get_input_embeddings()(input_ids)
        batch, q_len = hidden.shape[:2]
        device = hidden.device
        all_hidden = (hidden,) if output_hidden_states else None
        new_mask = attention_mask[:, -q_len:]
        for s, segment in enumerate(self._segments()):
            past = cache.segment_masks[s]
            key_mask = torch.cat([past, new_mask], dim=1)
            positions = past.sum(-1, keepdim=True) + torch.arange(q_len, device=device)
            if s == 0 and position_ids is not None:
                positions = position_ids[:, -q_len:]
            mask4d = _additive_mask(key_mask, q_len, hidden.dtype)
            hidden, all_hidden = self._run_layers(segment, hidden, mask4d, positions, cache, True, all_hidden)
            cache.segment_masks[s] = key_mask
        return DPNModelOutput(
            last_hidden_state=self.language_model.norm(hidden),
            cache=cache,
            attention_mask=new_mask,
            token_positions=torch.arange(q_len, device=device).expand(batch, -1)
            + attention_mask.shape[1]
            - q_len,
            hidden_states=all_hidden,
        )

    def _prefill_state(
        self, input_ids, embeds, is_visual, attention_mask, position_ids, plan: RoutingPlan
    ) -> PrefillState:
        """The state the prefill loop starts from: the embedded input, its mask, positions and tokens' kinds."""
        cfg = self.config
        is_router = input_ids == cfg.router_token_id
        has_image = is_visual.any(-1)
        if plan.mode == "auto" and (has_image & ~is_router.any(-1)).any():
            i = int((has_image & ~is_router.any(-1)).nonzero()[0, 0])
            raise ValueError(
                f"compression='auto' needs a <router> token (id {cfg.router_token_id}) after the question in every "
                f"sample with an image; sample {i} has none. Build prompts with the DPN processor, or force a "
                f"compression (one of {cfg.compression_factors}, or a schedule)."
            )
        device = input_ids.device
        rows0, cols0 = cfg.vision_grid
        positions = position_ids if position_ids is not None else _positions_from_mask(attention_mask)
        return PrefillState(
            hidden=embeds,
            mask=attention_mask,
            is_visual=is_visual,
            is_router=is_router & attention_mask.bool(),
            src=torch.where(attention_mask.bool(), torch.arange(input_ids.shape[1], device=device)[None], -1),
            rows=torch.where(has_image, rows0, 0).to(device),
            cols=torch.where(has_image, cols0, 0).to(device),
            positions=positions,
        )

    def _pool_and_rebuild(self, stage, state: PrefillState, choice, gate, eligible) -> PrefillState:
        """Pool each sample's visual block with its expert and rebuild the shortened batch.

        Returns the [`PrefillState`] on the new sequence (every field rebuilt); `state` is left as it was.
        Everything is rebuilt with one scatter; the only Python loop runs over the few distinct (grid, expert)
        groups.
        """
        hidden, mask = state.hidden, state.mask
        batch, length, dim = hidden.shape
        device = hidden.device
        rows, cols = state.rows, state.cols
        n_old = rows * cols
        strides = torch.tensor(stage.strides, device=device)  # (E, 2)
        chosen = torch.where(eligible, choice, 0)  # expert 0 for the rest: replaced by identity below
        new_rows, new_cols = pooled_grid((rows, cols), (strides[chosen, 0], strides[chosen, 1]))
        new_rows = torch.where(eligible, new_rows, rows)
        new_cols = torch.where(eligible, new_cols, cols)
        n_new = new_rows * new_cols

        # Gather each sample's visual block: (B, N, D).
        has_image = n_old > 0
        vis_start = state.is_visual.int().argmax(-1)
        n_max = int(n_old.max())
        offsets = torch.arange(max(n_max, 1), device=device)
        gather_idx = (vis_start[:, None] + offsets[None]).clamp(max=length - 1)
        visual = hidden.gather(1, gather_idx[..., None].expand(-1, -1, dim))

        # Pool group by group: samples sharing (rows, cols, expert) share one pooling call.
        n_new_max = max(int(n_new.max()), 1)
        pooled = hidden.new_zeros(batch, n_new_max, dim)
        keys = torch.stack([rows, cols, torch.where(eligible, choice, -1)], dim=-1)
        groups, inverse = torch.unique(keys[has_image], dim=0, return_inverse=True)
        image_rows = has_image.nonzero().squeeze(-1)
        for g, (r, c, expert) in enumerate(groups.tolist()):
            members = image_rows[inverse == g]
            grid = visual[members, : r * c].reshape(-1, r, c, dim).permute(0, 3, 1, 2)
            out = grid if expert < 0 else stage.pool(grid, expert)
            out = out.flatten(2).transpose(1, 2)  # (G, r' * c', D)
            pooled[members, : out.shape[1]] = out
        if gate is not None:  # scale by the chosen probability so the router gets a gradient
            scale = torch.where(eligible, gate, torch.ones_like(gate)).to(pooled.dtype)
            pooled = pooled * scale[:, None, None]

        # New rank of each real token among real tokens; the visual block shrinks from n_old to n_new.
        real = mask.bool()
        rank = real.long().cumsum(-1) - 1
        vis_rank = torch.where(has_image, rank.gather(1, vis_start[:, None]).squeeze(-1), length)
        after = rank >= (vis_rank + n_old)[:, None]
        new_rank = torch.where(after, rank - (n_old - n_new)[:, None], rank)
        new_real = real.sum(-1) - n_old + n_new
        new_len = int(new_real.max())
        left_padded = bool(
            real[:, -1].all()
        )  # unless right padded: the last position is real for every sample
        pad_offset = (new_len - new_real) if left_padded else torch.zeros_like(new_real)

        keep_text = real & ~state.is_visual
        dest_text = torch.where(keep_text, pad_offset[:, None] + new_rank, new_len)
        pool_slots = torch.arange(n_new_max, device=device)
        pool_valid = pool_slots[None] < n_new[:, None]
        dest_pool = torch.where(
            pool_valid, (pad_offset + vis_rank.clamp(max=length))[:, None] + pool_slots, new_len
        )
        dest = torch.cat([dest_text, dest_pool], dim=1)  # (B, L + N'), dummy column new_len is dropped

        def scatter(values_text, values_pool, fill):
            src = torch.cat([values_text, values_pool], dim=1)
            shape = (batch, new_len + 1, *src.shape[2:])
            index = dest.view(batch, -1, *([1] * (src.dim() - 2))).expand_as(src)
            return torch.full(shape, fill, dtype=src.dtype, device=device).scatter(1, index, src)[:, :new_len]

        new_mask = scatter(keep_text.long(), pool_valid.long(), 0)
        return PrefillState(
            hidden=scatter(hidden, pooled, 0.0),
            mask=new_mask,
            is_visual=scatter(torch.zeros_like(keep_text), pool_valid, False),
            is_router=scatter(state.is_router & keep_text, torch.zeros_like(pool_valid), False),
            src=scatter(state.src, torch.full_like(pool_slots[None].expand(batch, -1), -1), -1),
            rows=new_rows,
            cols=new_cols,
            positions=_positions_from_mask(new_mask),
        )

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        compression: Compression = "auto",
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        output_hidden_states: bool | None = None,
        ragged: bool | None = None,
        **kwargs,
    ) -> DPNModelOutput:
        """Run the pyramid decoder: [`_prefill`] on a prompt (no cache, or an empty one), [`_decode`] on new
        tokens against a filled `DPNCache`.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): token ids; each image is a block of
                `config.num_visual_tokens` image tokens, the `<router>` token follows the question.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, size, size)`, *optional*): one image
                per sample whose input_ids hold image tokens, in batch order.
            attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real tokens;
                left or right padding. During decoding it spans the cached tokens too, as in `generate`.
            position_ids (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): positions before the
                first pooling layer; derived from the attention mask when omitted.
            cache (`DPNCache`, *optional*): cache from an earlier call; an empty `DynamicCache` is replaced.
            use_cache (`bool`, *optional*): return a cache for decoding.
            compression (`str`, `int` or `Sequence[int]`): `"auto"` (router: sample in training, argmax in
                eval, among the experts the token floor allows); `"auto:lambda=X"` (the router with the cost dial:
                at inference `argmax_e log p_e - X * kept_e`, `kept_e` the share of visual tokens expert `e` keeps,
                so one trained model trades accuracy for FLOPs without retraining); `"random"` (a uniformly drawn feasible expert
                per sample and pooling layer, no router); an expert's factor (1, 2, 4 by default) forced at every
                pooling layer (1 is dense); or a schedule, one factor per pooling layer (`[1, 2, 4]`, `"1,2,4"`).
                Parsed by [`parse_compression`]; invalid values raise `ValueError`.
            ragged (`bool`, *optional*): after a pooling stage whose samples took different experts, run the rest
                of the prefill per expert path, each group at its own length, instead of padding every sample to the
                batch's longest path (same outputs, within float rounding; the cache decodes the whole batch as
                before). Default: on at inference, off in training (`not self.training`): under DeepSpeed ZeRO-3
                every rank must run the same modules in the same order (each layer's parameters are gathered as it
                runs), and per-group layer calls that differ between ranks would break those collectives. It is
                differentiable, so `ragged=True` may be passed in single-process training. A batch splits where
                its samples' paths differ: `auto` or `random` choices, or samples that are not pooled (no image,
                too few tokens) beside ones that are.
        """
        cfg = self.config
        use_cache = cfg.text_config.use_cache if use_cache is None else use_cache
        output_hidden_states = bool(output_hidden_states)
        ragged = not self.training if ragged is None else ragged
        plan = self._plan(compression)
        if input_ids is None:
            raise ValueError(
                "DPN needs input_ids to find the image and router tokens (inputs_embeds alone is not enough)"
            )
        batch, q_len = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(batch, q_len, dtype=torch.long, device=device)
        attention_mask = attention_mask.long()

        cache = self._resolve_cache(cache, use_cache)
        if cache is not None and cache.get_seq_length() > 0:
            if pixel_values is not None:
                raise ValueError("images can only be given with the prompt, not while decoding from a cache")
            return self._decode(input_ids, attention_mask, position_ids, cache, output_hidden_states)
        return self._prefill(
            input_ids,
            pixel_values,
            attention_mask,
            position_ids,
            cache,
            use_cache=use_cache,
            plan=plan,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            output_hidden_states=output_hidden_states,
            ragged=ragged,
        )

    def _prefill(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.FloatTensor | None,
        attention_mask: torch.LongTensor,
        position_ids: torch.LongTensor | None,
        cache: DPNCache | None,
        use_cache: bool,
        plan: RoutingPlan,
        vision_feature_layer: int | None,
        vision_feature_select_strategy: str | None,
        output_hidden_states: bool,
        ragged: bool = True,
    ) -> DPNModelOutput:
        """Run the prompt through the pyramid: each segment's layers on the current [`PrefillState`], then its
        pooling stage (route, pool, rebuild) on the way to the next segment; fills `cache` if given.

        With `ragged`, a pooling stage whose samples took different experts splits the batch into groups by the
        path taken so far ([`_pool_stage`]); each group runs the rest of the prefill at its own length (its own
        `DPNCache` for those layers), and the outputs are reassembled in batch order at the end, padded to a
        common length on the input's padding side (left unless the input is right padded): hidden states,
        masks, token positions, the cache's keys, values and per-segment masks, so a later decode of the whole
        batch works as after an unragged prefill.
        """
        cfg = self.config
        batch = input_ids.shape[0]
        device = input_ids.device
        embeds, is_visual = self._embed(
            input_ids, pixel_values, vision_feature_layer, vision_feature_select_strategy
        )
        state = self._prefill_state(input_ids, embeds, is_visual, attention_mask, position_ids, plan)
        left = bool(attention_mask[:, -1].all())  # pad outputs on the left unless the input is right padded
        n_stages = len(self.pyramid)
        segments = self._segments()
        # the groups alive: (rows of the batch, state, cache); one group (the batch, in order) until a split
        groups: list[tuple[torch.Tensor | None, PrefillState, DPNCache | None]] = [(None, state, cache)]
        runs = []  # per segment: [(rows, mask, cache, hidden states of its layers)] of the groups that ran it
        stage_out = []  # per pooling stage: [(rows, choices, probs, feasible, value)]
        visual_counts = [state.rows * state.cols]
        for s, segment in enumerate(segments):
            seg_runs, next_groups, seg_stage = [], [], []
            for rows, g_state, g_cache in groups:
                mask = g_state.mask
                mask4d = self._prefill_mask(mask, g_state.hidden.dtype)
                layer_hidden = () if output_hidden_states else None
                hidden, layer_hidden = self._run_layers(
                    segment, g_state.hidden, mask4d, g_state.positions, g_cache, use_cache, layer_hidden
                )
                g_state = replace(g_state, hidden=hidden)
                seg_runs.append((rows, mask, g_cache, layer_hidden))
                if s == n_stages:
                    next_groups.append((rows, g_state, g_cache))
                    continue
                parts, chosen, probs, feasible, value = self._pool_stage(s, g_state, plan, ragged)
                seg_stage.append((rows, chosen, probs, feasible, value))
                for sub_rows, sub_state in parts:
                    if sub_rows is None:
                        next_groups.append((rows, sub_state, g_cache))
                        continue
                    sub_cache = DPNCache(config=cfg.text_config) if g_cache is not None else None
                    next_groups.append((sub_rows if rows is None else rows[sub_rows], sub_state, sub_cache))
            runs.append(seg_runs)
            groups = next_groups
            if s < n_stages:
                stage_out.append(seg_stage)
                visual_counts.append(_merge_rows([(r, st.rows * st.cols) for r, st, _ in groups]))

        choices = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        if stage_out:
            choices = torch.stack([_merge_rows([(r, c) for r, c, *_ in out]) for out in stage_out], dim=1)
        probs_all = [
            _merge_rows([(r, p) for r, _, p, _, _ in out]) for out in stage_out if out[0][2] is not None
        ]
        feasible_all = [
            _merge_rows([(r, f) for r, _, _, f, _ in out]) for out in stage_out if out[0][3] is not None
        ]
        values_all = [_merge_rows([(r, v) for r, *_, v in out]) for out in stage_out if out[0][4] is not None]
        seq_lens = [
            _merge_rows([(r, m.sum(-1)) for r, m, _, _ in seg_runs])
            for seg_runs, seg in zip(runs, segments)
            for _ in seg
        ]
        all_hidden = None
        if output_hidden_states:
            all_hidden = (embeds,)
            for seg_runs, segment in zip(runs, segments):
                for k in range(len(segment)):
                    all_hidden += (_merge_padded([(r, h[k]) for r, _, _, h in seg_runs], 1, left),)
        if cache is not None:
            _reassemble_cache(cache, runs, segments, left, use_cache)
        final = [(r, st) for r, st, _ in groups]
        router_probs = torch.stack(probs_all, dim=1) if probs_all else None
        r_loss = None
        if router_probs is not None:
            r_loss = routing_loss(
                router_probs,
                choices,
                choices >= 0,
                cfg.routing_loss_scales,
                cfg.routing_loss_target,
                expert=cfg.routing_loss_expert,
                reduction=cfg.routing_loss_reduction,
            )
        return DPNModelOutput(
            last_hidden_state=self.language_model.norm(
                _merge_padded([(r, st.hidden) for r, st in final], 1, left)
            ),
            cache=cache,
            attention_mask=_merge_padded([(r, st.mask) for r, st in final], 1, left),
            token_positions=_merge_padded([(r, st.src) for r, st in final], 1, left, fill=-1),
            expert_choices=choices,
            router_probs=router_probs,
            router_feasible=torch.stack(feasible_all, dim=1) if feasible_all else None,
            router_values=torch.stack(values_all, dim=1) if values_all else None,
            visual_tokens=torch.stack(visual_counts, dim=1),
            layer_seq_lens=torch.stack(seq_lens, dim=1),
            routing_loss=r_loss,
            hidden_states=all_hidden,
        )


class DPNForConditionalGeneration(DPNPreTrainedModel, GenerationMixin):
    """DPN with a language-modelling head: training loss, `generate()`, conversion from llava-hf."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: DPNConfig):
        super().__init__(config)
        self.model = DPNModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def encoder_cache(self) -> EncoderCache | None:
        """The vision-encoder cache attached with [`set_encoder_cache`], or None."""
        return self.model.encoder_cache

    def set_encoder_cache(self, cache: EncoderCache | None) -> None:
        """Attach (or, with None, detach) an [`EncoderCache`]: at inference (eval mode, no gradients) identical
        images reuse the vision tower + projector output, so a multi-turn chat about one image runs the tower
        once. `model.set_encoder_cache(EncoderCache(max_bytes=256 * 2**20))`."""
        self.model.set_encoder_cache(cache)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        compression: Compression = "auto",
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        ragged: bool | None = None,
        reinforce_groups: torch.LongTensor | None = None,
        **kwargs,
    ) -> DPNCausalLMOutputWithPast:
        """Forward pass; see [`DPNModel.forward`] for the inputs.

        Args:
            labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*): target ids aligned with
                `input_ids` (not shifted), -100 where no loss is taken. They follow their tokens through
                the pooling, so the loss is the usual next-token loss over the text.
            logits_to_keep (`int`): compute logits for the last this many positions only (0 = all).
            ragged (`bool`, *optional*): run the prefill per expert path after a pooling stage (default: at
                inference only; see [`DPNModel.forward`]).
            reinforce_groups (`torch.LongTensor` of shape `(batch,)`, *optional*): training with
                `router_estimator="reinforce"`: rows with one id are one sample repeated, each routed on its
                own; the REINFORCE baseline is then the group's (RLOO, [`reinforce_loss`]).
        """
        out = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            compression=compression,
            output_hidden_states=output_hidden_states,
            ragged=ragged,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        lm_loss = loss = rf_loss = None
        if labels is not None:
            src = out.token_positions
            moved = labels.gather(1, src.clamp(min=0)).masked_fill(src < 0, -100)
            if logits_to_keep:
                moved = moved[:, -logits_to_keep:]
            lm_loss = self.loss_function(
                logits=logits, labels=moved, vocab_size=self.config.text_config.vocab_size, **kwargs
            )
            loss = lm_loss
            if out.routing_loss is not None:
                loss = lm_loss + self.config.routing_loss_weight * out.routing_loss
            if self.training and out.router_probs is not None and self.config.router_estimator == "reinforce":
                with torch.no_grad():
                    sample_loss = per_sample_lm_loss(logits, moved)
                    # mean over the pooled segments of the fraction of visual tokens kept (1 = dense)
                    counts = out.visual_tokens.float()
                    cost = (counts[:, 1:] / counts[:, :1].clamp(min=1)).mean(-1)
                rf_loss = reinforce_loss(
                    out.router_probs,
                    out.router_feasible,
                    out.expert_choices,
                    sample_loss,
                    cost,
                    self.config.router_cost_weight,
                    out.router_values,
                    self.config.router_explore,
                    reinforce_groups,
                    self.config.router_entropy_weight,
                    self.config.router_imitation_weight,
                )
                loss = loss + self.config.router_reinforce_weight * rf_loss

        prefill_flops = None
        if out.layer_seq_lens is not None:
            has_image = out.visual_tokens[:, 0] > 0
            kept = (
                out.attention_mask.sum(-1)
                if not logits_to_keep
                else torch.full_like(has_image, logits_to_keep, dtype=torch.long)
            )
            prefill_flops = flops_lib.prefill_flops_batch(
                self.config,
                out.layer_seq_lens,
                has_image,
                lm_head_tokens=kept,
                num_routed_layers=None if out.router_probs is not None else 0,  # forced: no router runs
            )
        return DPNCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            lm_loss=lm_loss,
            routing_loss=out.routing_loss,
            reinforce_loss=rf_loss,
            cache=out.cache,
            token_positions=out.token_positions,
            expert_choices=out.expert_choices,
            router_probs=out.router_probs,
            visual_tokens=out.visual_tokens,
            layer_seq_lens=out.layer_seq_lens,
            prefill_flops=prefill_flops,
            hidden_states=out.hidden_states,
        )

    # -- conversion from llava-hf ----------------------------------------------------------------

    @classmethod
    def from_llava(
        cls, llava: str | LlavaForConditionalGeneration, router_token_id: int | None = None, **dpn_options
    ) -> DPNForConditionalGeneration:
        """Build a DPN model from a llava-hf checkpoint directory (or loaded model).

        The LLaVA weights are copied unchanged; the router weights are freshly initialised. When
        `router_token_id` is not given, one token is appended to the vocabulary for `<router>` and the
        embeddings and lm head are resized (new rows: the mean of the existing ones, as HF does); when it is
        given (a free row of a padded vocabulary), that row is set to the mean the same way.

        Args:
            llava (`str` or `LlavaForConditionalGeneration`): local checkpoint directory or model.
            router_token_id (`int`, *optional*): id of an existing `<router>` token.
            **dpn_options: DPNConfig fields (pooling_layers, expert_strides, pooling_type, ...).
        """
        if not isinstance(llava, LlavaForConditionalGeneration):
            llava = LlavaForConditionalGeneration.from_pretrained(llava, dtype=torch.float32)
        if not isinstance(llava.config, LlavaConfig):
            raise ValueError(f"expected a LLaVA checkpoint, got model_type {llava.config.model_type!r}")
        if router_token_id is None:
            old_vocab = llava.config.text_config.vocab_size
            llava.resize_token_embeddings(old_vocab + 1, mean_resizing=True)
            router_token_id = old_vocab
        else:
            with torch.no_grad():
                for table in (llava.get_input_embeddings().weight, llava.get_output_embeddings().weight):
                    others = torch.cat([table[:router_token_id], table[router_token_id + 1 :]])
                    table[router_token_id] = others.mean(0)
        base = llava.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "image_seq_length"):
            base.pop(key, None)
        num_layers = llava.config.text_config.num_hidden_layers
        dpn_options.setdefault("pooling_layers", [num_layers // 4, num_layers // 2, 3 * num_layers // 4])
        config = DPNConfig(**base, router_token_id=router_token_id, **dpn_options)
        model = cls(config)
        missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
        not_router = [k for k in missing if not k.startswith("model.pyramid.")]
        if not_router or unexpected:
            raise ValueError(
                f"LLaVA weights did not map onto DPN: missing {not_router[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(llava.dtype)


__all__ = [
    "DPNCausalLMOutputWithPast",
    "DPNForConditionalGeneration",
    "DPNModel",
    "DPNModelOutput",
    "DPNPreTrainedModel",
    "per_sample_lm_loss",
    "reinforce_loss",
    "routing_loss",
]
