"""Batched generation for serving: a request prepared for the model, and a batch of them generated step by step.

No Ray here. [`prepare`] turns a request into a [`Prepared`] one (prompt ids, pixel values, sampling settings). A
[`BatchRun`] takes requests that share one compression rate (`"auto"`, a factor, or a schedule such as `"1-2-4"`:
see serve_apps.compression), left-pads them into one batch, runs the prefill once (where DPN pools the visual
tokens) and then decodes one token per step for every unfinished request. Each request keeps its own `max_tokens`,
`temperature`, `top_p`, `seed` and `stop` strings, which `generate()` cannot do in one batch. Each step returns one
event per request (serve_apps.events: a `DeltaEvent`, the `FinalEvent` with the finish reason and usage, or an
`ErrorEvent`), so the caller can stream. Rows of batches prefilled at other rates join a running one, and
finished rows leave it, with [`BatchRun.absorb`] (continuous batching, serve_apps.executor).

`BatchRun` composes named pieces: the KV cache and mask of its rows (serve_apps.batch_cache), the choice of each
next token (serve_apps.sampling), stop strings and what text may be streamed yet (serve_apps.stopping), and each
request's usage (serve_apps.usage).

One request never fails another: sampling never raises for a valid request and never emits a reserved token, so
nothing fed back can be rejected; and a row whose seed or sampling raises ends alone with an error event
(`_fail_row`), while the other rows go on. (A whole step that raises is serve_apps.scheduler's to isolate.)
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from dpn_model.processing import ReservedTokenError
from serve_apps.batch_cache import BatchCache, left_padded, segments
from serve_apps.compression import Rate
from serve_apps.events import DeltaEvent, ErrorEvent, Event, FinalEvent
from serve_apps.sampling import ReservedMask, sample_token, seeded_generator, token_logprobs
from serve_apps.stopping import cut_at_stop, releasable
from serve_apps.usage import completion_usage, prefill_usage

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
    # what the request asked for, as serve_apps.compression.for_model made it on arrival (its one parse): "auto",
    # "auto:lambda=X", a factor, or a schedule's label ("1-2-4"); queues, batches and usage take it as it is
    compression: Rate
    request_id: str = ""
    ignore_eos: bool = False
    logprobs: bool = False  # report each generated token's logprob (OpenAI's `logprobs`)
    top_logprobs: int = 0  # and this many most likely alternatives (0..20)


def prepare(processor: Any, request: dict[str, Any], max_prompt_tokens: int) -> Prepared:
    """The prompt ids of a request (`DPNProcessor.encode`, generate mode) and its images' pixel values.

    Args:
        processor: a `DPNProcessor`.
        request: `messages` (OpenAI role/content, images as `image_url` parts), `images` (in order: the
            ingress's decoded `(H, W, 3)` uint8 arrays, or encoded image bytes), `max_tokens`, `temperature`,
            `top_p`, `seed`, `stop`, `compression` (the `Rate` serve_apps.compression.for_model gave it, kept as
            it is; default `"auto"`), `request_id`.
        max_prompt_tokens: longest prompt allowed, counting the image tokens.

    Raises:
        PromptError: special or added tokens typed into the text of any message (code `reserved_token`, from
            the processor's rule), malformed messages, or a prompt over `max_prompt_tokens`.
    """
    images = request.get("images") or None
    try:  # a chat request: its image parts stay where the client put them
        input_ids = processor.encode(request["messages"], bool(images), mode="generate", image_first=False)[
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
        compression=request.get("compression", "auto"),
        request_id=request.get("request_id", ""),
        ignore_eos=bool(request.get("ignore_eos", False)),
        logprobs=bool(request.get("logprobs", False)),
        top_logprobs=int(request.get("top_logprobs") or 0),
    )


@dataclass
class Row:
    """One request in a batch: what it asked for, what it generated so far, its sampler and its records.

    Attributes:
        request: The prepared request.
        generator: Its random generator (None: greedy).
        info: The record of the batch it was prefilled in (rows of other batches join a running one).
        rate: The rate it was prefilled at.
        generated: The tokens generated so far.
        logprobs: One entry per generated token, when the request asked for them.
        emitted: Characters of the decoded text already sent.
        finished: Nothing more to generate: its last event was returned (or is its `error`).
        error: Why the row failed; a row that fails before its prefill (its seed) reports it there.
        usage: Its prefill's part of the usage (serve_apps.usage), set by the prefill.
    """

    request: Prepared
    generator: torch.Generator | None
    info: dict[str, Any]
    rate: Rate
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    emitted: int = 0
    finished: bool = False
    error: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)


def _fail_row(row: Row, message: str) -> ErrorEvent:
    """End `row` alone with `message`: the one rule for a failure that is this row's (its seed, its sampling)."""
    row.finished, row.error = True, message
    return ErrorEvent(message)


class BatchRun:
    """One batch of requests at one compression rate, generated step by step.

    Args:
        model: a `DPNForConditionalGeneration` in eval mode.
        processor: its `DPNProcessor` (tokenizer for padding, stop handling and detokenization).
        requests: the batch; all run with `compression`.
        compression: the `Rate` the model runs this batch at (`"auto"`, a forced factor, or a schedule's label
            such as `"1-2-4"`: its prefill group's, serve_apps.policy), kept and reported as it is.
        queue: the name of the queue the batch came from (for observability).
        resume: rows carried over from a batch whose decode step failed (`split_row`), in place of fresh ones.
    """

    def __init__(
        self,
        model: Any,
        processor: Any,
        requests: list[Prepared],
        compression: Rate,
        queue: str,
        resume: list[Row] | None = None,
    ):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.compression = compression
        self.batch_id = next(_batch_ids)
        self.info: dict[str, Any] = {
            "id": self.batch_id,
            "queue": queue,
            "rate": self.compression,
            "size": len(requests),
            "requested": [r.compression for r in requests],
        }
        self.rows = resume if resume is not None else [self._new_row(req) for req in requests]
        for row in self.rows:
            row.info, row.rate = self.info, self.compression
        self.cache: BatchCache | None = None  # from the prefill on
        self.eos_id = self.tokenizer.eos_token_id
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self._reserved = ReservedMask(processor)

    def _new_row(self, req: Prepared) -> Row:
        row = Row(req, None, self.info, self.compression)
        try:
            row.generator = seeded_generator(req.temperature, req.seed)
        except Exception as exc:  # noqa: BLE001 - a seed torch cannot take fails its own row, not the batch
            logger.warning("request %s: cannot seed its generator (%s)", req.request_id, exc)
            _fail_row(row, f"invalid seed {req.seed!r}: {exc}")
        return row

    @property
    def requests(self) -> list[Prepared]:
        """The batch's requests, row by row."""
        return [row.request for row in self.rows]

    @property
    def done(self) -> bool:
        return all(row.finished for row in self.rows)

    def split_row(self, i: int) -> BatchRun:
        """Row `i` as a batch of its own on the same model, going on from what it generated: after a decode step
        of this batch raised (its KV cache is lost), each unfinished request re-reads its prompt and its tokens so
        far in a prefill of its own, so only the request at fault fails."""
        row = self.rows[i]
        came_from = row.info
        run = BatchRun(self.model, self.processor, [row.request], row.rate, came_from["queue"], resume=[row])
        run.info.update(fingerprint=came_from.get("fingerprint"), resumed_from=came_from["id"])
        return run

    def mark_failed(self, exc: BaseException) -> None:
        """Note `exc` in the record of every batch the rows were prefilled in."""
        for info in {id(row.info): row.info for row in self.rows}.values():
            info["failed"] = f"{type(exc).__name__}: {exc}"

    # -- continuous batching --------------------------------------------------------------------------------

    def absorb(self, *others: BatchRun, drop: Collection[int] | None = None) -> list[int]:
        """Drop rows (`drop`, indices; default: the finished rows), their KV cache freed, and take in the rows of
        `others`, batches prefilled on the same model (at any rate), so that they decode together from the next
        `step` on; one copy of the KV cache does both. Each row keeps its own request, sampling state and batch
        record.

        Returns:
            `list[int]`: the indices the dropped rows had, in order.
        """
        if any(other.model is not self.model for other in others):
            raise ValueError("rows of batches on different models cannot decode together")
        gone = (
            sorted(set(drop)) if drop is not None else [i for i, row in enumerate(self.rows) if row.finished]
        )
        if not gone and not others:
            return gone
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep] + [row for other in others for row in other.rows]
        if not self.rows:
            self.cache = None
            return gone
        joining = [other.cache for other in others]  # prefilled batches: each has its cache
        self.cache.regroup(keep if gone else None, joining, segments(self.model.config))
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
        ids, mask = left_padded([row.request.input_ids + row.generated for row in self.rows], self._pad_id)
        pixels = [row.request.pixel_values for row in self.rows if row.request.pixel_values is not None]
        out = self.model(
            input_ids=ids.to(device),
            pixel_values=torch.cat(pixels).to(device=device, dtype=self.model.dtype) if pixels else None,
            attention_mask=mask.to(device),
            compression=self.compression,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = BatchCache(out.cache, mask.to(device))
        usage = prefill_usage(self.model.config, out, mask.sum(-1).tolist(), self.requests, self.compression)
        for row, prefilled in zip(self.rows, usage):
            row.usage = prefilled
        events = self._advance(out.logits[:, -1].float())
        self.info["prefill_s"] = round(time.perf_counter() - start, 4)
        return [ErrorEvent(row.error) if row.error else event for row, event in zip(self.rows, events)]

    @torch.inference_mode()
    def step(self) -> list[Event | None]:
        """Decode one token for every request (finished ones are fed padding and ignored)."""
        last = [
            row.generated[-1] if row.generated and not row.finished else self._pad_id for row in self.rows
        ]
        mask = self.cache.grow()
        out = self.model(
            input_ids=torch.tensor(last, device=mask.device)[:, None],
            attention_mask=mask,
            cache=self.cache.kv,
            use_cache=True,
            compression=self.compression,
            logits_to_keep=1,
        )
        self.cache.kv = out.cache
        return self._advance(out.logits[:, -1].float())

    # -- one token per row ---------------------------------------------------------------------------------

    def _advance(self, logits: torch.Tensor) -> list[Event | None]:
        """One event per row from the step's logits `(B, V)`: a failing row ends alone with an error event."""
        logits = self._reserved(logits)  # reserved tokens are never emitted, greedy or sampled
        events: list[Event | None] = []
        for i, row in enumerate(self.rows):
            if row.finished:
                events.append(None)
                continue
            try:
                events.append(self._advance_row(row, logits[i]))
            except Exception as exc:  # noqa: BLE001 - this row's failure must not end its batch-mates
                logger.exception("batch %s: request %s failed", self.batch_id, row.request.request_id)
                events.append(_fail_row(row, f"generation failed: {exc}"))
        return events

    def _advance_row(self, row: Row, logits: torch.Tensor) -> DeltaEvent | FinalEvent | None:
        """Sample the row's next token; its text delta, its final event, or None (text held back)."""
        req = row.request
        token = sample_token(logits, req.temperature, req.top_p, row.generator)
        finish = None
        if token == self.eos_id and not req.ignore_eos:
            finish = "stop"  # end-of-sequence is not part of the answer
        else:
            row.generated.append(token)
            if req.logprobs:
                row.logprobs.append(token_logprobs(self.tokenizer, logits, token, req.top_logprobs))
            if len(row.generated) >= req.max_tokens:
                finish = "length"
        text, finish = cut_at_stop(
            self.tokenizer.decode(row.generated, skip_special_tokens=True), req.stop, finish
        )
        if finish is None:
            delta, row.emitted = releasable(text, row.emitted, req.stop)
            return DeltaEvent(delta) if delta else None
        row.finished = True
        delta, row.emitted = text[row.emitted :], len(text)
        return FinalEvent(
            text=delta,
            full_text=text,
            finish_reason=finish,
            usage=completion_usage(row.usage, len(row.generated)),
            batch=row.info,
            logprobs=row.logprobs if req.logprobs else None,
        )


__all__ = ["BatchRun", "Prepared", "PromptError", "Row", "prepare"]
