"""The OpenAI-compatible HTTP API as a FastAPI app, independent of Ray.

`create_api(backend, settings)` builds the routes over any `Backend` (something that streams generation events
for a request); the Serve ingress passes one that calls the model deployment's handle, tests can pass a fake one.
Everything the client sends is validated here (Host, auth, content type, body size, JSON, schema, prompt bytes,
token budget, images, limits) so a bad request never reaches a batch, and every error leaves in OpenAI's shape:
400/401/404/413/415 for the client's mistakes, 503 with `Retry-After` when the model side is full or unreachable
(a replica died, a health probe timed out), and a JSON 500 for anything unexpected (a bug, logged with its
traceback).

Secure by default: the app refuses to be built without an API key (in the environment variable `api_key_env`)
unless the settings say `auth="none"` explicitly, which it logs as a warning and `/health` reports. What leaves
the server says what a client needs and nothing of its insides: every response carries an `x-request-id` (the
client's own, when it is short and safe, else a new one), errors a stable `code`, and 5xx messages never the text
of an exception, a path, a host or the model's reference; those go to the server log under the request id.

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
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_apps.events import DeltaEvent, ErrorEvent, Event, FinalEvent, StartEvent
from serve_apps.limits import (
    Limits,
    check_body_size,
    check_prompt_bytes,
    check_request_tokens,
    load_image_url,
    prompt_token_bound,
    request_max_tokens,
)
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


class AuthNotConfigured(RuntimeError):
    """No API key is configured and the settings do not say `auth: none`: the ingress refuses to start."""


AUTH_MODES = ("api_key", "none")


def check_host_patterns(patterns: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`allowed_hosts` normalized (lower case, IPv6 without brackets), or a ValueError naming a bad pattern:
    a host name or address, `*.example.com` (any subdomain), or `*` (any host)."""
    out = []
    for pattern in patterns:
        host = str(pattern).strip().lower()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or ("*" in host and host != "*" and not (host.startswith("*.") and "*" not in host[1:])):
            raise ValueError(
                f"allowed_hosts: {pattern!r} is not a host pattern: give names or addresses ('api.example.com', "
                "'10.0.0.5'), '*.example.com' for any subdomain, or '*' for any host"
            )
        out.append(host)
    return tuple(out)


@dataclass
class Settings:
    """Ingress settings (from the app config).

    Attributes:
        served_model_name: The model id clients pass as `model` and `GET /v1/models` and `/health` show (never
            the checkpoint's path or MLflow reference).
        limits: Request limits.
        api_key_env: Environment variable holding the API key: every route but `/health` needs
            `Authorization: Bearer <key>` (surrounding whitespace, e.g. a secret file's newline, is dropped).
            Unset or empty, `create_api` refuses to build the app (`AuthNotConfigured`) unless `auth` is
            `"none"`.
        auth: `"api_key"` (default): the key above is required. `"none"`: serve without authentication, for a
            trusted network only; logged as a warning when the app is built, and `/health` says `"auth": "none"`.
        allowed_hosts: Host names (or `*.example.com`, or `*`) the server answers to; a request with another
            `Host` header is a 400 `invalid_host` (as Starlette's TrustedHostMiddleware, in OpenAI's shape), a
            guard against DNS rebinding from browsers. Empty (default): any host.
        retry_after_s: `Retry-After` seconds on 503 responses (overloaded or model unavailable).
        default_compression: Compression of requests that do not set `compression`: `"auto"`, a factor or a
            schedule (a list of factors), already checked for form (serve_apps.compression.check_form).
        health_timeout_s: Longest wait for the model's info on `/health` and `/v1/models`; beyond it they
            answer 503 (a dead replica must not make the probe hang until the replacement is up).
        send_request_id: Send the `x-request-id` response header. The Serve ingress turns it off: Ray Serve's
            proxy sends the header itself, with the same id (the client's `x-request-id`, or one it made).
    """

    served_model_name: str = "dpn"
    limits: Limits = field(default_factory=Limits)
    api_key_env: str = "DPN_API_KEY"
    auth: str = "api_key"
    allowed_hosts: tuple[str, ...] = ()
    retry_after_s: int = 1
    default_compression: str | int | list[int] = "auto"
    health_timeout_s: float = 2.0
    send_request_id: bool = True

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"auth must be 'api_key' or 'none', got {self.auth!r}")
        self.allowed_hosts = check_host_patterns(self.allowed_hosts)

    def api_key(self) -> str | None:
        """The key clients must send, or None with `auth="none"`.

        Raises:
            AuthNotConfigured: `auth` is `"api_key"` and `api_key_env` names no variable holding a key.
        """
        if self.auth == "none":
            return None
        key = (os.environ.get(self.api_key_env) or "").strip() if self.api_key_env else ""
        if key:
            return key
        where = (
            f"the environment variable {self.api_key_env} is unset or empty"
            if self.api_key_env
            else "api_key_env is empty"
        )
        raise AuthNotConfigured(
            f"no API key configured: {where}. Set {self.api_key_env or 'DPN_API_KEY'} (named by api_key_env) to "
            "the key clients must send as 'Authorization: Bearer <key>' in the environment of the ingress "
            "replicas, or set 'auth: none' in the app's args to serve without authentication (a trusted "
            "network only)"
        )


_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_REQUEST_ID_KEY = "dpn.request_id"


def request_id_of(request: Request) -> str:
    """The request id `_Guard` gave the request (sent back as `x-request-id`, logged with every error)."""
    return request.scope.get(_REQUEST_ID_KEY) or "-"


def _request_id(headers: Headers) -> str:
    """The client's `x-request-id` when it is short and safe to log and echo (letters, digits, `._:-`, at most
    64), else a new one."""
    given = headers.get("x-request-id", "")
    return given if _SAFE_REQUEST_ID.fullmatch(given) else f"req_{uuid.uuid4().hex}"


def _host_of(header: str | None) -> str | None:
    """The host of a `Host` header, lower case, without port or IPv6 brackets; None when missing or malformed."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        port_ok = rest == "" or (rest.startswith(":") and rest[1:].isdigit())
        return host if bracket and host and port_ok else None
    host, _, port = value.partition(":")
    return host if host and (not port or port.isdigit()) else None


def _host_allowed(host: str | None, patterns: tuple[str, ...]) -> bool:
    if not patterns or "*" in patterns:
        return True
    if host is None:
        return False
    return any(host == p or (p.startswith("*.") and host.endswith(p[1:])) for p in patterns)


def _internal_error(request_id: str) -> APIError:
    return APIError(
        500,
        f"internal error; the request was not completed (request id {request_id})",
        "server_error",
        code="internal_error",
    )


class _Guard:
    """ASGI middleware in front of every route: gives each request its id (`x-request-id` on every response,
    errors included), refuses a `Host` outside `allowed_hosts`, and answers an exception no handler took with a
    JSON 500 that names only the request id (the traceback goes to the log under it)."""

    def __init__(self, app: ASGIApp, allowed_hosts: tuple[str, ...] = (), send_request_id: bool = True):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.send_request_id = send_request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = scope[_REQUEST_ID_KEY] = _request_id(headers)
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            if message["type"] == "http.response.start" and self.send_request_id:
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                }
            await send(message)

        if not _host_allowed(_host_of(headers.get("host")), self.allowed_hosts):
            error = APIError(
                400,
                "the request's Host header is not a name this server answers to (allowed_hosts); "
                "address the server by its configured name",
                "invalid_request_error",
                code="invalid_host",
            )
            await error.response()(scope, receive, send_with_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:
            logger.error(
                "request %s: unexpected error on %s %s",
                request_id,
                scope.get("method"),
                scope.get("path"),
                exc_info=exc,
            )
            if started:  # the status line is out: the server can only close the connection
                raise
            await _internal_error(request_id).response()(scope, receive, send_with_id)


def _check_json_content_type(request: Request) -> None:
    """A 415 unless the body is declared `application/json` (charset, if any, UTF-8): a `text/plain` or form
    POST is what a web page can send cross-site without a CORS preflight."""
    declared = request.headers.get("content-type")
    media, *params = (declared or "").split(";")
    charsets = [
        value.strip().strip('"').lower()
        for name, _, value in (param.partition("=") for param in params)
        if name.strip().lower() == "charset"
    ]
    if media.strip().lower() == "application/json" and all(c in ("utf-8", "utf8") for c in charsets):
        return
    shown = "none" if declared is None else repr(declared[:60])
    raise APIError(
        415,
        f"unsupported Content-Type ({shown}): send the body as JSON with 'Content-Type: application/json'",
        "invalid_request_error",
        code="unsupported_media_type",
    )


class _ModelFacts:
    """What the ingress knows of the served model for its token budget: the visual tokens per image, from the
    backend's info (`num_visual_tokens`), refreshed at most every `ttl_s` (and whenever `/health` or `/v1/models`
    read it); None while unknown (the backend has not answered yet)."""

    def __init__(self, backend: Backend, timeout_s: float, ttl_s: float = 30.0):
        self.backend, self.timeout_s, self.ttl_s = backend, timeout_s, ttl_s
        self._value: int | None = None
        self._fetched = float("-inf")

    def update(self, info: dict[str, Any]) -> None:
        value = info.get("num_visual_tokens")
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            self._value = value
        self._fetched = time.monotonic()

    async def visual_tokens(self) -> int | None:
        if time.monotonic() - self._fetched >= self.ttl_s:
            self._fetched = time.monotonic()  # one refresh at a time; the others use what is known
            try:
                self.update(await _model_info(self.backend, self.timeout_s))
            except Exception as exc:  # noqa: BLE001 - unknown for now: the replica still checks the prompt
                logger.debug("model info for the token budget unavailable: %r", exc)
        return self._value


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def _api_key_at_start(settings: Settings) -> str | None:
    """The API key (`AuthNotConfigured` without one, unless `auth: none`, which is logged as a warning)."""
    api_key = settings.api_key()
    if api_key is None:
        logger.warning(
            "auth: none: the API is served WITHOUT authentication; anyone who can reach it can use the model. "
            "Set %s and remove 'auth: none' unless this network is trusted",
            settings.api_key_env or "DPN_API_KEY",
        )
    return api_key


def create_api(
    backend: Backend, settings: Settings | None = None, metrics: MetricsSink | None = None
) -> FastAPI:
    """The FastAPI app serving the OpenAI-compatible API over `backend`; each chat request is recorded in
    `metrics` when it ends (None: not recorded)."""
    settings = settings or Settings()
    api_key = _api_key_at_start(settings)
    facts = _ModelFacts(backend, settings.health_timeout_s)
    app = FastAPI(title="DPN OpenAI-compatible API", docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app)
    app.add_middleware(_Guard, allowed_hosts=settings.allowed_hosts, send_request_id=settings.send_request_id)
    _add_error_handlers(app, settings.retry_after_s)

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        return await _health(backend, settings, facts, request_id_of(request))

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _check_auth(request, api_key)
        info = await _model_info(backend, settings.health_timeout_s)
        facts.update(info)
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
            _check_json_content_type(request)
            req = _parse_request(await _read_body(request, settings.limits))
            observed = _ObservedBackend(backend, observation)
            response = await _chat_completion(req, observed, settings, facts, request_id_of(request))
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


async def _health(backend: Backend, settings: Settings, facts: _ModelFacts, request_id: str) -> JSONResponse:
    """`GET /health` (no key needed: load balancers probe it): the status, the served model's name and version
    and the auth mode, or a 503 + Retry-After when the backend does not answer. Never the backend's exception,
    the model's path or reference: the failure is logged under the request id."""
    try:
        info = await _model_info(backend, settings.health_timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure means unhealthy
        logger.warning("request %s: /health: the model backend did not answer: %r", request_id, exc)
        return APIError(
            503,
            f"the model backend is unavailable; retry after {settings.retry_after_s} s (request id {request_id})",
            "server_error",
            code="unhealthy",
            headers={"Retry-After": str(settings.retry_after_s)},
        ).response()
    facts.update(info)
    return JSONResponse(
        {
            "status": "ok",
            "model": settings.served_model_name,
            "version": info.get("version"),
            "auth": settings.auth,
        }
    )


def _model_list(info: dict[str, Any], served_model_name: str) -> dict[str, Any]:
    """The body of `GET /v1/models`: the one served model, with its version and the compressions it serves
    (`root` is the served name: the checkpoint's path or MLflow reference stays on the server)."""
    return {
        "object": "list",
        "data": [
            {
                "id": served_model_name,
                "object": "model",
                "created": 0,
                "owned_by": "dpn",
                "root": served_model_name,
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
    """Every error leaves in OpenAI's shape: ours, FastAPI's (query validation, 404, 405), Ray's (503); bugs (500)
    are `_Guard`'s."""

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
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        logger.warning("request %s: %r", request_id_of(request), exc)
        return _unavailable_error(exc, retry_after_s).response()


def _unavailable_error(exc: Unavailable, retry_after_s: int) -> APIError:
    """The 503 + Retry-After of an `Unavailable` (code `overloaded` for a full queue, else `model_unavailable`);
    its text (queue sizes, replica errors) is for the log, not the client."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, Overloaded):
        return APIError(
            503,
            f"the server is overloaded; retry after {retry_after_s} s",
            "server_overloaded",
            code="overloaded",
            headers=retry,
        )
    return APIError(
        503,
        f"the model is unavailable; retry after {retry_after_s} s",
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
        events = self.backend.generate(request)
        try:
            async for event in events:
                self.observation.event(event)
                yield event
        finally:
            await _aclose(events)

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


async def _aclose(events: AsyncIterator[Event]) -> None:
    """Close `events` now when it is an async generator: one left early would otherwise close only when collected,
    and the backend's cleanup (e.g. cancelling the request on the replica) must run at once."""
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _model_info(backend: Backend, timeout_s: float) -> dict[str, Any]:
    """The backend's info, or `Unavailable` after `timeout_s` (a dead replica must not hang the health probe)."""
    try:
        return await asyncio.wait_for(backend.info(), timeout_s)
    except TimeoutError as exc:
        raise Unavailable(f"no answer from the model within {timeout_s} s") from exc


@dataclass(frozen=True)
class _Call:
    """What answering one request needs besides the backend: its request id (named in 5xx messages, the key of
    the server log's details) and the `Retry-After` of its 503s."""

    request_id: str
    retry_after_s: int


async def _chat_completion(
    req: ChatCompletionRequest,
    backend: _ObservedBackend,
    settings: Settings,
    facts: _ModelFacts,
    request_id: str,
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
    limits = settings.limits
    max_tokens = request_max_tokens(req.max_tokens, req.max_completion_tokens, limits)
    await _check_budgets(req, max_tokens, limits, facts)
    backend_request = await _backend_request(req, limits, max_tokens)
    call = _Call(request_id, settings.retry_after_s)
    if req.stream:
        return await _streaming_response(req, backend_request, backend, settings, call)
    requests = _choice_requests(backend_request, req.n or 1)
    answers = await _answers(backend, requests, call)
    rid, name = backend_request["request_id"], settings.served_model_name
    text0, final0, fingerprint = answers[0]
    usage = final0.usage if len(answers) == 1 else _merged_usage([final.usage for _, final, _ in answers])
    choices = [(text, final.finish_reason, final.logprobs) for text, final, _ in answers]
    body_out = chat_completion(rid, name, choices, usage, fingerprint, final0.batch, int(time.time()))
    batch = final0.batch or {}
    headers = {"x-dpn-batch-id": str(batch.get("id", "")), "x-dpn-batch-rate": str(batch.get("rate", ""))}
    return JSONResponse(body_out, headers=headers)


async def _check_budgets(
    req: ChatCompletionRequest, max_tokens: int, limits: Limits, facts: _ModelFacts
) -> None:
    """The budgets at the door, before anything is decoded or forwarded: the messages' text bytes
    (`limits.max_prompt_bytes`) and `n x (prompt + max_tokens)` (`limits.max_request_tokens`), the prompt
    bounded by its bytes and the model's visual tokens per image (`limits.prompt_token_bound`)."""
    text_bytes, images = 0, 0
    for message in req.messages:
        parts = [message.content] if isinstance(message.content, str) else message.content
        for part in parts:
            if isinstance(part, str):
                text_bytes += len(part.encode())
            elif part.type == "text":
                text_bytes += len(part.text.encode())
            else:
                images += 1
    check_prompt_bytes(text_bytes, limits)
    n = req.n or 1
    if n == 1:  # max_request_tokens >= max_prompt_tokens + max_tokens: one choice always fits
        return
    visual_tokens = await facts.visual_tokens() if images else None
    prompt = prompt_token_bound(text_bytes, len(req.messages), images, visual_tokens, limits)
    check_request_tokens(n, prompt, max_tokens, limits)


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
    req: ChatCompletionRequest,
    backend_request: dict[str, Any],
    backend: _ObservedBackend,
    settings: Settings,
    call: _Call,
) -> StreamingResponse:
    """The stream of chunks of a one-choice request (its first event awaited first, so a refusal is an error
    status, not an in-stream error)."""
    events = backend.generate(backend_request)
    try:
        first = await _first_event(events, call)
    except BaseException:
        await _aclose(events)
        raise
    fingerprint = first.fingerprint if isinstance(first, StartEvent) else None
    ids = _StreamIds(
        backend_request["request_id"],
        settings.served_model_name,
        int(time.time()),
        fingerprint,
        call.request_id,
    )
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
    backend: Backend, request: dict[str, Any], call: _Call
) -> tuple[str, FinalEvent, str | None]:
    """One backend request's text, `FinalEvent` and answering model version; an `ErrorEvent` raises."""
    events = backend.generate(request)
    try:
        first = await _first_event(events, call)
        text, final = await _collect(events, call)
    finally:
        await _aclose(events)
    return text, final, _fingerprint(final, first.fingerprint if isinstance(first, StartEvent) else None)


async def _answers(
    backend: Backend, requests: list[dict[str, Any]], call: _Call
) -> list[tuple[str, FinalEvent, str | None]]:
    """The answers of the choices' requests, run concurrently; the first failure cancels the others and is
    raised (a request with n choices succeeds or fails as a whole). The others are awaited until their
    cancellation is done, so the backend has stopped them (on Ray: the replica's generation, see
    serve_apps.app.HandleBackend) before the error is answered."""
    if len(requests) == 1:
        return [await _answer(backend, requests[0], call)]
    tasks = [asyncio.ensure_future(_answer(backend, request, call)) for request in requests]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _merged_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    """The `usage` of a request with several choices: the prompt counted once, every choice's completion tokens
    summed; DPN's prefill fields (visual tokens, compression, FLOPs) are the first choice's."""
    usage = dict(usages[0])
    completion = sum(int(u.get("completion_tokens", 0)) for u in usages)
    usage["completion_tokens"] = completion
    usage["total_tokens"] = int(usage.get("prompt_tokens", 0)) + completion
    return usage


async def _collect(events: AsyncIterator[Event], call: _Call) -> tuple[str, FinalEvent]:
    """The whole text of a non-streaming request and its `FinalEvent`; an `ErrorEvent` is raised as an `APIError`."""
    text, final = [], None
    async for event in events:
        match event:
            case ErrorEvent():
                raise _event_error(event, call)
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


async def _backend_request(req: ChatCompletionRequest, limits: Limits, max_tokens: int) -> dict[str, Any]:
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
        "max_tokens": max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stop": req.stop_list(),
        "compression": req.compression,
        "ignore_eos": req.ignore_eos,
        "logprobs": bool(req.logprobs),
        "top_logprobs": req.top_logprobs or 0,
    }


def _client_message(event: ErrorEvent, request_id: str) -> str:
    """What the client reads of a backend `ErrorEvent`: its message for the client's own mistakes (4xx, naming
    the field and the limit) and for 503s (retry), else a generic one naming the request id, under which the
    server log keeps the backend's message (a fault's text may hold paths, hosts or exception details)."""
    if event.status < 500 or event.status == 503:
        return event.message
    logger.error("request %s: the model failed (%s): %s", request_id, event.code, event.message)
    return f"generation failed on the server; the request was not completed (request id {request_id})"


def _event_error(event: ErrorEvent, call: _Call) -> APIError:
    """The `APIError` of a backend `ErrorEvent` (400 for prompt problems, 503 + Retry-After when unavailable)."""
    status = int(event.status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": str(call.retry_after_s)} if status == 503 else None
    message = _client_message(event, call.request_id)
    return APIError(status, message, kind, param=event.param, code=event.code, headers=headers)


async def _first_event(events: AsyncIterator[Event], call: _Call) -> Event:
    """The backend's first event: a `StartEvent`, or the `ErrorEvent` it reports (raised as an `APIError`)."""
    try:
        first = await events.__anext__()
    except StopAsyncIteration as exc:
        raise APIError(500, "the model backend returned nothing", "server_error", code="no_result") from exc
    if isinstance(first, ErrorEvent):
        raise _event_error(first, call)
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
    request_id: str = "-"


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
    """The chunks of the backend's events, or the in-stream error that ends them (which names only the request
    id: the failure is in the server log under it)."""
    try:
        async for event in events:
            if isinstance(event, ErrorEvent):
                observation.finish(200, event.code)
                yield _stream_error(_client_message(event, ids.request_id), event.code)
                return
            if isinstance(event, DeltaEvent | FinalEvent):
                for chunk in _event_chunks(event, ids, include_usage):
                    yield chunk
    except Unavailable as exc:  # the replica died mid-stream: the status line is sent; report in-stream
        logger.warning("request %s: stream %s: %r", ids.request_id, ids.rid, exc)
        observation.finish(200, "model_unavailable")
        yield _stream_error("the model is unavailable; retry", "model_unavailable")
        return
    except Exception:  # noqa: BLE001 - the status line is already sent; report in-stream
        logger.exception("request %s: stream %s failed", ids.request_id, ids.rid)
        observation.finish(200, "generation_failed")
        message = f"generation failed on the server; the answer is incomplete (request id {ids.request_id})"
        yield _stream_error(message, "generation_failed")
        return
    finally:
        await _aclose(events)
    observation.finish(200)


__all__ = [
    "AUTH_MODES",
    "AuthNotConfigured",
    "Backend",
    "Overloaded",
    "Settings",
    "Unavailable",
    "check_host_patterns",
    "create_api",
    "request_id_of",
]
