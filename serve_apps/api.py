"""The OpenAI-compatible HTTP API as a FastAPI app, independent of Ray.

`create_api(backend, settings)` builds the routes over any `Backend` (something that streams generation events
for a request); the Serve ingress passes one that calls the model deployment's handle, tests can pass a fake one.
Everything the client sends is validated here (auth, JSON, schema, images, limits) so a bad request never
reaches a batch, and every error leaves in OpenAI's shape.

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`, `GET /v1/dpn/batches` (recent batches with
the rate each ran at and the rates its requests asked for).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_apps.limits import Limits, check_max_tokens, load_image_url
from serve_apps.protocol import (
    APIError,
    ChatCompletionRequest,
    chat_chunk,
    chat_completion,
    completion_id,
    invalid_request,
    validation_error_to_api_error,
)

logger = logging.getLogger(__name__)


class Backend(Protocol):
    """What the API needs from the model side."""

    def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Events for one request: `start`, `delta`s, `final`; or a single `error`."""

    async def info(self) -> dict[str, Any]:
        """Model ref, version, compression factors, batching settings."""

    async def batches(self, limit: int) -> list[dict[str, Any]]:
        """Recent batch records."""


class Overloaded(Exception):
    """The backend refused the request because its queues are full (the API answers 503 + Retry-After)."""


@dataclass
class Settings:
    """Ingress settings (from the app config).

    Attributes:
        served_model_name: The model id clients pass as `model` and `GET /v1/models` lists.
        limits: Request limits.
        api_key_env: Environment variable holding the API key; when it is set and non-empty, every route but
            `/health` needs `Authorization: Bearer <key>`.
        retry_after_s: `Retry-After` seconds on 503 responses when the server is overloaded.
        default_compression: Compression of requests that do not set `compression` (`auto`, 1, 2 or 4).
    """

    served_model_name: str = "dpn"
    limits: Limits = field(default_factory=Limits)
    api_key_env: str = "DPN_API_KEY"
    retry_after_s: int = 1
    default_compression: str | int = "auto"

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def create_api(backend: Backend, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving the OpenAI-compatible API over `backend`."""
    settings = settings or Settings()
    limits = settings.limits
    api_key = settings.api_key()
    app = FastAPI(title="DPN OpenAI-compatible API", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(f"invalid request: {exc.errors()[0].get('msg')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind, code=str(exc.status_code)).response()

    @app.exception_handler(Overloaded)
    async def _overloaded(_: Request, exc: Overloaded) -> JSONResponse:
        return overloaded(str(exc)).response()

    def overloaded(detail: str) -> APIError:
        return APIError(
            503, f"the server is overloaded ({detail}); retry after {settings.retry_after_s} s",
            "server_overloaded", code="overloaded", headers={"Retry-After": str(settings.retry_after_s)},
        )

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", "authentication_error", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            info = await backend.info()
        except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
            return APIError(503, f"model backend unavailable: {exc}", "server_error", code="unhealthy").response()
        return JSONResponse({"status": "ok", "model": info.get("model"), "version": info.get("version")})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        info = await backend.info()
        return JSONResponse({"object": "list", "data": [{
            "id": settings.served_model_name, "object": "model", "created": 0, "owned_by": "dpn",
            "root": info.get("model"), "version": info.get("version"),
            "compression": ["auto", *info.get("compression_factors", [])],
        }]})

    @app.get("/v1/dpn/batches")
    async def batches(request: Request, limit: int = 0) -> JSONResponse:
        check_auth(request)
        return JSONResponse({"object": "list", "data": await backend.batches(limit)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_auth(request)
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid_request(f"request body is not valid JSON ({exc})", code="invalid_json") from exc
        if not isinstance(payload, dict):
            raise invalid_request("request body must be a JSON object", code="invalid_json")
        try:
            req = ChatCompletionRequest.model_validate(payload)
        except ValidationError as exc:
            raise validation_error_to_api_error(exc) from exc
        if req.model is not None and req.model != settings.served_model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {settings.served_model_name!r}",
                           "invalid_request_error", param="model", code="model_not_found")
        if "compression" not in req.model_fields_set:
            req.compression = settings.default_compression
        backend_request = await _backend_request(req, limits)
        events = backend.generate(backend_request)
        first = await _first_event(events, overloaded)
        name = settings.served_model_name
        rid, created = backend_request["request_id"], int(time.time())
        fingerprint = first.get("fingerprint")
        if req.stream:
            return StreamingResponse(_stream(events, rid, name, created, fingerprint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, final = [], None
        async for event in events:
            if event["type"] == "error":
                raise APIError(event.get("status", 500), event["message"], "server_error", code=event.get("code"))
            text.append(event.get("text", ""))
            if event["type"] == "final":
                final = event
        if final is None:
            raise APIError(500, "generation ended without a result", "server_error", code="no_result")
        body_out = chat_completion(rid, name, "".join(text), final["finish_reason"], final["usage"],
                                   final.get("fingerprint", fingerprint), final.get("batch"), created)
        batch = final.get("batch") or {}
        headers = {"x-dpn-batch-id": str(batch.get("id", "")), "x-dpn-batch-rate": str(batch.get("rate", ""))}
        return JSONResponse(body_out, headers=headers)

    return app


async def _backend_request(req: ChatCompletionRequest, limits: Limits) -> dict[str, Any]:
    """Validate images and limits; return what the model deployment needs (plain data, images as bytes)."""
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
                raise invalid_request(f"images are only accepted in user messages, message {i} is {message.role!r}",
                                      param=param, code="invalid_image_position")
            if len(images) >= limits.max_images_per_request:
                raise invalid_request(
                    f"too many images: this server accepts at most {limits.max_images_per_request} per request",
                    param=param, code="too_many_images",
                )
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(await load_image_url(url, limits, param + ".url"))
            parts.append({"type": "image_url"})
        messages.append({"role": message.role, "content": parts})
    if messages[-1]["role"] != "user":
        raise invalid_request("the last message must be from the user", param="messages", code="invalid_messages")
    return {
        "request_id": completion_id(),
        "messages": messages,
        "images": images,
        "max_tokens": check_max_tokens(req.max_completion_tokens or req.max_tokens, limits),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": req.stop_list(),
        "compression": req.compression_value(),
        "ignore_eos": req.ignore_eos,
    }


async def _first_event(events: AsyncIterator[dict[str, Any]], overloaded) -> dict[str, Any]:
    """The backend's first event: `start`, or the error it reports (400 for prompt problems, 503 when full)."""
    try:
        first = await events.__anext__()
    except Overloaded as exc:
        raise overloaded(str(exc)) from exc
    except StopAsyncIteration as exc:
        raise APIError(500, "the model backend returned nothing", "server_error", code="no_result") from exc
    if first["type"] == "error":
        status = first.get("status", 500)
        kind = "invalid_request_error" if status < 500 else "server_error"
        raise APIError(status, first["message"], kind, param=first.get("param"), code=first.get("code"))
    return first


async def _stream(events: AsyncIterator[dict[str, Any]], rid: str, model: str, created: int,
                  fingerprint: str | None) -> AsyncIterator[bytes]:
    """Server-sent events in OpenAI's `chat.completion.chunk` format, ending with `data: [DONE]`."""
    yield _sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, fingerprint=fingerprint))
    try:
        async for event in events:
            if event["type"] == "error":
                yield _sse({"error": {"message": event["message"], "type": "server_error", "param": None,
                                      "code": event.get("code")}})
                break
            if event["type"] == "delta":
                yield _sse(chat_chunk(rid, model, created, {"content": event["text"]}, fingerprint=fingerprint))
            elif event["type"] == "final":
                if event.get("text"):
                    yield _sse(chat_chunk(rid, model, created, {"content": event["text"]}, fingerprint=fingerprint))
                yield _sse(chat_chunk(rid, model, created, {}, finish_reason=event["finish_reason"],
                                      usage=event["usage"], fingerprint=event.get("fingerprint", fingerprint),
                                      batch=event.get("batch")))
    except Exception as exc:  # noqa: BLE001 - the status line is already sent; report in-stream
        logger.exception("stream %s failed", rid)
        yield _sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                              "code": "generation_failed"}})
    yield _sse("[DONE]")


__all__ = ["Backend", "Overloaded", "Settings", "create_api"]
