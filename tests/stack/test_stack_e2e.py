"""The main job end to end on the production stack (deploy/local): the stage `.ci/stack` runs.

Skipped unless ``DPN_STACK_ENV`` names the env file of a running stack (``dpn stack up`` writes it to
``STATE/stack.env``), so the normal suite never starts services::

    dpn stack up && DPN_STACK_ENV=~/.dpn/stack/stack.env pytest -q -m stack tests/stack

The module runs ``deploy/local/e2e.py`` once (data on S3, ``ray job submit`` of train / eval / retrain,
``serve deploy`` + one chat through the ``openai`` client, Prometheus) and checks what it found.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = os.environ.get("DPN_STACK_ENV")

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(not ENV_FILE, reason="needs a running stack: set DPN_STACK_ENV (dpn stack up)"),
]


@pytest.fixture(scope="module")
def summary(tmp_path_factory) -> dict:
    """The e2e run's summary (written whether it passed or not); its output goes to the test log."""
    path = tmp_path_factory.mktemp("e2e") / "summary.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "local" / "e2e.py"), "--env-file", ENV_FILE,
         "--tag", time.strftime("pytest-%Y%m%d-%H%M%S"), "--summary", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    assert path.is_file(), f"e2e.py wrote no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(path.read_text())


def stage(summary: dict, name: str) -> dict:
    assert name in summary["stages"], f"the e2e run stopped before {name}: {summary.get('error')}"
    return summary["stages"][name]


def test_every_stage_passed(summary):
    assert summary["ok"], summary["error"]


def test_training_placed_one_worker_on_each_node(summary):
    assert stage(summary, "train")["worker_nodes"] == ["127.0.0.2", "127.0.0.3"]


def test_checkpoints_and_model_are_in_s3(summary):
    train = stage(summary, "train")
    assert train["checkpoints"], train
    assert train["model_weights"].startswith("s3://"), train


def test_mlflow_has_every_step_once(summary):
    assert stage(summary, "train")["loss_steps"] == [1, 2, 3, 4]


def test_eval_and_retrain_ran_through_the_jobs_api(summary):
    assert stage(summary, "eval")["metrics"] > 0
    retrain = stage(summary, "retrain")
    assert retrain["status"] in ("promoted", "rejected") and retrain["champion"], retrain


def test_the_champion_answers_an_openai_client(summary):
    serve = stage(summary, "serve")
    assert serve["answer"] and serve["finish_reason"] in ("stop", "length"), serve


def test_prometheus_answers_dpn_metrics_and_the_dashboard(summary):
    metrics = stage(summary, "metrics")
    assert metrics["ray_dpn_requests_total"] >= 1
    assert metrics["dashboard_queries"] >= 10, metrics
