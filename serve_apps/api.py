"""The OpenAI-compatible HTTP API as a FastAPI app, independent of Ray.

`create_api(backend, settings)` builds the routes over any `Backend` (something that streams generation events
for a request); the Serve ingress passes one that calls the model deployment's handle, tests can pass a fake one.
Everything the client sends is validated here (auth, body size, JSON, schema, images, limits) so a bad request
never reaches a batch, and every error leaves in OpenAI's shape: 400/401/404/413 for the client's mistakes, 503 with
`Retry-After` when the model side is full or unreachable (a replica died, a health probe timed out), and a JSON 500
for anything unexpected (a bug, logged with its traceback).

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /v1/dpn/batches` (recent batches with
the rate each ran at and the rates its requests asked for: `"auto"`, a factor, or a schedule's label `"1-2-4"`).

Every chat request, answered or refused, is recorded when it ends in the `MetricsSink` given to `create_api`
(serve_apps.metrics: the Serve ingress passes its Ray metrics, Prometheus' `ray_dpn_*`), through a
`RequestObservation` that sees the request's backend events.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.events import DeltaEvent, ErrorEvent, Event, FinalEvent, StartEvent
from serve_apps.limits import Limits, check_body_size, load_image_url, request_max_tokens
from serve_apps.metrics import MetricsSink, RequestObservation
from serve_apps.protocol import (
    APIError,
    ChatCompletionRequest,
    chat_chunk,
    chat_completion,
    check_unsupported,
    completion_id,
    invalid_request,
    parse_json_object,
    usage_chunk,
    validation_error_to_api_error,
)

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """What the API needs from the model side."""

    def generate(self, request: dict[str, Any]) -> AsyncIterator[Event]:
        """Events for one request (serve_apps.events): a `StartEvent`, `DeltaEvent`s, a `FinalEvent`; or a single
        `ErrorEvent`."""

    async def info(self) -> dict[str, Any]:
        """Model ref, version, compression factors, batching settings."""

    async def batches(self, limit: int) -> list[dict[str, Any]]:
        """Recent batch records."""


class Unavailable(Exception):
    """The model side cannot serve now (a replica died, none is reachable); the API answers 503 + Retry-After."""


class Overloaded(Unavailable):
    """The backend refused the request because its queues are full (the API answers 503 + Retry-After)."""


@dataclass
class Settings:
    """Ingress settings (from the app config).

    Attributes:
        served_model_name: The model id clients pass as `model` and `GET /v1/models` lists.
        limits: Request limits.
        api_key_env: Environment variable holding the API key; when it is set and non-empty, every route but
            `/health` needs `Authorization: Bearer <key>`.
        retry_after_s: `Retry-After` seconds on 503 responses (overloaded or model unavailable).
        default_compression: Compression of requests that do not set `compression`: `"auto"`, a factor or a
            schedule (a list of factors), already checked for form (serve_apps.compression.check_form).
        health_timeout_s: Longest wait for the model's info on `/health` and `/v1/models`; beyond it they
            answer 503 (a dead replica must not make the probe hang until the replacement is up).
    """

    served_model_name: str = "dpn"
    limits: Limits = field(default_factory=Limits)
    api_key_env: str = "DPN_API_KEY"
    retry_after_s: int = 1
    default_compression: str | int | list[int] = "auto"
    health_timeout_s: float = 2.0

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def create_api(
    backend: Backend, settings: Settings | None = None, metrics: MetricsSink | None = None
) -> FastAPI:
    """The FastAPI app serving the OpenAI-compatible API over `backend`; each chat request is recorded in
    `metrics` when it ends (None: not recorded)."""
    settings = settings or Settings()
    api_key = settings.api_key()
    app = FastAPI(title="DPN OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app)
    _add_error_handlers(app, settings.retry_after_s)

    @app.get("/health")
    async def health() -> JSONResponse:
        return await _health(backend, settings)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_auth(request, api_key)
        info = await _model_info(backend, settings.health_timeout_s)
        return JSONResponse(_model_list(info, settings.served_model_name))

    @app.get("/v1/dpn/batches")
    async def batches(request: Request, limit: int = Query(0, ge=0, le=1_000_000)) -> JSONResponse:
        _check_auth(request, api_key)
        return JSONResponse({"object": "list", "data": await backend.batches(limit)})

    @app.post(
        "/v1/chat/completions",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}
                },
            }
        },
    )
    async def chat_completions(request: Request) -> Response:
        observation = RequestObservation(metrics)
        try:
            _check_auth(request, api_key)
            req = _parse_request(await _read_body(request, settings.limits))
            response = await _chat_completion(req, _ObservedBackend(backend, observation), settings)
        except asyncio.CancelledError:
            observation.finish(499, "abort")  # the client went away before the answer
            raise
        except Exception as exc:
            observation.finish(*_error_status(exc))
            raise
        if not isinstance(response, StreamingResponse):
            observation.finish(200)
        return response  # a stream's end is recorded by _stream

    return app


async def _health(backend: Backend, settings: Settings) -> JSONResponse:
    """`GET /health`: the served model and version, or a 503 + Retry-After when the backend does not answer."""
    try:
        info = await _model_info(backend, settings.health_timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        return APIError(
            503,
            f"model backend unavailable: {exc}",
            "server_error",
            code="unhealthy",
            headers={"Retry-After": str(settings.retry_after_s)},
        ).response()
    return JSONResponse({"status": "ok", "model": info.get("model"), "version": info.get("version")})


def _model_list(info: dict[str, Any], served_model_name: str) -> dict[str, Any]:
    """The body of `GET /v1/models`: the one served model, with its version and the compressions it serves."""
    return {
        "object": "list",
        "data": [
            {
                "id": served_model_name,
                "object": "model",
                "created": 0,
                "owned_by": "dpn",
                "root": info.get("model"),
                "version": info.get("version"),
                "compression": ["auto", *info.get("compression_factors", [])],
                **_schedule_length(info),
            }
        ],
    }


def _schedule_length(info: dict[str, Any]) -> dict[str, int]:
    """How many factors a `compression` schedule of the served model has (one per pooling layer), when known."""
    layers = info.get("pooling_layers")
    return {"compression_schedule_length": len(layers)} if isinstance(layers, list) else {}


def _add_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    """Every error leaves in OpenAI's shape: ours, FastAPI's (query validation, 404, 405), Ray's (503), bugs (500)."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None  # drop "query" / "path"
        return invalid_request(
            f"invalid value for {param!r}: {first.get('msg')}", param=param, code="invalid_value"
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, code=str(exc.status_code)).response()

    @app.exception_handler(Unavailable)
    async def _unavailable(_: Request, exc: Unavailable) -> JSONResponse:
        return _unavailable_error(exc, retry_after_s).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return APIError(
            500,
            f"internal error ({type(exc).__name__}); the request was not completed",
            "server_error",
            code="internal_error",
        ).response()


def _unavailable_error(exc: Unavailable, retry_after_s: int) -> APIError:
    """The 503 + Retry-After of an `Unavailable` (code `overloaded` for a full queue, else `model_unavailable`)."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, Overloaded):
        return APIError(
            503,
            f"the server is overloaded ({exc}); retry after {retry_after_s} s",
            "server_overloaded",
            code="overloaded",
            headers=retry,
        )
    return APIError(
        503,
        f"the model is unavailable ({exc}); retry after {retry_after_s} s",
        "server_error",
        code="model_unavailable",
        headers=retry,
    )


def _error_status(exc: Exception) -> tuple[int, str]:
    """The HTTP status and error code the error handlers answer `exc` with (for the metrics)."""
    if isinstance(exc, APIError):
        return exc.status, exc.code or "error"
    if isinstance(exc, Unavailable):
        error = _unavailable_error(exc, 0)
        return error.status, error.code or "error"
    return 500, "internal_error"


class _ObservedBackend:
    """A `Backend` that shows every event of every `generate` call to one request's `RequestObservation`."""

    def __init__(self, backend: Backend, observation: RequestObservation):
        self.backend = backend
        self.observation = observation

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[Event]:
        async for event in self.backend.generate(request):
            self.observation.event(event)
            yield event

    async def info(self) -> dict[str, Any]:
        return await self.backend.info()

    async def batches(self, limit: int) -> list[dict[str, Any]]:
        return await self.backend.batches(limit)


def _check_auth(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="missing_api_key",
        )
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "incorrect API key provided", "authentication_error", code="invalid_api_key")


async def _model_info(backend: Backend, timeout_s: float) -> dict[str, Any]:
    """The backend's info, or `Unavailable` after `timeout_s` (a dead replica must not hang the health probe)."""
    try:
        return await asyncio.wait_for(backend.info(), timeout_s)
    except TimeoutError as exc:
        raise Unavailable(f"no answer from the model within {timeout_s} s") from exc


async def _chat_completion(
    req: ChatCompletionRequest, backend: _ObservedBackend, settings: Settings
) -> Response:
    """Run a validated request on the backend: a `chat.completion`, or a stream of chunks when `stream`."""
    if req.model is not None and req.model != settings.served_model_name:
        raise APIError(
            404,
            f"model {req.model!r} does not exist; this server serves {settings.served_model_name!r}",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )
    if "compression" not in req.model_fields_set:
        req.compression = settings.default_compression
    if req.stream_options is not None and not req.stream:
        raise invalid_request(
            "stream_options is only allowed when stream is true", param="stream_options", code="invalid_value"
        )
    if req.stream and (req.n or 1) > 1:
        raise invalid_request(
            f"n={req.n} is not supported with stream: true (streamed requests have one choice); "
            "send n without stream, or stream n separate requests",
            param="n",
            code="unsupported_parameter",
        )
    _check_logprobs(req)
    backend_request = await _backend_request(req, settings.limits)
    if req.stream:
        return await _streaming_response(req, backend_request, backend, settings)
    requests = _choice_requests(backend_request, req.n or 1)
    answers = await _answers(backend, requests, settings.retry_after_s)
    rid, name = backend_request["request_id"], settings.served_model_name
    text0, final0, fingerprint = answers[0]
    usage = final0.usage if len(answers) == 1 else _merged_usage([final.usage for _, final, _ in answers])
    choices = [(text, final.finish_reason, final.logprobs) for text, final, _ in answers]
    body_out = chat_completion(rid, name, choices, usage, fingerprint, final0.batch, int(time.time()))
    batch = final0.batch or {}
    headers = {"x-dpn-batch-id": str(batch.get("id", "")), "x-dpn-batch-rate": str(batch.get("rate", ""))}
    return JSONResponse(body_out, headers=headers)


def _check_logprobs(req: ChatCompletionRequest) -> None:
    """`top_logprobs` needs `logprobs: true`, and logprobs are served without `stream` only (400s naming them)."""
    if req.top_logprobs is not None and not req.logprobs:
        raise invalid_request("top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
    if req.logprobs and req.stream:
        raise invalid_request(
            "logprobs is not supported with stream: true on this server; send it without stream",
            param="logprobs",
            code="unsupported_parameter",
        )


async def _streaming_response(
    req: ChatCompletionRequest, backend_request: dict[str, Any], backend: _ObservedBackend, settings: Settings
) -> StreamingResponse:
    """The stream of chunks of a one-choice request (its first event awaited first, so a refusal is an error
    status, not an in-stream error)."""
    events = backend.generate(backend_request)
    first = await _first_event(events, settings.retry_after_s)
    fingerprint = first.fingerprint if isinstance(first, StartEvent) else None
    ids = _StreamIds(backend_request["request_id"], settings.served_model_name, int(time.time()), fingerprint)
    return StreamingResponse(
        _stream(events, ids, _include_usage(req), backend.observation),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: the request's plus the index, wrapped into int64 (so seeded choices differ when
    sampling, and a seeded request is reproducible choice by choice); None stays None."""
    if seed is None:
        return None
    return (seed + index + 2**63) % 2**64 - 2**63


def _choice_requests(request: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The backend requests of the `n` choices of one request: itself when `n` is 1, else copies with their own
    request id (`<id>-<index>`) and seed (`_choice_seed`); the decoded images are shared, not copied."""
    if n == 1:
        return [request]
    rid = request["request_id"]
    return [
        {**request, "request_id": f"{rid}-{i}", "seed": _choice_seed(request.get("seed"), i)}
        for i in range(n)
    ]


async def _answer(
    backend: Backend, request: dict[str, Any], retry_after_s: int
) -> tuple[str, FinalEvent, str | None]:
    """One backend request's text, `FinalEvent` and answering model version; an `ErrorEvent` raises."""
    events = backend.generate(request)
    first = await _first_event(events, retry_after_s)
    text, final = await _collect(events, retry_after_s)
    return text, final, _fingerprint(final, first.fingerprint if isinstance(first, StartEvent) else None)


async def _answers(
    backend: Backend, requests: list[dict[str, Any]], retry_after_s: int
) -> list[tuple[str, FinalEvent, str | None]]:
    """The answers of the choices' requests, run concurrently; the first failure cancels the others and is
    raised (a request with n choices succeeds or fails as a whole)."""
    if len(requests) == 1:
        return [await _answer(backend, requests[0], retry_after_s)]
    tasks = [asyncio.ensure_future(_answer(backend, request, retry_after_s)) for request in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _merged_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The `usage` of a request with several choices: the prompt counted once, every choice's completion tokens
    summed; DPN's prefill fields (visual tokens, compression, FLOPs) are the first choice's."""
    usage = dict(usages[0])
    completion = sum(int(u.get("completion_tokens", 0)) for u in usages)
    usage["completion_tokens"] = completion
    usage["total_tokens"] = int(usage.get("prompt_tokens", 0)) + completion
    return usage


async def _collect(events: AsyncIterator[Event], retry_after_s: int) -> tuple[str, FinalEvent]:
    """The whole text of a non-streaming request and its `FinalEvent`; an `ErrorEvent` is raised as an `APIError`."""
    text, final = [], None
    async for event in events:
        match event:
            case ErrorEvent():
                raise _event_error(event, retry_after_s)
            case DeltaEvent(text=delta):
                text.append(delta)
            case FinalEvent(text=delta):
                text.append(delta)
                final = event
    if final is None:
        raise APIError(500, "generation ended without a result", "server_error", code="no_result")
    return "".join(text), final


def _fingerprint(final: FinalEvent, start_fingerprint: str | None) -> str | None:
    """The model version that answered: the final event's (set by the replica's scheduler), else the start's."""
    return final.fingerprint if final.fingerprint is not None else start_fingerprint


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, with the chat request body the route parses by hand (so that body limits, JSON errors
    and validation stay ours) documented from `ChatCompletionRequest`, for clients and schema-driven fuzzers."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        body = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["ChatCompletionRequest"] = body
        app.openapi_schema = schema
    return app.openapi_schema


async def _read_body(request: Request, limits: Limits) -> bytes:
    """The request body, refused with 413 past `max_body_bytes`: by its Content-Length, and while it streams in."""
    declared = request.headers.get("content-length", "")
    if (
        declared.isascii() and declared.isdigit()
    ):  # 19+ digits is past any limit (and int() caps long strings)
        check_body_size(int(declared) if len(declared) < 19 else limits.max_body_bytes + 1, limits)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limits)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_request(body: bytes) -> ChatCompletionRequest:
    """The validated request, or a 400 in OpenAI's shape naming the field at fault."""
    payload = parse_json_object(body)
    check_unsupported(payload)
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise validation_error_to_api_error(exc) from exc


async def _backend_request(req: ChatCompletionRequest, limits: Limits) -> dict[str, Any]:
    """Validate images and limits; return what the model deployment needs (plain data, images decoded to
    `(H, W, 3)` uint8 RGB arrays, so the replica never decodes a file)."""
    messages, images = [], []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        parts = []
        for j, part in enumerate(message.content):
            if part.type == "text":
                parts.append({"type": "text", "text": part.text})
                continue
            param = f"messages.{i}.content.{j}.image_url"
            if message.role != "user":
                raise invalid_request(
                    f"images are only accepted in user messages, message {i} is {message.role!r}",
                    param=param,
                    code="invalid_image_position",
                )
            if len(images) >= limits.max_images_per_request:
                raise invalid_request(
                    f"too many images: this server accepts at most {limits.max_images_per_request} per request",
                    param=param,
                    code="too_many_images",
                )
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(await load_image_url(url, limits, param + ".url"))
            parts.append({"type": "image_url"})
        messages.append({"role": message.role, "content": parts})
    if messages[-1]["role"] != "user":
        raise invalid_request(
            "the last message must be from the user", param="messages", code="invalid_messages"
        )
    return {
        "request_id": completion_id(),
        "messages": messages,
        "images": images,
        "max_tokens": request_max_tokens(req.max_tokens, req.max_completion_tokens, limits),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": req.stop_list(),
        "compression": req.compression,
        "ignore_eos": req.ignore_eos,
        "logprobs": bool(req.logprobs),
        "top_logprobs": req.top_logprobs or 0,
    }


def _event_error(event: ErrorEvent, retry_after_s: int) -> APIError:
    """The `APIError` of a backend `ErrorEvent` (400 for prompt problems, 503 + Retry-After when unavailable)."""
    status = int(event.status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": str(retry_after_s)} if status == 503 else None
    return APIError(status, event.message, kind, param=event.param, code=event.code, headers=headers)


async def _first_event(events: AsyncIterator[Event], retry_after_s: int) -> Event:
    """The backend's first event: a `StartEvent`, or the `ErrorEvent` it reports (raised as an `APIError`)."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration as exc:
        raise APIError(500, "the model backend returned nothing", "server_error", code="no_result") from exc
    if isinstance(first, ErrorEvent):
        raise _event_error(first, retry_after_s)
    return first


def _stream_error(message: str, code: str | None) -> bytes:
    """An error reported inside a stream (its status line is already sent), in OpenAI's shape."""
    return _sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})


@dataclass(frozen=True)
class _StreamIds:
    """What every chunk of one stream repeats."""

    rid: str
    model: str
    created: int
    fingerprint: str | None


def _include_usage(req: ChatCompletionRequest) -> bool:
    return req.stream_options is not None and req.stream_options.include_usage


def _event_chunks(event: DeltaEvent | FinalEvent, ids: _StreamIds, include_usage: bool) -> list[bytes]:
    """The server-sent events of one backend event: its text (a `FinalEvent`'s when not empty), and for a
    `FinalEvent` the closing chunk, then with `include_usage` the usage chunk (`choices: []`, OpenAI's shape;
    without it the closing chunk carries `usage`, as before)."""
    rid, model, created = ids.rid, ids.model, ids.created
    chunks = []
    if isinstance(event, DeltaEvent) or event.text:
        chunks.append(
            _sse(chat_chunk(rid, model, created, {"content": event.text}, fingerprint=ids.fingerprint))
        )
    if isinstance(event, FinalEvent):
        fingerprint = _fingerprint(event, ids.fingerprint)
        closing = chat_chunk(
            rid,
            model,
            created,
            {},
            finish_reason=event.finish_reason,
            usage=None if include_usage else event.usage,
            fingerprint=fingerprint,
            batch=event.batch,
        )
        chunks.append(_sse(closing))
        if include_usage:
            chunks.append(_sse(usage_chunk(rid, model, created, event.usage, fingerprint)))
    return chunks


async def _stream(
    events: AsyncIterator[Event], ids: _StreamIds, include_usage: bool, observation: RequestObservation
) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's `chat.completion.chunk` format, ending with `data: [DONE]`; the request's
    end is recorded in `observation` (status 200: the status line is sent; outcome the finish reason, the
    in-stream error's code, or `abort` when the client goes away first)."""
    try:
        yield _sse(
            chat_chunk(
                ids.rid,
                ids.model,
                ids.created,
                {"role": "assistant", "content": ""},
                fingerprint=ids.fingerprint,
            )
        )
        async for chunk in _stream_events(events, ids, include_usage, observation):
            yield chunk
        yield _sse("[DONE]")
    finally:
        observation.finish(200, "abort")  # a no-op when the stream ended (or failed) first


async def _stream_events(
    events: AsyncIterator[Event], ids: _StreamIds, include_usage: bool, observation: RequestObservation
) -> AsyncIterator[bytes]:
    """The chunks of the backend's events, or the in-stream error that ends them."""
    try:
        async for event in events:
            if isinstance(event, ErrorEvent):
                observation.finish(200, event.code)
                yield _stream_error(event.message, event.code)
                return
            if isinstance(event, DeltaEvent | FinalEvent):
                for chunk in _event_chunks(event, ids, include_usage):
                    yield chunk
    except (
        Unavailable
    ) as exc:  # the replica died mid-stream: the status line is already sent; report in-stream
        observation.finish(200, "model_unavailable")
        yield _stream_error(f"the model is unavailable ({exc}); retry", "model_unavailable")
        return
    except Exception as exc:  # noqa: BLE001 - the status line is already sent; report in-stream
        logger.exception("stream %s failed", ids.rid)
        observation.finish(200, "generation_failed")
        yield _stream_error(f"generation failed: {exc}", "generation_failed")
        return
    observation.finish(200)


__all__ = ["Backend", "Overloaded", "Settings", "Unavailable", "create_api"]
