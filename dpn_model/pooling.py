"""Dynamic Pooling Experts: the router and the 2-D pooling experts applied after a decoder layer.

Each expert pools the current visual grid with kernel = stride (1x1 keeps every token, 1x2 half, 2x2 a
quarter). A small router reads the hidden state of the `<router>` tokens (their mean over every user turn, as
the reference does) and picks one expert per sample.
Grids whose side is not a multiple of the stride keep their last partial window (ceil mode): no token
is silently dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dpn_model.configuration import DPNConfig


def pooled_grid(grid, stride):
    """Grid of visual tokens after pooling with kernel = `stride`, ceil mode: border cells form smaller windows.

    Args:
        grid (`(rows, cols)`): current grid; ints or `(batch,)` tensors alike.
        stride (`(sh, sw)`): the expert's stride; ints or tensors.

    Returns:
        `(ceil(rows / sh), ceil(cols / sw))`; no token is dropped, e.g. a 5x5 grid with (2, 2) gives 3x3.
    """
    (rows, cols), (sh, sw) = grid, stride
    return -(-rows // sh), -(-cols // sw)


def router_input(hidden: torch.Tensor, is_router: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """What the router reads: the `<router>` tokens' hidden states, one vector per sample.

    Args:
        hidden (`torch.Tensor` of shape `(batch, seq_len, hidden)`): hidden states after the pooling layer.
        is_router (`torch.BoolTensor` of shape `(batch, seq_len)`): the `<router>` positions (one per user turn).
        reduction (`str`): `"mean"` over every `<router>` position of the sample (reference), or `"last"`
            (the last `<router>` position only).

    Returns:
        `torch.Tensor` of shape `(batch, hidden)`, in `hidden`'s dtype; zeros for a sample without `<router>`.
    """
    counts = is_router.sum(-1)  # (B,)
    k = max(int(counts.max()), 1)
    # positions of each sample's router tokens, in order, padded to the batch's most: (B, K)
    positions = torch.argsort((~is_router).int(), dim=-1, stable=True)[:, :k]
    picked = hidden.gather(1, positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, K, D)
    if reduction == "last":
        last = (counts - 1).clamp(min=0)
        out = picked[torch.arange(hidden.shape[0], device=hidden.device), last]
        return out * (counts > 0).unsqueeze(-1).to(hidden.dtype)
    valid = (torch.arange(k, device=hidden.device)[None] < counts[:, None]).unsqueeze(-1)  # (B, K, 1)
    # elementwise in float32 (no matmul: FLOPs accounting counts matmuls only, and this is not the model's)
    total = (picked.float() * valid).sum(1)
    return (total / counts.clamp(min=1).unsqueeze(-1)).to(hidden.dtype)


class RouterCritic(nn.Linear):
    """The REINFORCE critic of one router (`router_baseline="critic"`): `Linear(hidden, 1)`, initialised to 0."""


class PoolingConv(nn.Conv2d):
    """The depthwise conv of one `pooling_type="conv"` expert: kernel = stride, no bias, initialised to averaging.

    Its own class (a leaf module holding the weight) so that `DPNPreTrainedModel._init_weights` can find it:
    transformers skips a custom-code module without direct parameters (such as `DynamicPoolingExperts`) when it
    initialises the missing weights, so an init keyed on the parent never runs. The parameter keeps the name
    `weight`: checkpoints saved with a plain `nn.Conv2d` load unchanged.
    """

    def __init__(self, channels: int, stride: tuple[int, int]):
        super().__init__(channels, channels, kernel_size=stride, stride=stride, groups=channels, bias=False)

    @property
    def averaging_value(self) -> float:
        """The weight that makes this conv average pooling over its `kh x kw` window: `1 / (kh * kw)`."""
        kh, kw = self.kernel_size
        return 1.0 / (kh * kw)


class DPNRouter(nn.Module):
    """LayerNorm -> Linear(h, h/4, no bias) -> GELU -> Linear(h/4, n_experts, bias optional); logits / temperature,
    then a softmax over the experts, or with `outcome` a sigmoid per expert (`router_estimator="outcome"`: the
    probability that a sample taking that expert is answered)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        temperature: float,
        bias: bool = False,
        critic: bool = False,
        outcome: bool = False,
    ):
        super().__init__()
        self.temperature = temperature
        self.outcome = outcome
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, max(hidden_size // 4, 1), bias=False)
        self.act = nn.GELU()
        self.out = nn.Linear(max(hidden_size // 4, 1), num_experts, bias=bias)
        # REINFORCE baseline correction (`router_baseline="critic"`); starts at 0, i.e. the batch baseline
        self.critic = RouterCritic(hidden_size, 1) if critic else None

    def forward(self, router_hidden: torch.Tensor) -> torch.Tensor:
        """Args:
            router_hidden (`torch.Tensor` of shape `(batch, hidden)`): what the router reads ([`router_input`]).

        Returns:
            `torch.Tensor` of shape `(batch, num_experts)`: expert probabilities (float32), or with `outcome` each
            expert's predicted probability of an answer.
        """
        logits = self.out(self.act(self.down(self.norm(router_hidden)))).float() / self.temperature
        return torch.sigmoid(logits) if self.outcome else torch.softmax(logits, dim=-1)

    def value(self, router_hidden: torch.Tensor) -> torch.Tensor | None:
        """The critic's predicted reward advantage over the batch, `(batch,)` float32 (None without a critic).

        It reads the normalised router input without a gradient to it: the critic never changes what the
        router or the decoder compute.
        """
        if self.critic is None:
            return None
        return self.critic(self.norm(router_hidden).detach()).squeeze(-1).float()


class DynamicPoolingExperts(nn.Module):
    """One pooling stage of the pyramid: a router and the pooling experts of one decoder depth."""

    def __init__(self, config: DPNConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.strides = [tuple(s) for s in config.expert_strides]
        self.pooling_type = config.pooling_type
        self.router = DPNRouter(
            hidden,
            len(self.strides),
            config.router_temperature,
            bias=config.router_bias,
            critic=config.uses_router_critic,
            outcome=config.router_predicts_outcome,
        )
        if self.pooling_type == "conv":
            # Depthwise conv per expert, kernel = stride; initialised to average pooling in _init_weights.
            self.convs = nn.ModuleList(PoolingConv(hidden, s) for s in self.strides)

    def tokens_after(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Visual tokens each expert would leave, `(batch, num_experts)`, for grids `(batch,)` rows x cols."""
        strides = torch.tensor(self.strides, device=rows.device)  # (E, 2)
        new_rows, new_cols = pooled_grid((rows[:, None], cols[:, None]), (strides[:, 0], strides[:, 1]))
        return new_rows * new_cols

    def feasible_experts(self, rows: torch.Tensor, cols: torch.Tensor, floor: int | None) -> torch.Tensor:
        """Experts that leave at least `floor` visual tokens, `(batch, num_experts)` bool.

        The expert keeping the most tokens is always feasible, so every sample has a choice (the reference would
        re-sample forever on a grid of 16 or 17 tokens; here such a grid keeps its tokens).
        """
        kept = self.tokens_after(rows, cols)
        if not floor:
            return torch.ones_like(kept, dtype=torch.bool)
        return (kept >= floor) | (kept == kept.max(-1, keepdim=True).values)

    def pool(self, grid_tokens: torch.Tensor, expert: int) -> torch.Tensor:
        """Pool visual tokens laid out on their grid.

        Args:
            grid_tokens (`torch.Tensor` of shape `(n, hidden, rows, cols)`): visual tokens of `n` samples.
            expert (`int`): index into the expert strides.

        Returns:
            `torch.Tensor` of shape `(n, hidden, ceil(rows / sh), ceil(cols / sw))`.
        """
        stride = self.strides[expert]
        if stride == (1, 1):
            return grid_tokens
        if self.pooling_type == "max":
            return F.max_pool2d(grid_tokens, kernel_size=stride, stride=stride, ceil_mode=True)
        if self.pooling_type == "avg":
            return F.avg_pool2d(
                grid_tokens, kernel_size=stride, stride=stride, ceil_mode=True, count_include_pad=False
            )
        rows, cols = grid_tokens.shape[-2:]
        pad_rows, pad_cols = (-rows) % stride[0], (-cols) % stride[1]
        if pad_rows or pad_cols:  # replicate the edge so a partial window averages real tokens only
            grid_tokens = F.pad(grid_tokens, (0, pad_cols, 0, pad_rows), mode="replicate")
        return self.convs[expert](grid_tokens)
