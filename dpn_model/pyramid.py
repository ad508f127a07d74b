"""The pyramid's prefill: the decoder layers in segments, and between two segments a pooling stage.

The loop runs the decoder layers in *segments*: after the last layer of a segment (the configured
`pooling_layers`) the visual tokens of each sample are pooled by the expert its router chose (route), and the
batch is rebuilt on a shorter sequence with contiguous positions and a fresh padding mask (pool and rebuild).
Samples that choose different experts are grouped by (grid, expert), never looped over one by one.

With `ragged` (the default at inference) a pooling stage whose samples took different experts splits the batch
into [`Group`]s by the path taken so far; each group runs the rest of the prefill at its own length (its own
`DPNCache` for those layers), so no sample pays for another's longer path, and the outputs (and the cache) are
reassembled in batch order at the end ([`PrefillRun`], `dpn_model.ragged`). It is off in training: under
DeepSpeed ZeRO-3 every rank must run the same modules in the same order (each layer's parameters are gathered
as it runs), and per-group layer calls that differ between ranks would break those collectives.

What the loop carries is named: a [`PrefillState`] per group, a [`Routing`] per routed group and stage, a
[`StageRecord`] per group and pooling stage, a `GroupRun` per group and segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from dpn_model.cache import DPNCache
from dpn_model.configuration import Compression, CompressionSpec, DPNConfig
from dpn_model.losses import exploring, feasible_distribution
from dpn_model.pooling import DynamicPoolingExperts, pooled_grid, router_input
from dpn_model.ragged import GroupRun, merge_padded, merge_rows, select_rows


@dataclass(frozen=True)
class RoutingPlan:
    """How one forward chooses its experts (from its `compression`, [`parse_compression`]).

    Attributes:
        mode: `"auto"` (the router), `"random"`, or `"forced"` (a factor or a schedule).
        expert_indices: the expert index forced at each pooling layer (forced only; else None).
        cost: the cost dial `lambda` of `"auto:lambda=X"` (inference: argmax of `log p - lambda * kept share`).
    """

    mode: str
    expert_indices: list[int] | None = None
    cost: float = 0.0

    @classmethod
    def from_compression(cls, compression: Compression | CompressionSpec, config: DPNConfig) -> RoutingPlan:
        """The plan of a `compression` (parsed by [`CompressionSpec.parse`]); invalid values raise `ValueError`."""
        spec = CompressionSpec.parse(compression, config)
        if spec.mode == "forced":
            return cls("forced", spec.expert_indices(config))
        return cls(spec.mode, None, spec.cost)


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


@dataclass(frozen=True)
class Routing:
    """What routing chose at one pooling stage for the samples of one group (`B` of them, `E` experts).

    Args:
        choice (`torch.LongTensor` of shape `(B,)`): expert per sample (also for samples that are not pooled).
        gate (`torch.FloatTensor` of shape `(B,)`, *optional*): the chosen expert's probability; None when no
            router ran (forced or random) and for an outcome router (`router_estimator="outcome"`).
        probs, feasible (`(B, E)`, *optional*): router probabilities and the experts the token floor allowed
            (auto only).
        value (`torch.FloatTensor` of shape `(B,)`, *optional*): the critic's value (training with
            `router_baseline="critic"` only).
    """

    choice: torch.Tensor
    gate: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    feasible: torch.Tensor | None = None
    value: torch.Tensor | None = None


@dataclass(frozen=True)
class StageRecord:
    """What one pooling stage decided for one group: the rows of the output's routing fields.

    Args:
        rows (`torch.LongTensor` of shape `(G,)`, *optional*): the group's rows of the batch (None: all, in order).
        chosen (`torch.LongTensor` of shape `(G,)`): expert per sample, -1 where nothing was pooled (no image,
            or fewer than `min_visual_tokens` left).
        probs, feasible, value: as in [`Routing`].
    """

    rows: torch.Tensor | None
    chosen: torch.Tensor
    probs: torch.Tensor | None
    feasible: torch.Tensor | None
    value: torch.Tensor | None


@dataclass(frozen=True)
class Group:
    """Samples of the batch that took one path so far: their rows (None: the whole batch, in order), their state
    and the cache their layers write to (the batch's until the batch splits, then the group's own)."""

    rows: torch.Tensor | None
    state: PrefillState
    cache: DPNCache | None


@dataclass
class PrefillRun:
    """Everything the prefill loop produced, and its reassembly into batch-order outputs.

    Args:
        segments: decoder layer indices of each segment.
        groups: the groups alive after the last segment.
        segment_runs: per segment, the `GroupRun` of each group that ran it.
        stage_records: per pooling stage, the [`StageRecord`] of each group that reached it.
        visual_counts: visual tokens per sample `(B,)` before the first pooling stage and after each one.
    """

    segments: list[range]
    groups: list[Group]
    visual_counts: list[torch.Tensor]
    segment_runs: list[list[GroupRun]] = field(default_factory=list)
    stage_records: list[list[StageRecord]] = field(default_factory=list)

    def expert_choices(self, batch: int, device: torch.device) -> torch.Tensor:
        """Expert per sample and pooling stage `(B, stages)`, -1 where nothing was pooled."""
        if not self.stage_records:
            return torch.full((batch, 0), -1, dtype=torch.long, device=device)
        merged = [merge_rows([(r.rows, r.chosen) for r in records]) for records in self.stage_records]
        return torch.stack(merged, dim=1)

    def routing_field(self, name: str) -> torch.Tensor | None:
        """A [`StageRecord`] field (`probs`, `feasible`, `value`) per sample, stacked over the stages where the
        router gave it (`(B, stages, ...)`), or None where no stage did."""
        merged = [
            merge_rows([(r.rows, getattr(r, name)) for r in records])
            for records in self.stage_records
            if getattr(records[0], name) is not None
        ]
        return torch.stack(merged, dim=1) if merged else None

    def layer_seq_lens(self) -> torch.Tensor:
        """Real sequence length each decoder layer ran on, per sample, `(B, layers)`."""
        lengths = [
            merge_rows([(run.rows, run.mask.sum(-1)) for run in seg_runs])
            for seg_runs, segment in zip(self.segment_runs, self.segments)
            for _ in segment
        ]
        return torch.stack(lengths, dim=1)

    def hidden_states(self, embeds: torch.Tensor, left: bool) -> tuple[torch.Tensor, ...]:
        """The embeddings and each layer's output in batch order, padded per layer (needs the per-layer outputs)."""
        all_hidden = (embeds,)
        for seg_runs, segment in zip(self.segment_runs, self.segments):
            for k in range(len(segment)):
                all_hidden += (merge_padded([(run.rows, run.hidden_states[k]) for run in seg_runs], 1, left),)
        return all_hidden

    def final(self, name: str, left: bool, fill: float = 0) -> torch.Tensor:
        """A [`PrefillState`] field of the groups alive at the end, in batch order, padded to the longest."""
        return merge_padded([(g.rows, getattr(g.state, name)) for g in self.groups], 1, left, fill=fill)


def additive_mask(key_mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
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


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Contiguous positions over real tokens (0 for padding), as `generate` makes them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) * mask.long()


def prefill_mask(mask: torch.Tensor, dtype: torch.dtype, attn_implementation: str) -> torch.Tensor | None:
    """The attention mask of a prefill over `mask` `(B, L)`: causal + key padding, `(B, 1, L, L)`.

    `None` only for an unpadded group under SDPA, whose attention then runs causal by itself
    (`is_causal` when given no mask) and may take its fused kernels; every other implementation (eager
    adds no mask at all when given None) gets the explicit causal mask.
    """
    if attn_implementation == "sdpa" and bool(mask.all()):
        return None
    return additive_mask(mask, mask.shape[1], dtype)


def run_layers(
    language_model: nn.Module, segment: range, hidden, mask4d, positions, cache, use_cache: bool, all_hidden
):
    """Run the decoder layers of one segment on `hidden` `(B, q, D)` with one mask and one set of positions.

    Returns:
        `(hidden, all_hidden)`: the segment's output and `all_hidden` with each layer's output appended
        (None stays None).
    """
    layers = language_model.layers
    pos_emb = language_model.rotary_emb(hidden, positions)
    for i in segment:
        hidden = layers[i](
            hidden, attention_mask=mask4d, position_ids=positions, cache=cache,
            use_cache=use_cache, position_embeddings=pos_emb,
        )  # fmt: skip
        if all_hidden is not None:
            all_hidden += (hidden,)
    return hidden, all_hidden


def initial_state(
    config: DPNConfig, input_ids, embeds, is_visual, attention_mask, position_ids, plan: RoutingPlan
) -> PrefillState:
    """The state the prefill loop starts from: the embedded input, its mask, positions and tokens' kinds."""
    is_router = input_ids == config.router_token_id
    has_image = is_visual.any(-1)
    if plan.mode == "auto" and (has_image & ~is_router.any(-1)).any():
        i = int((has_image & ~is_router.any(-1)).nonzero()[0, 0])
        raise ValueError(
            f"compression='auto' needs a <router> token (id {config.router_token_id}) after the question in every "
            f"sample with an image; sample {i} has none. Build prompts with the DPN processor, or force a "
            f"compression (one of {config.compression_factors}, or a schedule)."
        )
    device = input_ids.device
    rows0, cols0 = config.vision_grid
    positions = position_ids if position_ids is not None else positions_from_mask(attention_mask)
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


# -- pool and rebuild ----------------------------------------------------------------------------


def pool_and_rebuild(
    stage: DynamicPoolingExperts, state: PrefillState, choice, gate, eligible
) -> PrefillState:
    """Pool each sample's visual block with its expert and rebuild the shortened batch.

    Returns the [`PrefillState`] on the new sequence (every field rebuilt); `state` is left as it was.
    Everything is rebuilt with one scatter; the only Python loop runs over the few distinct (grid, expert)
    groups.
    """
    rows, cols = state.rows, state.cols
    strides = torch.tensor(stage.strides, device=state.hidden.device)  # (E, 2)
    chosen = torch.where(eligible, choice, 0)  # expert 0 for the rest: replaced by identity below
    new_rows, new_cols = pooled_grid((rows, cols), (strides[chosen, 0], strides[chosen, 1]))
    new_rows = torch.where(eligible, new_rows, rows)
    new_cols = torch.where(eligible, new_cols, cols)
    vis_start = state.is_visual.int().argmax(-1)
    pooled = _pool_visual(stage, state, vis_start, choice, gate, eligible, new_rows * new_cols)
    return _rebuild(state, pooled, vis_start, new_rows, new_cols)


def _pool_visual(stage, state: PrefillState, vis_start, choice, gate, eligible, n_new) -> torch.Tensor:
    """Each sample's pooled visual block `(B, N', D)`, zero padded to the longest, scaled by its gate.

    Samples sharing (rows, cols, expert) share one pooling call; samples not `eligible` keep their block.
    """
    hidden = state.hidden
    batch, length, dim = hidden.shape
    rows, cols = state.rows, state.cols
    n_old = rows * cols
    has_image = n_old > 0
    # Gather each sample's visual block: (B, N, D).
    offsets = torch.arange(max(int(n_old.max()), 1), device=hidden.device)
    gather_idx = (vis_start[:, None] + offsets[None]).clamp(max=length - 1)
    visual = hidden.gather(1, gather_idx[..., None].expand(-1, -1, dim))

    pooled = hidden.new_zeros(batch, max(int(n_new.max()), 1), dim)
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
    return pooled


def _rebuild(state: PrefillState, pooled, vis_start, new_rows, new_cols) -> PrefillState:
    """The [`PrefillState`] on the shortened sequence: text tokens keep their order, the visual block of
    `n_old` tokens becomes the `n_new` pooled ones, padding stays on the input's side."""
    mask = state.mask
    batch, length = mask.shape
    n_old, n_new = state.rows * state.cols, new_rows * new_cols
    # New rank of each real token among real tokens; the visual block shrinks from n_old to n_new.
    real = mask.bool()
    rank = real.long().cumsum(-1) - 1
    vis_rank = torch.where(n_old > 0, rank.gather(1, vis_start[:, None]).squeeze(-1), length)
    after = rank >= (vis_rank + n_old)[:, None]
    new_rank = torch.where(after, rank - (n_old - n_new)[:, None], rank)
    new_real = real.sum(-1) - n_old + n_new
    new_len = int(new_real.max())
    left_padded = bool(real[:, -1].all())  # unless right padded: the last position is real for every sample
    pad_offset = (new_len - new_real) if left_padded else torch.zeros_like(new_real)

    keep_text = real & ~state.is_visual
    dest_text = torch.where(keep_text, pad_offset[:, None] + new_rank, new_len)
    pool_slots = torch.arange(pooled.shape[1], device=mask.device)
    pool_valid = pool_slots[None] < n_new[:, None]
    dest_pool = torch.where(
        pool_valid, (pad_offset + vis_rank.clamp(max=length))[:, None] + pool_slots, new_len
    )
    dest = torch.cat([dest_text, dest_pool], dim=1)  # (B, L + N'), dummy column new_len is dropped
    scatter = partial(_scatter, dest, new_len)
    new_mask = scatter(keep_text.long(), pool_valid.long(), 0)
    return PrefillState(
        hidden=scatter(state.hidden, pooled, 0.0),
        mask=new_mask,
        is_visual=scatter(torch.zeros_like(keep_text), pool_valid, False),
        is_router=scatter(state.is_router & keep_text, torch.zeros_like(pool_valid), False),
        src=scatter(state.src, torch.full_like(pool_slots[None].expand(batch, -1), -1), -1),
        rows=new_rows,
        cols=new_cols,
        positions=positions_from_mask(new_mask),
    )


def _scatter(dest: torch.Tensor, new_len: int, values_text, values_pool, fill) -> torch.Tensor:
    """Text values `(B, L, ...)` and pooled values `(B, N', ...)` to their positions `dest` `(B, L + N')` of the
    new sequence `(B, new_len, ...)` (`fill` elsewhere; destination `new_len` is a dummy that is dropped)."""
    src = torch.cat([values_text, values_pool], dim=1)
    batch = src.shape[0]
    shape = (batch, new_len + 1, *src.shape[2:])
    index = dest.view(batch, -1, *([1] * (src.dim() - 2))).expand_as(src)
    return torch.full(shape, fill, dtype=src.dtype, device=src.device).scatter(1, index, src)[:, :new_len]


# -- the segment loop ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PyramidPrefill:
    """One prefill through the pyramid: the model's parts it runs and the options of this forward.

    Args:
        language_model: the Llama decoder (its layers, rotary embedding).
        stages: one [`DynamicPoolingExperts`] per pooling layer.
        segments: decoder layer indices of each segment.
        config: the model's config; training: the model's mode (sampling and token floor follow it).
        plan: how experts are chosen; ragged: split the batch by path (module docstring).
        use_cache, output_hidden_states: fill the cache; keep each layer's output.
    """

    language_model: nn.Module
    stages: nn.ModuleList
    segments: list[range]
    config: DPNConfig
    training: bool
    plan: RoutingPlan
    ragged: bool
    use_cache: bool
    output_hidden_states: bool

    def run(self, state: PrefillState, cache: DPNCache | None) -> PrefillRun:
        """Each segment's layers on every group alive, then (but after the last) its pooling stage, which may
        split a group into several."""
        run = PrefillRun(
            self.segments, groups=[Group(None, state, cache)], visual_counts=[state.rows * state.cols]
        )
        n_stages = len(self.stages)
        for s, segment in enumerate(self.segments):
            seg_runs, next_groups, records = [], [], []
            for group in run.groups:
                group, group_run = self._run_segment(segment, group)
                seg_runs.append(group_run)
                if s == n_stages:
                    next_groups.append(group)
                    continue
                parts, record = self._pool_stage(s, group)
                records.append(record)
                next_groups.extend(parts)
            run.segment_runs.append(seg_runs)
            run.groups = next_groups
            if s < n_stages:
                run.stage_records.append(records)
                run.visual_counts.append(
                    merge_rows([(g.rows, g.state.rows * g.state.cols) for g in next_groups])
                )
        return run

    def _run_segment(self, segment: range, group: Group) -> tuple[Group, GroupRun]:
        """The group after the segment's layers, and the record of that run."""
        state = group.state
        mask4d = prefill_mask(state.mask, state.hidden.dtype, self.config.text_config._attn_implementation)
        layer_hidden = () if self.output_hidden_states else None
        hidden, layer_hidden = run_layers(
            self.language_model,
            segment,
            state.hidden,
            mask4d,
            state.positions,
            group.cache,
            self.use_cache,
            layer_hidden,
        )
        ran = replace(group, state=replace(state, hidden=hidden))
        return ran, GroupRun(group.rows, state.mask, group.cache, layer_hidden)

    def _pool_stage(self, s: int, group: Group) -> tuple[list[Group], StageRecord]:
        """Route and pool the visual tokens of a group after pooling layer `s`.

        With `ragged`, samples that took different experts here are split into groups (one per expert, plus
        one for the samples that were not pooled), each rebuilt on its own length, so that no sample is
        padded to another's path in the layers that follow. Returns the groups on the shortened sequences (the
        group itself when nothing was pooled) and the stage's record.
        """
        stage, state = self.stages[s], group.state
        n_visual = state.rows * state.cols
        eligible = (n_visual >= self.config.min_visual_tokens) & (n_visual > 0)
        forced = self.plan.expert_indices[s] if self.plan.expert_indices is not None else None
        routing = self._route(stage, state, forced)
        chosen = torch.where(eligible, routing.choice, -1)
        record = StageRecord(group.rows, chosen, routing.probs, routing.feasible, routing.value)
        identity = forced is not None and stage.strides[forced] == (1, 1)
        if not eligible.any() or identity:
            return [group], record
        paths = torch.unique(chosen) if self.ragged else chosen[:1]
        if len(paths) == 1:
            pooled = pool_and_rebuild(stage, state, routing.choice, routing.gate, eligible)
            return [replace(group, state=pooled)], record
        return [self._split(stage, group, routing, eligible, chosen == path) for path in paths], record

    def _split(self, stage, group: Group, routing: Routing, eligible, members: torch.Tensor) -> Group:
        """The pooled group of the `members` `(B,)` of `group` that took one path, with a cache of its own."""
        rows = members.nonzero().squeeze(-1)
        gate = routing.gate[rows] if routing.gate is not None else None
        state = pool_and_rebuild(
            stage, select_rows(group.state, rows), routing.choice[rows], gate, eligible[rows]
        )
        cache = DPNCache(config=self.config.text_config) if group.cache is not None else None
        return Group(rows if group.rows is None else group.rows[rows], state, cache)

    def _route(self, stage: DynamicPoolingExperts, state: PrefillState, forced: int | None) -> Routing:
        """Choose an expert per sample of a group (see [`Routing`]).

        The router and random routing choose among the experts the token floor allows (training: sampled from
        the feasible ones, as the reference's re-sampling; otherwise the feasible argmax). The gate is the
        chosen expert's probability under the full distribution, as in the reference. At inference the cost dial
        (`plan.cost`, `"auto:lambda=X"`) shifts the argmax: `log p_e - X * kept_e`, `kept_e` the share of the
        visual tokens expert `e` keeps.
        """
        hidden = state.hidden
        if forced is not None:
            return Routing(torch.full((hidden.shape[0],), forced, dtype=torch.long, device=hidden.device))
        cfg = self.config
        floor = cfg.train_token_floor if self.training else cfg.inference_token_floor
        feasible = stage.feasible_experts(state.rows, state.cols, floor)  # (B, E)
        if self.plan.mode == "random":
            return Routing(torch.multinomial(feasible.float(), 1).squeeze(-1))
        features = router_input(hidden, state.is_router, cfg.router_token_reduction)
        probs = stage.router(features)  # (B, E) f32
        value = stage.router.value(features) if self.training and cfg.uses_router_critic else None
        allowed = probs.detach() * feasible
        if self.training:
            explore = cfg.router_explore if cfg.router_estimator == "reinforce" else 0.0
            sampling = allowed
            if cfg.router_predicts_outcome:  # the bandit explores every feasible expert uniformly
                sampling = feasible.float()
            elif explore:
                sampling = exploring(feasible_distribution(probs.detach(), feasible), feasible, explore)
            choice = torch.multinomial(sampling, 1).squeeze(-1)
        elif self.plan.cost:
            kept = torch.tensor([1.0 / (h * w) for h, w in stage.strides], device=probs.device)  # (E,)
            score = probs.detach().clamp_min(1e-30).log() - self.plan.cost * kept
            choice = score.masked_fill(~feasible, float("-inf")).argmax(-1)
        else:
            choice = allowed.argmax(-1)
        # the chosen probability scales the pooled tokens (the reference's gradient path); an outcome router
        # learns from the answer instead, and leaves the tokens as they are
        gate = None if cfg.router_predicts_outcome else probs.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
        return Routing(choice, gate, probs, feasible, value)
