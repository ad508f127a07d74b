"""Prometheus metrics of the endpoint, exported the Ray way (`ray.serve.metrics`), named in vLLM's style.

Ray collects the metrics of every process of a node in its metrics agent, which serves them to Prometheus at
`http://<node>:<metrics_export_port>/metrics` (`ray start --head --metrics-export-port=8080`, and
`--metrics-export-port` on each worker's `ray start`: a node setting, `ray.init()` only connects); Ray puts `ray_` before each name and Prometheus' `_total` after a counter's,
and adds the `deployment`, `replica` and `application` labels of the Serve replica that recorded it. So the counter
`dpn_requests` below is scraped as `ray_dpn_requests_total{status="200", outcome="stop", deployment=..., ...}`.
`RAY_metrics_report_interval_ms` (default 10 s) sets how often a process reports to the agent. Ray aggregates a
histogram by bucket and exports each observation at its bucket's midpoint: a histogram's buckets and `_count` are
exact, its `_sum` approximate (the FLOPs counters are the exact totals).

Two producers record:

- the ingress (serve_apps.api), once per chat request when it ends, through a [`RequestObservation`] that watches
  the request's backend events: requests by HTTP status and outcome, latencies, tokens, and DPN's routing as the
  replica reported it in each answer's `usage` (expert chosen per pooling layer, visual tokens kept, prefill FLOPs
  spent against dense);
- the replica's engine, once per step, through [`observe_engine_step`]: waiting and running requests per rate and
  the step's batch size.

The metric objects are created once per process, on first use ([`serve_metrics`]), inside the Serve replica that
records (so Serve's labels are set). Without Ray (the API's plain FastAPI tests) recording still works and goes
nowhere: Ray's metric objects keep their points in the process until a Ray worker exports them, and none does;
`create_api` without a sink records nothing at all.

| metric (as scraped) | type | labels | what |
|---|---|---|---|
| `ray_dpn_requests_total` | counter | `status`, `outcome` | chat requests by HTTP status and outcome |
| `ray_dpn_e2e_request_latency_seconds` | histogram | `compression` | arrival to last token, answered requests |
| `ray_dpn_time_to_first_token_seconds` | histogram | `compression` | arrival to first generated token |
| `ray_dpn_time_per_output_token_seconds` | histogram | `compression` | mean time between output tokens, per request |
| `ray_dpn_prompt_tokens_total` | counter | | prompt tokens (images included) of answered requests |
| `ray_dpn_generation_tokens_total` | counter | | generated tokens of answered requests |
| `ray_dpn_expert_chosen_total` | counter | `layer`, `expert`, `compression` | pooling expert run per pooling layer |
| `ray_dpn_visual_tokens_kept_ratio` | histogram | `compression` | visual tokens after the last pooling / before the first |
| `ray_dpn_prefill_flops_total` | counter | `compression` | prefill FLOPs spent |
| `ray_dpn_prefill_flops_dense_total` | counter | `compression` | prefill FLOPs the same prompts cost dense |
| `ray_dpn_prefill_flops_saved_ratio` | histogram | `compression` | per prefill, 1 - spent / dense |
| `ray_dpn_num_requests_waiting` | gauge | `rate` | requests queued for prefill, per rate |
| `ray_dpn_num_requests_running` | gauge | `rate` | requests decoding, per rate |
| `ray_dpn_batch_size` | histogram | | rows an engine step decoded (its batch) |

`outcome` is the finish reason of an answer (`stop`, `length`; `length` when any of its `n` choices was cut),
`abort` when the client went away before the end, or the error's OpenAI `code` (`invalid_value`, `overloaded`,
`model_unavailable`, `generation_failed`, `internal_error`, ...). A stream that fails after its status line was
sent counts as `status="200"` with the in-stream error's code; a non-streaming request whose client disconnected
counts as `status="499"` (nginx's "client closed request"). `compression` is what the request asked for (`auto`,
a factor, a schedule's label `1-2-4`), `layer` the index of the pooling layer (0 = the first), `expert` the factor
it ran (`1`, `2`, `4`) or `skipped` (too few visual tokens left to pool). Routing and FLOPs are counted per
prefill: a request with `n` choices runs `n` of them.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve_apps.events import ErrorEvent, Event, FinalEvent, StartEvent

TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
"""Time-to-first-token buckets (vLLM's)."""
TPOT_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                  40.0, 80.0]  # fmt: skip
"""Time-per-output-token buckets (vLLM's)."""
E2E_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                 480.0, 960.0, 1920.0, 7680.0]  # fmt: skip
"""End-to-end latency buckets (vLLM's)."""
KEPT_RATIO_BUCKETS = [1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 1.0]
"""Visual-tokens-kept buckets: the pyramid's products of 1, 1/2 and 1/4 fall on their edges."""
SAVED_RATIO_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
"""FLOPs-saved buckets (a dense prefill, 0, falls in the first)."""
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
"""Engine step batch-size buckets."""


@dataclass(frozen=True)
class RequestRecord:
    """What one chat request leaves in the metrics when it ends.

    Attributes:
        status: The HTTP status the client got (499: it went away before a non-streamed answer).
        outcome: `stop`, `length`, `abort`, or the error's code.
        compression: What the request asked for (`auto`, `2`, `1-2-4`), as the replica reported it; None when
            no answer came back.
        e2e_s: Arrival to the last event, when answered.
        ttft_s: Arrival to the first generated token, when one came.
        tpot_s: Mean time between output tokens (first to last over tokens - 1), when more than one came.
        prompt_tokens: Prompt tokens, counted once per request (`usage.prompt_tokens`), when answered.
        usages: The `usage` of each answer's prefill (one per choice), as the replica reported it.
    """

    status: int
    outcome: str
    compression: str | None = None
    e2e_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    prompt_tokens: int = 0
    usages: list[dict[str, Any]] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.status == 200 and self.outcome in ("stop", "length")


class MetricsSink(Protocol):
    """Where the ingress sends its request records ([`RayServeMetrics`]; a test may keep them in a list)."""

    def record_request(self, record: RequestRecord) -> None:
        """Record one ended request."""


class RequestObservation:
    """Watches one chat request: its backend events (`event`, every choice's), then its end (`finish`, the first
    call wins), which sends a [`RequestRecord`] to the sink.

    Args:
        sink: Where the record goes; None records nothing.
    """

    def __init__(self, sink: MetricsSink | None):
        self.sink = sink
        self.start = time.perf_counter()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.finals: list[FinalEvent] = []
        self.prompt_tokens: int | None = None
        self.finished = False

    def event(self, event: Event) -> None:
        """Note a backend event as it arrives (a delta or final event is a generated token's arrival)."""
        now = time.perf_counter()
        if isinstance(event, StartEvent):
            self.prompt_tokens = event.prompt_tokens if self.prompt_tokens is None else self.prompt_tokens
            return
        if isinstance(event, ErrorEvent):
            return
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        if isinstance(event, FinalEvent):
            self.finals.append(event)

    def finish(self, status: int, outcome: str | None = None) -> None:
        """End the request: `status` as the client got it; `outcome` None for an answer (its finish reason)."""
        if self.finished:
            return
        self.finished = True
        if self.sink is None:
            return
        if outcome is None:
            reasons = {final.finish_reason for final in self.finals}
            outcome = "length" if "length" in reasons else (reasons.pop() if reasons else "no_result")
        record = RequestRecord(status, outcome)
        if record.answered and self.finals:
            record = self._answered(record)
        self.sink.record_request(record)

    def _answered(self, record: RequestRecord) -> RequestRecord:
        usages = [final.usage for final in self.finals]
        tokens = max(int(u.get("completion_tokens", 0)) for u in usages)
        first, last = self.first_token, self.last_token
        tpot = (
            (last - first) / (tokens - 1) if first is not None and last is not None and tokens > 1 else None
        )
        requested = usages[0].get("compression_requested")
        return RequestRecord(
            status=record.status,
            outcome=record.outcome,
            compression=None if requested is None else str(requested),
            e2e_s=(last or time.perf_counter()) - self.start,
            ttft_s=None if first is None else first - self.start,
            tpot_s=tpot,
            prompt_tokens=int(usages[0].get("prompt_tokens", self.prompt_tokens or 0)),
            usages=usages,
        )


class RayServeMetrics:
    """The endpoint's Ray metric objects (`ray.serve.metrics`); one per process, from [`serve_metrics`]."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        by_compression = ("compression",)
        self.requests = Counter(
            "dpn_requests", "Chat requests by HTTP status and outcome.", tag_keys=("status", "outcome")
        )
        self.e2e = Histogram(
            "dpn_e2e_request_latency_seconds",
            "Arrival to last token of answered requests.",
            E2E_BUCKETS_S,
            by_compression,
        )
        self.ttft = Histogram(
            "dpn_time_to_first_token_seconds", "Arrival to first token.", TTFT_BUCKETS_S, by_compression
        )
        self.tpot = Histogram(
            "dpn_time_per_output_token_seconds",
            "Mean time between output tokens, per request.",
            TPOT_BUCKETS_S,
            by_compression,
        )
        self.prompt_tokens = Counter("dpn_prompt_tokens", "Prompt tokens of answered requests.")
        self.generation_tokens = Counter("dpn_generation_tokens", "Generated tokens of answered requests.")
        self.expert_chosen = Counter(
            "dpn_expert_chosen",
            "Pooling expert run per pooling layer (its factor, or skipped).",
            tag_keys=("layer", "expert", "compression"),
        )
        self.visual_kept = Histogram(
            "dpn_visual_tokens_kept_ratio",
            "Visual tokens after the last pooling layer over those entering the decoder.",
            KEPT_RATIO_BUCKETS,
            by_compression,
        )
        self.flops = Counter("dpn_prefill_flops", "Prefill FLOPs spent.", tag_keys=by_compression)
        self.flops_dense = Counter(
            "dpn_prefill_flops_dense", "Prefill FLOPs the same prompts cost dense.", tag_keys=by_compression
        )
        self.flops_saved = Histogram(
            "dpn_prefill_flops_saved_ratio",
            "Per prefill, 1 - FLOPs spent / dense FLOPs.",
            SAVED_RATIO_BUCKETS,
            by_compression,
        )
        self.waiting = Gauge("dpn_num_requests_waiting", "Requests queued for prefill.", tag_keys=("rate",))
        self.running = Gauge("dpn_num_requests_running", "Requests decoding.", tag_keys=("rate",))
        self.batch_size = Histogram("dpn_batch_size", "Rows an engine step decoded.", BATCH_SIZE_BUCKETS)
        self._rates: set[str] = set()
        self._lock = threading.Lock()

    def record_request(self, record: RequestRecord) -> None:
        """Record one ended chat request (see the module's table)."""
        self.requests.inc(1, {"status": str(record.status), "outcome": record.outcome})
        if not record.answered:
            return
        tags = {"compression": record.compression or "unknown"}
        if record.e2e_s is not None:
            self.e2e.observe(record.e2e_s, tags)
        if record.ttft_s is not None:
            self.ttft.observe(record.ttft_s, tags)
        if record.tpot_s is not None:
            self.tpot.observe(record.tpot_s, tags)
        if record.prompt_tokens:
            self.prompt_tokens.inc(record.prompt_tokens)
        generated = sum(int(u.get("completion_tokens", 0)) for u in record.usages)
        if generated:
            self.generation_tokens.inc(generated)
        for usage in record.usages:
            self._record_prefill(usage, tags)

    def _record_prefill(self, usage: dict[str, Any], tags: dict[str, str]) -> None:
        for layer, factor in enumerate(usage.get("compression_per_pooling_layer") or []):
            expert = "skipped" if factor is None else str(factor)
            self.expert_chosen.inc(1, {"layer": str(layer), "expert": expert, **tags})
        visual = usage.get("visual_tokens_per_layer") or []
        if visual and visual[0] > 0:
            self.visual_kept.observe(visual[-1] / visual[0], tags)
        spent, dense = usage.get("prefill_flops"), usage.get("prefill_flops_dense")
        if spent is not None and dense:
            self.flops.inc(float(spent), tags)
            self.flops_dense.inc(float(dense), tags)
            self.flops_saved.observe(max(0.0, 1.0 - float(spent) / float(dense)), tags)

    def observe_engine_step(self, waiting: dict[str, int], running: dict[str, int], batch_size: int) -> None:
        """See the module function [`observe_engine_step`]."""
        with self._lock:
            self._rates |= set(waiting) | set(running)
            rates = sorted(self._rates)
        for rate in rates:
            self.waiting.set(int(waiting.get(rate, 0)), {"rate": rate})
            self.running.set(int(running.get(rate, 0)), {"rate": rate})
        if batch_size > 0:
            self.batch_size.observe(batch_size)


_metrics: RayServeMetrics | None = None
_metrics_lock = threading.Lock()


def serve_metrics() -> RayServeMetrics:
    """This process's [`RayServeMetrics`], created on the first call (call it inside the replica that records, so
    Serve's `deployment`/`replica`/`application` labels are set)."""
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = RayServeMetrics()
        return _metrics


def observe_engine_step(waiting: dict[str, int], running: dict[str, int], batch_size: int) -> None:
    """Record one engine step of the model replica: gauges `dpn_num_requests_waiting{rate}` and
    `dpn_num_requests_running{rate}`, histogram `dpn_batch_size`.

    Call it once per step, after the step ran, from the replica's engine.

    Args:
        waiting: Requests queued for prefill, by rate (`"auto"`, `"2"`, `"1-2-4"`: `str` of the `Rate`).
        running: Requests being decoded, by rate.
        batch_size: Rows the step decoded (its batch: running rows and the ones just prefilled); 0 (an idle step)
            sets the gauges only.

    A rate that was reported once and is missing from a later call is set to 0 in both gauges (its queue
    emptied), so a dashboard never shows a stale queue.
    """
    serve_metrics().observe_engine_step(waiting, running, batch_size)


__all__ = [
    "MetricsSink",
    "RayServeMetrics",
    "RequestObservation",
    "RequestRecord",
    "observe_engine_step",
    "serve_metrics",
]
