"""The events that stream one request's generation from the model replica to the ingress. No Ray here.

A request's stream is a `StartEvent` (its prompt was accepted), then `DeltaEvent`s and one `FinalEvent`; or a
single `ErrorEvent` (the request was refused, or failed) in place of any of them, which ends the stream. They are
produced on the replica (serve_apps.generation, serve_apps.scheduler, serve_apps.model), cross the Serve
deployment handle (a streaming call: plain picklable dataclasses) and are turned into HTTP responses by the
ingress (serve_apps.api), which tells them apart with `isinstance` / `match`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StartEvent:
    """The request was tokenized and queued.

    Attributes:
        prompt_tokens: Prompt length in tokens, image tokens included.
        fingerprint: The model version that will answer (OpenAI's `system_fingerprint`).
    """

    prompt_tokens: int
    fingerprint: str | None = None


@dataclass(frozen=True)
class DeltaEvent:
    """Newly generated text (never empty; text that could still become a stop string is held back)."""

    text: str


@dataclass(frozen=True)
class FinalEvent:
    """The request's last event when it succeeds.

    Attributes:
        text: The last piece of text not sent yet (may be empty).
        full_text: The whole completion.
        finish_reason: `stop` (end of sequence or a stop string) or `length` (`max_tokens`).
        usage: Token counts, visual tokens per layer, compression requested and run, prefill FLOPs.
        batch: The record of the batch that ran it (id, queue, rate, requested rates, size, ...).
        fingerprint: The model version that answered; set by the scheduler from its batch.
        logprobs: When the request asked for them, one entry per generated token in OpenAI's
            `choices[i].logprobs.content` shape (`token`, `logprob`, `bytes`, `top_logprobs`); else None.
    """

    text: str
    full_text: str
    finish_reason: str
    usage: dict[str, Any]
    batch: dict[str, Any] | None = None
    fingerprint: str | None = None
    logprobs: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class ErrorEvent:
    """The event that ends a request that cannot be answered.

    Attributes:
        message: What went wrong, for the client.
        status: HTTP status: 400 for the request's prompt, 503 to retry, 500 for a fault (its input was validated,
            so a failing row is the server's fault, and the one place it shows is that row's answer).
        param: The request field at fault, if any.
        code: A short machine-readable code.
    """

    message: str
    status: int = 500
    param: str | None = None
    code: str = "generation_failed"


Event = StartEvent | DeltaEvent | FinalEvent | ErrorEvent
"""Any event of a request's stream."""

__all__ = ["DeltaEvent", "ErrorEvent", "Event", "FinalEvent", "StartEvent"]
