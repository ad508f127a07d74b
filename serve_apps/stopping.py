"""Stop strings, and which of a request's text may be streamed yet. Plain Python, no torch.

A request ends at end-of-sequence (unless it asked `ignore_eos`), at `max_tokens` (serve_apps.generation), or at
the first of its `stop` strings: the text is cut before it ([`cut_at_stop`]). Until then, the text that could
still turn into a stop string (the last `len(stop) - 1` characters) or that ends in an incomplete character (a
trailing U+FFFD from a multi-byte character split across tokens) is held back ([`releasable`]), so a client never
receives text it must take back.
"""

from __future__ import annotations

from collections.abc import Sequence


def cut_at_stop(text: str, stop: Sequence[str], finish: str | None) -> tuple[str, str | None]:
    """`text` cut before the first of the `stop` strings it holds (finish reason `stop`), or as it is with
    `finish`."""
    hits = [text.find(s) for s in stop if s in text]
    if hits:
        return text[: min(hits)], "stop"
    return text, finish


def releasable(text: str, emitted: int, stop: Sequence[str]) -> tuple[str, int]:
    """The text of an unfinished request that can be sent now, after the `emitted` characters already sent, and
    the characters sent after it; what could still become a stop string or an incomplete character waits."""
    hold = max((len(s) - 1 for s in stop), default=0)
    safe = len(text) - hold
    if text.endswith("\ufffd"):
        safe = min(safe, len(text) - 1)
    end = max(safe, emitted)
    return text[emitted:end], end


__all__ = ["cut_at_stop", "releasable"]
