"""Prometheus metrics of the endpoint (serve_apps.metrics).

Without Ray: the ingress over a fake backend records one `RequestRecord` per chat request, with the status the
client got and its outcome, for answers, refusals, in-stream errors and `n` choices. With a real local Ray: the
tiny app served by Ray Serve, an answer with an image and a 400, then Ray's metrics agent is scraped until the
`ray_dpn_*` series show them, with the engine-step gauges recorded from the driver.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from serve_cluster import free_port, served_tiny_app

from serve_apps.api import Overloaded, Settings, create_api
from serve_apps.events import DeltaEvent, ErrorEvent, FinalEvent, StartEvent
from serve_apps.limits import Limits
from serve_apps.metrics import RequestRecord

HI = [{"role": "user", "content": "hi"}]
USAGE = {
    "prompt_tokens": 10,
    "completion_tokens": 3,
    "total_tokens": 13,
    "visual_tokens_per_layer": [16, 16, 4],
    "compression_per_pooling_layer": [4, None],
    "compression_requested": "auto",
    "prefill_flops": 60.0,
    "prefill_flops_dense": 100.0,
    "prefill_flops_saved": 0.4,
}


class ListSink:
    def __init__(self) -> None:
        self.records: list[RequestRecord] = []

    def record_request(self, record: RequestRecord) -> None:
        self.records.append(record)


class ScriptedBackend:
    """`mode`: ok | overloaded | prompt_error | fails_mid_stream."""

    mode = "ok"

    async def generate(self, request):
        if self.mode == "overloaded":
            raise Overloaded("queue full")
        if self.mode == "prompt_error":
            yield ErrorEvent("the prompt is too long", status=400, param="messages", code="prompt_too_long")
            return
        yield StartEvent(prompt_tokens=10, fingerprint="v1")
        yield DeltaEvent(text="a red ")
        if self.mode == "fails_mid_stream":
            yield ErrorEvent("row failed", status=500, code="generation_failed")
            return
        yield DeltaEvent(text="big ")
        yield FinalEvent(text="circle", full_text="a red big circle", finish_reason="stop", usage=USAGE)

    async def info(self):
        return {"model": "/ckpt", "version": "v1", "compression_factors": [1, 2, 4]}

    async def batches(self, limit):
        return []


@pytest.fixture()
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture()
def sink() -> ListSink:
    return ListSink()


@pytest.fixture()
def client(backend, sink) -> TestClient:
    settings = Settings(
        limits=Limits(max_tokens=32, default_max_tokens=8), api_key_env="DPN_METRICS_TEST_KEY", auth="none"
    )
    return TestClient(create_api(backend, settings, sink))


def chat(client: TestClient, **body: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"messages": HI, **body})


def test_answer_is_recorded_with_latencies_tokens_and_routing(client, sink):
    assert chat(client).status_code == 200
    (record,) = sink.records
    assert (record.status, record.outcome, record.compression) == (200, "stop", "auto")
    assert record.answered and record.prompt_tokens == 10 and record.usages == [USAGE]
    assert 0 <= record.ttft_s <= record.e2e_s and record.tpot_s >= 0


@pytest.mark.parametrize("stream", [False, True])
def test_refusals_are_recorded_with_status_and_code(client, backend, sink, monkeypatch, stream):
    assert chat(client, max_tokens=0, stream=stream).status_code == 400
    backend.mode = "prompt_error"
    assert chat(client, stream=stream).status_code == 400
    backend.mode = "overloaded"
    assert chat(client, stream=stream).status_code == 503
    monkeypatch.setenv("DPN_METRICS_TEST_KEY", "secret")
    settings = Settings(api_key_env="DPN_METRICS_TEST_KEY")
    assert (
        TestClient(create_api(backend, settings, sink)).post("/v1/chat/completions", json={}).status_code
        == 401
    )
    got = [(r.status, r.outcome, r.answered, r.usages) for r in sink.records]
    assert got == [
        (400, "invalid_value", False, []),
        (400, "prompt_too_long", False, []),
        (503, "overloaded", False, []),
        (401, "missing_api_key", False, []),
    ]


def test_stream_is_recorded_when_it_ends(client, backend, sink):
    with client.stream("POST", "/v1/chat/completions", json={"messages": HI, "stream": True}) as response:
        assert response.status_code == 200
        assert sink.records == []  # the answer is still streaming
        body = response.read().decode()
    assert body.endswith("data: [DONE]\n\n")
    assert [(r.status, r.outcome, r.compression) for r in sink.records] == [(200, "stop", "auto")]
    backend.mode = "fails_mid_stream"
    chat(client, stream=True)
    assert (sink.records[-1].status, sink.records[-1].outcome) == (200, "generation_failed")


def test_n_choices_are_one_request_with_every_prefill(client, sink):
    assert chat(client, n=2).status_code == 200
    (record,) = sink.records
    assert record.outcome == "stop" and record.usages == [USAGE, USAGE] and record.prompt_tokens == 10


def test_without_a_sink_nothing_is_recorded(backend):
    assert (
        TestClient(create_api(backend, Settings(auth="none")))
        .post("/v1/chat/completions", json={"messages": HI})
        .status_code
        == 200
    )


# ------------------------------------------------------------------------------------------ real Ray


def _image_url() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("ray")
    metrics_port = free_port()
    os.environ["RAY_metrics_report_interval_ms"] = "500"  # noqa: SIM112 - Ray reads it so; workers inherit it
    try:
        with served_tiny_app(
            tmp_path_factory.mktemp("metrics"),
            {
                "api_key_env": "DPN_METRICS_TEST_UNSET_KEY",
                "batching": {"batch_wait_timeout_s": 0.01},
                "limits": {"default_max_tokens": 4},
                "model_options": {"ray_actor_options": {"num_cpus": 1}},
            },
            _metrics_export_port=metrics_port,
        ) as base:
            yield base, f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        os.environ.pop("RAY_metrics_report_interval_ms", None)


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of one series in Prometheus' text format: (labels, value)."""
    out = []
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
            out.append((labels, float(match.group(2))))
    return out


def _total(text: str, name: str, **labels: str) -> float:
    return sum(v for got, v in _samples(text, name) if all(got.get(k) == x for k, x in labels.items()))


def _in_bucket(text: str, name: str, value: float) -> float:
    """Observations of histogram `name` in the bucket that holds `value` (Ray re-records every observation at its
    bucket's midpoint, so `_sum` is approximate: buckets are what is exact)."""
    cumulative: dict[float, float] = {}
    for labels, count in _samples(text, name + "_bucket"):
        le = float(labels["le"])
        cumulative[le] = cumulative.get(le, 0.0) + count
    edges = sorted(cumulative)
    upper = next(i for i, le in enumerate(edges) if value <= le)
    return cumulative[edges[upper]] - (cumulative[edges[upper - 1]] if upper else 0.0)


def _scrape_until(url: str, ready, timeout_s: float = 45.0) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            text = ""
        if ready(text):
            return text
        time.sleep(0.5)
    dpn = "\n".join(line for line in text.splitlines() if "dpn_" in line)
    raise AssertionError(f"metrics not scraped within {timeout_s} s; dpn series:\n{dpn}")


@pytest.mark.ray
def test_metrics_are_scraped_from_rays_metrics_agent(served):
    base, metrics_url = served
    image = {"type": "image_url", "image_url": {"url": _image_url()}}
    messages = [{"role": "user", "content": [image, {"type": "text", "text": "what colour?"}]}]
    ok = httpx.post(
        base + "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 3, "ignore_eos": True},
        timeout=60,
    )
    assert ok.status_code == 200, ok.text
    usage = ok.json()["usage"]
    bad = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "max_tokens": 0}, timeout=30)
    assert bad.status_code == 400

    def ready(text: str) -> bool:
        return (
            _total(text, "ray_dpn_requests_total") >= 2
            and _total(text, "ray_dpn_batch_size_count", deployment="DPNServer") >= 1
            and _total(text, "ray_dpn_num_requests_running", deployment="DPNServer", rate="auto") == 0
            and _total(text, "ray_dpn_prefill_flops_saved_ratio_count") >= 1
        )

    text = _scrape_until(metrics_url, ready)
    assert _total(text, "ray_dpn_requests_total", status="200", outcome="length") == 1
    assert _total(text, "ray_dpn_requests_total", status="400", outcome="invalid_value") == 1
    (labels, _), *_ = _samples(text, "ray_dpn_requests_total")
    assert labels["deployment"] == "OpenAIIngress" and labels["application"] == "dpn"  # Serve's labels
    assert _total(text, "ray_dpn_time_to_first_token_seconds_count", compression="auto") == 1
    assert _total(text, "ray_dpn_time_per_output_token_seconds_count", compression="auto") == 1
    assert _total(text, "ray_dpn_e2e_request_latency_seconds_count", compression="auto") == 1
    assert _total(text, "ray_dpn_prompt_tokens_total") == usage["prompt_tokens"]
    assert _total(text, "ray_dpn_generation_tokens_total") == usage["completion_tokens"] == 3
    for layer, factor in enumerate(usage["compression_per_pooling_layer"]):
        expert = "skipped" if factor is None else str(factor)
        assert _total(text, "ray_dpn_expert_chosen_total", layer=str(layer), expert=expert) == 1
    assert _total(text, "ray_dpn_expert_chosen_total") == len(usage["compression_per_pooling_layer"]) > 0
    visual = usage["visual_tokens_per_layer"]
    assert _in_bucket(text, "ray_dpn_visual_tokens_kept_ratio", visual[-1] / visual[0]) == 1
    assert _total(text, "ray_dpn_prefill_flops_total") == pytest.approx(usage["prefill_flops"], rel=1e-6)
    assert _total(text, "ray_dpn_prefill_flops_dense_total") == pytest.approx(
        usage["prefill_flops_dense"], rel=1e-6
    )
    assert _in_bucket(text, "ray_dpn_prefill_flops_saved_ratio", usage["prefill_flops_saved"]) == 1
    # the replica's engine: one request decoded alone (every step a batch of 1), and the idle step after it left
    # the gauges at nothing waiting or running
    steps = _total(text, "ray_dpn_batch_size_count", deployment="DPNServer")
    assert steps >= 1 and _in_bucket(text, "ray_dpn_batch_size", 1) == steps
    assert _total(text, "ray_dpn_num_requests_waiting", deployment="DPNServer", rate="auto") == 0


def test_grafana_dashboard_queries_only_exported_metrics():
    """Every `ray_dpn_*` series the dashboard queries is one the endpoint exports (a renamed metric breaks it)."""
    from pathlib import Path

    from serve_apps.metrics import RayServeMetrics

    metrics = vars(RayServeMetrics()).values()
    exported = set()
    for metric in metrics:
        name = getattr(metric, "_name", None)
        if name is None:
            continue
        kind = type(metric).__name__
        suffixes = {"Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"], "Gauge": [""]}[kind]
        exported |= {f"ray_{name}{suffix}" for suffix in suffixes}
    dashboard = json.loads((Path(__file__).parents[1] / "deploy/grafana/dpn-dashboard.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"ray_dpn_\w+", target["expr"])
    }
    assert len(queried) >= 10 and queried <= exported, queried - exported
