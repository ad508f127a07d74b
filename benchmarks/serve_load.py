"""Load test of the serving app: continuous batching and per-rate prefill against the alternatives (issue 16).

    python benchmarks/serve_load.py --preset mid --workload short --clients 16 --requests 200
    python benchmarks/serve_load.py --preset mid --workload mixed --clients 16 --requests 200

Starts a local Ray cluster and the real Serve app (ingress + model deployment, one model replica with 1 CPU) on
127.0.0.1 with a random model of `--preset`, then runs each engine variant in turn, side by side in one invocation:

- (a) `continuous-bucketed`: what production serves (serve_apps.policy.ContinuousPolicy): continuous
  (iteration-level) batching, each step's prefill grouped by rate.
- (b) `continuous-mixed` ([`MixedPolicy`]): continuous batching, one prefill group per step run at the densest rate
  any member may need ([`batch_rate`]: smallest forced factor, or 1 when `auto` is mixed in).
- (c) `continuous-dense` ([`DensePolicy`]): continuous batching, everything at compression 1.
- (d) `static-bucketed` ([`StaticPolicy`]): the former static batcher (per-rate queues, a batch's rows stay until
  its last one finishes).

(b), (c) and (d) are baselines, not served: they are scheduling policies of this script (serve_apps.policy's
interface), given to the replica in Python (`build_app(args, policy=...)`) and run by the production engine loop
and executor; no serve config can select them.

For every variant N concurrent clients send the same seeded sequence of image questions over loopback, streaming
the answers (`stream_options.include_usage`), until the request count or the time limit is reached. Each request
draws its compression from the traffic mix (`--mix`, default 70% `auto`, 10% each of 1, 2 and 4) and its answer
length from the workload, and generates exactly that many tokens (`ignore_eos`):

- `short`: max_tokens uniform in 4-16 (prefill-bound, as VQA traffic is);
- `mixed`: max_tokens uniform in 4-128 (where continuous batching matters).

Reports per variant: requests/s, generated tokens/s, time to first token p50/p99, time per output token p50, the
mean prefill group (`GET /v1/dpn/batches`: one record per prefill group, with `size` and the requests `running`
when it started), the prefill ms per request and its share of the wall time
(the records' `prefill_s`), the replica's RSS after 100 and 1,000 completed requests
and at the end (psutil on the replica process, a descendant of this driver's Ray), and the issue's targets as
ratios. Each variant gets a fresh replica and 8 warm-up requests that are not counted. The FLOPs ideal of (a) over (c) is the dense
prefill FLOPs over the mix's (the `prefill_flops_dense` and `prefill_flops` fields of each answer's `usage`); of (a)
over (b), (b)'s prefill FLOPs over (a)'s. Only prefill FLOPs are counted (decoding is the same in every variant), so
the ideal is an upper bound that only a prefill-bound workload approaches. `--write` replaces the "Serving" section
of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import httpx
import numpy as np
import PIL.Image

from dpn_model.configuration import CompressionSpec
from serve_apps.compression import Rate, as_rate, factors_per_layer
from serve_apps.policy import (
    BatchingConfig,
    ContinuousPolicy,
    EngineState,
    PrefillGroup,
    RateQueues,
    SchedulingPolicy,
    StepPlan,
    WaitingRequest,
)

logger = logging.getLogger("serve_load")
RATES: list[str | int] = ["auto", 1, 2, 4]
VARIANTS = {
    "a": "continuous-bucketed",
    "b": "continuous-mixed",
    "c": "continuous-dense",
    "d": "static-bucketed",
}
WORKLOADS = {"short": (4, 16), "mixed": (4, 128)}
RSS_AT = (100, 1000)  # answers after which the replica's RSS is read (and once more at the end)
# the replica engine's phases (`Scheduler.engine_stats`, plus `other`), in the order printed
ENGINE_PHASES = ("prefill", "decode", "merge", "build", "loop_wait", "idle", "other")


# -- the baselines: scheduling policies the production engine runs (serve_apps.policy) --------------------------


def densest(rates: Sequence[Rate]) -> Rate:
    """The rate a batch holding several forced `rates` runs at so that each member keeps at least the visual
    tokens it asked for at every layer: per layer, the smallest factor any member applies there."""
    own = [factors_per_layer(rate, 1) for rate in rates]  # a factor: (f,); a schedule: its own factors
    lengths = {len(factors) for factors in own if len(factors) > 1}
    if len(lengths) > 1:  # schedules of different models (a swap in between): the smallest factor everywhere
        return min(min(factors) for factors in own)
    layers = lengths.pop() if lengths else 1
    per_layer = [factors_per_layer(rate, layers) for rate in rates]
    return as_rate([min(column) for column in zip(*per_layer)])


def batch_rate(requested: Sequence[Any]) -> Rate:
    """The one rate a batch of requests that asked for `requested` runs at under [`MixedPolicy`] (the model applies
    one rate per forward pass): their rate when they agree; else the densest any member may need, so that none
    keeps fewer visual tokens than it asked for: 1 when one of them is routed (`auto`, with or without the cost
    dial: the router may pick 1x), else per pooling layer the smallest factor any member applies there (`[2,
    "1-2-4", 4]` runs at `"1-2-2"`). Production's queues keep one rate per batch (serve_apps.policy)."""
    rates = {as_rate(value) for value in requested}
    if len(rates) == 1:
        return next(iter(rates))
    if any(CompressionSpec.parse(rate).factors is None for rate in rates):
        return 1
    return densest(sorted(rates, key=str))


class MixedPolicy(ContinuousPolicy):
    """(b): continuous batching with one queue for every rate; a prefill group runs at the densest rate any of its
    members may need (the padding to the densest visual length that per-rate prefills avoid)."""

    def queue(self, rate: Rate) -> str:
        return "mixed"

    def group_rate(self, requested: list[Rate]) -> Rate:
        return batch_rate(requested)


class DensePolicy(ContinuousPolicy):
    """(c): continuous batching, one queue, every prefill at compression 1 (plain LLaVA compute)."""

    def queue(self, rate: Rate) -> str:
        return "dense"

    def group_rate(self, requested: list[Rate]) -> Rate:
        return 1


class StaticPolicy(RateQueues):
    """(d): the static batcher continuous batching replaced. A batch is taken from one rate's queue when the model
    can take it: while nothing runs, once its oldest request waited `batch_wait_timeout_s` or it holds
    `max_batch_size`; while batches run, once it is full or its oldest waited `max_queue_delay_s`, at most
    `max_running_batches` at once. Its rows stay together until the last one finishes: none leaves or joins.
    (Each running batch decodes one token per step, a new one from the step of its prefill.)"""

    def __init__(
        self,
        config: BatchingConfig,
        max_batch_size: int = 8,
        max_queue_delay_s: float = 0.5,
        max_running_batches: int = 4,
    ):
        self.config = config
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_running_batches = max_running_batches

    @property
    def capacity(self) -> int:
        return self.max_batch_size * self.max_running_batches

    def plan(self, state: EngineState) -> StepPlan:
        queues: dict[str, list[WaitingRequest]] = {}
        for request in state.by_arrival():
            queues.setdefault(self.queue(request.rate), []).append(request)
        batches = len({row.batch for row in state.running}) + state.resuming  # each resumed request: a batch
        groups = []
        while (group := self._due(queues, batches, state.now)) is not None:
            groups.append(group)
            batches += 1
        if not batches:
            heads = [queue[0].arrived for queue in queues.values() if queue]
            timeout = self.config.batch_wait_timeout_s
            return StepPlan.wait(max(0.0, min(heads) + timeout - state.now) if heads else None)
        return StepPlan(prefill=tuple(groups), decode=tuple(row.key for row in state.running if not row.gone))

    def _due(self, queues: dict[str, list[WaitingRequest]], batches: int, now: float) -> PrefillGroup | None:
        """The next batch to start (from the queue whose oldest request came first), or None."""
        if batches >= self.max_running_batches:
            return None
        limit = self.max_queue_delay_s if batches else self.config.batch_wait_timeout_s
        ready = [
            (queue[0].arrived, key)
            for key, queue in queues.items()
            if queue and (len(queue) >= self.max_batch_size or now - queue[0].arrived >= limit)
        ]
        if not ready:
            return None
        key = min(ready)[1]
        members, queues[key] = queues[key][: self.max_batch_size], queues[key][self.max_batch_size :]
        (group,) = self.groups(members, joins=False)  # one queue's requests: one group, at its rate
        return group


def variant_policy(
    variant: str, batching: dict[str, Any], args: argparse.Namespace
) -> SchedulingPolicy | None:
    """The scheduling policy of `variant` (None: production's) for a replica with `batching`."""
    config = BatchingConfig.from_dict(batching)
    if variant == "b":
        return MixedPolicy(config)
    if variant == "c":
        return DensePolicy(config)
    if variant == "d":
        return StaticPolicy(config, args.max_batch_size, args.max_queue_delay_s, args.max_running_batches)
    return None


def _image_url(seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_mix(text: str) -> dict[str | int, float]:
    """`"auto:0.7,1:0.1,2:0.1,4:0.1"` -> shares by rate, normalised to sum to 1."""
    mix: dict[str | int, float] = {}
    for part in text.split(","):
        rate, _, share = part.partition(":")
        rate = rate.strip()
        key: str | int = rate if rate == "auto" else int(rate)
        if key not in RATES:
            raise ValueError(f"--mix: unknown rate {rate!r}; choose from {RATES}")
        mix[key] = float(share)
    total = sum(mix.values())
    if total <= 0:
        raise ValueError("--mix: shares must sum to more than 0")
    return {rate: share / total for rate, share in mix.items()}


def make_requests(
    total: int, workload: str, mix: dict[str | int, float], seed: int
) -> list[tuple[str | int, int, int]]:
    """The seeded request sequence every variant replays: `(compression, max_tokens, image index)` per request."""
    rng = np.random.default_rng(seed)
    low, high = WORKLOADS[workload]
    rates = list(mix)
    picks = rng.choice(len(rates), size=total, p=[mix[r] for r in rates])
    lengths = rng.integers(low, high + 1, size=total)
    images = rng.integers(0, 8, size=total)
    return [(rates[int(p)], int(n), int(im)) for p, n, im in zip(picks, lengths, images)]


def _replica_rss() -> int | None:
    """RSS (bytes) of the model replica: the `DPNServer` replica among this driver's Ray processes (its raylet
    is our child, so another session's cluster is never measured)."""
    import psutil

    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if "ServeReplica" in cmdline and "DPNServer" in cmdline:
                return proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _one(http: httpx.AsyncClient, base: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Stream one answer: TTFT (first content chunk), TPOT and its usage; None when it failed."""
    start = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", base + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return None
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return None
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
    if usage is None or first is None:
        return None
    tokens = int(usage.get("completion_tokens", 0))
    return {
        "ttft": first - start,
        "tpot": (last - first) / (tokens - 1) if tokens > 1 else None,
        "tokens": tokens,
        "flops": float(usage.get("prefill_flops", 0.0)),
        "flops_dense": float(usage.get("prefill_flops_dense", 0.0)),
    }


def _body(compression: str | int, max_tokens: int, image_url: str) -> dict[str, Any]:
    """One streamed image question of the workload: greedy, exactly `max_tokens` tokens (`ignore_eos`)."""
    return {
        "model": "dpn",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "compression": compression,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": "What colour is the large shape?"},
                ],
            }
        ],
    }


async def _load(
    base: str, clients: int, requests: list[tuple[str | int, int, int]], time_limit: float
) -> dict[str, Any]:
    """N clients, each streaming requests back to back from the shared sequence."""
    images = [_image_url(i) for i in range(8)]
    answers: list[dict[str, Any]] = []
    failures = 0
    rss: dict[int | str, int | None] = {}  # after 100 and 1,000 answers, and at the end
    counter = iter(requests)
    deadline = time.perf_counter() + time_limit

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal failures
        for compression, max_tokens, image in counter:
            if time.perf_counter() > deadline:
                return
            answer = await _one(http, base, _body(compression, max_tokens, images[image]))
            if answer is None:
                failures += 1
                continue
            answers.append(answer)
            if len(answers) in RSS_AT:
                rss[len(answers)] = _replica_rss()

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    rss["end"] = _replica_rss()
    ttft = [a["ttft"] for a in answers]
    tpot = [a["tpot"] for a in answers if a["tpot"] is not None]
    return {
        "completed": len(answers),
        "failed": failures,
        "wall_s": wall,
        "throughput": len(answers) / wall,
        "tokens_s": sum(a["tokens"] for a in answers) / wall,
        "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
        "ttft_p99": _percentile(ttft, 0.99),
        "tpot_p50": statistics.median(tpot) if tpot else float("nan"),
        "flops": statistics.mean(a["flops"] for a in answers) if answers else float("nan"),
        "flops_dense": statistics.mean(a["flops_dense"] for a in answers) if answers else float("nan"),
        "rss": rss,
    }


def _batching(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """The replica's `batching` section: the continuous engine's knobs, or (d)'s idle wait."""
    if variant != "d":
        return {
            "max_num_seqs": args.max_num_seqs,
            "max_prefill_tokens": args.max_prefill_tokens,
            "waiting_served_ratio": args.waiting_served_ratio,
            "max_waiting_steps": args.max_waiting_steps,
        }
    return {"batch_wait_timeout_s": args.batch_wait_s}


def variant_app(variant: str, model: str, args: argparse.Namespace) -> Any:
    """The Serve app of `variant`: the production app (serve_apps.app.build_app), with the variant's policy."""
    from serve_apps.app import build_app

    batching = _batching(variant, args)
    return build_app(
        {
            "model": model,
            "device": "cpu",
            "auth": "none",  # a local benchmark endpoint
            "batching": batching,
            "limits": {"max_tokens": max(WORKLOADS[args.workload][1], 64)},
            "model_options": {"ray_actor_options": {"num_cpus": 1}},
        },
        policy=variant_policy(variant, batching, args),
    )


def run_variant(
    variant: str, model: str, base: str, requests: list[tuple[str | int, int, int]], args: argparse.Namespace
) -> dict[str, Any]:
    from ray import serve

    app = variant_app(variant, model, args)
    serve.run(app, name="dpn", route_prefix="/")
    warmup = make_requests(min(8, len(requests)), args.workload, {"auto": 0.25, 1: 0.25, 2: 0.25, 4: 0.25}, 1)
    asyncio.run(_load(base, min(4, args.clients), warmup, 120))  # not counted
    server = serve.get_deployment_handle("DPNServer", app_name="dpn")
    before = len(httpx.get(base + "/v1/dpn/batches").json()["data"])
    engine_before = server.info.remote().result()["engine"]
    result = asyncio.run(_load(base, args.clients, requests, args.time_limit))
    engine = _engine_delta(engine_before, server.info.remote().result()["engine"])
    data = httpx.get(base + "/v1/dpn/batches").json()["data"][before:]
    sizes = [b["size"] for b in data]
    running = [b["running"] for b in data if "running" in b]
    result.update(
        variant=variant,
        batches=len(data),
        mean_batch=statistics.mean(sizes) if sizes else float("nan"),
        mean_running=statistics.mean(running) if running else float("nan"),
        prefill_s=sum(b.get("prefill_s", 0.0) for b in data),
        engine=engine,
    )
    logger.info("%s: %s", VARIANTS[variant], result)
    serve.delete("dpn")
    return result


def _engine_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The replica engine's time (`Scheduler.engine_stats`) spent between two readings: seconds per phase, `other`
    (the rest of the wall time: handing events on, the loop's own bookkeeping), and the decode steps."""
    seconds = {k: after["seconds"].get(k, 0.0) - before["seconds"].get(k, 0.0) for k in after["seconds"]}
    wall = after["wall"] - before["wall"]
    seconds["other"] = wall - sum(seconds.values())
    return {"wall": wall, "steps": after["steps"] - before["steps"], "seconds": seconds}


def target_lines(by_variant: dict[str, dict[str, Any]], workload: str) -> list[str]:
    """The issue's targets, as ratios of this run's variants."""
    lines = []
    a = by_variant.get("a")
    if a is None:
        return ["(a) not run: no target checks."]
    if workload == "short":
        for other in ("c", "b"):
            if other not in by_variant:
                continue
            o = by_variant[other]
            ratio = a["throughput"] / o["throughput"]
            # over (c): the dense FLOPs of (a)'s requests over what they spent; over (b): what (b) spent over (a)
            ideal = (a["flops_dense"] if other == "c" else o["flops"]) / a["flops"]
            share = ratio / ideal
            lines.append(
                f"- (a)/({other}) throughput {ratio:.2f}x, FLOPs ideal {ideal:.2f}x: {share:.2f} of the ideal "
                f"(target >= 0.90: {'met' if share >= 0.9 else 'missed'})."
            )
    if "d" in by_variant:
        d = by_variant["d"]
        ratio = a["throughput"] / d["throughput"]
        ttft_ok = a["ttft_p99"] <= d["ttft_p99"]
        met = ratio >= 1.5 and ttft_ok
        target = " (the target is set on workload mixed)" if workload != "mixed" else ""
        lines.append(
            f"- (a)/(d) throughput {ratio:.2f}x, p99 TTFT {a['ttft_p99']:.2f} s vs {d['ttft_p99']:.2f} s "
            f"(target >= 1.5x at equal or better p99 TTFT{target}: {'met' if met else 'missed'})."
        )
    for name, r in by_variant.items():
        rss = r["rss"]
        if all(rss.get(n) for n in RSS_AT):
            growth = rss[RSS_AT[1]] / rss[RSS_AT[0]]
            lines.append(
                f"- ({name}) replica RSS {rss[RSS_AT[0]] / 2**20:.0f} MiB at {RSS_AT[0]} requests, "
                f"{rss[RSS_AT[1]] / 2**20:.0f} MiB at {RSS_AT[1]}: {growth:.2f}x (target <= 1.10x: "
                f"{'met' if growth <= 1.1 else 'missed'})."
            )
    return lines


def _markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    by_variant = {r["variant"]: r for r in results}
    low, high = WORKLOADS[args.workload]
    mix = ", ".join(f"{share:.0%} {rate}" for rate, share in args.mix.items())
    lines = [
        f"### Workload {args.workload}, {args.preset} preset",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU; "
        f"{args.preset} preset (random weights), one model replica with 1 CPU, "
        f"{args.clients} concurrent streaming clients over loopback, {args.requests} requests per variant (time "
        f"limit {args.time_limit:.0f} s), max_tokens uniform {low}-{high} (ignore_eos), traffic mix {mix} "
        f"(seed {args.seed}). Continuous: max_num_seqs {args.max_num_seqs}, max_prefill_tokens "
        f"{args.max_prefill_tokens}, waiting_served_ratio {args.waiting_served_ratio}, max_waiting_steps "
        f"{args.max_waiting_steps}; static: max_batch_size {args.max_batch_size}, batch wait {args.batch_wait_s} s, "
        f"max_queue_delay_s {args.max_queue_delay_s}, max_running_batches {args.max_running_batches}.",
        "",
        "| variant | req/s | gen tok/s | TTFT p50 (s) | TTFT p99 (s) | TPOT p50 (ms) | prefill groups "
        "| mean group | mean running | prefill GFLOPs/req | prefill ms/req | prefill share of wall "
        "| RSS @100 / @1000 / end (MiB) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rss = " / ".join(f"{r['rss'][n] / 2**20:.0f}" if r["rss"].get(n) else "-" for n in (*RSS_AT, "end"))
        running = "-" if r["mean_running"] != r["mean_running"] else f"{r['mean_running']:.1f}"  # no records
        lines.append(
            f"| ({r['variant']}) {VARIANTS[r['variant']]} | {r['throughput']:.2f} | {r['tokens_s']:.1f} | "
            f"{r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {1000 * r['tpot_p50']:.0f} | {r['batches']} | "
            f"{r['mean_batch']:.1f} | {running} | {r['flops'] / 1e9:.2f} | "
            f"{1000 * r['prefill_s'] / max(r['completed'], 1):.0f} | {r['prefill_s'] / r['wall_s']:.0%} | {rss} | "
            f"{r['failed']} |"
        )
    if results:
        lines += [
            "",
            "Where the replica's engine spent its time, ms per completed request (`Scheduler.engine_stats`: "
            "`loop_wait` is the event loop busy elsewhere after a compute call; `other` the rest of the wall):",
            "",
            "| variant | decode steps | ms/step | " + " | ".join(ENGINE_PHASES) + " |",
            "|---|---|---|" + "---|" * len(ENGINE_PHASES),
        ]
        for r in results:
            engine, n = r["engine"], max(r["completed"], 1)
            per_step = 1000 * engine["seconds"].get("decode", 0.0) / max(engine["steps"], 1)
            phases = " | ".join(f"{1000 * engine['seconds'].get(p, 0.0) / n:.0f}" for p in ENGINE_PHASES)
            lines.append(
                f"| ({r['variant']}) {VARIANTS[r['variant']]} | {engine['steps']} | {per_step:.0f} | {phases} |"
            )
    lines += ["", "Targets:", "", *target_lines(by_variant, args.workload), ""]
    return "\n".join(lines)


def _write_section(path: str, section: str) -> None:
    """Put `section` (one `### Workload ...` block) into the "Serving" section of `path`: it replaces the block
    of the same heading (workload and preset), or is appended to the section; blocks of this benchmark's other
    runs stay. A Serving section of the former layout (no `###` blocks) is replaced."""
    text = "# Benchmarks\n"
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    start = text.find("## Serving")
    if start < 0:
        text = text.rstrip("\n") + "\n\n## Serving\n\n"
        start = text.find("## Serving")
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end + 1
    body = text[start:end]
    if "\n### Workload " not in body:
        body = "## Serving\n\n"
    heading = section.split("\n", 1)[0] + "\n"
    at = body.find(heading)
    if at >= 0:
        stop = body.find("\n### ", at + 1)
        body = body[:at] + section.rstrip("\n") + "\n\n" + (body[stop + 1 :] if stop >= 0 else "")
    else:
        body = body.rstrip("\n") + "\n\n" + section
    text = text[:start] + body.rstrip("\n") + "\n" + ("\n" + text[end:] if end < len(text) else "")
    with open(path, "w") as f:
        f.write(text)


def _variants(text: str) -> list[str]:
    names = {name: key for key, name in VARIANTS.items()}
    out = []
    for part in text.split(","):
        part = part.strip()
        key = part if part in VARIANTS else names.get(part)
        if key is None:
            raise argparse.ArgumentTypeError(
                f"unknown variant {part!r}; choose from {sorted(VARIANTS)} or {sorted(names)}"
            )
        out.append(key)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line; (d)'s knobs are `--max-batch-size`, `--batch-wait-s`, `--max-queue-delay-s` and
    `--max-running-batches`, the continuous variants' the others."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: a random model of --preset)")
    parser.add_argument("--preset", choices=["tiny", "mid"], default="tiny")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="short")
    parser.add_argument(
        "--variants",
        "--engines-modes",
        type=_variants,
        default=list(VARIANTS),
        help="comma-separated a,b,c,d (or continuous-bucketed, continuous-mixed, continuous-dense, static-bucketed)",
    )
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("auto:0.7,1:0.1,2:0.1,4:0.1"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=200, help="requests per variant")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds per variant")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=8192)
    parser.add_argument("--waiting-served-ratio", type=float, default=0.0)
    parser.add_argument("--max-waiting-steps", type=int, default=20)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-s", type=float, default=0.02)
    parser.add_argument("--max-queue-delay-s", type=float, default=0.5)
    parser.add_argument("--max-running-batches", type=int, default=4)
    parser.add_argument("--write", default=None, help="replace the Serving section of this markdown file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    import ray
    from ray import serve

    from dpn_model.presets import create_checkpoint

    model = args.model or create_checkpoint(args.preset, tempfile.mkdtemp(prefix="dpn-serve-load-"), seed=0)
    requests = make_requests(args.requests, args.workload, args.mix, args.seed)
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for variant in args.variants:
            results.append(run_variant(variant, model, f"http://127.0.0.1:{port}", requests, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = _markdown(results, args, command.strip())
    print(section)
    if args.write:
        _write_section(args.write, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
