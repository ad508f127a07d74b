"""`DPNCache`: a `DynamicCache` whose layers may hold different lengths after pooling.

The pyramid shortens the sequence after each pooling layer, so the layers between two pooling points (a
*segment*) share one length while different segments do not. Besides the keys and values, the cache
keeps, per segment, which cached positions are real tokens (padding and pooled-away tokens are not):
a decoding step attends to those and takes its rotary position from their count, as the paper does.
Layer 0 sits before any pooling, so `get_seq_length()` is the full sequence length, which is what
`generate` uses to slice its next inputs.

For continuous batching a running cache takes in the rows of others (`append_rows`: e.g. batches prefilled at
other compression rates, so with other per-segment lengths) and drops its finished rows in the same copy
(`append_rows(keep=...)`, then `drop_leading_padding`). Rows are left padded per segment; as decoding takes each
row's position from its count of real cached tokens and attends only to those, padding changes nothing a row
computes.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class DPNCache(DynamicCache):
    """Key/value cache of a DPN decoder with one padding mask per segment.

    Args:
        config (`PretrainedConfig`, *optional*): the text config, forwarded to `DynamicCache`.
    """

    def __init__(self, config=None):
        super().__init__(config=config)
        # segment_masks[s]: `(batch, cached_len_s)` long, 1 for a real cached token of segment s.
        self.segment_masks: list[torch.Tensor] = []

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.segment_masks = [m.index_select(0, beam_idx.to(m.device)) for m in self.segment_masks]

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.segment_masks = [m.repeat_interleave(repeats, dim=0) for m in self.segment_masks]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.segment_masks = [m[indices, ...] for m in self.segment_masks]

    def append_rows(self, *others: DPNCache, keep: torch.Tensor | None = None) -> None:
        """Keep the rows `keep` of this cache (all of them if None) and add the rows of `others` (same model, any
        compression: per-segment lengths may differ) after them, in one copy of each layer's keys and values; in
        every layer the shorter rows are left padded (zeros, masked out) to the longest.

        Args:
            others (`DPNCache`): caches of the same decoder, e.g. of batches just prefilled; left unchanged.
            keep (`torch.LongTensor`, *optional*): the indices of this cache's rows to keep, in order (rows that
                finished leave in the same copy that takes the new ones in).
        """
        for other in others:
            if len(other.layers) != len(self.layers) or len(other.segment_masks) != len(self.segment_masks):
                raise ValueError(
                    f"cannot append rows of a cache with {len(other.layers)} layers and {len(other.segment_masks)} "
                    f"segments to one with {len(self.layers)} and {len(self.segment_masks)}"
                )

        def stacked(mine: torch.Tensor, theirs: list[torch.Tensor], dim: int) -> torch.Tensor:
            index = None if keep is None else keep.to(mine.device)
            return cat_left_padded([mine, *theirs], dim, index)

        for i, mine in enumerate(self.layers):
            mine.keys = stacked(mine.keys, [o.layers[i].keys for o in others], dim=2)
            mine.values = stacked(mine.values, [o.layers[i].values for o in others], dim=2)
        self.segment_masks = [
            stacked(mask, [o.segment_masks[s] for o in others], dim=1)
            for s, mask in enumerate(self.segment_masks)
        ]

    def drop_leading_padding(self, segments: list[range]) -> None:
        """Drop, per segment, the leading positions that are padding in every row (left after removing rows), so
        a cache that keeps serving does not grow past its longest row.

        Args:
            segments (`list[range]`): the decoder layers of each segment, in order (one per `segment_masks`).
        """
        for s, segment in enumerate(segments):
            mask = self.segment_masks[s]
            real = mask.any(0).nonzero()
            start = int(real[0, 0]) if len(real) else mask.shape[1]
            if not start:
                continue
            self.segment_masks[s] = mask[:, start:]
            for i in segment:
                layer = self.layers[i]
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "DPNCache cannot be cropped: pooled layers hold fewer positions than the input, so there is no "
            "single position to crop to (assisted decoding and contrastive search are not supported)"
        )


def cat_left_padded(tensors: list[torch.Tensor], dim: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """`tensors` stacked along the batch (dim 0) into one new tensor, each shorter one left padded with zeros along
    `dim`; with `index`, only those rows of the first tensor, gathered straight into the result (one copy)."""
    if len(tensors) == 1 and index is None:
        return tensors[0]
    sizes = [t.shape[0] for t in tensors]
    if index is not None:
        sizes[0] = len(index)
    longest = max(t.shape[dim] for t in tensors)
    shape = list(tensors[0].shape)
    shape[0], shape[dim] = sum(sizes), longest
    out = tensors[0].new_empty(shape)
    row = 0
    for i, (value, n) in enumerate(zip(tensors, sizes)):
        block = out[row : row + n]
        pad = longest - value.shape[dim]
        if pad:
            block.narrow(dim, 0, pad).zero_()
        target = block.narrow(dim, pad, value.shape[dim])
        if i == 0 and index is not None:
            if pad:
                target.copy_(value.index_select(0, index))
            else:  # the whole block: gather into it
                torch.index_select(value, 0, index, out=block)
        else:
            target.copy_(value)
        row += n
    return out
