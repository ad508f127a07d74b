"""`dpn serve`: start the OpenAI-compatible endpoint on a local (or given) Ray cluster, for a quick start.

    DPN_API_KEY=$(python -c "import secrets; print(secrets.token_urlsafe(32))") \
        dpn serve --model /path/to/checkpoint --port 8000
    dpn serve --model models:/dpn@champion --max-replicas 2 --compression-default auto

The endpoint needs an API key (clients send `Authorization: Bearer <key>`) in the environment variable named by
`--api-key-env` (`DPN_API_KEY`); without one it refuses to start, unless `--auth none` says to serve without
authentication (a trusted network only).

For a cluster, prefer `serve deploy configs/serve_llava7b.yaml`; this command builds the same app from flags.

The console shows the command's stages (Ray started or joined, the app deployed, the URL it serves at) and errors;
what Ray, Ray Serve and the replicas print goes to a log file whose path it prints first (`--log-file PATH`;
default `~/.dpn/logs/serve-<time>.log`), as the jobs do (`dpn_base.console`). `-v` shows everything instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpn_base.console import (
    add_console_arguments,
    announce_log,
    console_and_log,
    default_log_path,
    report_failure,
)
from dpn_base.ray_session import connect_ray

if TYPE_CHECKING:
    from ray.serve import Application

logger = logging.getLogger(__name__)

LOG_FOLDER = Path("~/.dpn")  # the default log's folder (`<LOG_FOLDER>/logs/serve-<time>.log`)
LIBRARIES = "Ray, Ray Serve and the replicas"  # what else prints, in the console's words
# which of the project's log records the console shows: this command's stages, and the warnings of the rest
SERVE_ECHO: dict[str, int] = {
    "serve_apps": logging.INFO,
    "tracking": logging.INFO,  # a models:/ URI resolved and downloaded
    "dpn_model": logging.WARNING,
    "dpn_base": logging.WARNING,
}


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
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster address, `auto` for the `ray start` cluster on this machine (default: $RAY_ADDRESS, "
        "else start a local one)",
    )
    add_console_arguments(parser, "~/.dpn/logs/serve-<time>.log", LIBRARIES)


def run(args: argparse.Namespace) -> int:
    from serve_apps.app import build_app

    _check_args(args)
    with _serve_console(args):
        logger.info("building the app for %s", args.model)
        app = build_app(_app_args(args))
        _serve_until_interrupted(app, args)
    return 0


@contextlib.contextmanager
def _serve_console(args: argparse.Namespace) -> Iterator[None]:
    """The clean console of `dpn serve` (`dpn_base.console`): its stages on stderr, the rest in the log.

    Ctrl-C once the endpoint is up is how the command stops (`_serve_until_interrupted` takes it); an error, or
    Ctrl-C during the start, prints the log's last lines and exits 1 (130). With `args.verbose` the body runs as
    without a console.
    """
    if args.verbose:
        yield
        return
    log_path = Path(args.log_file or default_log_path(LOG_FOLDER.expanduser(), "serve")).resolve()
    announce_log("serve", log_path, LIBRARIES)
    failure = None
    with console_and_log(log_path, console_fd=2, echo=SERVE_ECHO) as out:
        logger.info("dpn serve: %s", " ".join(sys.argv), extra={"console": False})
        try:
            yield
        except (Exception, KeyboardInterrupt) as err:
            logger.error("dpn serve failed", exc_info=True, extra={"console": False})
            failure = err
        else:
            print(f"dpn serve stopped; its log: {log_path}", file=out, flush=True)
    if failure is not None:
        report_failure(sys.stderr, "serve", failure, log_path)
        raise SystemExit(130 if isinstance(failure, KeyboardInterrupt) else 1) from failure


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

    Ray is joined as every command joins it (`connect_ray`: `--address`, else `$RAY_ADDRESS`, else a new local
    Ray whose workers inherit this environment, the API key included: what `_check_args` relies on). Serve is
    shut down on the way out, so a local start leaves no replicas behind.
    """
    from ray import serve

    where = args.address or os.environ.get("RAY_ADDRESS")
    if where:
        logger.info("joining the Ray cluster at %s", where)
    else:
        logger.info("starting a local Ray")
    # with the dashboard, as the plain `ray.init()` this replaced started it: `serve status` reads its REST API
    connect_ray(args.address, dashboard=True)
    logger.info("starting Ray Serve's HTTP proxy on %s:%d", args.host, args.port)
    serve.start(http_options={"host": args.host, "port": args.port})
    logger.info("deploying the app dpn (model %s; replicas load it, which can take minutes) ...", args.model)
    serve.run(app, name="dpn", route_prefix=args.route_prefix)
    logger.info(
        "serving %s at http://%s:%d%sv1 (API key: %s; Ctrl-C to stop)",
        args.model,
        args.host,
        args.port,
        args.route_prefix.rstrip("/") + "/",
        f"required, from ${args.api_key_env}" if args.auth == "api_key" else "off",
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("shutting down")
    finally:
        serve.shutdown()
