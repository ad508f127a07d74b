"""Split a batch into groups of rows and put their results back together, for the ragged prefill.

At inference, a pooling stage whose samples took different experts splits the batch by path, and each group
runs the rest of the prefill at its own length (see `dpn_model.pyramid`). These helpers take the rows of a group
out of a batch and reassemble per-group tensors, and the per-group caches, in batch order, padding sequences to
a common length on the input's padding side. They know nothing of the model: only rows, lengths and caches.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TypeVar

import torch

from dpn_model.cache import DPNCache

State = TypeVar("State")


@dataclass(frozen=True)
class GroupRun:
    """One group's run of one segment: what the outputs and the cache are reassembled from.

    Args:
        rows (`torch.LongTensor` of shape `(G,)`, *optional*): the group's rows of the batch; None: the whole
            batch, in order.
        mask (`torch.LongTensor` of shape `(G, L)`): the padding mask the segment ran on (1: real token).
        cache (`DPNCache`, *optional*): the cache the group's layers wrote to.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): each layer's output, when they are returned.
    """

    rows: torch.Tensor | None
    mask: torch.Tensor
    cache: DPNCache | None
    hidden_states: tuple[torch.Tensor, ...] | None


def select_rows(state: State, rows: torch.Tensor) -> State:
    """The same dataclass of per-row tensors (a `PrefillState`) for some rows of the batch (`rows`, indices)."""
    return type(state)(**{f.name: getattr(state, f.name)[rows] for f in fields(state)})


def merge_rows(parts: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-group tensors `(G, ...)`, given as `(rows, value)` pairs, in batch order; `rows` None: the
    whole batch, in order.

    The groups' rows partition the batch. Differentiable (a concatenation and a gather).
    """
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    order = torch.cat([rows for rows, _ in parts]).argsort()
    return torch.cat([value for _, value in parts])[order]


def merge_padded(
    parts: list[tuple[torch.Tensor | None, torch.Tensor]], dim: int, left: bool, fill: float = 0
) -> torch.Tensor:
    """[`merge_rows`] for tensors whose dimension `dim` (a sequence) differs between groups: each is padded
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
    return merge_rows(parts)


def reassemble_cache(
    cache: DPNCache, runs: list[list[GroupRun]], segments: list[range], left: bool, use_cache: bool
) -> None:
    """Fill `cache` from a ragged prefill: per segment, the keys and values of the groups that ran it (each in its
    own cache once the batch split) and their masks, padded to a common length in batch order.

    Args:
        runs: per segment, the [`GroupRun`] of each group that ran it.
    """
    for seg_runs, segment in zip(runs, segments):
        if (
            seg_runs[0].cache is cache or not use_cache
        ):  # the batch ran this segment as one group, into `cache`
            continue
        for i in segment:
            keys = merge_padded([(run.rows, run.cache.layers[i].keys) for run in seg_runs], 2, left)
            values = merge_padded([(run.rows, run.cache.layers[i].values) for run in seg_runs], 2, left)
            cache.update(keys, values, i)
    cache.segment_masks = [
        merge_padded([(run.rows, run.mask) for run in seg_runs], 1, left) for seg_runs in runs
    ]
