"""The tiny serve app on a local Ray with Serve on a free port, shared by the Ray serving test modules."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served_tiny_app(root: Path, args: dict[str, Any], **ray_init: Any) -> Iterator[str]:
    """Serve `build_app({"model": <a tiny random checkpoint under root>, "device": "cpu", "auth": "none", **args})`
    on a local Ray of 3 CPUs (the ingress and up to two model replicas); yields the base URL, and shuts Serve and
    Ray down after.

    Args:
        root: where the checkpoint is written.
        args: the app's args (`serve_apps.app.AppArgs`) besides `model` and `device`; without `auth` the app is
            served without authentication (on 127.0.0.1 only), as these tests of other things need.
        ray_init: extra `ray.init` arguments (e.g. `_metrics_export_port`).
    """
    import ray
    from ray import serve

    from dpn_model.presets import create_checkpoint
    from serve_apps.app import build_app

    checkpoint = create_checkpoint("tiny", str(root / "ckpt"), seed=0)
    port = free_port()
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, **ray_init)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": checkpoint, "device": "cpu", "auth": "none", **args})
        serve.run(app, name="dpn", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
