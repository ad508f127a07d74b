"""A decoding batch's KV cache and attention mask, row by row: built at the prefill, one column more per decode
step, and rows dropped and added in one copy when requests leave and join (continuous batching).

No Ray here. The batch is left-padded: every row's real tokens end at the last column. DPN's cache keeps one
length per segment of decoder layers (pooling shortens the visual tokens after each pooling layer), so rows
prefilled at different rates decode together, each segment padded on the left to its longest row
(`dpn_model.cache.DPNCache.append_rows`); when rows leave, the padding no row needs any more is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dpn_model.cache import DPNCache, cat_left_padded


def left_padded(prefixes: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids `(B, T)` of `prefixes` left-padded with `pad_id` so that they end together, and their attention
    mask `(B, T)` (1 for a real token)."""
    width = max(len(prefix) for prefix in prefixes)
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        ids[i, width - len(prefix) :] = torch.tensor(list(prefix))
        mask[i, width - len(prefix) :] = 1
    return ids, mask


def segments(config: Any) -> list[range]:
    """The decoder layers of each cache segment: from one pooling layer to the next (`config`: a `DPNConfig`)."""
    bounds = [0, *config.pooling_layers, config.text_config.num_hidden_layers]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class BatchCache:
    """The KV cache of a batch and its attention mask, row-aligned.

    Attributes:
        kv: The model's cache (one entry per decoder layer, one length per segment).
        mask: `(B, T)`, 1 for a real token, 0 for left padding; one column per position decoded against.
    """

    kv: DPNCache
    mask: torch.Tensor

    def grow(self) -> torch.Tensor:
        """The mask with one more real column, for the token a decode step feeds every row."""
        column = torch.ones((self.mask.shape[0], 1), dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([self.mask, column], dim=1)
        return self.mask

    def regroup(
        self, keep: list[int] | None, others: Sequence[BatchCache], layer_segments: list[range]
    ) -> None:
        """Keep rows `keep` (in that order; None: every row) and append the rows of `others` after them, in one
        copy of every layer's keys and values; after rows left, drop the leading padding no row needs."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device) if keep is not None else None
        self.kv.append_rows(*(other.kv for other in others), keep=index)
        self.mask = cat_left_padded([self.mask, *(other.mask for other in others)], dim=1, index=index)
        if keep is not None:
            self.kv.drop_leading_padding(layer_segments)
            self.mask = self.mask[:, int(self.mask.any(0).nonzero()[0, 0]) :]


__all__ = ["BatchCache", "left_padded", "segments"]
