"""OpenAI chat-completions request schema, response builders and OpenAI-style errors.

The request schema is OpenAI's `POST /v1/chat/completions` body (the fields DPN supports) plus one extra field,
`compression`: `"auto"` (the router decides, default) or a forced factor 1, 2, 4 (1 = dense). Unknown fields are
ignored, as OpenAI-compatible servers do, so clients that send extra options keep working. Validation failures
become `400` errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, never FastAPI's 422.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

Compression = Literal["auto", 1, 2, 4]
COMPRESSION_CHOICES: tuple[str | int, ...] = ("auto", 1, 2, 4)


class APIError(Exception):
    """An error the API returns to the client, in OpenAI's shape.

    Args:
        status: HTTP status code.
        message: What was wrong and what to do about it.
        type: OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
        param: The request field at fault, dotted (`messages.0.content.1.image_url.url`), if any.
        code: A short machine-readable code.
        headers: Extra response headers (e.g. `Retry-After`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str = "invalid_request") -> APIError:
    """A 400 `invalid_request_error`."""
    return APIError(400, message, "invalid_request_error", param, code)


# --------------------------------------------------------------------------------------------- request


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Strict):
    url: StrictStr
    detail: StrictStr | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | StrictStr  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: StrictStr | list[ContentPart]
    name: StrictStr | None = None


class ChatCompletionRequest(_Strict):
    """The body of `POST /v1/chat/completions`."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    n: StrictInt | None = Field(default=None, ge=1, le=1)
    user: StrictStr | None = None
    compression: Compression | StrictStr = "auto"
    ignore_eos: StrictBool = False  # extension (as vLLM's): generate exactly max_tokens, for load tests

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]

    def compression_value(self) -> str | int:
        """`"auto"` or a forced factor; accepts the strings "1", "2", "4" too."""
        value = self.compression
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if value not in COMPRESSION_CHOICES:
            raise invalid_request(
                f"compression must be 'auto' or one of 1, 2, 4 (1 = dense), got {self.compression!r}",
                param="compression",
                code="invalid_compression",
            )
        return value


def validation_error_to_api_error(error: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI-style 400 naming the field and what was expected."""
    first = error.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "tagged-union"))]
    # drop pydantic's union branch names (e.g. "str", "list[...]", "TextPart") from the location
    param = ".".join(p for p in loc if not (p[:1].isupper() or "[" in p or p in {"str", "int", "bool", "float"}))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"missing required field {param!r}"
    elif first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        param = None
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = f"invalid value for {param!r}: {message} (got {shown})" if param else message
    return invalid_request(message, param=param or None, code="invalid_value")


# --------------------------------------------------------------------------------------------- response


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def chat_completion(
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    fingerprint: str | None,
    batch: dict[str, Any] | None,
    created: int | None = None,
) -> dict[str, Any]:
    """A `chat.completion` object (non-streaming response)."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "dpn_batch": batch,
    }


def chat_chunk(
    request_id: str,
    model: str,
    created: int,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage: dict[str, Any] | None = None,
    fingerprint: str | None = None,
    batch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A `chat.completion.chunk` object (one server-sent event of a stream)."""
    chunk: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage is not None:
        chunk["usage"] = usage
    if batch is not None:
        chunk["dpn_batch"] = batch
    return chunk


__all__ = [
    "APIError",
    "COMPRESSION_CHOICES",
    "ChatCompletionRequest",
    "ChatMessage",
    "chat_chunk",
    "chat_completion",
    "completion_id",
    "invalid_request",
    "validation_error_to_api_error",
]
