"""The model deployment (`DPNServer`): one DPN model per replica, an engine that batches requests continuously.

The engine (serve_apps.scheduler, deciding with serve_apps.policy, running on serve_apps.executor) works in steps:
each step decodes one token for every running request (rows of every rate in one batch: after its prefill a row's
rate only shows in its per-segment cache lengths), and prefills the requests that may join, within `max_num_seqs`
and `max_prefill_tokens`, one prefill per rate; a finished or cancelled request leaves at once.

Each request's `compression` is checked against the model's config on arrival (factors its experts have, one per
pooling layer for a schedule: a 400 naming `compression` otherwise, listing what the model serves; see
serve_apps.compression); the request is tokenized, then waits for its prefill, grouped with the others of the rate
it runs at: `auto` (the router decides per sample), 1 (dense), 2, 4, or a schedule such as `1-2-4`. A prefill
holds one rate only, so every sequence of it has the same visual length after each pooling layer: no compute is
spent on padding between rates.

Every batch is recorded (id, queue, rate run, rates requested, size, requests running when it started) in a
bounded history served by `batches()`, and each response carries its batch's record, so anyone can check that a
prefill never mixes rates. What per-rate prefills and continuous batching buy is measured by
benchmarks/serve_load.py against baselines it gives the replica as other scheduling policies (`policy`, in
Python only: no config selects them).

Moving to a new model version without downtime: the model comes from the deployment's `user_config = {"model":
REF, "version": V}` (set from the app args). Redeploying with a changed `user_config` in the config's `DPNServer`
deployment section (`serve deploy`) is a lightweight update: Serve calls `reconfigure` on the running replicas,
each loads the new weights in a background thread while it keeps serving with the old ones, then swaps atomically;
batches already running finish on the model they started with. (Changing `args` or calling `serve.run` again from
Python instead replaces the replicas one by one, starting each new one before stopping an old one.)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.exceptions import RayServeException

from dpn_base.config_models import ConfigModel
from serve_apps import compression, loading, metrics
from serve_apps.events import ErrorEvent, Event, StartEvent
from serve_apps.generation import Prepared, PromptError, prepare
from serve_apps.limits import Limits
from serve_apps.policy import RETIRED_KEYS, BatchingConfig, SchedulingPolicy
from serve_apps.scheduler import Scheduler

logger = logging.getLogger(__name__)


def default_version(ref: str) -> str:
    """The version label of a model given without one: `model-` and a hash of its ref. Clients see the version
    (`system_fingerprint`, `/health`), so it must not be the ref itself, a local path or an MLflow URI."""
    return "model-" + hashlib.sha256(ref.encode()).hexdigest()[:12]


def _section(value: Any, cls: type[ConfigModel], name: str) -> Any:
    """`value`, a validated config section (its defaults when None): the app args validated it once, so a replica
    takes it as it is; a mapping here is a caller's mistake, said so rather than failing later."""
    if value is None:
        return cls()
    if not isinstance(value, cls):
        raise TypeError(
            f"{name} must be a {cls.__name__} (serve_apps.app.AppArgs validates the serve config's {name!r} "
            f"section), got {type(value).__name__}: build it with {cls.__name__}.from_dict"
        )
    return value


class DPNServer:
    """A replica: the model, its processor, per-rate batch queues and a record of the batches run.

    Args:
        batching: the engine's `BatchingConfig`, validated where the app args are (serve_apps.app.AppArgs);
            default: its defaults.
        limits: the request `Limits`, validated likewise (the replica checks `max_prompt_tokens`).
        device: `auto`, `cpu`, `cuda`, ...
        dtype: `auto` (bf16 on GPU, fp32 on CPU), `float32`, `bfloat16`.
        model: model ref to load at start when no `user_config` is given (e.g. in tests without Serve).
        default_compression: the ingress's compression for requests that set none; every model this replica
            loads must serve it, else the load fails (with the compressions the model serves) and, on a
            reconfigure, the replica goes on serving the model it has.
        encoder_cache_bytes: size of each loaded model's vision-encoder cache (`dpn_model.EncoderCache`: a
            repeated image, e.g. every turn of a chat about one image, skips the vision tower); 0 disables it.
        policy: the engine's scheduling policy (serve_apps.policy); default `ContinuousPolicy(batching)`. Only
            Python passes another (benchmarks/serve_load.py's baselines); no config can.
    """

    def __init__(
        self,
        batching: BatchingConfig | None = None,
        limits: Limits | None = None,
        device: str = "auto",
        dtype: str = "auto",
        model: str | None = None,
        default_compression: Any = "auto",
        encoder_cache_bytes: int = 0,
        policy: SchedulingPolicy | None = None,
    ):
        self.batching = _section(batching, BatchingConfig, "batching")
        self.limits = _section(limits, Limits, "limits")
        self.device, self.dtype = device, dtype
        if encoder_cache_bytes < 0:
            raise ValueError(
                f"encoder_cache_bytes must be >= 0 (0 disables the cache), got {encoder_cache_bytes}"
            )
        self.encoder_cache_bytes = encoder_cache_bytes
        self.default_compression = compression.check_form(default_compression)
        self._current: tuple[Any, Any, str, str] | None = None  # (model, processor, ref, version)
        self._reload_lock = asyncio.Lock()
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.batching.history)
        self._started = time.time()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # outside a Serve replica (tests, scripts); anything else is a real error
            self.replica_id = "local"
        # engine gauges go to Ray's metrics only inside a Serve replica (tests and scripts run without them)
        on_step = (
            metrics.observe_engine_step
            if self.replica_id != "local"
            else (lambda waiting, running, rows: None)
        )
        self.scheduler = Scheduler(self.batching, self._model_for_batch, self._record_batch, on_step, policy)
        if model is not None:
            self._swap(model, "", *loading.load_model(model, device, dtype, encoder_cache_bytes))

    # -- model versions ------------------------------------------------------------------------------------

    def _swap(self, ref: str, version: str, model: Any, processor: Any) -> None:
        try:
            compression.for_model(self.default_compression, model.config)
        except ValueError as exc:
            raise ValueError(
                f"model {ref}: default_compression {self.default_compression!r}: {exc}"
            ) from None
        version = version or default_version(ref)
        self._current = (model, processor, ref, version)
        logger.info("serving model %s (version %s)", ref, version)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load `user_config["model"]` (version `user_config.get("version")`) and swap it in while serving."""
        ref = user_config.get("model")
        if not ref:
            raise ValueError(
                "user_config needs 'model': a checkpoint directory or MLflow URI (models:/dpn@champion)"
            )
        version = str(user_config.get("version") or default_version(ref))
        async with self._reload_lock:
            if self._current is not None and self._current[2:] == (ref, version):
                return
            model, processor = await asyncio.to_thread(
                loading.load_model, ref, self.device, self.dtype, self.encoder_cache_bytes
            )
            self._swap(ref, version, model, processor)

    def _model_for_batch(self) -> tuple[Any, Any, str]:
        model, processor, _, version = self._require_model()
        return model, processor, version

    def _record_batch(self, info: dict[str, Any]) -> None:
        info["replica"] = self.replica_id
        self._history.append(info)

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
            "batching": self.batching.model_dump(exclude=set(RETIRED_KEYS)),
            "waiting": self.scheduler.waiting(),
            "running_batches": len(self.scheduler.running),
            "running": self.scheduler.running_requests(),
            "uptime_s": round(time.time() - self._started, 1),
            "engine": self.scheduler.engine_stats(),
        }

    def batches(self, limit: int = 0) -> list[dict[str, Any]]:
        """The most recent batches run by this replica (all remembered ones when `limit` is 0)."""
        items = list(self._history)
        return items[-limit:] if limit else items

    def check_health(self) -> None:
        self._require_model()

    async def _prepare(self, processor: Any, request: dict[str, Any]) -> Prepared | ErrorEvent:
        """The tokenized request, or the `ErrorEvent` that answers it (prepare runs off the event loop)."""
        try:
            return await asyncio.to_thread(prepare, processor, request, self.limits.max_prompt_tokens)
        except PromptError as exc:
            return ErrorEvent(str(exc), 400, exc.param, exc.code)
        # the processor's complaints about the input (placeholders, text it cannot encode) are the client's
        except (ValueError, TypeError, UnicodeError) as exc:
            return ErrorEvent(f"cannot tokenize the request: {exc}", 400, "messages", "invalid_prompt")
        except Exception as exc:  # noqa: BLE001 - a fault preparing one request must not escape to the caller
            logger.exception("request %s: prepare failed", request.get("request_id"))
            return ErrorEvent(f"preparing the request failed: {exc}")

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[Event]:
        """Stream events for one request (serve_apps.events): a `StartEvent`, then `DeltaEvent`s and one
        `FinalEvent` (or one `ErrorEvent`).

        Never raises for a request: problems with it are `ErrorEvent`s (400 for the prompt, 503 before a model is
        loaded, 500 for a fault), so the ingress answers in OpenAI's shape and no other request is touched.

        Args:
            request: `messages`, `images` (RGB arrays or encoded bytes), `max_tokens`, `temperature`, `top_p`,
                `seed`, `stop`, `compression`, `request_id` (already validated by the ingress).
        """
        if self._current is None:
            yield ErrorEvent("no model is loaded yet; retry shortly", 503, code="model_loading")
            return
        model, processor, _, version = self._current
        try:
            rate = compression.for_model(request.get("compression", "auto"), model.config)
        except ValueError as exc:
            yield ErrorEvent(str(exc), 400, "compression", "invalid_value")
            return
        prepared = await self._prepare(processor, {**request, "compression": rate})
        if isinstance(prepared, ErrorEvent):
            yield prepared
            return
        yield StartEvent(prompt_tokens=len(prepared.input_ids), fingerprint=version)
        async for event in self.scheduler.submit(prepared):
            yield event


ModelDeployment = serve.deployment(
    DPNServer,
    name="DPNServer",
    max_ongoing_requests=64,
    max_queued_requests=128,
    health_check_period_s=10,
)

__all__ = ["DPNServer", "ModelDeployment", "default_version"]
