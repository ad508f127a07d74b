"""`dpn serve`: start the OpenAI-compatible endpoint on a local (or given) Ray cluster, for a quick start.

    DPN_API_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))") \
        dpn serve --model /path/to/checkpoint --port 8000
    dpn serve --model models:/dpn@champion --max-replicas 2 --compression-default auto

The endpoint needs an API key (clients send `Authorization: Bearer <key>`) in the environment variable named by
`--api-key-env` (`DPN_API_KEY`); without one it refuses to start, unless `--auth none` says to serve without
authentication (a trusted network only).

For a cluster, prefer `serve deploy configs/serve_llava7b.yaml`; this command builds the same app from flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray.serve import Application

logger = logging.getLogger(__name__)


def _compression(value: str) -> str | int | list[int]:
    """`auto`, a factor (`2`) or a schedule (`1,2,4`, `1-2-4`); the model's factors are checked when it loads."""
    if value == "auto":  # the default: no need to import the model package to parse it
        return value
    from serve_apps.compression import check_form

    try:
        return check_form(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="checkpoint directory or MLflow URI (models:/dpn@champion)"
    )
    parser.add_argument("--version", default=None, help="version label shown as system_fingerprint")
    parser.add_argument(
        "--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 to expose)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--route-prefix", default="/", help="route prefix of the app (default /)")
    parser.add_argument("--served-model-name", default="dpn", help="model id clients use (default dpn)")
    parser.add_argument(
        "--compression-default",
        type=_compression,
        default="auto",
        help="compression of requests that do not set it: auto, a factor (1, 2, 4) or one factor per pooling "
        "layer (1,2,4) (default auto)",
    )
    parser.add_argument(
        "--max-num-seqs", type=int, default=32, help="most requests running at once per replica (default 32)"
    )
    parser.add_argument("--batch-wait-s", type=float, default=0.02, help="batch wait timeout in seconds")
    parser.add_argument("--min-replicas", type=int, default=1, help="autoscaling minimum model replicas")
    parser.add_argument("--max-replicas", type=int, default=1, help="autoscaling maximum model replicas")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16")
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=128,
        help="requests queued per caller before 503 + Retry-After",
    )
    parser.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    parser.add_argument(
        "--api-key-env",
        default="DPN_API_KEY",
        help="environment variable holding the API key (default DPN_API_KEY; required unless --auth none)",
    )
    parser.add_argument(
        "--auth",
        choices=("api_key", "none"),
        default="api_key",
        help="api_key: clients need the key (default); none: no authentication, for a trusted network only",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        dest="allowed_hosts",
        help="a Host name the endpoint answers to (repeatable; default: any), e.g. api.example.com",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")


def run(args: argparse.Namespace) -> int:
    from serve_apps.app import build_app

    _check_args(args)
    app = build_app(_app_args(args))
    _serve_until_interrupted(app, args)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Refuse, before Ray starts, what would only fail later: an empty replica range, a local start with no key."""
    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        raise SystemExit("--max-replicas must be >= max(1, --min-replicas)")
    local = args.address is None and not os.environ.get("RAY_ADDRESS")
    if local and args.auth == "api_key" and not os.environ.get(args.api_key_env, "").strip():
        # the local Ray started here inherits this environment: say so now, not after the replicas failed
        raise SystemExit(
            f"no API key: set {args.api_key_env} to the key clients must send (e.g. "
            f"{args.api_key_env}=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')), "
            "or pass --auth none to serve without authentication (a trusted network only)"
        )


def _app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as `build_app`'s arguments, the dict a `serve deploy` config's `args:` gives it.

    `target_ongoing_requests` is half the engine's `max_num_seqs`: Serve adds replicas once each holds more than that
    (the shipped configs' 16 of 32).
    """
    return {
        "model": args.model,
        "version": args.version,
        "served_model_name": args.served_model_name,
        "device": args.device,
        "dtype": args.dtype,
        "default_compression": args.compression_default,
        "batching": {
            "max_num_seqs": args.max_num_seqs,
            "batch_wait_timeout_s": args.batch_wait_s,
        },
        "limits": {"allow_remote_images": args.allow_remote_images},
        "api_key_env": args.api_key_env,
        "auth": args.auth,
        "allowed_hosts": args.allowed_hosts,
        "model_options": {
            "autoscaling_config": {
                "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas,
                "target_ongoing_requests": max(1, args.max_num_seqs // 2),
                "upscale_delay_s": 10,
                "downscale_delay_s": 120,
            },
            "max_queued_requests": args.max_queued_requests,
            "ray_actor_options": {"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        },
    }


def _serve_until_interrupted(app: Application, args: argparse.Namespace) -> None:
    """Start Ray and Serve, run the app, and keep this process (the cluster's owner, when local) alive until Ctrl-C.

    Serve is shut down on the way out, so a local start leaves no replicas behind.
    """
    import ray
    from ray import serve

    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="dpn", route_prefix=args.route_prefix)
    logger.info(
        "serving %s at http://%s:%d%sv1 (Ctrl-C to stop)",
        args.model,
        args.host,
        args.port,
        args.route_prefix.rstrip("/") + "/",
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        serve.shutdown()
