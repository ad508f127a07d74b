"""The routers' losses: the paper's routing loss, our REINFORCE term and our outcome fit, on the tensors a forward
returns.

`routing_loss` keeps compression up: it rewards probability on the experts that pool more. `reinforce_loss`
(`router_estimator="reinforce"`; ours, not the authors') prices each sample's path instead. A sample's reward is
`-(sample_loss + cost_weight * cost)`; its advantage is the reward minus the mean reward of the batch's other
routed samples (a leave-one-out baseline, which keeps the estimate unbiased), or, with `groups`, of the other
routed rows of its group (RLOO: the same sample routed several times, so the baseline is the sample's own
expected reward and the advantage says only how its path did). The term is
`-mean(advantage * sum over layers of log q(chosen expert))`, `q` the distribution the expert was sampled from
(the router's probabilities renormalised over the experts the token floor allowed): minimising it raises the
probability of paths that answered a sample better than its batch-mates did, at their price in tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


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


def visual_token_cost(visual_tokens: torch.Tensor) -> torch.Tensor:
    """A path's price for [`reinforce_loss`]: the mean over the pooling layers of the share of the visual tokens
    still there after each (1: dense), `(batch,)` float32, from the output's `visual_tokens` `(batch, layers + 1)`."""
    counts = visual_tokens.float()
    return (counts[:, 1:] / counts[:, :1].clamp(min=1)).mean(-1)


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
    """REINFORCE term for the routers (`router_estimator="reinforce"`): the estimator of the module docstring.

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
    mates = _baseline_mates(has, groups)
    n_mates = mates.sum(-1)
    scored = n_mates > 0  # routed rows with a baseline
    n = int(scored.sum())
    if n == 0:
        return probs.sum() * 0.0
    p = feasible_distribution(probs, feasible)
    routed = routed & scored[:, None]
    log_q = torch.log(_chosen(exploring(p, feasible, explore), choices).clamp(min=1e-12)) * routed  # (B, L)
    reward = -(sample_loss.float() + cost_weight * cost.float()).detach() * has
    baseline = (mates.float() @ reward) / n_mates.clamp(min=1)
    advantage = (reward - baseline) * scored
    corrected, extra = _critic_corrected(advantage, values, routed)
    extra = _regularised(extra, p, choices, routed, corrected, n, entropy_weight, imitation_weight)
    return -(corrected * log_q).sum() / n + extra


def outcome_loss(probs: torch.Tensor, choices: torch.Tensor, sample_loss: torch.Tensor) -> torch.Tensor:
    """The outcome router's fit (`router_estimator="outcome"`): binary cross-entropy between the probability of
    an answer each router predicted for the expert the sample took and the answer's probability on the path it
    took, `exp(-sample_loss)` (the geometric mean of its answer tokens' probabilities; no gradient through it).

    The paths were drawn uniformly (the bandit's exploration), so each router learns, per question, how likely
    each of its experts is to keep the answer when the later layers' experts are drawn at random.

    Args:
        probs (`torch.Tensor` of shape `(batch, layers, experts)`): each expert's predicted probability of an
            answer (sigmoid outputs, float32).
        choices (`torch.LongTensor` of shape `(batch, layers)`): expert taken per sample and layer, -1: not routed.
        sample_loss (`torch.Tensor` of shape `(batch,)`): each sample's LM loss on the path it took.

    Returns:
        `torch.Tensor`: scalar, the mean over the routed (sample, layer) pairs; 0 (with a graph) when none was.
    """
    routed = choices >= 0
    if not routed.any():
        return probs.sum() * 0.0
    target = torch.exp(-sample_loss.detach().float())[:, None].expand_as(choices)
    predicted = _chosen(probs, choices).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(predicted[routed], target[routed])


def _baseline_mates(has: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """`(B, B)` bool: the rows whose reward enters row i's baseline (routed, not i, of i's group if grouped)."""
    mates = has[:, None] & has[None, :] & ~torch.eye(has.shape[0], dtype=torch.bool, device=has.device)
    if groups is not None:
        mates &= groups[:, None] == groups[None, :]
    return mates


def _chosen(dist: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """The probability `dist` `(B, L, E)` gave each chosen expert, `(B, L)` (anything where nothing was chosen)."""
    return dist.gather(-1, choices.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def _critic_corrected(
    advantage: torch.Tensor, values: torch.Tensor | None, routed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The advantage per routed layer `(B, L)`, less the critic's prediction when there is one (it removes what
    the sample's own question explains of its advantage), and the critic's squared error (else 0)."""
    extra = torch.zeros((), device=advantage.device)
    if values is None:
        return advantage[:, None] * routed, extra
    corrected = (advantage[:, None] - values.detach()) * routed
    return corrected, extra + ((values - advantage[:, None]) ** 2 * routed).sum() / routed.sum()


def _regularised(
    extra: torch.Tensor,
    p: torch.Tensor,
    choices: torch.Tensor,
    routed: torch.Tensor,
    corrected: torch.Tensor,
    n: int,
    entropy_weight: float,
    imitation_weight: float,
) -> torch.Tensor:
    """`extra` with [`reinforce_loss`]'s entropy bonus and self-imitation term added (each only when weighted)."""
    if entropy_weight:
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(-1)  # (B, L)
        extra = extra - entropy_weight * (entropy * routed).sum() / routed.sum()
    if imitation_weight:
        log_p = torch.log(_chosen(p, choices).clamp(min=1e-12)) * routed
        extra = extra - imitation_weight * (corrected.clamp(min=0) * log_p).sum() / n
    return extra


__all__ = [
    "exploring",
    "feasible_distribution",
    "outcome_loss",
    "per_sample_lm_loss",
    "reinforce_loss",
    "routing_loss",
    "visual_token_cost",
]
