"""The serving ingress under a threat model: auth on by default, JSON only, allowed hosts, no leaks, budgets at the
door, cancellation of abandoned choices on the replica, and remote images from public addresses only.

No Ray cluster: the real FastAPI app from `serve_apps.api.create_api` runs in-process over fake backends (and over
`serve_apps.app.HandleBackend` with a fake deployment handle); remote images are fetched from HTTP servers this
module starts on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve import FakeBackend, assert_openai_error, data_url, image_message, png_bytes, post

from serve_apps.api import AuthNotConfigured, Overloaded, Settings, Unavailable, create_api
from serve_apps.events import DeltaEvent, ErrorEvent, FinalEvent, StartEvent
from serve_apps.limits import BYTES_PER_TOKEN_BOUND, Limits, address_refusal, fetch_remote_image
from serve_apps.protocol import APIError

HI = [{"role": "user", "content": "hi"}]
KEY_ENV = "DPN_SECURITY_TEST_KEY"
LEAKS = ("/home/ops", "10.1.2.3", "4242", "RuntimeError", "models:/", "/srv/ckpt")
"""What the backends below put in their failures and refs; none of it may reach a client."""


def open_client(backend: Any, **settings: Any) -> TestClient:
    settings.setdefault("auth", "none")
    return TestClient(create_api(backend, Settings(**settings)), raise_server_exceptions=False)


def assert_no_leak(text: str) -> None:
    for secret in LEAKS:
        assert secret not in text, (secret, text)


# ----------------------------------------------------------------------------------------------- auth


def test_no_api_key_refuses_to_start(monkeypatch):
    from serve_apps.app import ingress_settings

    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(AuthNotConfigured, match=f"{KEY_ENV}.*auth: none"):
        create_api(FakeBackend(), Settings(api_key_env=KEY_ENV))
    monkeypatch.setenv(KEY_ENV, "  ")
    with pytest.raises(AuthNotConfigured, match=KEY_ENV):
        create_api(FakeBackend(), Settings(api_key_env=KEY_ENV))
    with pytest.raises(AuthNotConfigured, match="api_key_env is empty"):
        create_api(FakeBackend(), Settings(api_key_env=""))
    # where the Serve ingress replica starts: it does not start
    bound = {
        "served_model_name": "dpn",
        "limits": Limits(),
        "api_key_env": KEY_ENV,
        "auth": "api_key",
        "allowed_hosts": [],
        "retry_after_s": 1,
        "default_compression": "auto",
        "health_timeout_s": 2.0,
    }
    with pytest.raises(AuthNotConfigured, match=KEY_ENV):
        ingress_settings(bound)
    monkeypatch.setenv(KEY_ENV, "k")
    assert ingress_settings(bound).api_key() == "k"
    assert ingress_settings({**bound, "auth": "none"}).api_key() is None
    assert ingress_settings(bound).send_request_id is False  # Serve's proxy sends x-request-id


def test_auth_none_warns_at_start_and_health_says_so(monkeypatch, caplog):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="serve_apps.api"):
        client = open_client(FakeBackend(), api_key_env=KEY_ENV)
    assert any(
        r.levelno == logging.WARNING and "WITHOUT authentication" in r.getMessage() for r in caplog.records
    )
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["auth"] == "none"
    assert post(client, {"messages": HI}).status_code == 200


def test_with_a_key_health_says_api_key_and_the_key_is_required(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret\n")  # a Secret made from a file ends with a newline
    client = TestClient(create_api(FakeBackend(), Settings(api_key_env=KEY_ENV)))
    assert client.get("/health").json()["auth"] == "api_key"
    assert_openai_error(post(client, {"messages": HI}), 401, "missing API key")
    assert post(client, {"messages": HI}, headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_app_args_and_settings_check_auth_and_hosts():
    from pydantic import ValidationError

    from serve_apps.app import AppArgs

    assert AppArgs.model_validate({"model": "m"}).auth == "api_key"
    with pytest.raises(ValidationError, match="auth"):
        AppArgs.model_validate({"model": "m", "auth": "off"})
    with pytest.raises(ValidationError, match="allowed_hosts"):
        AppArgs.model_validate({"model": "m", "allowed_hosts": ["evil*.com"]})
    assert AppArgs.model_validate(
        {"model": "m", "allowed_hosts": ["API.example.com", "[::1]"]}
    ).allowed_hosts == [
        "api.example.com",
        "::1",
    ]
    with pytest.raises(ValueError, match="auth"):
        Settings(auth="disabled")


def test_dpn_serve_refuses_a_local_start_without_a_key(monkeypatch):
    import argparse

    from serve_apps.commands import add_arguments, run

    monkeypatch.delenv("DPN_API_KEY", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit, match="DPN_API_KEY.*--auth none"):
        run(parser.parse_args(["--model", "m"]))
    assert parser.parse_args(["--model", "m", "--auth", "none", "--allowed-host", "a.b"]).allowed_hosts == [
        "a.b"
    ]


# ----------------------------------------------------------------------------------------------- content type


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,
        "application/json; charset=latin-1",
        "application/jsonp",
    ],
)
def test_json_endpoint_refuses_other_content_types_with_415(content_type):
    backend = FakeBackend()
    client = open_client(backend)
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}]}',
                           headers=headers)  # fmt: skip
    assert "content-type" in response.request.headers or content_type is None
    error = assert_openai_error(response, 415, "application/json")
    assert error["code"] == "unsupported_media_type" and error["type"] == "invalid_request_error"
    assert backend.requests == []


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", 'Application/JSON;Charset="UTF-8"'],
)
def test_json_with_optional_charset_is_accepted(content_type):
    client = open_client(FakeBackend())
    response = client.post(
        "/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}]}',
        headers={"content-type": content_type},
    )  # fmt: skip
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------------------------- hosts, request ids


def test_allowed_hosts():
    backend = FakeBackend()
    client = open_client(backend, allowed_hosts=("api.example.com", "*.internal.example", "[::1]"))
    for host in ("api.example.com", "API.example.com:8000", "a.b.internal.example", "[::1]:8000"):
        response = post(client, {"messages": HI}, headers={"host": host})
        assert response.status_code == 200, (host, response.text)
    for host in ("evil.example", "api.example.com.evil.example", "internal.example", "", "a:b:c", "[::1"):
        response = post(client, {"messages": HI}, headers={"host": host})
        error = assert_openai_error(response, 400, "Host")
        assert error["code"] == "invalid_host" and response.headers["x-request-id"]
        assert_openai_error(client.get("/health", headers={"host": host}), 400)
    assert len(backend.requests) == 4
    assert post(open_client(FakeBackend()), {"messages": HI}, headers={"host": "anything"}).status_code == 200


def test_every_response_has_a_request_id_and_a_safe_client_id_is_kept():
    client = open_client(FakeBackend())
    responses = [
        post(client, {"messages": HI}),
        post(client, {"messages": []}),
        client.get("/v1/nothing"),
        client.post("/v1/chat/completions", content=b"{}", headers={"content-type": "text/plain"}),
        client.get("/health"),
    ]
    with client.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as stream:
        responses.append(stream)
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)
    kept = post(client, {"messages": HI}, headers={"x-request-id": "client-42.a:b_c"})
    assert kept.headers["x-request-id"] == "client-42.a:b_c"
    for unsafe in ("x" * 65, "a b", "../etc", "id\\x", "<script>", "-leading-dash", "é"):
        response = post(client, {"messages": HI}, headers={"x-request-id": unsafe.encode()})
        assert response.headers["x-request-id"].startswith("req_"), unsafe


def test_without_send_request_id_the_header_is_left_to_the_proxy():
    response = post(open_client(FakeBackend(), send_request_id=False), {"messages": HI})
    assert response.status_code == 200 and "x-request-id" not in response.headers


# ----------------------------------------------------------------------------------------------- leaks


class LeakyBackend(FakeBackend):
    """Fails the way a real backend can, with internals in the failure: `mode` is `info_fails`, `crash`,
    `mid_stream`, `replica_500`, `unavailable`; its info carries a local path as the model ref."""

    async def info(self):
        if self.mode == "info_fails":
            raise RuntimeError(
                "cannot reach the replica at 10.1.2.3:6379 (pid 4242), checkpoint /home/ops/ckpt"
            )
        return {"model": "/srv/ckpt/models:/dpn@champion", "version": "v1", "compression_factors": [1, 2, 4]}

    async def generate(self, request):
        self.requests.append(request)
        if self.mode == "crash":
            raise RuntimeError("bug reading /home/ops/ckpt on 10.1.2.3 (pid 4242)")
        if self.mode == "unavailable":
            raise Unavailable("replica 10.1.2.3 pid 4242 died: RuntimeError")
        yield StartEvent(prompt_tokens=3, fingerprint="v1")
        if self.mode == "replica_500":
            yield ErrorEvent("generation failed: RuntimeError: CUDA error in /home/ops/ckpt on 10.1.2.3")
            return
        yield DeltaEvent(text="partial ")
        if self.mode == "mid_stream":
            raise RuntimeError("lost /home/ops/ckpt on 10.1.2.3 (pid 4242)")
        yield FinalEvent(text="end", full_text="partial end", finish_reason="stop", usage={})


def leaky(mode: str) -> tuple[TestClient, LeakyBackend]:
    backend = LeakyBackend()
    backend.mode = mode
    return open_client(backend, health_timeout_s=0.5), backend


def logged_under(caplog, request_id: str, needle: str) -> bool:
    return any(
        request_id in r.getMessage()
        and (needle in r.getMessage() or (r.exc_info and needle in str(r.exc_info[1])))
        for r in caplog.records
    )


def test_health_answers_503_without_the_backends_exception(caplog):
    client, _ = leaky("info_fails")
    with caplog.at_level(logging.WARNING, logger="serve_apps.api"):
        response = client.get("/health")
    error = assert_openai_error(response, 503)
    assert error["code"] == "unhealthy" and response.headers["retry-after"] == "1"
    assert response.headers["x-request-id"] in error["message"]
    assert_no_leak(response.text)
    assert logged_under(caplog, response.headers["x-request-id"], "10.1.2.3:6379")  # for the operator


def test_health_and_models_name_no_path_or_ref():
    client, _ = leaky("ok")
    health, models = client.get("/health"), client.get("/v1/models")
    assert health.json() == {"status": "ok", "model": "dpn", "version": "v1", "auth": "none"}
    assert models.json()["data"][0]["root"] == "dpn"
    assert_no_leak(health.text + models.text)


def test_a_mid_stream_exception_does_not_leak(caplog):
    client, _ = leaky("mid_stream")
    with (
        caplog.at_level(logging.ERROR),
        client.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as response,
    ):
        body = response.read().decode()
    assert response.status_code == 200 and body.endswith("data: [DONE]\n\n")
    assert '"code":"generation_failed"' in body and response.headers["x-request-id"] in body
    assert_no_leak(body)
    assert logged_under(caplog, response.headers["x-request-id"], "10.1.2.3")


def test_a_replica_fault_does_not_leak_in_a_stream_or_an_answer(caplog):
    client, _ = leaky("replica_500")
    with (
        caplog.at_level(logging.ERROR),
        client.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as response,
    ):
        body = response.read().decode()
    assert '"code":"generation_failed"' in body
    assert_no_leak(body)
    assert logged_under(caplog, response.headers["x-request-id"], "CUDA error")
    response = post(client, {"messages": HI})
    error = assert_openai_error(response, 500, response.headers["x-request-id"])
    assert error["code"] == "generation_failed"
    assert_no_leak(response.text)


@pytest.mark.parametrize(("mode", "status"), [("crash", 500), ("unavailable", 503)])
def test_500_and_503_do_not_leak(caplog, mode, status):
    client, _ = leaky(mode)
    with caplog.at_level(logging.WARNING):
        for stream in (False, True):
            response = post(client, {"messages": HI, "stream": stream})
            assert_openai_error(response, status)
            assert_no_leak(response.text)
    assert logged_under(caplog, response.headers["x-request-id"], "10.1.2.3")


def test_client_errors_still_name_the_field_and_limit():
    client = open_client(FakeBackend(), limits=Limits(max_tokens=32, default_max_tokens=8))
    error = assert_openai_error(post(client, {"messages": HI, "max_tokens": 33}), 400, "limit of 32")
    assert error["param"] == "max_tokens"


# ----------------------------------------------------------------------------------------------- budgets


def test_prompt_bytes_are_bounded_before_forwarding():
    limits = Limits(max_prompt_tokens=100)
    assert limits.max_prompt_bytes == BYTES_PER_TOKEN_BOUND * 100
    backend = FakeBackend()
    client = open_client(backend, limits=limits)
    for messages in (
        [{"role": "user", "content": "x" * 6401}],
        [{"role": "user", "content": "é" * 3201}],  # bytes, not characters
        [
            {"role": "system", "content": "x" * 3200},
            {"role": "user", "content": [{"type": "text", "text": "y" * 3201}]},
        ],
    ):
        error = assert_openai_error(post(client, {"messages": messages}), 400, "limits.max_prompt_bytes")
        assert error["code"] == "prompt_too_large" and error["param"] == "messages"
    assert backend.requests == []
    assert post(client, {"messages": [{"role": "user", "content": "x" * 6400}]}).status_code == 200


def test_the_default_byte_bound_holds_the_tokenizers_longest_token():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).parents[1] / "checkpoints" / "tiny-dense")
    longest = max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in tokenizer.get_vocab())
    assert 0 < longest <= BYTES_PER_TOKEN_BOUND


class VisionBackend(FakeBackend):
    async def info(self):
        return {**await super().info(), "num_visual_tokens": 576}


def test_n_times_tokens_budget_is_checked_before_the_backend():
    limits = Limits(max_prompt_tokens=1000, max_tokens=100, default_max_tokens=10)
    assert limits.max_request_tokens == 4 * 1100
    backend = VisionBackend()
    client = open_client(backend, limits=limits)
    text = [{"role": "user", "content": "x" * 500}]
    error = assert_openai_error(post(client, {"messages": text, "n": 8, "max_tokens": 100}), 400,
                                "limits.max_request_tokens", "n=8")  # fmt: skip
    assert error["code"] == "request_token_budget_exceeded" and error["param"] == "n"
    # the visual tokens of an image count (from the backend's info): 5 x (~300 + 576 + 10) is over, text alone not
    image = image_message(data_url(png_bytes()), "Colour?")
    assert_openai_error(post(client, {"messages": image, "n": 5}), 400, "limits.max_request_tokens")
    assert backend.requests == []
    assert post(client, {"messages": [{"role": "user", "content": "Colour?"}], "n": 5}).status_code == 200
    assert post(client, {"messages": text, "n": 4, "max_tokens": 10}).status_code == 200
    # one choice of the largest prompt and max_tokens is never refused by the budget
    assert (
        post(client, {"messages": [{"role": "user", "content": "x" * 64000}], "max_tokens": 100}).status_code
        == 200
    )
    assert len(backend.requests) == 5 + 4 + 1


def test_request_budget_must_hold_one_full_request():
    with pytest.raises(ValueError, match="max_request_tokens"):
        Limits.from_dict({"max_prompt_tokens": 1000, "max_tokens": 100, "max_request_tokens": 1099})
    assert Limits.from_dict({"max_prompt_tokens": 1000, "max_tokens": 100, "max_request_tokens": 1100})


# ----------------------------------------------------------------------------------------------- cancellation


class ChoiceBackend(FakeBackend):
    """Choice 1 fails (`mode`: `error_event` or `overloaded`) once the others run; they record their cancellation."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.cancelled: list[str] = []

    async def generate(self, request):
        self.requests.append(request)
        if request["request_id"].endswith("-1"):
            await asyncio.sleep(0.05)
            if self.mode == "overloaded":
                raise Overloaded("full")
            yield ErrorEvent("generation failed: boom", 500)
            return
        yield StartEvent(prompt_tokens=3)
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.append(request["request_id"][-2:])
            raise
        yield FinalEvent(text="late", full_text="late", finish_reason="stop", usage={})


@pytest.mark.parametrize(("mode", "status"), [("error_event", 500), ("overloaded", 503)])
def test_a_failing_choice_cancels_the_others(mode, status):
    backend = ChoiceBackend(mode)
    start = time.perf_counter()
    response = post(open_client(backend), {"messages": HI, "n": 3})
    assert response.status_code == status and time.perf_counter() - start < 10
    assert sorted(backend.cancelled) == ["-0", "-2"]  # before the error was answered


class FakeResponse:
    """A `DeploymentResponseGenerator` of a fake handle: `events`, then (unless `ends`) waits; records `cancel()`."""

    def __init__(self, events: list[Any], ends: bool = False):
        self.events, self.ends, self.cancelled = list(events), ends, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.events:
            return self.events.pop(0)
        if self.ends:
            raise StopAsyncIteration
        await asyncio.sleep(30)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """`handle.options(stream=True).generate.remote(request)`, as `HandleBackend` calls it."""

    def __init__(self, fail_choice: str | None = None):
        self.fail_choice = fail_choice
        self.responses: dict[str, FakeResponse] = {}

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        rid = request.get("request_id", "")
        if self.fail_choice and rid.endswith(self.fail_choice):
            response = FakeResponse([ErrorEvent("generation failed: boom", 500)], ends=True)
        else:
            response = FakeResponse([StartEvent(prompt_tokens=3)])
        self.responses[rid] = response
        return response


def test_handle_backend_cancels_the_replicas_stream_when_its_caller_leaves():
    from serve_apps.app import HandleBackend

    async def scenario(how: str) -> FakeResponse:
        handle = FakeHandle()
        events = HandleBackend(handle).generate({"request_id": "r"})
        first = await events.__anext__()
        assert isinstance(first, StartEvent)
        if how == "task cancelled":
            task = asyncio.ensure_future(events.__anext__())
            await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await events.aclose()
        return handle.responses["r"]

    assert asyncio.run(scenario("task cancelled")).cancelled
    assert asyncio.run(scenario("closed")).cancelled

    async def to_the_end() -> FakeResponse:
        handle = FakeHandle()
        handle.remote = lambda request: handle.responses.setdefault(
            "r", FakeResponse([StartEvent(prompt_tokens=1)], ends=True)
        )
        assert len([e async for e in HandleBackend(handle).generate({})]) == 1
        return handle.responses["r"]

    assert not asyncio.run(to_the_end()).cancelled


def test_a_failing_choice_cancels_the_others_on_the_replica():
    """The whole path without a cluster: the API over `HandleBackend` over a fake deployment handle."""
    from serve_apps.app import HandleBackend

    handle = FakeHandle(fail_choice="-1")
    response = post(open_client(HandleBackend(handle)), {"messages": HI, "n": 3})
    assert response.status_code == 500
    cancelled = {rid[-2:]: r.cancelled for rid, r in handle.responses.items()}
    assert cancelled["-0"] and cancelled["-2"]  # (choice 1's stream, closed after its error, may be too)


# ----------------------------------------------------------------------------------------------- remote images: addresses

REFUSED_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4",
    "240.0.0.0/4",
]  # fmt: skip
REFUSED_V6 = [
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "2001:db8::/32",
    "100::/64",
    "2001::/23",
]
PUBLIC = ["8.8.0.0/16", "1.1.1.0/24", "93.184.216.0/24", "2606:4700::/32", "2001:4860::/32", "2a00:1450::/32"]


def addresses_in(networks: list[str]) -> st.SearchStrategy:
    return st.one_of(*(st.ip_addresses(network=n) for n in networks))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(ip=addresses_in(REFUSED_V4))
def test_every_non_public_ipv4_address_is_refused_in_every_form(ip):
    assert address_refusal(ip) is not None
    assert address_refusal(ipaddress.ip_address(f"::ffff:{ip}")) is not None  # IPv4-mapped
    assert address_refusal(ipaddress.ip_address(f"64:ff9b::{ip}")) is not None  # NAT64
    assert address_refusal(ipaddress.ip_address((0x2002 << 112) | (int(ip) << 80))) is not None  # 6to4


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(ip=addresses_in(REFUSED_V6))
def test_every_non_public_ipv6_address_is_refused(ip):
    assert address_refusal(ip) is not None


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(ip=addresses_in(PUBLIC))
def test_public_addresses_are_allowed(ip):
    assert address_refusal(ip) is None
    if ip.version == 4:
        assert address_refusal(ipaddress.ip_address(f"::ffff:{ip}")) is None


def test_metadata_addresses_are_refused_even_when_allowed():
    for ip, networks in [
        ("169.254.169.254", ("169.254.0.0/16",)),
        ("::ffff:169.254.169.254", ("0.0.0.0/0",)),
        ("fd00:ec2::254", ("fd00::/8",)),
        ("100.100.100.200", ("100.64.0.0/10",)),
    ]:
        assert address_refusal(ip, networks) == "a cloud metadata address", ip
    assert address_refusal("127.0.0.1", ("127.0.0.1/32",)) is None
    assert address_refusal("127.0.0.2", ("127.0.0.1/32",)) is not None
    with pytest.raises(ValueError, match="not an IP network"):
        Limits.from_dict({"remote_image_allowed_networks": ["intranet"]})


# ----------------------------------------------------------------------------------------------- remote images: fetches

PNG = png_bytes(24, 16)


class _Images(http.server.BaseHTTPRequestHandler):
    """`/img` a PNG, `/to-img` a redirect to it, `/to-metadata` a redirect to 169.254.169.254, `/loop` a redirect
    to itself, `/drip` one byte every 0.1 s, `/big` more bytes than declared nowhere, `/big-declared` a large
    Content-Length. Every request's path and Host are recorded on the server."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.hits.append((self.path, self.headers.get("Host")))
        with contextlib.suppress(
            BrokenPipeError, ConnectionResetError
        ):  # the fetch gave up first, as it should
            self._answer()

    def _answer(self):
        redirects = {
            "/to-img": "/img",
            "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            "/loop": "/loop",
        }
        if self.path in redirects:
            self.send_response(302)
            self.send_header("Location", redirects[self.path])
            self.end_headers()
        elif self.path == "/img":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            for _ in range(100):
                time.sleep(0.1)
                self.wfile.write(b"x")
                self.wfile.flush()
        elif self.path in ("/big", "/big-declared"):
            self.send_response(200)
            if self.path == "/big-declared":
                self.send_header("Content-Length", "10000000")
            self.end_headers()
            self.wfile.write(b"\0" * 50_000)


@pytest.fixture(scope="module")
def image_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    server.daemon_threads = True
    server.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def base(image_server) -> str:
    image_server.hits.clear()
    return f"http://127.0.0.1:{image_server.server_address[1]}"


LOOPBACK_ALLOWED = Limits(
    allow_remote_images=True, remote_image_allowed_networks=("127.0.0.1/32",), remote_timeout_s=1.0,
    max_image_bytes=20_000,
)  # fmt: skip
DEFAULT_REMOTE = Limits(allow_remote_images=True, remote_timeout_s=1.0, max_image_bytes=20_000)


def fetch(url: str, limits: Limits = LOOPBACK_ALLOWED) -> bytes:
    return asyncio.run(fetch_remote_image(url, limits, "url"))


def refused(url: str, limits: Limits = LOOPBACK_ALLOWED) -> APIError:
    with pytest.raises(APIError) as info:
        fetch(url, limits)
    assert info.value.status == 400 and info.value.param == "url"
    assert "127.0.0.1" not in info.value.message and "169.254" not in info.value.message
    return info.value


def test_an_allowed_host_is_fetched_and_redirects_are_followed(base, image_server):
    assert fetch(base + "/img") == PNG
    assert fetch(base + "/to-img") == PNG
    assert [path for path, _ in image_server.hits] == ["/img", "/to-img", "/img"]
    backend = FakeBackend()
    client = open_client(backend, limits=LOOPBACK_ALLOWED)
    assert post(client, {"messages": image_message(base + "/img")}).status_code == 200
    assert backend.requests[0]["images"][0].shape == (16, 24, 3)


def test_by_default_the_loopback_server_is_refused(base, image_server):
    for url in (base + "/img", base.replace("127.0.0.1", "[::ffff:127.0.0.1]") + "/img",
                base.replace("127.0.0.1", "2130706433") + "/img", "http://169.254.169.254/latest/meta-data/"):  # fmt: skip
        assert refused(url, DEFAULT_REMOTE).code == "image_url_not_allowed"
    assert image_server.hits == []
    error = assert_openai_error(
        post(open_client(FakeBackend(), limits=DEFAULT_REMOTE), {"messages": image_message(base + "/img")}),
        400,
    )
    assert error["code"] == "image_url_not_allowed" and "127.0.0.1" not in error["message"]
    assert image_server.hits == []


def test_a_redirect_to_a_private_address_is_refused(base, image_server):
    assert refused(base + "/to-metadata").code == "image_url_not_allowed"
    assert [path for path, _ in image_server.hits] == ["/to-metadata"]


def test_redirects_are_bounded(base, image_server):
    assert "limits.remote_max_redirects" in refused(base + "/loop").message
    assert len(image_server.hits) == LOOPBACK_ALLOWED.remote_max_redirects + 1
    no_redirects = LOOPBACK_ALLOWED.model_copy(update={"remote_max_redirects": 0})
    refused(base + "/to-img", no_redirects)


def test_the_timeout_is_total_not_per_read(base):
    start = time.perf_counter()
    error = refused(base + "/drip")  # a byte every 0.1 s: no single read waits 1 s
    assert error.code == "image_fetch_timeout" and "limits.remote_timeout_s" in error.message
    assert time.perf_counter() - start < 3


def test_the_body_is_capped(base):
    for path in ("/big", "/big-declared"):
        error = refused(base + path)
        assert error.code == "image_too_large" and "limits.max_image_bytes" in error.message


def test_the_checked_address_is_the_one_connected_to(base, image_server, monkeypatch):
    """DNS rebinding: the name resolves to an allowed address once, then to a private one; the fetch uses the
    address it checked, and the server sees the original name as Host."""
    port = image_server.server_address[1]
    answers = iter(["127.0.0.1"])
    lookups = []
    real = socket.getaddrinfo

    def rebinding(host, *args, **kwargs):
        if host != "images.test":
            return real(host, *args, **kwargs)
        lookups.append(host)
        address = next(answers, "10.0.0.1")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    assert fetch(f"http://images.test:{port}/img") == PNG
    assert lookups == ["images.test"] and image_server.hits == [("/img", f"images.test:{port}")]
    assert refused(f"http://images.test:{port}/img").code == "image_url_not_allowed"  # now private: refused
    assert len(image_server.hits) == 1
