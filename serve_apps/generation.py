"""Batched generation for serving: prompt preparation, one prefill, step-by-step decoding with per-request sampling.

No Ray here. A [`BatchRun`] takes requests that share one compression rate (`"auto"`, a factor, or a schedule such
as `"1-2-4"`: see serve_apps.compression), left-pads them into one batch, runs
the prefill once (where DPN pools the visual tokens) and then decodes one token per step for every unfinished
request. Each request keeps its own `max_tokens`, `temperature`, `top_p`, `seed` and `stop` strings, which
`generate()` cannot do in one batch. Each step returns one event per request (serve_apps.events: a `DeltaEvent`,
the `FinalEvent` with the finish reason and usage, or an `ErrorEvent`), so the caller can stream.

One request never fails another: sampling is numerically safe for any valid temperature and top_p, reserved
tokens (`<image>`, `<router>`, padding, every special token but end-of-sequence, ids past the tokenizer) are never
sampled, so nothing fed back can be rejected; and a row whose seed, sampling or decoding raises ends alone, with
an error event, while the other rows go on.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dpn_model import flops as flops_lib
from dpn_model.cache import cat_left_padded
from dpn_model.processing import ReservedTokenError
from serve_apps.compression import Rate, as_rate
from serve_apps.events import DeltaEvent, ErrorEvent, Event, FinalEvent

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
    compression: Rate  # what the request asked for: "auto", a factor, or a schedule's label ("1-2-4")
    request_id: str = ""
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's logprob (OpenAI's `logprobs`)
    top_logprobs: int = 0  # and this many most likely alternatives (0..20)


@dataclass
class _RowState:
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # one entry per generated token, when asked
    emitted: int = 0  # characters of the decoded text already sent
    finished: bool = False
    error: str | None = None  # why the row failed before its first token (seed), reported at prefill


GREEDY_BELOW = 1e-4
"""Temperatures below this sample greedily: the distribution is already one-hot to float precision."""


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


def prepare(processor: Any, request: dict[str, Any], max_prompt_tokens: int) -> Prepared:
    """The prompt ids of a request (`DPNProcessor.encode`, generate mode) and its images' pixel values.

    Args:
        processor: a `DPNProcessor`.
        request: `messages` (OpenAI role/content, images as `image_url` parts), `images` (in order: the
            ingress's decoded `(H, W, 3)` uint8 arrays, or encoded image bytes), `max_tokens`, `temperature`,
            `top_p`, `seed`, `stop`, `compression`, `request_id`.
        max_prompt_tokens: longest prompt allowed, counting the image tokens.

    Raises:
        PromptError: special or added tokens typed into the text of any message (code `reserved_token`, from
            the processor's rule), malformed messages, or a prompt over `max_prompt_tokens`.
    """
    images = request.get("images") or None
    try:  # a chat request: its image parts stay where the client put them
        input_ids = processor.encode(request["messages"], images, mode="generate", image_first=False)[
            "input_ids"
        ]
    except ReservedTokenError as exc:  # the processor's one special-token rule (DPNProcessor.check_text)
        raise PromptError(
            f"message {exc.message_index} contains the reserved token {exc.token!r}; special tokens cannot be "
            "typed in the text: the server adds them where the prompt needs them, and images go in image_url parts",
            param=f"messages.{exc.message_index}.content",
            code="reserved_token",
        ) from exc
    except ValueError as exc:
        raise PromptError(str(exc), param="messages", code="invalid_messages") from exc
    if len(input_ids) > max_prompt_tokens:
        raise PromptError(
            f"the prompt is {len(input_ids)} tokens (including {processor.image_seq_length} per image), more than "
            f"this server's limit of {max_prompt_tokens}; shorten the conversation",
            param="messages",
            code="prompt_too_long",
        )
    temperature = 1.0 if request.get("temperature") is None else float(request["temperature"])
    return Prepared(
        input_ids=input_ids,
        pixel_values=processor.image_processor(images, return_tensors="pt")["pixel_values"]
        if images
        else None,
        max_tokens=int(request["max_tokens"]),
        temperature=temperature,
        top_p=1.0 if request.get("top_p") is None else float(request["top_p"]),
        seed=request.get("seed"),
        stop=list(request.get("stop") or []),
        compression=as_rate(request.get("compression", "auto")),
        request_id=request.get("request_id", ""),
        ignore_eos=bool(request.get("ignore_eos", False)),
        logprobs=bool(request.get("logprobs", False)),
        top_logprobs=int(request.get("top_logprobs") or 0),
    )


LOGPROB_FLOOR = -9999.0
"""The logprob reported for a token the model gives no probability (OpenAI's value; JSON has no -inf)."""


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


def _generator(req: Prepared) -> torch.Generator | None:
    """The row's random generator (None when greedy); seeded by the request or at random."""
    if req.temperature < GREEDY_BELOW:
        return None
    generator = torch.Generator()
    generator.manual_seed(req.seed if req.seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    return generator


class BatchRun:
    """One batch of requests at one compression rate, generated step by step.

    Args:
        model: a `DPNForConditionalGeneration` in eval mode.
        processor: its `DPNProcessor` (tokenizer for padding, stop handling and detokenization).
        requests: the batch; all run with `compression`.
        compression: `"auto"`, a forced factor, or a schedule (`"1-2-4"`, `[1, 2, 4]`) the model runs this batch
            at; kept (and reported) as its `Rate`.
        queue: the name of the queue the batch came from (for observability).
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        requests: list[Prepared],
        compression: Rate | list[int],
        queue: str,
        resume: list[tuple[_RowState, torch.Generator | None]] | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.requests = requests
        self.compression = as_rate(compression)
        self.batch_id = next(_batch_ids)
        self.info = {
            "id": self.batch_id,
            "queue": queue,
            "rate": self.compression,
            "size": len(requests),
            "requested": [r.compression for r in requests],
        }
        if resume is not None:  # rows carried over from a failed batch (see `split_row`)
            self.rows = [row for row, _ in resume]
            self.generators = [generator for _, generator in resume]
        else:
            self.rows = [_RowState() for _ in requests]
            self.generators = [self._seeded(row, req) for row, req in zip(self.rows, requests)]
        # ids never emitted, built at the first logits (they give the vocabulary size)
        self._reserved: torch.Tensor | None = None
        self.eos_id = self.tokenizer.eos_token_id
        # per row: the record of the batch it was prefilled in, and the rate it ran at (rows of other batches
        # join a running one with `absorb`)
        self.row_info = [self.info] * len(requests)
        self.row_rates = [self.compression] * len(requests)
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._usage: list[dict[str, Any]] = []

    @staticmethod
    def _seeded(row: _RowState, req: Prepared) -> torch.Generator | None:
        try:
            return _generator(req)
        except Exception as exc:  # noqa: BLE001 - a seed torch cannot take fails its own row, not the batch
            logger.warning("request %s: cannot seed its generator (%s)", req.request_id, exc)
            row.finished, row.error = True, f"invalid seed {req.seed!r}: {exc}"
            return None

    def split_row(self, i: int) -> BatchRun:
        """Row `i` as a batch of its own on the same model, going on from what it generated: after a decode step
        of this batch raised (its KV cache is lost), each unfinished request re-reads its prompt and its tokens so
        far in a prefill of its own, so only the request at fault fails."""
        run = BatchRun(
            self.model,
            self.processor,
            [self.requests[i]],
            self.row_rates[i],
            self.row_info[i]["queue"],
            resume=[(self.rows[i], self.generators[i])],
        )
        run.info.update(fingerprint=self.row_info[i].get("fingerprint"), resumed_from=self.row_info[i]["id"])
        return run

    # -- continuous batching --------------------------------------------------------------------------------

    _ROW_LISTS = ("requests", "rows", "generators", "row_info", "row_rates", "_usage")

    def absorb(self, *others: BatchRun) -> list[int]:
        """Drop the finished rows (their KV cache freed) and take in the rows of `others`, batches prefilled on
        the same model (at any rate), so that they decode together from the next `step` on; one copy of the KV
        cache does both. Each row keeps its own request, sampling state and batch record.

        Returns:
            `list[int]`: the indices the dropped rows had, in order.
        """
        if any(other.model is not self.model for other in others):
            raise ValueError("rows of batches on different models cannot decode together")
        gone = [i for i, row in enumerate(self.rows) if row.finished]
        if not gone and not others:
            return gone
        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        for name in self._ROW_LISTS:
            values = getattr(self, name)
            setattr(
                self, name, [values[i] for i in keep] + [v for other in others for v in getattr(other, name)]
            )
        if not self.rows:
            self._cache, self._mask = None, None
            return gone
        index = torch.tensor(keep, dtype=torch.long, device=self._mask.device) if gone else None
        self._cache.append_rows(*(other._cache for other in others), keep=index)
        self._mask = cat_left_padded([self._mask, *(other._mask for other in others)], dim=1, index=index)
        if gone:
            config = self.model.config
            bounds = [0, *config.pooling_layers, config.text_config.num_hidden_layers]
            self._cache.drop_leading_padding([range(a, b) for a, b in zip(bounds[:-1], bounds[1:])])
            self._mask = self._mask[:, int(self._mask.any(0).nonzero()[0, 0]) :]
        return gone

    def remove_finished(self) -> list[int]:
        """Drop the finished rows (their KV cache freed at once); the indices they had, in order."""
        return self.absorb()

    # -- steps ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self) -> list[Event | None]:
        """Run the prompt through the model (pooling happens here) and pick each request's first token; the
        batch record gets the seconds it took (`prefill_s`)."""
        start = time.perf_counter()
        device = self.model.device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        prefixes = [req.input_ids + row.generated for req, row in zip(self.requests, self.rows)]
        width = max(len(prefix) for prefix in prefixes)
        ids = torch.full((len(self.requests), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.requests), width), dtype=torch.long)
        for i, prefix in enumerate(prefixes):  # left padding: prompts end together
            ids[i, width - len(prefix) :] = torch.tensor(prefix)
            mask[i, width - len(prefix) :] = 1
        pixels = [r.pixel_values for r in self.requests if r.pixel_values is not None]
        pixel_values = torch.cat(pixels).to(device=device, dtype=self.model.dtype) if pixels else None
        out = self.model(
            input_ids=ids.to(device),
            pixel_values=pixel_values,
            attention_mask=mask.to(device),
            compression=self.compression,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = out.cache
        self._mask = mask.to(device)
        self._usage = self._prefill_usage(out, mask)
        events = self._advance(out.logits[:, -1].float())
        self.info["prefill_s"] = round(time.perf_counter() - start, 4)
        return [ErrorEvent(row.error) if row.error else event for row, event in zip(self.rows, events)]

    @torch.inference_mode()
    def step(self) -> list[Event | None]:
        """Decode one token for every request (finished ones are fed padding and ignored)."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        last = [row.generated[-1] if row.generated and not row.finished else pad_id for row in self.rows]
        device = self._mask.device
        self._mask = torch.cat(
            [self._mask, torch.ones((len(self.rows), 1), dtype=torch.long, device=device)], dim=1
        )
        out = self.model(
            input_ids=torch.tensor(last, device=device)[:, None],
            attention_mask=self._mask,
            cache=self._cache,
            use_cache=True,
            compression=self.compression,
            logits_to_keep=1,
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
        prompt_lens = mask.sum(-1).tolist()  # the prompt, and the tokens a resumed row had generated
        for i, req in enumerate(self.requests):
            prompt_len = int(prompt_lens[i])
            has_image = req.pixel_values is not None
            lens = [int(x) for x in out.layer_seq_lens[i].tolist()]
            visual0 = int(out.visual_tokens[i, 0]) if has_image else 0
            text_len = prompt_len - visual0
            per_layer = [length - text_len for length in lens]
            choices = [int(c) for c in out.expert_choices[i].tolist()]
            spent = float(out.prefill_flops[i])
            dense = float(
                flops_lib.prefill_flops(
                    config,
                    [prompt_len] * config.text_config.num_hidden_layers,
                    num_images=int(has_image),
                    lm_head_tokens=1,
                    num_routed_layers=0,
                )
            )
            usage.append(
                {
                    "prompt_tokens": len(req.input_ids),
                    "visual_tokens_per_layer": per_layer if has_image else [],
                    "compression_per_pooling_layer": [factors[c] if c >= 0 else None for c in choices]
                    if has_image
                    else [],
                    "compression_requested": req.compression,
                    "compression_run": self.compression,
                    "prefill_flops": spent,
                    "prefill_flops_dense": dense,
                    "prefill_flops_saved": round(1.0 - spent / dense, 6) if dense else 0.0,
                }
            )
        return usage

    def _advance(self, logits: torch.Tensor) -> list[Event | None]:
        """One event per row from the step's logits `(B, V)`: a failing row ends alone with an error event."""
        if self._reserved is None:
            self._reserved = torch.tensor(
                reserved_token_ids(self.processor, logits.shape[-1]), dtype=torch.long
            )
        # reserved tokens are never emitted, greedy or sampled
        logits = logits.cpu().float().index_fill(1, self._reserved, float("-inf"))
        events: list[Event | None] = []
        for i, (row, req) in enumerate(zip(self.rows, self.requests)):
            if row.finished:
                events.append(None)
                continue
            try:
                events.append(self._advance_row(i, logits[i]))
            except Exception as exc:  # noqa: BLE001 - this row's failure must not end its batch-mates
                logger.exception("batch %s: request %s failed", self.batch_id, req.request_id)
                row.finished = True
                events.append(ErrorEvent(f"generation failed: {exc}"))
        return events

    def _advance_row(self, i: int, logits: torch.Tensor) -> DeltaEvent | FinalEvent | None:
        """Sample row `i`'s next token; its text delta, its final event, or None (text held back)."""
        row, req = self.rows[i], self.requests[i]
        token = sample_token(logits, req.temperature, req.top_p, self.generators[i])
        finish = None
        if token == self.eos_id and not req.ignore_eos:
            finish = "stop"
        else:
            row.generated.append(token)
            if req.logprobs:
                row.logprobs.append(token_logprobs(self.tokenizer, logits, token, req.top_logprobs))
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
            delta = text[row.emitted : max(safe, row.emitted)]
            row.emitted = max(safe, row.emitted)
            return DeltaEvent(delta) if delta else None
        row.finished = True
        delta = text[row.emitted :]
        row.emitted = len(text)
        usage = dict(self._usage[i], completion_tokens=len(row.generated))
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return FinalEvent(
            text=delta,
            full_text=text,
            finish_reason=finish,
            usage=usage,
            batch=self.row_info[i],
            logprobs=row.logprobs if req.logprobs else None,
        )


__all__ = [
    "BatchRun",
    "Prepared",
    "PromptError",
    "prepare",
    "reserved_token_ids",
    "sample_token",
    "token_logprobs",
]
