"""Serving: the OpenAI-compatible API, per-rate batching, limits, auth, overload, model reload.

Most checks run the FastAPI app in-process over a fake backend (fast, no Ray). The rest go through the real Ray
Serve application on one local Ray cluster shared by the module, with a tiny random checkpoint, and the official
`openai` client.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from pydantic import ValidationError
from serve_cluster import free_port

from serve_apps.api import Overloaded, Settings, create_api
from serve_apps.events import DeltaEvent, ErrorEvent, FinalEvent, StartEvent
from serve_apps.limits import Limits
from serve_apps.policy import RETIRED_KEYS, BatchingConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def serve_load() -> Any:
    """benchmarks/serve_load.py as a module: its baseline scheduling policies and variant builder."""
    spec = importlib.util.spec_from_file_location(
        "serve_load", os.path.join(ROOT, "benchmarks", "serve_load.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- helpers


def png_bytes(width: int = 40, height: int = 30, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def flat_png(width: int, height: int) -> bytes:
    """A one-colour PNG: many pixels, few bytes."""
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_message(url: str, question: str = "What colour is the big shape?") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


class FakeBackend:
    """Streams a fixed answer; records what reached it. `mode`: ok | overloaded | prompt_error."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.mode = "ok"

    async def generate(self, request):
        self.requests.append(request)
        if self.mode == "overloaded":
            raise Overloaded("num_queued_requests=2, max_queued_requests=2")
        if self.mode == "prompt_error":
            yield ErrorEvent(
                status=400, message="the prompt is 999 tokens", param="messages", code="prompt_too_long"
            )
            return
        yield StartEvent(prompt_tokens=10, fingerprint="v1")
        yield DeltaEvent(text="a red ")
        usage = {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13, "prefill_flops_saved": 0.4}
        batch = {"id": 7, "queue": "4", "rate": 4, "size": 1, "requested": [4]}
        yield FinalEvent(
            text="circle",
            full_text="a red circle",
            finish_reason="stop",
            usage=usage,
            batch=batch,
            fingerprint="v1",
        )

    async def info(self):
        return {"model": "/ckpt", "version": "v1", "compression_factors": [1, 2, 4]}

    async def batches(self, limit):
        return []


@pytest.fixture()
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture()
def client(backend) -> TestClient:
    limits = Limits(max_image_bytes=20_000, max_image_pixels=200 * 200, max_tokens=32, default_max_tokens=8)
    return TestClient(create_api(backend, Settings(limits=limits, auth="none")))


def post(client: TestClient, body: Any, **kwargs) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body, **kwargs)


def assert_openai_error(response: httpx.Response, status: int, *needles: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


# ----------------------------------------------------------------------------------------------- API (no Ray)


def test_completion_passes_validated_request_to_backend(client, backend):
    body = {
        "model": "dpn",
        "messages": image_message(data_url(png_bytes())),
        "max_tokens": 5,
        "temperature": 0,
        "stop": "\n",
        "seed": 3,
        "compression": 4,
    }
    response = post(client, body)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "a red circle"}
    assert out["usage"]["prefill_flops_saved"] == 0.4
    assert response.headers["x-dpn-batch-rate"] == "4"
    sent = backend.requests[0]
    assert (
        sent["compression"] == 4 and sent["max_tokens"] == 5 and sent["stop"] == ["\n"] and sent["seed"] == 3
    )
    assert [image.shape for image in sent["images"]] == [(30, 40, 3)]  # decoded once, in the ingress
    assert np.array_equal(
        sent["images"][0], np.asarray(PIL.Image.open(io.BytesIO(png_bytes())).convert("RGB"))
    )
    assert sent["messages"][0]["content"][0] == {"type": "image_url"}


def test_defaults_and_raw_base64(client, backend):
    raw = base64.b64encode(png_bytes()).decode()
    assert post(client, {"messages": image_message(raw)}).status_code == 200
    sent = backend.requests[0]
    assert (
        sent["compression"] == "auto" and sent["max_tokens"] == 8 and sent["images"][0].shape == (30, 40, 3)
    )


def test_stream_is_openai_sse(client):
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "a red circle"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"]["total_tokens"] == 13


BAD_REQUESTS = [
    ("missing messages", {"max_tokens": 3}, "missing required field 'messages'"),
    ("empty messages", {"messages": []}, "messages"),
    ("messages wrong type", {"messages": "hello"}, "messages"),
    (
        "max_tokens wrong type",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"},
        "max_tokens",
    ),
    (
        "temperature out of range",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 7},
        "temperature",
    ),
    ("stream wrong type", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    (
        "unknown part type",
        {"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
        "messages.0.content",
    ),
    # the form is checked here; whether the model has a factor or that many pooling layers, on the replica
    (
        "compression random",
        {"messages": [{"role": "user", "content": "hi"}], "compression": "random"},
        "not served",
    ),
    (
        "compression schedule with a boolean",
        {"messages": [{"role": "user", "content": "hi"}], "compression": [1, True, 4]},
        "compression",
    ),
    (
        "compression string",
        {"messages": [{"role": "user", "content": "hi"}], "compression": "max"},
        "compression",
    ),
    (
        "max_tokens over limit",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 33},
        "limit of 32",
    ),
    (
        "invalid base64",
        {"messages": image_message("data:image/png;base64,@@@not-base64@@@")},
        "not valid base64",
    ),
    ("raw text not base64", {"messages": image_message("hello there!")}, "not valid base64"),
    (
        "not an image",
        {"messages": image_message(data_url(b"just some text, not pixels"))},
        "not a readable image",
    ),
    ("non-image media type", {"messages": image_message(data_url(b"abc", "text/plain"))}, "not an image"),
    (
        "ftp scheme",
        {"messages": image_message("ftp://example.com/cat.png")},
        "unsupported image URL scheme 'ftp'",
    ),
    ("file scheme", {"messages": image_message("file:///etc/passwd")}, "unsupported image URL scheme 'file'"),
    (
        "remote url disabled",
        {"messages": image_message("https://example.com/cat.png")},
        "remote image URLs are disabled",
    ),
    (
        "too many pixels",
        {"messages": image_message(data_url(flat_png(300, 300)))},
        "more than the limit of 40000 pixels",
    ),
    (
        "too many bytes",
        {"messages": image_message(data_url(png_bytes(190, 190, fmt="BMP"), "image/bmp"))},
        "more than the limit of 20000 bytes",
    ),
    (
        "too many images",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                        {"type": "image_url", "image_url": {"url": data_url(png_bytes())}},
                        {"type": "text", "text": "?"},
                    ],
                }
            ]
        },
        "too many images",
    ),
    (
        "image in assistant turn",
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes())}}],
                },
                {"role": "user", "content": "?"},
            ]
        },
        "only accepted in user messages",
    ),
    (
        "last message not user",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        "last message",
    ),
    ("truncated png", {"messages": image_message(data_url(png_bytes()[:60]))}, "image"),
]


@pytest.mark.parametrize(("name", "body", "needle"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_is_openai_400(client, backend, name, body, needle):
    error = assert_openai_error(post(client, body), 400, needle)
    assert error["type"] == "invalid_request_error"
    assert backend.requests == []  # never reached the model
    assert post(client, {"messages": [{"role": "user", "content": "still serving?"}]}).status_code == 200


def test_body_not_json_is_400(client):
    response = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 400, "not valid JSON")


def test_unknown_model_is_404_and_unknown_route_is_openai_error(client):
    error = assert_openai_error(
        post(client, {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404
    )
    assert error["code"] == "model_not_found"
    assert_openai_error(client.get("/v1/nothing"), 404)


def test_prompt_error_from_replica_is_400(client, backend):
    backend.mode = "prompt_error"
    error = assert_openai_error(
        post(client, {"messages": [{"role": "user", "content": "x"}]}), 400, "999 tokens"
    )
    assert error["code"] == "prompt_too_long"


def test_overload_is_503_with_retry_after(client, backend):
    backend.mode = "overloaded"
    for stream in (False, True):
        response = post(client, {"messages": [{"role": "user", "content": "x"}], "stream": stream})
        error = assert_openai_error(response, 503, "overloaded")
        assert error["type"] == "server_overloaded"
        assert response.headers["retry-after"] == "1"


def test_api_key(backend, monkeypatch):
    monkeypatch.setenv("DPN_TEST_KEY", "s3cret")
    client = TestClient(create_api(backend, Settings(api_key_env="DPN_TEST_KEY")))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(post(client, body), 401, "missing API key")
    assert_openai_error(
        post(client, body, headers={"Authorization": "Bearer wrong"}), 401, "incorrect API key"
    )
    assert_openai_error(client.get("/v1/models"), 401)
    assert post(client, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health").status_code == 200  # load balancers probe without a key
    assert backend.requests and len(backend.requests) == 1


def test_auth_none_means_open(client):
    assert post(client, {"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "dpn" and models["data"][0]["compression"] == ["auto", 1, 2, 4]
    assert client.get("/health").json()["auth"] == "none"


def test_openai_client_against_in_process_app(client):
    from openai import OpenAI

    oai = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    out = oai.chat.completions.create(
        model="dpn", messages=image_message(data_url(png_bytes())), extra_body={"compression": 2}
    )
    assert out.choices[0].message.content == "a red circle"
    assert out.usage.model_extra["prefill_flops_saved"] == 0.4


def test_unknown_limit_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown config key limits\.max_image_byte .*valid keys"):
        Limits.from_dict({"max_image_byte": 1})


@pytest.mark.parametrize("name", ["serve_tiny.yaml", "serve_llava7b.yaml"])
def test_serve_configs_are_valid(name):
    from ray.serve.schema import ServeDeploySchema

    from serve_apps.app import AppArgs

    with open(os.path.join(ROOT, "configs", name)) as f:
        config = yaml.safe_load(f)
    ServeDeploySchema.model_validate(config)
    app = config["applications"][0]
    assert app["import_path"] == "serve_apps.app:build_app"
    args = AppArgs.model_validate(app["args"])  # its sections too: batching and limits are typed
    assert not set(app["args"].get("batching", {})) & set(RETIRED_KEYS)  # each key set does something
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"DPNServer", "OpenAIIngress"}
    for deployment in deployments.values():
        assert {
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "upscale_delay_s",
            "downscale_delay_s",
        } <= set(deployment["autoscaling_config"])
    if "7b" in name:
        assert deployments["DPNServer"]["ray_actor_options"]["num_gpus"] == 1 and args.dtype == "bfloat16"


# ----------------------------------------------------------------------------------------------- generation engine


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    from dpn_model.presets import create_checkpoint

    root = tmp_path_factory.mktemp("serve_ckpt")
    return create_checkpoint("tiny", str(root / "v1"), seed=0), create_checkpoint(
        "tiny", str(root / "v2"), seed=1
    )


@pytest.fixture(scope="module")
def tiny(checkpoints):
    from serve_apps.loading import load_model

    return load_model(checkpoints[0], device="cpu")


def prepared_request(processor, question: str = "Colour?", **overrides):
    """An image question through the replica's `prepare`, as the scheduler receives it."""
    from serve_apps.generation import prepare

    request = {
        "messages": image_message("x", question),
        "images": [png_bytes(seed=len(question))],
        "max_tokens": 6,
        "temperature": 0.0,
        "compression": 2,
        **overrides,
    }
    return prepare(processor, request, max_prompt_tokens=4096)


def _run(model, processor, items, rate):
    from serve_apps.generation import BatchRun

    run = BatchRun(model, processor, items, rate, "test")
    finals = {}
    for events in [run.prefill()] + [None] * 64:
        events = events if events is not None else (run.step() if not run.done else [])
        for i, event in enumerate(events):
            if isinstance(event, FinalEvent):
                finals[i] = event
        if run.done:
            break
    return run, [finals[i] for i in range(len(items))]


def test_batched_left_padded_generation_matches_generate(tiny):
    model, processor = tiny
    items = [
        prepared_request(processor, "Colour?"),
        prepared_request(processor, "How many small shapes are in the picture?"),
    ]
    run, finals = _run(model, processor, items, 2)
    for item, row in zip(items, run.rows):
        reference = model.generate(
            input_ids=torch.tensor([item.input_ids]),
            pixel_values=item.pixel_values,
            compression=2,
            max_new_tokens=6,
            do_sample=False,
        )
        expected = reference[0, len(item.input_ids) :].tolist()
        assert (
            row.generated
            == [t for t in expected if t != processor.tokenizer.eos_token_id][: len(row.generated)]
        )
    usage = finals[0].usage
    assert usage["compression_per_pooling_layer"] == [2, 2, 2]
    assert usage["visual_tokens_per_layer"] == [256, 128, 64, 32]
    assert 0.2 < usage["prefill_flops_saved"] < 0.5


def test_logprobs_are_the_models_log_softmax(tiny):
    import math

    model, processor = tiny
    item = prepared_request(processor, "Colour?", max_tokens=4, logprobs=True, top_logprobs=3)
    run, (final,) = _run(model, processor, [item], 1)
    entries = final.logprobs
    assert len(entries) == len(run.rows[0].generated) >= 1
    for token, entry in zip(run.rows[0].generated, entries):
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted(
            (t["logprob"] for t in top), reverse=True
        )
        assert entry["logprob"] == top[0]["logprob"] <= 0  # greedy: the chosen token is the most likely
        assert entry["token"] == processor.tokenizer.decode([token]) and entry["bytes"] == list(
            entry["token"].encode()
        )
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-5
    plain = _run(model, processor, [prepared_request(processor, "Colour?", max_tokens=4)], 1)[1][0]
    assert plain.logprobs is None and plain.full_text == final.full_text


def test_sampling_params_stop_and_seed(tiny):
    model, processor = tiny
    greedy = _run(model, processor, [prepared_request(processor, "Colour?", max_tokens=8)], 1)[1][0]
    assert greedy.finish_reason in ("length", "stop") and greedy.usage["compression_run"] == 1
    if len(greedy.full_text) > 2:
        stop = greedy.full_text[1:3]
        stopped = _run(
            model, processor, [prepared_request(processor, "Colour?", max_tokens=8, stop=[stop])], 1
        )[1][0]
        assert stopped.finish_reason == "stop" and stop not in stopped.full_text
        assert greedy.full_text.startswith(stopped.full_text)
    sampled = [prepared_request(processor, "Colour?", temperature=1.0, top_p=0.9, seed=11) for _ in range(2)]
    a, b = _run(model, processor, sampled, 4)[1]
    assert a.full_text == b.full_text  # same seed, same text, even in one batch


def test_reserved_tokens_and_long_prompts_are_prompt_errors(tiny):
    from serve_apps.generation import PromptError, prepare

    _, processor = tiny
    with pytest.raises(PromptError, match="reserved token"):
        prepared_request(processor, "tell me <router> now")
    with pytest.raises(PromptError, match="limit of 300"):
        prepare(
            processor,
            {
                "messages": image_message("x", "word " * 200),
                "images": [png_bytes()],
                "max_tokens": 4,
                "compression": 1,
            },
            max_prompt_tokens=300,
        )


def _schedule(tiny, mode: str, rates: list) -> list[dict[str, Any]]:
    """Submit requests of `rates` at once to a Scheduler (no Ray); return the batch records. `mode`: `bucketed`
    (production's policy) or `mixed` (the one-queue baseline of benchmarks/serve_load.py)."""
    import asyncio

    from serve_apps.compression import for_model
    from serve_apps.scheduler import Scheduler

    model, processor = tiny
    records: list[dict[str, Any]] = []
    config = BatchingConfig(batch_wait_timeout_s=0.05)
    policy = serve_load().MixedPolicy(config) if mode == "mixed" else None
    items = [  # each rate as the replica makes it on arrival (its one parse), then taken as it is
        prepared_request(processor, f"Question {i}?", compression=for_model(rate, model.config), max_tokens=2)
        for i, rate in enumerate(rates)
    ]

    async def main():
        scheduler = Scheduler(config, lambda: (model, processor, "v"), records.append, policy=policy)

        async def one(item):
            return [event async for event in scheduler.submit(item)]

        return await asyncio.gather(*(one(item) for item in items))

    outputs = asyncio.run(main())
    for item, events in zip(items, outputs):
        final = events[-1]
        assert isinstance(final, FinalEvent) and final.usage["compression_requested"] == item.compression
    return records


def test_scheduler_batches_hold_one_rate(tiny):
    rates = ["auto", 1, 2, 4, 4, 2, 1, "auto", 4, 4]
    records = _schedule(tiny, "bucketed", rates)
    assert sum(r["size"] for r in records) == len(rates)
    for record in records:
        assert set(record["requested"]) == {record["rate"]}, record
    assert any(r["size"] > 1 for r in records)
    # the one-queue baseline does mix rates in a batch and runs it at the densest rate needed
    mixed = _schedule(tiny, "mixed", rates)
    assert any(len(set(r["requested"])) > 1 for r in mixed)
    assert all(r["rate"] == serve_load().batch_rate(r["requested"]) for r in mixed)


# ------------------------------------------------------------------------------------------- compression schedules

HELLO = [{"role": "user", "content": "hi"}]
COMPRESSION_FORMS = [
    ("2", 2),
    (" 4 ", 4),
    ("AUTO", "auto"),
    ([1, 2, 4], [1, 2, 4]),
    ("1,2,4", [1, 2, 4]),
    ("1-2-4", [1, 2, 4]),
    ("[1, 2, 4]", [1, 2, 4]),
    (["1", "2", "4"], [1, 2, 4]),
    ("auto:lambda=0.5", "auto:lambda=0.5"),  # the cost dial, in its canonical spelling
    ("auto:lambda=+2.0", "auto:lambda=2"),
    ("auto:lambda=0", "auto"),
]


@pytest.mark.parametrize(("given", "sent"), COMPRESSION_FORMS, ids=[repr(f[0]) for f in COMPRESSION_FORMS])
def test_compression_forms_reach_the_replica_parsed(client, backend, given, sent):
    assert post(client, {"messages": HELLO, "compression": given}).status_code == 200
    assert backend.requests[0]["compression"] == sent


@pytest.mark.parametrize("given", ["auto:lambda=x", "auto:lambda=nan", "auto:lambda="])
def test_a_malformed_cost_dial_is_400_naming_compression(client, backend, given):
    response = post(client, {"messages": HELLO, "compression": given})
    assert response.status_code == 400 and response.json()["error"]["param"] == "compression"
    assert "auto:lambda=X" in response.json()["error"]["message"] and not backend.requests


def test_default_compression_and_cli_flag_take_a_schedule(backend, capsys):
    from serve_apps.app import AppArgs
    from serve_apps.commands import _compression, add_arguments

    args = AppArgs.model_validate({"model": "m", "default_compression": "1,2,4"})
    assert args.default_compression == [1, 2, 4]
    settings = Settings(default_compression=args.default_compression, auth="none")
    assert post(TestClient(create_api(backend, settings)), {"messages": HELLO}).status_code == 200
    assert backend.requests[0]["compression"] == [1, 2, 4]

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flag, parsed in [("1-2-4", [1, 2, 4]), ("[4, 2, 1]", [4, 2, 1]), ("2", 2), ("auto", "auto")]:
        assert (
            parser.parse_args(["--model", "m", "--compression-default", flag]).compression_default == parsed
        )
    assert parser.parse_args(["--model", "m"]).compression_default == "auto"
    for bad in ("random", "\u00b2", "1,,2", "true", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match="compression"):
            _compression(bad)
        with pytest.raises(ValidationError, match="compression"):
            AppArgs.model_validate({"model": "m", "default_compression": bad})
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--compression-default", "random"])
    assert "not served" in capsys.readouterr().err
    with pytest.raises(ValidationError, match="compression"):
        AppArgs.model_validate({"model": "m", "default_compression": [1, True, 4]})


class LocalBackend:
    """`serve_apps.api.Backend` over a `DPNServer` in this process: the replica's own checks and batches."""

    def __init__(self, server):
        self.server = server

    def generate(self, request):
        return self.server.generate(request)

    async def info(self):
        return self.server.info()

    async def batches(self, limit):
        return self.server.batches(limit)


@pytest.fixture(scope="module")
def local(checkpoints):
    """The API over a replica of the tiny model, without Ray."""
    from serve_apps.model import DPNServer

    server = DPNServer(
        batching=BatchingConfig(batch_wait_timeout_s=0.02),
        device="cpu",
        dtype="float32",
        model=checkpoints[0],
    )
    with TestClient(create_api(LocalBackend(server), Settings(auth="none"))) as client:
        client.server = server
        yield client


@pytest.mark.parametrize("schedule", [[1, 2, 4], "1,2,4"], ids=["list", "string"])
def test_schedule_request_runs_its_pyramid(local, schedule):
    from dpn_model import flops

    config = local.server._require_model()[0].config
    body = {
        "messages": image_message(data_url(png_bytes())),
        "max_tokens": 2,
        "temperature": 0,
        "compression": schedule,
    }
    response = post(local, body)
    assert response.status_code == 200, response.text
    out = response.json()
    usage = out["usage"]
    assert usage["compression_per_pooling_layer"] == [1, 2, 4]
    assert usage["compression_requested"] == usage["compression_run"] == "1-2-4"
    # the layers' visual tokens and the FLOPs as the FLOPs model predicts them for this schedule
    expected = flops.visual_tokens_per_layer(config, [1, 2, 4])
    assert usage["visual_tokens_per_layer"] == expected and expected[0] == config.num_visual_tokens
    assert expected != flops.visual_tokens_per_layer(config, 1) != flops.visual_tokens_per_layer(config, 4)
    text_len = usage["prompt_tokens"] - config.num_visual_tokens
    estimate = flops.estimate(config, text_len, [1, 2, 4], lm_head_tokens=1)
    assert usage["prefill_flops"] == pytest.approx(estimate["total"], rel=1e-6)
    assert out["dpn_batch"]["rate"] == "1-2-4" and response.headers["x-dpn-batch-rate"] == "1-2-4"
    record = [b for b in local.get("/v1/dpn/batches").json()["data"] if b["id"] == out["dpn_batch"]["id"]]
    assert record and record[0]["rate"] == record[0]["queue"] == "1-2-4"
    assert record[0]["requested"] == ["1-2-4"]
    model_card = local.get("/v1/models").json()["data"][0]
    assert model_card["compression"] == ["auto", *config.compression_factors]
    assert model_card["compression_schedule_length"] == len(config.pooling_layers)


def test_replica_version_and_model_card_name_no_path(local, checkpoints):
    """A model served without `version` is labelled by a hash of its ref: clients never see its local path."""
    import json

    health = local.get("/health").json()
    assert health["model"] == "dpn" and health["version"].startswith("model-")
    answer = post(local, {"messages": HELLO, "max_tokens": 1}).json()
    assert answer["system_fingerprint"] == health["version"]
    for text in (json.dumps(health), local.get("/v1/models").text, json.dumps(answer)):
        assert checkpoints[0] not in text


SCHEDULES_THE_MODEL_CANNOT_RUN = [
    ("unknown factor", 3, "factor(s) [3]"),
    ("unknown factor as text", "3", "factor(s) [3]"),
    ("unknown factor in a schedule", [1, 2, 8], "factor(s) [8]"),
    ("schedule too short", [1, 2], "has 2 factor(s)"),
    ("schedule too long", "1,2,4,4", "has 4 factor(s)"),
]


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    SCHEDULES_THE_MODEL_CANNOT_RUN,
    ids=[s[0] for s in SCHEDULES_THE_MODEL_CANNOT_RUN],
)
def test_compression_the_model_cannot_run_is_400_naming_it(local, name, value, needle):
    response = post(local, {"messages": HELLO, "max_tokens": 1, "compression": value})
    error = assert_openai_error(response, 400, needle, "This model serves", "[1, 2, 4]", "3 factor(s)")
    assert error["param"] == "compression" and error["type"] == "invalid_request_error"


def test_replica_serves_after_refused_schedules(local):
    assert post(local, {"messages": HELLO, "max_tokens": 1, "compression": [1, 2]}).status_code == 400
    assert post(local, {"messages": HELLO, "max_tokens": 1, "compression": "4-2-1"}).status_code == 200


def test_default_compression_the_model_cannot_run_fails_its_load(checkpoints):
    from serve_apps.model import DPNServer

    with pytest.raises(ValueError, match=r"default_compression \[1, 2\].*This model serves"):
        DPNServer(device="cpu", model=checkpoints[0], default_compression=[1, 2])


def test_one_schedule_one_queue_whatever_its_form(tiny):
    rates = ["1-2-4", [1, 2, 4], "1,2,4", [2, 2, 2], 2, "4-2-1"]
    records = _schedule(tiny, "bucketed", rates)
    assert sum(r["size"] for r in records) == len(rates)
    for record in records:
        assert set(record["requested"]) == {record["rate"]} and record["queue"] == str(record["rate"])
    sizes = {record["rate"]: 0 for record in records}
    for record in records:
        sizes[record["rate"]] += record["size"]
    assert sizes == {"1-2-4": 3, 2: 2, "4-2-1": 1}  # [2, 2, 2] is factor 2: the same computation, its queue
    mixed = _schedule(tiny, "mixed", rates)
    assert all(r["rate"] == serve_load().batch_rate(r["requested"]) for r in mixed)
    assert any(isinstance(r["rate"], str) and "-" in r["rate"] for r in mixed)


# ----------------------------------------------------------------------------------------------- real Ray Serve

API_KEY = "test-key-123"


def _app_args(model: str, version: str, **extra) -> dict[str, Any]:
    return {
        "model": model,
        "version": version,
        "device": "cpu",
        "api_key_env": "DPN_SERVE_TEST_KEY",
        "batching": {"batch_wait_timeout_s": 0.2},
        "limits": {"max_prompt_tokens": 400, "max_tokens": 16, "default_max_tokens": 8},
        "model_options": {"ray_actor_options": {"num_cpus": 1}},
        **extra,
    }


@pytest.fixture(scope="module")
def served(checkpoints):
    """The app on a local Ray cluster (once per module); yields its base URL."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from serve_apps.app import build_app

    os.environ["DPN_SERVE_TEST_KEY"] = API_KEY  # inherited by the local cluster's workers
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(_app_args(checkpoints[0], "v1")), name="dpn", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("DPN_SERVE_TEST_KEY", None)


def _openai(base: str):
    from openai import OpenAI

    return OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.ray
def test_ray_openai_client_new_fields(served):
    """n, max_completion_tokens, logprobs, stream_options.include_usage and an unsupported field, end to end."""
    import openai

    oai = _openai(served)
    messages = image_message(data_url(png_bytes()))
    common = {"model": "dpn", "messages": messages, "temperature": 0, "max_completion_tokens": 4}
    out = oai.chat.completions.create(n=2, logprobs=True, top_logprobs=2, **common)
    assert [c.index for c in out.choices] == [0, 1]
    assert out.choices[0].message.content == out.choices[1].message.content  # temperature 0: identical
    completion = sum(len(c.logprobs.content) for c in out.choices)
    assert 1 <= out.usage.completion_tokens <= 8 and out.usage.completion_tokens == completion
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    entry = out.choices[0].logprobs.content[0]
    assert len(entry.top_logprobs) == 2 and entry.logprob == entry.top_logprobs[0].logprob
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **common))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == out.usage.completion_tokens // 2
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == out.choices[0].message.content
    )
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(response_format={"type": "json_object"}, **common)
    assert "response_format" in info.value.message


@pytest.mark.ray
def test_ray_openai_client_completion_and_stream(served):
    oai = _openai(served)
    messages = image_message(data_url(png_bytes()))
    out = oai.chat.completions.create(
        model="dpn", messages=messages, max_tokens=6, temperature=0, extra_body={"compression": 4}
    )
    assert out.object == "chat.completion" and out.system_fingerprint == "v1"
    assert out.choices[0].finish_reason in ("stop", "length")
    usage = out.usage.model_extra
    assert out.usage.prompt_tokens > 256 and 1 <= out.usage.completion_tokens <= 6
    assert usage["visual_tokens_per_layer"] == [256, 64, 16, 4]
    assert usage["compression_per_pooling_layer"] == [4, 4, 4] and usage["prefill_flops_saved"] > 0.3
    assert out.model_extra["dpn_batch"]["rate"] == 4

    chunks = list(
        oai.chat.completions.create(
            model="dpn",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"compression": 4},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens

    models = oai.models.list()
    assert [m.id for m in models.data] == ["dpn"]


@pytest.mark.ray
def test_ray_batches_never_mix_rates(served):
    oai = _openai(served)
    rates = ["auto", 1, 2, 4] * 5
    before = {b["id"] for b in httpx.get(served + "/v1/dpn/batches", headers=_auth()).json()["data"]}

    def ask(i_rate):
        i, rate = i_rate
        out = oai.chat.completions.create(
            model="dpn",
            messages=image_message(data_url(png_bytes(seed=i))),
            max_tokens=3,
            temperature=0,
            extra_body={"compression": rate},
        )
        return rate, out.model_extra["dpn_batch"], out.usage.model_extra

    with ThreadPoolExecutor(len(rates)) as pool:
        results = list(pool.map(ask, enumerate(rates)))
    for rate, batch, usage in results:
        assert batch["rate"] == rate and usage["compression_run"] == rate
        if rate != "auto":
            assert set(usage["compression_per_pooling_layer"]) == {rate}
    batches = [
        b
        for b in httpx.get(served + "/v1/dpn/batches", headers=_auth()).json()["data"]
        if b["id"] not in before
    ]
    assert sum(b["size"] for b in batches) == len(rates)
    for batch in batches:
        assert set(batch["requested"]) == {batch["rate"]}, batch
    assert max(b["size"] for b in batches) > 1  # requests really were batched together


@pytest.mark.ray
def test_ray_errors_auth_and_keeps_serving(served):
    url = served + "/v1/chat/completions"
    good = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_openai_error(httpx.post(url, json=good), 401, "missing API key")
    assert_openai_error(httpx.post(url, json=good, headers={"Authorization": "Bearer nope"}), 401)
    bad_image = {"messages": image_message("data:image/png;base64,%%%"), "max_tokens": 2}
    assert_openai_error(httpx.post(url, json=bad_image, headers=_auth()), 400, "not valid base64")
    assert_openai_error(httpx.post(url, json={"max_tokens": 2}, headers=_auth()), 400, "messages")
    long_prompt = {"messages": image_message(data_url(png_bytes()), "why " * 200), "max_tokens": 2}
    error = assert_openai_error(
        httpx.post(url, json=long_prompt, headers=_auth(), timeout=60), 400, "limit of 400"
    )
    assert error["code"] == "prompt_too_long"  # checked on the replica, which owns the tokenizer
    answer = httpx.post(url, json=good, headers={**_auth(), "x-request-id": "client-7"}, timeout=60)
    assert answer.status_code == 200 and answer.headers.get_list("x-request-id") == ["client-7"]
    health = httpx.get(served + "/health")
    assert health.json()["status"] == "ok" and health.json()["auth"] == "api_key"
    assert len(health.headers.get_list("x-request-id")) == 1  # Serve's proxy's, not one more of ours


@pytest.mark.ray
def test_ray_reconfigure_swaps_model_while_serving(served, checkpoints):
    from ray import serve

    url = served + "/v1/chat/completions"
    body = {"messages": image_message(data_url(png_bytes())), "max_tokens": 2, "temperature": 0}
    seen: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def traffic():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                response = http.post(url, json=body, headers=_auth())
                seen.append((response.status_code, response.json().get("system_fingerprint")))

    first = httpx.post(url, json=body, headers=_auth(), timeout=60).json()
    replica = first["dpn_batch"]["replica"]
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(1.0)
        # what `serve deploy` does for a changed user_config of DPNServer: reconfigure() on the running replica
        handle = serve.get_deployment_handle("DPNServer", app_name="dpn")
        handle.reconfigure.remote({"model": checkpoints[1], "version": "v2"}).result(timeout_s=120)
        deadline = time.time() + 60
        while time.time() < deadline and httpx.get(served + "/health").json().get("version") != "v2":
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert all(status == 200 for status, _ in seen), seen
    fingerprints = [fp for _, fp in seen]
    assert "v1" in fingerprints and fingerprints[-1] == "v2"
    card = httpx.get(served + "/v1/models", headers=_auth()).json()["data"][0]
    assert card["version"] == "v2" and card["root"] == "dpn"  # the checkpoint's path stays on the server
    # swapped in place by reconfigure(), not by replacing the replica
    assert (
        httpx.get(served + "/v1/dpn/batches?limit=1", headers=_auth()).json()["data"][-1]["replica"]
        == replica
    )


@pytest.mark.ray
def test_ray_overload_is_503_with_retry_after(served, checkpoints):
    from ray import serve

    from serve_apps.app import build_app

    tight = _app_args(
        checkpoints[1],
        "v2",
        retry_after_s=3,
        model_options={
            "ray_actor_options": {"num_cpus": 1},
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
        },
    )
    serve.run(build_app(tight), name="dpn", route_prefix="/")
    body = {"messages": image_message(data_url(png_bytes())), "max_tokens": 16, "temperature": 0}

    def ask(_):
        response = httpx.post(served + "/v1/chat/completions", json=body, headers=_auth(), timeout=120)
        return response.status_code, response.headers.get("retry-after"), response.json()

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(ask, range(12)))
    statuses = [status for status, _, _ in results]
    assert 200 in statuses and 503 in statuses, statuses
    for status, retry_after, payload in results:
        if status == 503:
            assert retry_after == "3" and payload["error"]["type"] == "server_overloaded"
