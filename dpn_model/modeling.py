"""The Dynamic Pyramid Network: LLaVA whose decoder pools visual tokens with per-sample pooling experts.

Built from transformers' own LLaVA pieces (CLIP vision tower, `LlavaMultiModalProjector`, Llama decoder
layers, RMSNorm and rotary embedding); only the decoder loop is ours. This module holds the Hugging Face
classes: [`DPNModel`] embeds the prompt (text and image features), runs the prefill through the pyramid
(`dpn_model.pyramid`: decoder layers in segments, visual tokens pooled between them, the batch split by path
at inference and reassembled by `dpn_model.ragged`) or decodes new tokens against the cache;
[`DPNForConditionalGeneration`] adds the lm head, the losses (`dpn_model.losses`) and the prefill's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from dpn_model.configuration import Compression, DPNConfig
from dpn_model.encoder_cache import EncoderCache
from dpn_model.losses import (
    outcome_loss,
    per_sample_lm_loss,
    reinforce_loss,
    routing_loss,
    visual_token_cost,
)
from dpn_model.pooling import DynamicPoolingExperts, PoolingConv, RouterCritic
from dpn_model.pyramid import PyramidPrefill, RoutingPlan, additive_mask, initial_state, run_layers
from dpn_model.ragged import reassemble_cache


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


def _checked_mask(
    input_ids: torch.LongTensor | None, attention_mask: torch.Tensor | None
) -> torch.LongTensor:
    """The attention mask as long (all ones when not given); DPN cannot run without `input_ids`."""
    if input_ids is None:
        raise ValueError(
            "DPN needs input_ids to find the image and router tokens (inputs_embeds alone is not enough)"
        )
    if attention_mask is None:
        attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
    return attention_mask.long()


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
            mask4d = additive_mask(key_mask, q_len, hidden.dtype)
            hidden, all_hidden = run_layers(
                self.language_model, segment, hidden, mask4d, positions, cache, True, all_hidden
            )
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
                eval, among the experts the token floor allows); `"auto:lambda=X"` (the cost dial: at inference
                `argmax_e log p_e - X * kept_e`, `kept_e` the share of visual tokens expert `e` keeps, so one
                model trades accuracy for FLOPs without retraining); `"random"` (a uniformly drawn feasible
                expert per sample and pooling layer); an expert's factor (1, 2, 4 by default; 1 is dense) at
                every pooling layer; or a schedule, one factor per pooling layer (`[1, 2, 4]`, `"1,2,4"`).
                Parsed by [`parse_compression`]; invalid values raise `ValueError`.
            ragged (`bool`, *optional*): after a pooling stage whose samples took different experts, run the rest
                of the prefill per expert path, each group at its own length (same outputs, within float
                rounding; the cache decodes the whole batch as before). Default: at inference only, as DeepSpeed
                ZeRO-3 needs every rank to run the same modules (see `dpn_model.pyramid`); differentiable, so
                `ragged=True` may be passed in single-process training.
        """
        plan = RoutingPlan.from_compression(compression, self.config)
        attention_mask = _checked_mask(input_ids, attention_mask)
        use_cache = self.config.text_config.use_cache if use_cache is None else use_cache
        cache = self._resolve_cache(cache, use_cache)
        if cache is not None and cache.get_seq_length() > 0:
            if pixel_values is not None:
                raise ValueError("images can only be given with the prompt, not while decoding from a cache")
            return self._decode(input_ids, attention_mask, position_ids, cache, bool(output_hidden_states))
        prefill = self._pyramid_prefill(plan, ragged, use_cache, bool(output_hidden_states))
        vision = (vision_feature_layer, vision_feature_select_strategy)
        return self._prefill(prefill, input_ids, pixel_values, attention_mask, position_ids, cache, vision)

    def _pyramid_prefill(
        self, plan: RoutingPlan, ragged: bool | None, use_cache: bool, output_hidden_states: bool
    ) -> PyramidPrefill:
        """This model's [`PyramidPrefill`] with the options of one forward (`ragged` None: at inference only)."""
        return PyramidPrefill(
            language_model=self.language_model,
            stages=self.pyramid,
            segments=self._segments(),
            config=self.config,
            training=self.training,
            plan=plan,
            ragged=not self.training if ragged is None else ragged,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )

    def _prefill(
        self, prefill: PyramidPrefill, input_ids, pixel_values, attention_mask, position_ids, cache, vision
    ) -> DPNModelOutput:
        """Embed the prompt, run it through the pyramid ([`PyramidPrefill`]) and reassemble the outputs, and the
        cache if given, in batch order, padded to a common length on the input's padding side (left unless the
        input is right padded), so a later decode of the whole batch works as after an unragged prefill."""
        embeds, is_visual = self._embed(input_ids, pixel_values, *vision)
        state = initial_state(
            self.config, input_ids, embeds, is_visual, attention_mask, position_ids, prefill.plan
        )
        left = bool(state.mask[:, -1].all())  # pad outputs on the left unless the input is right padded
        run = prefill.run(state, cache)
        choices = run.expert_choices(state.mask.shape[0], state.mask.device)
        router_probs = run.routing_field("probs")
        if cache is not None:
            reassemble_cache(cache, run.segment_runs, run.segments, left, prefill.use_cache)
        return DPNModelOutput(
            last_hidden_state=self.language_model.norm(run.final("hidden", left)),
            cache=cache,
            attention_mask=run.final("mask", left),
            token_positions=run.final("src", left, fill=-1),
            expert_choices=choices,
            router_probs=router_probs,
            router_feasible=run.routing_field("feasible"),
            router_values=run.routing_field("value"),
            visual_tokens=torch.stack(run.visual_counts, dim=1),
            layer_seq_lens=run.layer_seq_lens(),
            routing_loss=self._routing_loss(router_probs, choices),
            hidden_states=run.hidden_states(embeds, left) if prefill.output_hidden_states else None,
        )

    def _routing_loss(self, router_probs: torch.Tensor | None, choices: torch.Tensor) -> torch.Tensor | None:
        """The configured [`routing_loss`] of a prefill; None when no router ran (not `compression="auto"`)."""
        cfg = self.config
        if router_probs is None or cfg.router_predicts_outcome:
            return None
        return routing_loss(
            router_probs,
            choices,
            choices >= 0,
            cfg.routing_loss_scales,
            cfg.routing_loss_target,
            expert=cfg.routing_loss_expert,
            reduction=cfg.routing_loss_reduction,
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
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache, use_cache=use_cache, compression=compression,
            output_hidden_states=output_hidden_states, ragged=ragged,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = lm_loss = rf_loss = None
        if labels is not None:
            loss, lm_loss, rf_loss = self._losses(
                out, logits, labels, logits_to_keep, reinforce_groups, **kwargs
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
            prefill_flops=self._prefill_flops(out, logits_to_keep),
            hidden_states=out.hidden_states,
        )

    def _losses(self, out: DPNModelOutput, logits, labels, logits_to_keep: int, reinforce_groups, **kwargs):
        """`(loss, lm_loss, reinforce_loss)`: the next-token loss on the labels moved to the output positions,
        plus the weighted routing loss (auto mode) and the routers' own term (auto mode, training, `"reinforce"` or
        `"outcome"`; returned as `reinforce_loss`)."""
        cfg = self.config
        src = out.token_positions
        moved = labels.gather(1, src.clamp(min=0)).masked_fill(src < 0, -100)
        if logits_to_keep:
            moved = moved[:, -logits_to_keep:]
        lm_loss = self.loss_function(
            logits=logits, labels=moved, vocab_size=cfg.text_config.vocab_size, **kwargs
        )
        loss = lm_loss
        if out.routing_loss is not None:
            loss = lm_loss + cfg.routing_loss_weight * out.routing_loss
        rf_loss = None
        if self.training and out.router_probs is not None and cfg.router_estimator != "scale":
            rf_loss = self._router_term(out, logits, moved, reinforce_groups)
            loss = loss + cfg.router_reinforce_weight * rf_loss
        return loss, lm_loss, rf_loss

    def _router_term(self, out: DPNModelOutput, logits, labels, reinforce_groups) -> torch.Tensor:
        """The routers' own loss in training: the REINFORCE term ([`reinforce_loss`]) or the outcome fit
        ([`outcome_loss`]), from each sample's LM loss on the path it took (`labels` moved to the outputs)."""
        cfg = self.config
        with torch.no_grad():
            sample_loss = per_sample_lm_loss(logits, labels)
        if cfg.router_predicts_outcome:
            return outcome_loss(out.router_probs, out.expert_choices, sample_loss)
        with torch.no_grad():
            cost = visual_token_cost(out.visual_tokens)
        return reinforce_loss(
            out.router_probs,
            out.router_feasible,
            out.expert_choices,
            sample_loss,
            cost,
            cfg.router_cost_weight,
            values=out.router_values,
            explore=cfg.router_explore,
            groups=reinforce_groups,
            entropy_weight=cfg.router_entropy_weight,
            imitation_weight=cfg.router_imitation_weight,
        )

    def _prefill_flops(self, out: DPNModelOutput, logits_to_keep: int) -> torch.Tensor | None:
        """Analytic FLOPs of a prefill per sample (`dpn_model.flops`), from the lengths its layers ran on; None
        for a decode step."""
        if out.layer_seq_lens is None:
            return None
        has_image = out.visual_tokens[:, 0] > 0
        kept = (
            out.attention_mask.sum(-1)
            if not logits_to_keep
            else torch.full_like(has_image, logits_to_keep, dtype=torch.long)
        )
        return flops_lib.prefill_flops_batch(
            self.config,
            out.layer_seq_lens,
            has_image,
            lm_head_tokens=kept,
            num_routed_layers=None if out.router_probs is not None else 0,  # forced: no router runs
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
]
