"""Choosing each request's next token: reserved tokens masked, greedy or temperature + top_p sampling, logprobs.

No Ray here. Sampling is numerically safe for any valid temperature and top_p, and reserved tokens (`<image>`,
`<router>`, padding, every special token but end-of-sequence, ids past the tokenizer) are never emitted, greedy or
sampled, so nothing fed back to the model can be rejected.
"""

from __future__ import annotations

from typing import Any

import torch

GREEDY_BELOW = 1e-4
"""Temperatures below this sample greedily: the distribution is already one-hot to float precision."""

LOGPROB_FLOOR = -9999.0
"""The logprob reported for a token the model gives no probability (OpenAI's value; JSON has no -inf)."""


def reserved_token_ids(processor: Any, vocab_size: int) -> list[int]:
    """Ids generation must never emit: the special tokens but end-of-sequence (`<image>`, `<router>`, padding,
    `<s>`, `<unk>`, ...) and ids the model has but the tokenizer lacks (padded vocabularies)."""
    tokenizer = processor.tokenizer
    special = set(tokenizer.all_special_ids)
    special |= {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    special |= {getattr(processor, "image_token_id", None), getattr(processor, "router_token_id", None)}
    special.discard(tokenizer.eos_token_id)
    special.discard(None)
    return sorted({i for i in special if 0 <= i < vocab_size} | set(range(len(tokenizer), vocab_size)))


class ReservedMask:
    """Sets the reserved ids ([`reserved_token_ids`]) of a batch's logits to -inf; the ids are found at the first
    logits, which give the model's vocabulary size."""

    def __init__(self, processor: Any):
        self.processor = processor
        self._ids: torch.Tensor | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` `(B, V)` as float32 on the CPU, reserved ids at -inf."""
        if self._ids is None:
            self._ids = torch.tensor(reserved_token_ids(self.processor, logits.shape[-1]), dtype=torch.long)
        return logits.cpu().float().index_fill(1, self._ids, float("-inf"))


def seeded_generator(temperature: float, seed: int | None) -> torch.Generator | None:
    """A request's random generator: None when it samples greedily, else seeded by `seed` (or at random).

    Raises:
        Whatever torch raises for a seed it cannot take (e.g. over 64 bits): the caller fails that request alone.
    """
    if temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator


def sample_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """Next token from one row's logits `(V,)` (reserved ids already at -inf): greedy below `GREEDY_BELOW`, else
    temperature + nucleus (top_p) sampling, computed so that no valid parameter can overflow or empty the
    distribution (max subtracted before dividing by the temperature; the top token always kept)."""
    logits = logits.float()
    if temperature < GREEDY_BELOW or generator is None:
        return int(logits.argmax())
    scaled = (logits - logits.max()) / temperature  # <= 0 everywhere, the max exactly 0: exp never overflows
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p
        keep[0] = True  # a top_p that rounds to 0 in float32 still keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs * keep)
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0.0:
        return int(logits.argmax())  # non-finite logits from the model: nothing to sample from
    return int(torch.multinomial(probs, 1, generator=generator))


def _logprob_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = tokenizer.decode([token], skip_special_tokens=False)
    value = logprob if logprob == logprob and logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # NaN, -inf
    return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8", "backslashreplace"))}


def token_logprobs(tokenizer: Any, logits: torch.Tensor, token: int, top: int) -> dict[str, Any]:
    """OpenAI's `logprobs.content` entry of `token` from one row's logits `(V,)` (reserved ids at -inf): the
    model's log-softmax over the tokens it may emit, before temperature and top_p (what OpenAI reports), and the
    `top` most likely tokens with theirs."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    entry = _logprob_entry(tokenizer, token, float(logprobs[token]))
    values, ids = logprobs.topk(min(top, logprobs.shape[-1])) if top else (logprobs[:0], logprobs[:0])
    entry["top_logprobs"] = [
        _logprob_entry(tokenizer, int(i), float(v)) for v, i in zip(values.tolist(), ids.tolist())
    ]
    return entry


__all__ = [
    "GREEDY_BELOW",
    "LOGPROB_FLOOR",
    "ReservedMask",
    "reserved_token_ids",
    "sample_token",
    "seeded_generator",
    "token_logprobs",
]
