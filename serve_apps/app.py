"""The Ray Serve application: a FastAPI ingress deployment in front of the DPN model deployment.

Deploy from a config file (`serve run configs/serve_tiny.yaml`, `serve deploy configs/serve_llava7b.yaml`), whose
`import_path: serve_apps.app:build_app` and `args` (see [`AppArgs`]) build the app; or from Python::

    from serve_apps.app import build_app
    serve.run(build_app({"model": "/path/to/checkpoint"}), route_prefix="/")

The ingress validates requests (serve_apps.api) and streams each one from the model deployment through a handle;
when the model deployment's caller-side queue is full (`max_queued_requests`), Ray raises `BackPressureError`
and the ingress answers an OpenAI-style 503 with `Retry-After`. When a model replica dies, the requests it was
serving fail with Ray's actor errors: those become 503 + `Retry-After` too (Serve starts a replacement; a retry
lands on a live replica).

The ingress replica refuses to start without an API key (the environment variable named by `api_key_env`,
`DPN_API_KEY` by default) unless the args say `auth: none` explicitly; `serve run` / `serve deploy` report its error.

When a request ends early (its client went away, or one of its `n` choices failed), the ingress cancels its other
streams, and `HandleBackend` cancels them on the model replica too (`DeploymentResponseGenerator.cancel()`), so the
replica stops generating tokens nobody will read.

The ingress records every chat request in Ray's metrics (serve_apps.metrics: `ray_dpn_*` on each node's metrics
agent, `ray start --metrics-export-port=...`), the model replicas their engine steps.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from dpn_base.config_models import validate_config
from serve_apps.api import Overloaded, Settings, Unavailable, check_host_patterns, create_api
from serve_apps.limits import Limits
from serve_apps.metrics import serve_metrics
from serve_apps.model import ModelDeployment, default_version
from serve_apps.policy import BatchingConfig, ContinuousPolicy, SchedulingPolicy
from serve_apps.protocol import CompressionField

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """The `args` of the serve config (`applications[].args`).

    Attributes:
        model: Checkpoint directory or MLflow URI (`models:/dpn@champion`); becomes the model deployment's
            `user_config`, so changing it (with `version`) rolls the replicas to the new model without downtime.
            Clients never see it (`/health` and `/v1/models` show `served_model_name` and `version`).
        version: Label of the model version (shown as `system_fingerprint`); change it to force a reload of the
            same ref (e.g. after the `champion` alias moved). Default: `model-<hash of the ref>`, which names no
            path.
        served_model_name: Model id clients use.
        device, dtype: Where and how the model runs (`auto`: GPU + bf16 when present, else CPU + fp32).
        batching: The engine's `BatchingConfig` (`max_num_seqs`, `max_prefill_tokens`, `waiting_served_ratio`,
            `max_waiting_steps`, `batch_wait_timeout_s`, `history`), validated here with the rest of the args.
        limits: The request `Limits` (image bytes/pixels/count, prompt bytes and tokens, the per-request token
            budget, max_tokens, remote images), validated here; both deployments receive the validated object.
        api_key_env: Environment variable with the API key, in the ingress replicas' environment (the k8s
            manifest reads it from the Secret `dpn-secrets`). Required unless `auth` is `none`: without it the
            ingress refuses to start.
        auth: `api_key` (default): every route but `/health` needs `Authorization: Bearer <key>`. `none`: no
            authentication, for a trusted network only (logged as a warning at start; `/health` says so).
        allowed_hosts: Host names the ingress answers to (`api.example.com`, `*.example.com`); other `Host`
            headers get a 400 `invalid_host`. Empty (default): any host.
        retry_after_s: `Retry-After` on 503 (overloaded, or the model unavailable).
        default_compression: Compression of requests that do not set `compression`: `auto`, a factor, or a schedule
            (`[1, 2, 4]`, `"1,2,4"`); checked for form here, against each model the replicas load there.
        health_timeout_s: Longest wait for the model deployment on `/health` and `/v1/models` before a 503.
        encoder_cache_bytes: Bytes of each replica's vision-encoder cache (identical images reuse the vision tower +
            projector output, least recently used evicted); 0 (default) disables it.
        model_options: Serve deployment options of the model deployment (`autoscaling_config`,
            `ray_actor_options`, `max_queued_requests`, ...), for builds without a config file (`dpn serve`);
            a config file's `deployments` section overrides them.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    version: str | None = None
    served_model_name: str = "dpn"
    device: str = "auto"
    dtype: str = "auto"
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: Limits = Field(default_factory=Limits)
    api_key_env: str = "DPN_API_KEY"
    auth: Literal["api_key", "none"] = "api_key"
    allowed_hosts: list[str] = Field(default_factory=list)
    retry_after_s: int = 1
    default_compression: CompressionField = "auto"
    health_timeout_s: float = Field(default=2.0, gt=0)
    encoder_cache_bytes: int = Field(default=0, ge=0)
    model_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, hosts: list[str]) -> list[str]:
        return list(check_host_patterns(hosts))


# a replica that died or cannot be reached; `RayActorError` covers ActorDiedError and ActorUnavailableError
_REPLICA_GONE = (
    RayActorError,
    ReplicaUnavailableError,
    DeploymentUnavailableError,
    WorkerCrashedError,
    NodeDiedError,
)


class HandleBackend:
    """`serve_apps.api.Backend` over the model deployment's handle (streaming calls).

    Ray's errors become the API's: a full queue is `Overloaded`, a dead or unreachable replica `Unavailable`
    (both 503 + Retry-After). A stream its caller leaves early (the task cancelled, or the generator closed) is
    cancelled on the replica: Ray does not do it when the awaiting task is cancelled, and the replica would go on
    generating for nobody.
    """

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle
        self._stream = handle.options(stream=True)

    async def generate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = self._stream.generate.remote(request)
        try:
            async for event in response:
                yield event
        except (asyncio.CancelledError, GeneratorExit):
            response.cancel()  # the caller went away: stop the generation on the replica
            raise
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from exc
        except _REPLICA_GONE as exc:
            raise Unavailable(f"model replica unavailable: {type(exc).__name__}") from exc

    async def info(self) -> dict[str, Any]:
        try:
            return await self.handle.info.remote()
        except _REPLICA_GONE as exc:
            raise Unavailable(f"model replica unavailable: {type(exc).__name__}") from exc

    async def batches(self, limit: int) -> list[dict[str, Any]]:
        try:
            return await self.handle.batches.remote(limit)
        except _REPLICA_GONE as exc:
            raise Unavailable(f"model replica unavailable: {type(exc).__name__}") from exc


@serve.deployment(name="OpenAIIngress", max_ongoing_requests=256)
@serve.ingress()
class OpenAIIngress:
    """HTTP ingress: the OpenAI-compatible FastAPI app over the model deployment, recording its requests in
    Ray's metrics."""

    def __init__(self, model_handle: DeploymentHandle, settings: dict[str, Any]):
        self.settings = ingress_settings(settings)
        self.backend = HandleBackend(model_handle)

    def __serve_build_asgi_app__(self):
        return create_api(
            self.backend, self.settings, serve_metrics()
        )  # built in the replica: Serve's labels


def ingress_settings(settings: dict[str, Any]) -> Settings:
    """The ingress's `Settings` from what `build_app` bound (`limits`: the validated `Limits`, taken as it is),
    checked where the replica starts: without an API key
    in its environment (and without `auth: none`) this raises `serve_apps.api.AuthNotConfigured`, naming the
    variable and the option, and the replica does not start."""
    parsed = Settings(
        served_model_name=settings["served_model_name"],
        limits=settings.get("limits", Limits()),
        api_key_env=settings["api_key_env"],
        auth=settings.get("auth", "api_key"),
        allowed_hosts=tuple(settings.get("allowed_hosts", ())),
        retry_after_s=settings["retry_after_s"],
        default_compression=settings["default_compression"],
        health_timeout_s=settings["health_timeout_s"],
        send_request_id=False,  # Serve's proxy answers with the request's x-request-id
    )
    parsed.api_key()  # fail here, at start, rather than when the app is first built
    return parsed


def build_app(args: dict[str, Any], policy: SchedulingPolicy | None = None) -> serve.Application:
    """Ray Serve app builder (`import_path: serve_apps.app:build_app`): validate `args`, bind the deployments.

    `args` are validated once, here, sections included (a `dpn_base.config_models.ConfigError` names each wrong
    key, `batching.max_num_seqs: must be >= 1, got 0`); the deployments receive the validated sections.

    Deployment options (replicas, autoscaling, resources, queue bounds) come from the config's `deployments`
    section (names `DPNServer` and `OpenAIIngress`) and override the defaults set here.

    Args:
        args: the serve config's `args` ([`AppArgs`]).
        policy: the replicas' scheduling policy (serve_apps.policy) in place of the production one, for the
            baselines of benchmarks/serve_load.py; a config file cannot give one (Serve passes `args` only).
    """
    parsed = validate_config(AppArgs, args)  # fail at build time on bad options
    capacity = (policy if policy is not None else ContinuousPolicy(parsed.batching)).capacity
    options = {
        # room for a full engine (the requests it runs at once) and as many again queued on the replica
        "max_ongoing_requests": max(64, 2 * capacity),
        **parsed.model_options,
        "user_config": {"model": parsed.model, "version": parsed.version or default_version(parsed.model)},
    }
    model = ModelDeployment.options(**options).bind(
        batching=parsed.batching,
        limits=parsed.limits,
        device=parsed.device,
        dtype=parsed.dtype,
        default_compression=parsed.default_compression,
        encoder_cache_bytes=parsed.encoder_cache_bytes,
        policy=policy,
    )
    settings = {
        "served_model_name": parsed.served_model_name,
        "limits": parsed.limits,
        "api_key_env": parsed.api_key_env,
        "auth": parsed.auth,
        "allowed_hosts": parsed.allowed_hosts,
        "retry_after_s": parsed.retry_after_s,
        "default_compression": parsed.default_compression,
        "health_timeout_s": parsed.health_timeout_s,
    }
    return OpenAIIngress.bind(model, settings)


__all__ = ["AppArgs", "HandleBackend", "OpenAIIngress", "build_app", "ingress_settings"]
