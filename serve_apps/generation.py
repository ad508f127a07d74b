"""Batched generation for serving: prompt preparation, one prefill, step-by-step decoding with per-request sampling.

No Ray here. A [`BatchRun`] takes requests that share one compression rate, left-pads them into one batch, runs
the prefill once (where DPN pools the visual tokens) and then decodes one token per step for every unfinished
request. Each request keeps its own `max_tokens`, `temperature`, `top_p`, `seed` and `stop` strings, which
`generate()` cannot do in one batch. Each step returns one event per request (a text delta, or the final event
with the finish reason and usage), so the caller can stream.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from dpn_model import flops as flops_lib

logger = logging.getLogger(__name__)

_batch_ids = itertools.count(1)


class PromptError(ValueError):
    """The request cannot be turned into a prompt (too long, bad placeholders); the API answers 400."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_prompt"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class Prepared:
    """A tokenized request, ready to join a batch."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (1, 3, S, S) or None for text-only requests
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    compression: str | int  # what the request asked for
    request_id: str = ""
    ignore_eos: bool = False


@dataclass
class _RowState:
    generated: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already sent
    finished: bool = False


def prepare(processor: Any, request: dict[str, Any], max_prompt_tokens: int) -> Prepared:
    """Build the prompt with `processor.build_prompt`, tokenize it and preprocess the image.

    Args:
        processor: a `DPNProcessor`.
        request: `messages` (OpenAI role/content, images as `image_url` parts), `images` (raw image bytes, in
            order), `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `compression`, `request_id`.
        max_prompt_tokens: longest prompt allowed, counting the image tokens.

    Raises:
        PromptError: special tokens typed into the text, or a prompt over `max_prompt_tokens`.
    """
    reserved = [processor.image_token, processor.router_token]
    for i, message in enumerate(request["messages"]):
        content = message["content"]
        texts = [content] if isinstance(content, str) else [p.get("text", "") for p in content if p["type"] == "text"]
        for text in texts:
            for token in reserved:
                if token in text:
                    raise PromptError(
                        f"message {i} contains the reserved token {token!r}; images go in image_url parts and "
                        "the router token is added by the server", param=f"messages.{i}.content", code="reserved_token",
                    )
    try:
        prompt = processor.build_prompt(request["messages"])
    except ValueError as exc:
        raise PromptError(str(exc), param="messages", code="invalid_messages") from exc
    images = request.get("images") or None
    encoded = processor(text=[prompt], images=images, padding=False, return_tensors="pt")
    input_ids = encoded["input_ids"][0].tolist()
    if len(input_ids) > max_prompt_tokens:
        raise PromptError(
            f"the prompt is {len(input_ids)} tokens (including {processor.image_seq_length} per image), more than "
            f"this server's limit of {max_prompt_tokens}; shorten the conversation",
            param="messages", code="prompt_too_long",
        )
    temperature = 1.0 if request.get("temperature") is None else float(request["temperature"])
    return Prepared(
        input_ids=input_ids,
        pixel_values=encoded.get("pixel_values") if images else None,
        max_tokens=int(request["max_tokens"]),
        temperature=temperature,
        top_p=1.0 if request.get("top_p") is None else float(request["top_p"]),
        seed=request.get("seed"),
        stop=list(request.get("stop") or []),
        compression=request.get("compression", "auto"),
        request_id=request.get("request_id", ""),
        ignore_eos=bool(request.get("ignore_eos", False)),
    )


def _sample(logits: torch.Tensor, req: Prepared, generator: torch.Generator | None) -> int:
    """Next token of one request: greedy at temperature 0, else temperature + nucleus (top_p) sampling."""
    if req.temperature <= 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits / req.temperature, dim=-1)
    if req.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < req.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class BatchRun:
    """One batch of requests at one compression rate, generated step by step.

    Args:
        model: a `DPNForConditionalGeneration` in eval mode.
        processor: its `DPNProcessor` (tokenizer for padding, stop handling and detokenization).
        requests: the batch; all run with `compression`.
        compression: `"auto"` or a forced factor the model runs this batch at.
        queue: the name of the queue the batch came from (for observability).
    """

    def __init__(self, model: Any, processor: Any, requests: list[Prepared], compression: str | int, queue: str):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.requests = requests
        self.compression = compression
        self.batch_id = next(_batch_ids)
        self.info = {
            "id": self.batch_id,
            "queue": queue,
            "rate": compression,
            "size": len(requests),
            "requested": [r.compression for r in requests],
        }
        self.rows = [_RowState() for _ in requests]
        self.generators = []
        for req in requests:
            gen = None
            if req.temperature > 0.0:
                gen = torch.Generator()
                gen.manual_seed(req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
            self.generators.append(gen)
        self.eos_id = self.tokenizer.eos_token_id
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._usage: list[dict[str, Any]] = []

    # -- steps ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self) -> list[dict[str, Any] | None]:
        """Run the prompt through the model (pooling happens here) and pick each request's first token."""
        device = self.model.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(r.input_ids) for r in self.requests)
        ids = torch.full((len(self.requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.requests), width), dtype=torch.long)
        for i, req in enumerate(self.requests):  # left padding: prompts end together
            ids[i, width - len(req.input_ids):] = torch.tensor(req.input_ids)
            mask[i, width - len(req.input_ids):] = 1
        pixels = [r.pixel_values for r in self.requests if r.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device=device, dtype=self.model.dtype) if pixels else None
        out = self.model(
            input_ids=ids.to(device), pixel_values=pixel_values, attention_mask=mask.to(device),
            compression=self.compression, use_cache=True, logits_to_keep=1,
        )
        self._cache = out.cache
        self._mask = mask.to(device)
        self._usage = self._prefill_usage(out, mask)
        return self._advance(out.logits[:, -1].float())

    @torch.inference_mode()
    def step(self) -> list[dict[str, Any] | None]:
        """Decode one token for every request (finished ones are fed padding and ignored)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        last = [row.generated[-1] if row.generated and not row.finished else pad_id for row in self.rows]
        device = self._mask.device
        self._mask = torch.cat([self._mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=device)], dim=1)
        out = self.model(
            input_ids=torch.tensor(last, device=device)[:, None], attention_mask=self._mask, cache=self._cache,
            use_cache=True, compression=self.compression, logits_to_keep=1,
        )
        self._cache = out.cache
        return self._advance(out.logits[:, -1].float())

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def _prefill_usage(self, out: Any, mask: torch.Tensor) -> list[dict[str, Any]]:
        """Per request: prompt tokens, visual tokens per decoder layer, chosen compression, FLOPs saved."""
        config = self.model.config
        factors = list(config.compression_factors)
        usage = []
        prompt_lens = mask.sum(-1).tolist()
        for i, req in enumerate(self.requests):
            prompt_len = int(prompt_lens[i])
            has_image = req.pixel_values is not None
            lens = [int(x) for x in out.layer_seq_lens[i].tolist()]
            visual0 = int(out.visual_tokens[i, 0]) if has_image else 0
            text_len = prompt_len - visual0
            per_layer = [length - text_len for length in lens]
            choices = [int(c) for c in out.expert_choices[i].tolist()]
            spent = float(out.prefill_flops[i])
            dense = float(flops_lib.prefill_flops(
                config, [prompt_len] * config.text_config.num_hidden_layers, num_images=int(has_image),
                lm_head_tokens=1, num_routed_layers=0,
            ))
            usage.append({
                "prompt_tokens": prompt_len,
                "visual_tokens_per_layer": per_layer if has_image else [],
                "compression_per_pooling_layer": [factors[c] if c >= 0 else None for c in choices] if has_image else [],
                "compression_requested": req.compression,
                "compression_run": self.compression,
                "prefill_flops": spent,
                "prefill_flops_dense": dense,
                "prefill_flops_saved": round(1.0 - spent / dense, 6) if dense else 0.0,
            })
        return usage

    def _advance(self, logits: torch.Tensor) -> list[dict[str, Any] | None]:
        events: list[dict[str, Any] | None] = []
        for i, (row, req) in enumerate(zip(self.rows, self.requests)):
            if row.finished:
                events.append(None)
                continue
            token = _sample(logits[i].cpu(), req, self.generators[i])
            finish = None
            if token == self.eos_id and not req.ignore_eos:
                finish = "stop"
            else:
                row.generated.append(token)
                if len(row.generated) >= req.max_tokens:
                    finish = "length"
            text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            if req.stop:
                hits = [text.find(s) for s in req.stop if s in text]
                if hits:
                    text, finish = text[: min(hits)], "stop"
            if finish is None:
                # hold back what could still become a stop string or an incomplete character
                hold = max((len(s) - 1 for s in req.stop), default=0)
                safe = len(text) - hold
                if text.endswith("\ufffd"):
                    safe = min(safe, len(text) - 1)
                delta = text[row.emitted: max(safe, row.emitted)]
                row.emitted = max(safe, row.emitted)
                events.append({"type": "delta", "text": delta} if delta else None)
                continue
            row.finished = True
            delta = text[row.emitted:]
            row.emitted = len(text)
            usage = dict(self._usage[i], completion_tokens=len(row.generated))
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            events.append({"type": "final", "text": delta, "full_text": text, "finish_reason": finish,
                           "usage": usage, "batch": self.info})
        return events


__all__ = ["BatchRun", "Prepared", "PromptError", "prepare"]
