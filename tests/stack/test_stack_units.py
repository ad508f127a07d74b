"""The stack's own logic without its services (no PostgreSQL, S3, MLflow, Ray or Prometheus is started):
the variables and their private file, process bookkeeping, paths that must fit Ray's socket limit, and
`dpn data synth` to a URI (what the e2e writes its data with)."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from dpn_cli import main as dpn
from jobs.stack import _script

stack = _script()


def test_env_prints_every_variable_and_keeps_the_secrets_private(tmp_path, capsys):
    assert dpn(["stack", "--state-dir", str(tmp_path / "s"), "env"]) == 0
    first = capsys.readouterr().out
    env = dict(shlex.split(line)[1].split("=", 1) for line in first.splitlines())
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                 "DPN_S3_BUCKET", "DPN_STORAGE_PATH", "PROMETHEUS_URL", "DPN_API_KEY"):  # fmt: skip
        assert env.get(name), name
    assert env["DPN_STORAGE_PATH"] == f"s3://{env['DPN_S3_BUCKET']}/runs"
    assert env["RAY_ADDRESS"].startswith("http://127.0.0.1:")
    for secret in (tmp_path / "s" / "secrets").iterdir():
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    assert Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    # the credentials are made once: a second call prints the same keys (the database keeps its password)
    assert dpn(["stack", "--state-dir", str(tmp_path / "s"), "env"]) == 0
    assert capsys.readouterr().out == first


def test_base_port_moves_every_port_and_is_kept_per_state_dir(tmp_path, capsys):
    dpn(["stack", "--state-dir", str(tmp_path / "a"), "--base-port", "41000", "env"])
    ctx = stack.open_context(tmp_path / "a", None)
    assert ctx.layout.port("mlflow") == 41500 and ctx.env["MLFLOW_TRACKING_URI"].endswith(":41500")
    assert stack.run(stack_args(tmp_path / "a", "--base-port", "42000", "env")) == 2  # refused, says why
    assert "--base-port 41000" in capsys.readouterr().err


def stack_args(state: Path, *argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    stack.add_arguments(parser)
    return parser.parse_args(["--state-dir", str(state), *argv])


def test_ray_temp_dirs_fit_the_socket_path_limit(tmp_path):
    short = stack.Layout(Path("/root/.dpn/stack"))
    assert short.ray_tmp == Path("/root/.dpn/stack/ray")
    long = stack.Layout(tmp_path / ("x" * 60))
    assert (
        len(str(long.ray_node_tmp("worker")))
        + len("/session_2026-12-07_14-19-41_500966_24760/sockets/plasma_store")
        < 107
    )
    assert long.ray_tmp != stack.Layout(tmp_path / ("y" * 60)).ray_tmp  # one per state dir


def test_prometheus_scrapes_the_file_ray_keeps_current(tmp_path):
    ctx = stack.open_context(tmp_path / "s", None)
    config = yaml.safe_load(stack.Prometheus(ctx).config())
    (files,) = [c["files"] for job in config["scrape_configs"] for c in job["file_sd_configs"]]
    assert files == [str(ctx.layout.ray_node_tmp("head") / "prom_metrics_service_discovery.json")]


def _service(marker: str) -> subprocess.Popen:
    """A parent with a child, in a session of their own, the parent's command line holding ``marker``."""
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, marker], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(stack.service_pids(proc.pid, marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc


def test_stop_finds_the_group_and_its_children_and_only_with_the_marker():
    proc = _service("--marker-of-this-test")
    try:
        pids = stack.service_pids(proc.pid, "--marker-of-this-test")
        assert proc.pid in pids and len(pids) == 2
        # a group id recorded long ago and recycled since: no process of it holds the marker -> left alone
        assert stack.service_pids(proc.pid, "--another-service") == []
        assert stack.stop_processes(proc.pid, "--another-service") == 0 and proc.poll() is None
        assert stack.stop_processes(proc.pid, "--marker-of-this-test", kill=True) == 2
        proc.wait(timeout=10)
        assert not any(stack._running(p) for p in pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)


@pytest.mark.slow
def test_synth_writes_a_dataset_and_a_new_shard_to_a_uri(tmp_path, capsys):
    root = tmp_path / "data"
    uri = root.as_uri()  # file://...: the URI path (stage locally, then copy) that s3:// takes
    assert dpn(["data", "synth", uri, "--format", "parquet", "--num-train", "16", "--num-eval", "8"]) == 0
    assert dpn(["data", "synth", uri, "--new-shard", "day2", "--num-train", "8", "--seed", "2"]) == 0
    manifest = json.loads((root / "synthetic.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["day2"]
    assert pq.read_table(root / "train-day2-000000.parquet").num_rows == 8
    assert pq.read_table(root / "train-000000.parquet").num_rows == 16
    assert "copied" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        dpn(["data", "synth", (tmp_path / "none").as_uri(), "--new-shard", "x", "--num-train", "8"])
