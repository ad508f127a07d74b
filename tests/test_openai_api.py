"""OpenAI chat-completions coverage: `max_completion_tokens`, unsupported fields (400 naming them),
`stream_options.include_usage`, `n`. The ingress runs in-process over a fake backend (no Ray); the official
`openai` client talks to it through the TestClient's transport."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from serve_apps.api import Settings, create_api
from serve_apps.events import DeltaEvent, FinalEvent, StartEvent
from serve_apps.limits import Limits

HI = [{"role": "user", "content": "hi"}]


class EchoBackend:
    """Answers `choice seed=<seed>` in two deltas; records every request that reached it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def generate(self, request):
        self.requests.append(request)
        yield StartEvent(prompt_tokens=10, fingerprint="v1")
        yield DeltaEvent(text="choice ")
        text = f"seed={request['seed']}"
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prefill_flops_saved": 0.4}
        logprobs = None
        if request.get("logprobs"):
            top = [{"token": "b", "logprob": -2.0, "bytes": [98]}][: request["top_logprobs"]]
            logprobs = [{"token": "a", "logprob": -0.5, "bytes": [97], "top_logprobs": top}]
        yield FinalEvent(
            text=text,
            full_text="choice " + text,
            finish_reason="length",
            usage=usage,
            batch={"id": 1, "rate": 4},
            logprobs=logprobs,
        )

    async def info(self):
        return {"model": "/ckpt", "version": "v1", "compression_factors": [1, 2, 4]}

    async def batches(self, limit):
        return []


@pytest.fixture()
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture()
def client(backend) -> TestClient:
    limits = Limits(max_tokens=32, default_max_tokens=8)
    return TestClient(create_api(backend, Settings(limits=limits, auth="none")))


@pytest.fixture()
def oai(client):
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client, max_retries=0)


def post(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": HI, **body})


def error_of(response: httpx.Response, param: str, *needles: str) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    for needle in (param, *needles):
        assert needle in error["message"], error["message"]
    return error


# ------------------------------------------------------------------------------------- max_completion_tokens


def test_max_completion_tokens_is_the_budget(oai, backend):
    oai.chat.completions.create(model="dpn", messages=HI, max_completion_tokens=5)
    oai.chat.completions.create(model="dpn", messages=HI, max_tokens=6)
    oai.chat.completions.create(model="dpn", messages=HI, max_tokens=7, max_completion_tokens=7)
    assert [r["max_tokens"] for r in backend.requests] == [5, 6, 7]


def test_max_completion_tokens_limits_and_conflicts(client, backend):
    error_of(post(client, max_completion_tokens=33), "max_completion_tokens", "limit of 32")
    error_of(post(client, max_completion_tokens=0), "max_completion_tokens")
    error_of(post(client, max_completion_tokens="4"), "max_completion_tokens")
    error = error_of(
        post(client, max_tokens=4, max_completion_tokens=5), "max_completion_tokens", "max_tokens"
    )
    assert error["code"] == "conflicting_max_tokens"
    assert backend.requests == []


def test_max_completion_tokens_conflict_with_the_openai_client(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="dpn", messages=HI, max_tokens=4, max_completion_tokens=5)
    assert "max_completion_tokens" in info.value.message and "max_tokens" in info.value.message


# ------------------------------------------------------------------------------------- unsupported fields

UNSUPPORTED = [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"),
    ("tool_choice", {"type": "function", "function": {"name": "f"}}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("parallel_tool_calls", True),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("logit_bias", {"50256": -100}),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("reasoning_effort", "low"),
    ("web_search_options", {}),
]


@pytest.mark.parametrize(
    ("field", "value"), UNSUPPORTED, ids=[f"{f}-{i}" for i, (f, _) in enumerate(UNSUPPORTED)]
)
def test_unsupported_field_is_a_400_naming_it(client, backend, field, value):
    error = error_of(post(client, **{field: value}), field, "unsupported")
    assert error["code"] == "unsupported_parameter"
    assert backend.requests == []


def test_unsupported_fields_are_all_named(client):
    error = error_of(
        post(client, tools=[{"type": "function"}], response_format={"type": "json_object"}), "tools"
    )
    assert "response_format" in error["message"]


HARMLESS = {
    "user": "u1",
    "metadata": {"k": "v"},
    "store": False,
    "service_tier": "auto",
    "tools": [],
    "tool_choice": "none",
    "functions": [],
    "function_call": "none",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "logit_bias": {},
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "logprobs": False,
    "audio": None,
    "prediction": None,
    "parallel_tool_calls": None,
    "top_logprobs": None,
    "some_future_field": {"x": 1},
}


def test_harmless_and_no_op_values_are_accepted(client, backend):
    response = post(client, **HARMLESS)
    assert response.status_code == 200, response.text
    assert len(backend.requests) == 1


def test_unsupported_field_with_the_openai_client(oai):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(
            model="dpn",
            messages=HI,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        )
    assert "tools" in info.value.message and info.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model="dpn", messages=HI, response_format={"type": "json_object"})
    assert "response_format" in info.value.message
    out = oai.chat.completions.create(model="dpn", messages=HI, user="u", store=False, metadata={"a": "b"})
    assert out.choices[0].message.content == "choice seed=None"


# ------------------------------------------------------------------------------------- stream_options


def sse_chunks(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": HI, "stream": True, **body}
    ) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: ") :]) for line in lines[:-1]]


def test_include_usage_adds_a_last_chunk_without_choices(client):
    chunks = sse_chunks(client, stream_options={"include_usage": True})
    last, closing = chunks[-1], chunks[-2]
    assert last["choices"] == [] and last["object"] == "chat.completion.chunk" and last["id"] == closing["id"]
    assert last["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 3,
        "total_tokens": 13,
        "prefill_flops_saved": 0.4,
    }
    assert closing["choices"][0]["finish_reason"] == "length" and "usage" not in closing
    assert all("usage" not in c for c in chunks[:-1])


@pytest.mark.parametrize("options", [None, {"include_usage": False}, {}])
def test_without_include_usage_no_usage_chunk(client, options):
    chunks = sse_chunks(client, **({} if options is None else {"stream_options": options}))
    assert all(c["choices"] for c in chunks)  # no choices-less usage chunk
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "choice seed=None"


def test_stream_options_errors_name_it(client):
    error_of(post(client, stream_options={"include_usage": True}), "stream_options", "stream")
    error_of(
        post(client, stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"
    )
    error_of(post(client, stream=True, stream_options=[]), "stream_options")


def test_include_usage_with_the_openai_client(oai):
    chunks = list(
        oai.chat.completions.create(
            model="dpn",
            messages=HI,
            stream=True,
            stream_options={"include_usage": True},
            max_completion_tokens=3,
        )
    )
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == 3
        and chunks[-1].usage.total_tokens == 13
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "choice seed=None"
    plain = list(oai.chat.completions.create(model="dpn", messages=HI, stream=True))
    assert all(c.choices for c in plain)


# ------------------------------------------------------------------------------------- n


def test_n_choices_with_the_openai_client(oai, backend):
    out = oai.chat.completions.create(model="dpn", messages=HI, n=3, seed=5, max_completion_tokens=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.message.content for c in out.choices] == ["choice seed=5", "choice seed=6", "choice seed=7"]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.prompt_tokens == 10 and out.usage.completion_tokens == 9 and out.usage.total_tokens == 19
    assert out.usage.model_extra["prefill_flops_saved"] == 0.4
    ids = [r["request_id"] for r in backend.requests]
    assert len(set(ids)) == 3 and all(i.startswith(out.id) for i in ids)
    assert all(r["max_tokens"] == 3 for r in backend.requests)


def test_n_one_and_unseeded(client, backend):
    out = post(client, n=1).json()
    assert len(out["choices"]) == 1 and out["usage"]["total_tokens"] == 13
    assert backend.requests[0]["request_id"] == out["id"]
    out = post(client, n=2).json()
    assert [c["message"]["content"] for c in out["choices"]] == ["choice seed=None"] * 2
    assert out["usage"]["completion_tokens"] == 6


def test_choice_seeds_wrap_in_int64(client, backend):
    post(client, n=2, seed=2**63 - 1)
    assert [r["seed"] for r in backend.requests] == [2**63 - 1, -(2**63)]


def test_n_errors_name_it(client, backend):
    error_of(post(client, n=9), "n")
    error_of(post(client, n=0), "n")
    error_of(post(client, n="2"), "n")
    error_of(post(client, n=2, stream=True), "n", "stream")
    assert backend.requests == []


def test_n_failure_fails_the_request(client, backend):
    calls = []
    generate = backend.generate

    async def second_fails(request):
        calls.append(request)
        if len(calls) == 2:
            from serve_apps.api import Overloaded

            raise Overloaded("full")
        async for event in generate(request):
            yield event

    backend.generate = second_fails
    response = post(client, n=3)
    assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"


# ------------------------------------------------------------------------------------- logprobs


def test_logprobs_with_the_openai_client(oai, backend):
    out = oai.chat.completions.create(model="dpn", messages=HI, logprobs=True, top_logprobs=1, n=2)
    assert backend.requests[0]["logprobs"] is True and backend.requests[0]["top_logprobs"] == 1
    for choice in out.choices:
        (entry,) = choice.logprobs.content
        assert entry.token == "a" and entry.logprob == -0.5 and entry.bytes == [97]
        assert [t.token for t in entry.top_logprobs] == ["b"]
    plain = oai.chat.completions.create(model="dpn", messages=HI)
    assert plain.choices[0].logprobs is None and backend.requests[-1]["logprobs"] is False


def test_logprobs_errors_name_them(client, backend):
    error_of(post(client, top_logprobs=2), "top_logprobs", "logprobs")
    error_of(post(client, logprobs=False, top_logprobs=2), "top_logprobs")
    error_of(post(client, logprobs=True, top_logprobs=21), "top_logprobs")
    error_of(post(client, logprobs=True, top_logprobs=-1), "top_logprobs")
    error_of(post(client, logprobs="yes"), "logprobs")
    error_of(post(client, logprobs=True, stream=True), "logprobs", "stream")
    assert backend.requests == []
