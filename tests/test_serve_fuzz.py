"""Fuzzing the serving API: property-based (hypothesis) and schema-driven (schemathesis), no Ray.

The property: whatever a client sends, the answer is never a 5xx other than 503, every 4xx is in OpenAI's error
shape, and the server goes on serving. The hypothesis fuzz builds requests that are nearly valid, field by field,
with hostile values mixed in (lone surrogates, unicode digits, integers of thousands of digits, deep nesting, NaN,
decompression-bomb and extreme-aspect images), plus arbitrary JSON and bytes; it runs once over a fake backend
(many examples, fast) and once over a tiny random model behind the real scheduler (fewer), so that whatever passes
validation is really tokenized, batched and sampled. Schemathesis drives the app from its own OpenAPI schema.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_serve import FakeBackend, LocalBackend, data_url, flat_png, png_bytes
from test_serve_robustness import png_header

from serve_apps.api import Settings, create_api
from serve_apps.limits import Limits

LIMITS = Limits(
    max_body_bytes=300_000,
    max_image_bytes=150_000,
    max_image_pixels=600 * 600,
    max_tokens=4,
    default_max_tokens=2,
    max_prompt_tokens=600,
)
SETTINGS = Settings(limits=LIMITS, auth="none")
ERROR_TYPES = {"invalid_request_error", "authentication_error", "not_found_error"}


# ----------------------------------------------------------------------------------------------- strategies

# Raw JSON text that no Python value serializes to; a field holding RAW[i] is spliced in as RAW_TEXT[i].
RAW_TEXT = [
    "9" * 5000,
    "-" + "1" * 4400,
    "NaN",
    "Infinity",
    "[" * 3000 + "]" * 3000,
    '{"a":' * 3000 + "1" + "}" * 3000,
    '"\\ud800"',
    '"a\\udfffb"',
    "1e999",
    "-0",
    "1E-400",
]
RAW = [f"@@raw{i}@@" for i in range(len(RAW_TEXT))]

HOSTILE_STRINGS = [
    "\ud800",
    "x\udfffy",
    "\u00b2",
    "\u0661",
    "\uff11",
    "\u2074",
    " 1",
    "1 ",
    "",
    "\x00",
    "<image>",
    "<router>",
    "</s>",
    "<pad>",
    "auto",
    "AUTO",
    "dpn",
    "\u202e",
    "\ufeff",
    "a" * 5000,
]
HOSTILE_NUMBERS = [
    0,
    -1,
    1,
    2,
    3,
    4,
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    -(2**63) - 1,
    10**30,
    1e-320,
    5e-324,
    1e-300,
    1e-30,
    1e-8,
    0.0,
    -0.0,
    1.0000001,
    2.0,
    2.0000001,
    1e308,
    True,
    False,
    None,
]

IMAGES = [
    png_bytes(24, 16),
    png_bytes(8, 8, fmt="JPEG"),
    png_header(30000, 30000),
    png_header(1, 300_000),
    png_header(599, 5),
    png_header(0, 10),
    flat_png(500, 500),
    flat_png(700, 700),
    png_bytes()[:70],
    b"GIF89a" + b"\xff" * 40,
    b"not an image at all",
]
IMAGE_URLS = st.one_of(
    st.sampled_from(IMAGES).map(data_url),
    st.sampled_from(IMAGES).map(lambda raw: data_url(raw).split(",", 1)[1]),  # raw base64
    st.sampled_from(
        [
            "data:image/png;base64,",
            "data:text/plain;base64,aGk=",
            "data:image/png;base64,@@@",
            "http://127.0.0.1/x.png",
            "file:///etc/passwd",
            "ftp://x",
            "data:,",
            "data:image/png,abc",
        ]
    ),
    st.text(max_size=30),
)

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)


# compressions of a form the ingress passes but no expert / pooling layer count of the tiny model fits, and forms
# it refuses
HOSTILE_COMPRESSIONS = [
    "random",
    "3",
    [1, 2],
    [1, 2, 4, 4],
    [1, 2, 8],
    "1,2",
    "1,,2",
    "1-2-4-",
    [1, True, 4],
    [1, 2.0, 4],
    ["\u0661", 2, 4],
    [[1], 2, 4],
    [],
    [0, 1, 2],
    [2**64, 1, 1],
    [1] * 100,
]

hostile_values = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.sampled_from(HOSTILE_COMPRESSIONS),
    st.sampled_from(HOSTILE_NUMBERS),
    st.sampled_from(RAW),
    json_values,
    IMAGE_URLS,
)

valid_text = st.text(max_size=40)
valid_image_url = st.sampled_from([png_bytes(24, 16), png_bytes(8, 8, fmt="JPEG"), flat_png(500, 300)]).map(
    data_url
)
valid_user = st.one_of(
    valid_text.map(lambda text: {"role": "user", "content": text}),
    st.tuples(valid_image_url, valid_text).map(
        lambda p: {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": p[0]}}, {"type": "text", "text": p[1]}],
        }
    ),
)
valid_messages = st.tuples(
    st.lists(valid_text.map(lambda t: {"role": "system", "content": t}), max_size=1), valid_user
).map(lambda p: [*p[0], p[1]])
valid_request = st.fixed_dictionaries(
    {"messages": valid_messages},
    optional={
        "model": st.just("dpn"),
        "max_tokens": st.integers(1, 4),
        "max_completion_tokens": st.integers(1, 4),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(1e-45, 1),
        "seed": st.integers(-(2**63), 2**63 - 1),
        "stop": st.one_of(valid_text, st.lists(valid_text, max_size=4)),
        "stream": st.booleans(),
        "n": st.integers(1, 2),
        "compression": st.sampled_from(
            ["auto", 1, 2, 4, "1", "2", "4", [1, 2, 4], [4, 2, 1], [2, 2, 2], "1,2,4", "1-2-4", "[4, 2, 1]"]
        ),
        "ignore_eos": st.booleans(),
        "user": valid_text,
    },
)
FIELDS = [
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "n",
    "compression",
    "ignore_eos",
    "user",
]


@st.composite
def requests(draw) -> dict[str, Any]:
    """A valid request with 0-2 of its values (a field, the user message's role or content, a part's text or URL)
    replaced by hostile ones: nearly valid requests reach the deepest code."""
    body = draw(valid_request)
    for _ in range(draw(st.integers(0, 2))):
        user = body["messages"][-1] if isinstance(body.get("messages"), list) and body["messages"] else {}
        if not isinstance(user, dict):  # an earlier round replaced the messages with something else
            user = {}
        where = draw(st.sampled_from(["field", "role", "content", "part"]))
        if where == "field":
            body[draw(st.sampled_from(FIELDS))] = draw(hostile_values)
        elif where in ("role", "content"):
            user[where] = draw(hostile_values)
        elif isinstance(user, dict) and isinstance(user.get("content"), list) and user["content"]:
            item = draw(st.sampled_from(user["content"]))
            if not isinstance(item, dict) or not item:
                continue
            key = draw(st.sampled_from(sorted(map(str, item))))
            item[key] = {"url": draw(IMAGE_URLS)} if key == "image_url" else draw(hostile_values)
    return body


def serialize(payload: Any) -> bytes:
    """JSON with the RAW placeholders replaced by their raw text (lone surrogates escaped, as JSON allows)."""
    body = json.dumps(payload, ensure_ascii=True)
    for marker, raw in zip(RAW, RAW_TEXT):
        body = body.replace(json.dumps(marker), raw)
    return body.encode()


bodies = st.one_of(
    requests().map(serialize),
    requests().map(serialize),
    requests().map(serialize),
    json_values.map(serialize),
    st.sampled_from(RAW_TEXT).map(str.encode),
    st.binary(max_size=200),
    requests().map(serialize).map(lambda body: body[: len(body) // 2]),  # truncated
    st.just(b'{"messages": [{"role": "user", "content": "' + b"x" * 400_000 + b'"}]}'),  # over max_body_bytes
)


# ----------------------------------------------------------------------------------------------- the property


def check_response(response, chat: bool = True) -> None:
    """No 5xx but 503; every error in OpenAI's shape; a 200 of `chat` is a completion or a stream of chunks."""
    status = response.status_code
    event(f"status {status}")
    assert status < 500 or status == 503, (status, response.text[:500])
    if status >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]
        if status < 500:
            assert error["type"] in ERROR_TYPES, error
        if status in (400, 413):
            assert error["type"] == "invalid_request_error", error
    elif not chat:
        return
    elif "text/event-stream" in str(response.headers.get("content-type")):  # schemathesis: a list of values
        lines = [line for line in response.text.split("\n") if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert not any('"error"' in line for line in lines), lines  # a validated request must not fail midway
    else:
        assert response.json()["object"] == "chat.completion"


def fuzz(client: TestClient, body: bytes) -> None:
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    check_response(response)


FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


@pytest.fixture(scope="module")
def fake_client():
    with TestClient(create_api(FakeBackend(), SETTINGS), raise_server_exceptions=False) as client:
        yield client


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(body=bodies)
def test_fuzz_fake_backend_never_5xx(fake_client, body):
    fuzz(fake_client, body)


@pytest.fixture(scope="module")
def model_client(tmp_path_factory):
    from dpn_model.presets import create_checkpoint
    from serve_apps.model import DPNServer
    from serve_apps.policy import BatchingConfig

    checkpoint = create_checkpoint("tiny", str(tmp_path_factory.mktemp("fuzz") / "ckpt"), seed=0)
    server = DPNServer(
        batching=BatchingConfig(batch_wait_timeout_s=0.01),
        limits=LIMITS,
        device="cpu",
        dtype="float32",
        model=checkpoint,
    )
    with TestClient(create_api(LocalBackend(server), SETTINGS), raise_server_exceptions=False) as client:
        client.server = server
        yield client


@settings(max_examples=60, **FUZZ_SETTINGS)
@given(body=st.one_of(requests().map(serialize), bodies))
def test_fuzz_tiny_model_never_5xx(model_client, body):
    fuzz(model_client, body)


def test_tiny_model_serves_after_the_fuzz(model_client):
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                    {"type": "text", "text": "Colour?"},
                ],
            }
        ],
        "temperature": 1.0,
        "max_tokens": 4,
    }
    for _ in range(3):
        response = model_client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
    scheduler = model_client.server.scheduler
    assert scheduler._task is not None and not scheduler._task.done()  # the loop is alive


# ----------------------------------------------------------------------------------------------- schemathesis

schema = schemathesis.openapi.from_asgi("/openapi.json", create_api(FakeBackend(), SETTINGS))


def test_openapi_documents_the_chat_request():
    raw = schema.raw_schema
    body = raw["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert "compression" in raw["components"]["schemas"]["ChatCompletionRequest"]["properties"]


@schema.parametrize()
@settings(max_examples=40, **FUZZ_SETTINGS)
def test_schemathesis_never_5xx(case):
    check_response(case.call(), chat=case.path == "/v1/chat/completions")
