"""`DPNCache`: a `DynamicCache` whose layers may hold different lengths after pooling.

The pyramid shortens the sequence after each pooling layer, so the layers between two pooling points (a
*segment*) share one length while different segments do not. Besides the keys and values, the cache
keeps, per segment, which cached positions are real tokens (padding and pooled-away tokens are not):
a decoding step attends to those and takes its rotary position from their count, as the paper does.
Layer 0 sits before any pooling, so `get_seq_length()` is the full sequence length, which is what
`generate` uses to slice its next inputs.
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

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "DPNCache cannot be cropped: pooled layers hold fewer positions than the input, so there is no "
            "single position to crop to (assisted decoding and contrastive search are not supported)"
        )
