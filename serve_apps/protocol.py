"""OpenAI chat-completions request schema, response builders and OpenAI-style errors.

The request schema is OpenAI's `POST /v1/chat/completions` body (the fields DPN supports) plus one extra field,
`compression`: `"auto"` (the router decides, default), a forced factor (1 = dense, 2, 4), or one factor per pooling
layer (`[1, 2, 4]`, `"1,2,4"`, `"1-2-4"`); see serve_apps.compression. OpenAI fields DPN does not implement
(`UNSUPPORTED_FIELDS`: tools, structured output, audio, logit bias, penalties, ...) are a 400 naming them when they
ask for something (a value other than their no-op default), so a client never gets an answer that silently ignored
what it asked; fields with no effect on the answer (`user`, `metadata`, `store`, `service_tier`) and fields OpenAI
does not know are ignored, so clients that send extra options keep working. Validation failures become `400`
errors in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``, never FastAPI's 422.

The schema is the one validation layer: every value is checked for type and range here (strings must be valid
Unicode, numbers finite, seeds within int64), so nothing malformed reaches the tokenizer, the sampler or torch.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from dpn_model.configuration import COST_PREFIX
from serve_apps.compression import FORMS, SERVED_MODES, check_form

# the cost dial in its canonical spelling, as check_form returns it ("auto:lambda=0.5")
CostDial = Annotated[StrictStr, StringConstraints(pattern=f"^{COST_PREFIX}")]

CompressionField = Annotated[
    Literal[SERVED_MODES] | CostDial | StrictInt | list[StrictInt],
    BeforeValidator(check_form, json_schema_input_type=str | int | list[int]),
    Field(description=f"{FORMS}; the model's factors and pooling layers are checked on the replica"),
]
"""The type of a request's `compression` field, checked for form (serve_apps.compression.check_form, over the
model's own parser `dpn_model.configuration.CompressionSpec.parse`): `"auto"` (the model's routing modes but random
routing, `SERVED_MODES`), the cost dial `"auto:lambda=X"` (canonical spelling), a factor, or a schedule as a list of factors. Whether the model has those factors and that
many pooling layers is checked on the replica. (The parsed value's plain type is
`dpn_model.configuration.Compression`.)"""


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
        # a message quoting the client's text must still encode: lone surrogates become \udxxx escapes
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
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


class OversizeInteger:
    """Stands in for a JSON integer too long to convert (Python caps int() at 4300 digits), so the schema rejects
    it at its field, naming the field, instead of the parser failing for the whole body."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


MAX_INTEGER_DIGITS = 100  # far beyond int64 (19 digits), far below Python's conversion limit


def _int_or_oversize(text: str) -> int | OversizeInteger:
    return int(text) if len(text) <= MAX_INTEGER_DIGITS else OversizeInteger(len(text))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400: malformed, too deeply nested, non-finite numbers, not UTF-8."""
    try:
        payload = json.loads(body, parse_int=_int_or_oversize, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise invalid_request("request body is nested too deeply to parse", code="invalid_json") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise invalid_request(f"request body is not valid JSON ({exc})", code="invalid_json") from exc
    if not isinstance(payload, dict):
        raise invalid_request("request body must be a JSON object", code="invalid_json")
    return payload


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text must be valid Unicode, found a lone surrogate at position {exc.start}"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
"""A string of valid Unicode (JSON can escape lone UTF-16 surrogates, which no tokenizer can encode)."""

Number = Annotated[StrictFloat, Field(allow_inf_nan=False)]
"""A finite JSON number (ints accepted, booleans and numeric strings not)."""


class ImageURL(_Strict):
    url: Text
    detail: Text | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | Text  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[ContentPart]
    name: Text | None = None


class StreamOptions(_Strict):
    """`stream_options` (only with `stream`): `include_usage` adds a last chunk with `choices: []` and `usage`."""

    include_usage: StrictBool = False


MAX_N = 8
"""Largest `n` (choices of one request); each choice is generated as a request of its own on the replicas."""


def _is_text_format(value: Any) -> bool:
    return value == {"type": "text"}


def _is_text_only(value: Any) -> bool:
    return value == ["text"]


def _is_zero(value: Any) -> bool:
    return value == 0


def _is_no_tool(value: Any) -> bool:
    return value == "none"


def _is_empty(value: Any) -> bool:
    return value in ([], {})


UNSUPPORTED_FIELDS: dict[str, tuple[Any, str]] = {
    # field: (the values that ask for nothing, besides null; what the field is)
    "tools": (_is_empty, "tool calling"),
    "tool_choice": (_is_no_tool, "tool calling"),
    "parallel_tool_calls": (None, "tool calling"),
    "functions": (_is_empty, "function calling"),
    "function_call": (_is_no_tool, "function calling"),
    "response_format": (_is_text_format, "structured output (only {'type': 'text'} is served)"),
    "audio": (None, "audio output"),
    "modalities": (_is_text_only, "output modalities other than ['text']"),
    "prediction": (None, "predicted outputs"),
    "logit_bias": (_is_empty, "logit bias"),
    "presence_penalty": (_is_zero, "presence penalty"),
    "frequency_penalty": (_is_zero, "frequency penalty"),
    "reasoning_effort": (None, "reasoning effort"),
    "web_search_options": (None, "web search"),
}
"""OpenAI chat-completion fields DPN does not implement: a request that sets one to anything but null or its no-op
value is a 400 naming it (`check_unsupported`)."""


def check_unsupported(payload: dict[str, Any]) -> None:
    """A 400 naming every field of `payload` that asks for an OpenAI feature DPN does not serve."""
    asked = []
    for name, (harmless, _) in UNSUPPORTED_FIELDS.items():
        value = payload.get(name)
        if value is None or (harmless is not None and harmless(value)):
            continue
        asked.append(name)
    if asked:
        what = "; ".join(f"{name!r} ({UNSUPPORTED_FIELDS[name][1]})" for name in asked)
        raise invalid_request(
            f"unsupported field(s): {what}; this server does not implement them, remove them from the request",
            param=asked[0],
            code="unsupported_parameter",
        )


class ChatCompletionRequest(_Strict):
    """The body of `POST /v1/chat/completions`."""

    model: Text | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0.0, le=2.0)
    top_p: Number | None = Field(default=None, gt=0.0, le=1.0)
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None  # OpenAI: up to 4 sequences
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64 (OpenAI's; torch's too)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(default=None, ge=1, le=MAX_N)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)  # OpenAI: 0..20, needs logprobs: true
    user: Text | None = None
    compression: CompressionField = "auto"
    ignore_eos: StrictBool = False  # extension (as vLLM's): generate exactly max_tokens, for load tests

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return [s for s in stops if s]


def _param(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as the dotted request field, without pydantic's union branch names (`str`,
    `list[...]`, `TextPart`, `function-after[...]`) and the discriminator value it puts after a tagged union."""
    parts: list[str] = []
    tag_next = False
    for item in map(str, loc):
        if tag_next and not item.isdigit():
            tag_next = False  # `type` of a content part: it repeats the field name that follows
            continue
        tag_next = tag_next or "tagged-union[" in item
        if (
            item.startswith("function-")
            or "[" in item
            or item[:1].isupper()
            or item in {"str", "int", "bool", "float"}
        ):
            continue
        parts.append(item)
    return ".".join(parts)


def validation_error_to_api_error(error: ValidationError) -> APIError:
    """The most specific pydantic error as an OpenAI-style 400 naming the field and what was expected.

    Of a union's errors, one for a value of the right type but wrong content (a lone surrogate in a text part) says
    more than "not a string" for the other branch; among equals, the deepest field wins."""
    errors = error.errors(include_url=False)
    first = min(errors, key=lambda e: (e.get("type", "").endswith("_type"), -len(e.get("loc", ()))))
    param = _param(first.get("loc", ()))
    message = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        message = f"missing required field {param!r}"
    elif first.get("type") == "json_invalid":
        message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', message)}"
        param = ""
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
    choices: list[tuple[str, str, list[dict[str, Any]] | None]],
    usage: dict[str, Any],
    fingerprint: str | None,
    batch: dict[str, Any] | None,
    created: int | None = None,
) -> dict[str, Any]:
    """A `chat.completion` object (non-streaming response); `choices` are `(text, finish_reason, logprobs)` in
    index order, `logprobs` the per-token entries (`choices[i].logprobs.content`) or None."""
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish_reason,
            }
            for index, (text, finish_reason, logprobs) in enumerate(choices)
        ],
        "usage": usage,
        "dpn_batch": batch,
    }


def _chunk(
    request_id: str, model: str, created: int, fingerprint: str | None, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    """The envelope every `chat.completion.chunk` shares."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }


def usage_chunk(
    request_id: str, model: str, created: int, usage: dict[str, Any], fingerprint: str | None = None
) -> dict[str, Any]:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the request's `usage`."""
    return {**_chunk(request_id, model, created, fingerprint, []), "usage": usage}


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
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = _chunk(request_id, model, created, fingerprint, [choice])
    if usage is not None:
        chunk["usage"] = usage
    if batch is not None:
        chunk["dpn_batch"] = batch
    return chunk


__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompressionField",
    "ChatMessage",
    "MAX_N",
    "StreamOptions",
    "UNSUPPORTED_FIELDS",
    "check_unsupported",
    "chat_chunk",
    "chat_completion",
    "completion_id",
    "invalid_request",
    "parse_json_object",
    "usage_chunk",
    "validation_error_to_api_error",
]
