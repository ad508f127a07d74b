"""`DPNCache`: a `DynamicCache` whose layers may hold different lengths after pooling.

The pyramid shortens the sequence after each pooling layer, so the layers between two pooling points (a
*segment*) share one length while different segments do not. Besides the keys and values, the cache
keeps, per segment, which cached positions are real tokens (padding and pooled-away tokens are not):
a decoding step attends to those and takes its rotary position from their count, as the paper does.
Layer 0 sits before any pooling, so `get_seq_length()` is the full sequence length, which is what
`generate` uses to slice its next inputs.

For continuous batching a running cache takes in the rows of another one (`append_rows`: e.g. a batch prefilled
at another compression rate, so with other per-segment lengths) and drops finished rows (`batch_select_indices`,
then `drop_leading_padding`). Rows are left padded per segment; as decoding takes each row's position from its
count of real cached tokens and attends only to those, padding changes nothing a row computes.
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

    def append_rows(self, other: DPNCache) -> None:
        """Add the rows of `other` (same model, any compression: per-segment lengths may differ) after this
        cache's rows; in every layer the shorter side is left padded (zeros, masked out) to the longer.

        Args:
            other (`DPNCache`): a cache of the same decoder, e.g. of a batch just prefilled; left unchanged.
        """
        if len(other.layers) != len(self.layers) or len(other.segment_masks) != len(self.segment_masks):
            raise ValueError(
                f"cannot append rows of a cache with {len(other.layers)} layers and {len(other.segment_masks)} "
                f"segments to one with {len(self.layers)} and {len(self.segment_masks)}"
            )
        for mine, theirs in zip(self.layers, other.layers):
            mine.keys = _cat_left_padded(mine.keys, theirs.keys, dim=2)
            mine.values = _cat_left_padded(mine.values, theirs.values, dim=2)
        self.segment_masks = [
            _cat_left_padded(mine, theirs, dim=1)
            for mine, theirs in zip(self.segment_masks, other.segment_masks)
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


def _cat_left_padded(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    """`a` and `b` stacked along the batch (dim 0), the shorter left padded with zeros along `dim`."""
    longest = max(a.shape[dim], b.shape[dim])
    parts = []
    for value in (a, b):
        short = longest - value.shape[dim]
        if short:
            shape = list(value.shape)
            shape[dim] = short
            value = torch.cat([value.new_zeros(shape), value], dim=dim)
        parts.append(value)
    return torch.cat(parts, dim=0)
