"""`EncoderCache`: a bounded LRU of vision tower + projector outputs, keyed by the image's content.

A multi-turn chat about one image sends the same pixels with every turn; with a cache attached
([`DPNModel.set_encoder_cache`]) the vision tower and projector run once for it and later turns reuse their
output. Entries are keyed by a hash of the preprocessed pixel tensor (its bytes, dtype and shape) and of the
vision-feature options, so only bit-identical inputs share an entry, and the cached features are exactly the
ones the tower would have returned: answers are the same with and without the cache.

The cache is consulted at inference only (model in eval mode and gradients off, as in `generate` and
serving), never in training. It holds features computed by the weights the model had when they were cached:
call [`EncoderCache.clear`] after changing the weights in place (loading a new model gives a new model, and a
new cache should be attached to it).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch


class EncoderCache:
    """Least-recently-used cache of image features, bounded in bytes.

    Args:
        max_bytes (`int`): most bytes of cached feature tensors kept; 0 disables the cache (nothing is stored,
            every lookup misses). Least recently used entries are evicted to make room; an entry larger than
            `max_bytes` is not stored.

    Attributes:
        hits, misses, evictions (`int`): lookup and eviction counters since creation (or [`clear`]).
        bytes_in_use (`int`): bytes of the tensors held now.
    """

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(
                f"EncoderCache max_bytes must be an int >= 0 (0 disables the cache), got {max_bytes!r}"
            )
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # a serving replica may call from more than one thread
        self.bytes_in_use = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        """Whether anything can be stored (`max_bytes > 0`)."""
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(pixel_values: torch.Tensor, *options) -> str:
        """Content key of one image's pixel tensor `(3, H, W)` and the options that change its features."""
        tensor = pixel_values.detach().contiguous().cpu()
        digest = hashlib.sha256(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        digest.update(repr((str(tensor.dtype), tuple(tensor.shape), *options)).encode())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached features for `key` (marked as most recently used), or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: torch.Tensor) -> None:
        """Store `value` (detached) under `key`, evicting least recently used entries until it fits."""
        size = value.numel() * value.element_size()
        with self._lock:
            if size > self.max_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes_in_use -= old.numel() * old.element_size()
            while self._entries and self.bytes_in_use + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes_in_use -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            self._entries[key] = value.detach()
            self.bytes_in_use += size

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        with self._lock:
            self._entries.clear()
            self.bytes_in_use = self.hits = self.misses = self.evictions = 0

    def stats(self) -> dict[str, int]:
        """`{"hits", "misses", "evictions", "entries", "bytes_in_use", "max_bytes"}`."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "entries": len(self._entries),
                "bytes_in_use": self.bytes_in_use,
                "max_bytes": self.max_bytes,
            }


__all__ = ["EncoderCache"]
