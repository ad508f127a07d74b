"""The model deployment: one DPN model per replica, one batch queue per compression rate.

Each request is tokenized on arrival, then waits in the queue of the rate it runs at: `auto` (the router decides
per sample), 1 (dense), 2 or 4. Each queue is its own `@serve.batch` method, so Ray Serve never puts two rates in
one batch, and every sequence of a batch has the same visual length after each pooling layer: no compute is spent
on padding between rates. Batches from different queues share the model through one compute thread, interleaved
step by step (a long batch does not block a short one's prefill for its whole length).

`mode` exists to measure what the per-rate queues buy (see benchmarks/serve_load.py):

- `bucketed` (default): one queue per rate, as above.
- `mixed`: one queue for everything. The model applies one rate per forward pass, so a batch holding several
  rates runs at the densest rate any of its requests may need (the smallest forced factor, or 1 when `auto`
  requests are mixed with others): the compute of padding every sequence to the densest visual length.
- `dense`: one queue, every batch at compression 1 (plain LLaVA compute).

Every batch is recorded (id, queue, rate run, rates requested, size) in a bounded history served by `batches()`,
and each response carries its batch's record, so anyone can check that a batch never mixes rates.

Moving to a new model version without downtime: the model comes from `user_config = {"model": REF, "version":
V}`. Changing it (`serve deploy` with an edited config, or `serve.run` with new options) calls `reconfigure` on the
running replicas: each loads the new weights in a background thread while it keeps serving with the old ones,
then swaps atomically; batches already running finish on the model they started with.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any

from ray import serve

from serve_apps import loading
from serve_apps.generation import BatchRun, Prepared, PromptError, prepare
from serve_apps.limits import Limits

logger = logging.getLogger(__name__)

MODES = ("bucketed", "mixed", "dense")
RATE_QUEUES = {"auto": "_queue_auto", 1: "_queue_1", 2: "_queue_2", 4: "_queue_4"}


@dataclass
class BatchingConfig:
    """The `batching` section of the serve config.

    Attributes:
        max_batch_size: Most requests in one batch (per queue).
        batch_wait_timeout_s: How long a queue waits for more requests after the first one arrives.
        mode: `bucketed` (one queue per rate), `mixed` (one queue) or `dense` (one queue, all dense).
        history: Batches remembered for `GET /v1/dpn/batches`.
    """

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    mode: str = "bucketed"
    history: int = 2048

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BatchingConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown batching options {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if config.mode not in MODES:
            raise ValueError(f"batching.mode must be one of {MODES}, got {config.mode!r}")
        if config.max_batch_size < 1 or config.batch_wait_timeout_s < 0:
            raise ValueError("batching.max_batch_size must be >= 1 and batch_wait_timeout_s >= 0")
        return config


def mixed_batch_rate(requested: list[str | int]) -> str | int:
    """The rate a one-queue batch runs at: its only rate, else the densest any member may need."""
    rates = set(requested)
    if len(rates) == 1:
        return next(iter(rates))
    if "auto" in rates:
        return 1  # the router may pick 1x for an auto request
    return min(rates)


class DPNModelServer:
    """A replica: the model, its processor, per-rate batch queues and a record of the batches run.

    Args:
        batching: `BatchingConfig` fields.
        limits: `Limits` fields (the replica checks `max_prompt_tokens`).
        device: `auto`, `cpu`, `cuda`, ...
        dtype: `auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`.
        model: model ref to load at start when no `user_config` is given (e.g. in tests without Serve).
    """

    def __init__(
        self,
        batching: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        device: str = "auto",
        dtype: str = "auto",
        model: str | None = None,
    ):
        self.batching = BatchingConfig.from_dict(batching)
        self.limits = Limits.from_dict(limits)
        self.device, self.dtype = device, dtype
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpn-compute")
        self._current: tuple[Any, Any, str, str] | None = None  # (model, processor, ref, version)
        self._reload_lock = asyncio.Lock()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.batching.history)
        self._started = time.time()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (tests, scripts)
            self.replica_id = "local"
        for name in ("_queue_auto", "_queue_1", "_queue_2", "_queue_4", "_queue_mixed"):
            queue = getattr(self, name)
            queue.set_max_batch_size(self.batching.max_batch_size)
            queue.set_batch_wait_timeout_s(self.batching.batch_wait_timeout_s)
        if model is not None:
            self._swap(model, "", *loading.load_model(model, device, dtype))

    # -- model versions ------------------------------------------------------------------------------------

    def _swap(self, ref: str, version: str, model: Any, processor: Any) -> None:
        self._current = (model, processor, ref, version or ref)
        logger.info("serving model %s (version %s)", ref, version or ref)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load `user_config["model"]` (version `user_config.get("version")`) and swap it in while serving."""
        ref = user_config.get("model")
        if not ref:
            raise ValueError("user_config needs 'model': a checkpoint directory or MLflow URI (models:/dpn@champion)")
        version = str(user_config.get("version") or ref)
        async with self._reload_lock:
            if self._current is not None and self._current[2:] == (ref, version):
                return
            model, processor = await asyncio.to_thread(loading.load_model, ref, self.device, self.dtype)
            self._swap(ref, version, model, processor)

    def _require_model(self) -> tuple[Any, Any, str, str]:
        if self._current is None:
            raise RuntimeError("no model loaded: give the deployment user_config={'model': REF}")
        return self._current

    # -- public methods (called through the handle) ---------------------------------------------------------

    def info(self) -> dict[str, Any]:
        model, _, ref, version = self._require_model()
        config = model.config
        return {
            "model": ref,
            "version": version,
            "compression_factors": list(config.compression_factors),
            "pooling_layers": list(config.pooling_layers),
            "num_visual_tokens": int(config.num_visual_tokens),
            "replica": self.replica_id,
            "device": str(model.device),
            "dtype": str(model.dtype).replace("torch.", ""),
            "batching": asdict(self.batching),
            "uptime_s": round(time.time() - self._started, 1),
        }

    def batches(self, limit: int = 0) -> list[dict[str, Any]]:
        """The most recent batches run by this replica (all remembered ones when `limit` is 0)."""
        items = list(self._history)
        return items[-limit:] if limit else items

    def check_health(self) -> None:
        self._require_model()

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream events for one request: `start`, then `delta`s and one `final` (or one `error`).

        Args:
            request: `messages`, `images` (bytes), `max_tokens`, `temperature`, `top_p`, `seed`, `stop`,
                `compression`, `request_id` (already validated by the ingress).
        """
        model, processor, _, version = self._require_model()
        try:
            prepared = await asyncio.to_thread(prepare, processor, request, self.limits.max_prompt_tokens)
        except PromptError as exc:
            yield {"type": "error", "status": 400, "message": str(exc), "param": exc.param, "code": exc.code}
            return
        except ValueError as exc:  # processor complaints (e.g. image/placeholder mismatch) are the client's
            yield {"type": "error", "status": 400, "message": str(exc), "param": "messages", "code": "invalid_prompt"}
            return
        yield {"type": "start", "prompt_tokens": len(prepared.input_ids), "fingerprint": version}
        async for event in self._queue_for(prepared.compression)(prepared):
            if event is not None:
                yield event

    # -- queues ---------------------------------------------------------------------------------------------

    def _queue_for(self, compression: str | int):
        if self.batching.mode == "bucketed":
            return getattr(self, RATE_QUEUES[compression])
        return self._queue_mixed

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _queue_auto(self, items: list[Prepared]) -> AsyncIterator[list]:
        async for results in self._run(items, "auto", "auto"):
            yield results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _queue_1(self, items: list[Prepared]) -> AsyncIterator[list]:
        async for results in self._run(items, 1, "1"):
            yield results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _queue_2(self, items: list[Prepared]) -> AsyncIterator[list]:
        async for results in self._run(items, 2, "2"):
            yield results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _queue_4(self, items: list[Prepared]) -> AsyncIterator[list]:
        async for results in self._run(items, 4, "4"):
            yield results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _queue_mixed(self, items: list[Prepared]) -> AsyncIterator[list]:
        if self.batching.mode == "dense":
            rate: str | int = 1
        else:
            rate = mixed_batch_rate([item.compression for item in items])
        async for results in self._run(items, rate, "mixed" if self.batching.mode == "mixed" else "dense"):
            yield results

    async def _run(self, items: list[Prepared], rate: str | int, queue: str) -> AsyncIterator[list]:
        """Run one batch; yield one entry per request each step (None: nothing new; StopIteration: ended)."""
        model, processor, _, version = self._require_model()
        run = BatchRun(model, processor, items, rate, queue)
        run.info["fingerprint"] = version
        run.info["replica"] = self.replica_id
        run.info["started"] = round(time.time(), 3)
        self._history.append(run.info)
        loop = asyncio.get_running_loop()
        ended = [False] * len(items)
        step = run.prefill
        try:
            while not all(ended):
                events = await loop.run_in_executor(self._compute, step)
                step = run.step
                results: list[Any] = []
                for i, event in enumerate(events):
                    if ended[i]:
                        results.append(StopIteration)
                        continue
                    if event is not None and event["type"] == "final":
                        event["fingerprint"] = version
                        ended[i] = True
                    results.append(event)
                yield results
        except Exception as exc:  # a failed batch answers every member instead of hanging them
            logger.exception("batch %s failed", run.batch_id)
            error = {"type": "error", "status": 500, "message": f"generation failed: {exc}", "param": None,
                     "code": "generation_failed"}
            yield [StopIteration if done else dict(error) for done in ended]


ModelDeployment = serve.deployment(
    DPNModelServer,
    name="DPNModel",
    max_ongoing_requests=64,
    max_queued_requests=128,
    health_check_period_s=10,
)

__all__ = ["BatchingConfig", "DPNModelServer", "MODES", "ModelDeployment", "mixed_batch_rate"]
