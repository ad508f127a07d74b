"""One home for joining Ray (``dpn_base.ray_session``): which cluster, and the environment every job's workers get.

No cluster is started: ``ray.init`` is replaced by a recorder, so these run in the unit suite.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest

from dpn_base.ray_session import WORKER_ENV_VARS, connect_ray

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpn_base", "dpn_model", "pipelines", "tracking", "serve_apps", "jobs", "dpn_cli")
RAY_HOME = "dpn_base/ray_session.py"


@pytest.fixture
def ray_init(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The keyword arguments of each ``ray.init`` call, Ray not yet initialised; no cluster starts."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_a_local_start_is_a_new_cluster_whose_workers_get_the_tracking_uri_and_offline_setting(
    ray_init, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert connect_ray(num_cpus=3) is True
    assert ray_init == [
        {
            "address": "local",
            "num_cpus": 3,
            "include_dashboard": False,
            "runtime_env": {
                "env_vars": {"HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "http://tracking:5000"}
            },
            "log_to_driver": True,
        }
    ]


def test_a_cluster_address_or_ray_address_is_joined_and_unset_variables_are_not_forwarded(
    ray_init, monkeypatch
):
    for name in WORKER_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert connect_ray(num_cpus=3, log_to_driver=False) is True
    assert ray_init == [
        {"address": "ray://head:10001", "runtime_env": {"env_vars": {}}, "log_to_driver": False}
    ]
    ray_init.clear()
    assert connect_ray("http://other:8265") is True  # an explicit address wins over $RAY_ADDRESS
    assert ray_init[0]["address"] == "http://other:8265"


def test_ray_already_initialised_is_left_to_its_owner(ray_init):
    connect_ray()
    assert connect_ray("http://elsewhere:8265") is False
    assert len(ray_init) == 1


def test_training_starts_its_local_ray_with_its_cpus_and_the_dashboard(ray_init, monkeypatch):
    from jobs.training.config import load_train_config
    from jobs.training.driver import init_ray

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///x.db")
    assert init_ray(load_train_config(None, ["run.local_num_cpus=5"])) is True
    call = ray_init[0]
    assert (call["address"], call["num_cpus"], call["include_dashboard"]) == ("local", 5, True)
    assert call["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
    ray_init.clear()
    init_ray(load_train_config(None, ["run.ray_address=ray://head:10001"]))
    assert ray_init[0]["address"] == "ray://head:10001"


def _ray_init_calls(path: Path) -> list[int]:
    """Lines of ``ray.init(...)`` calls in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "init"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "ray"
    ]


def test_ray_is_started_only_by_the_ray_session_module():
    found = [
        f"{rel}:{line}"
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (rel := path.relative_to(ROOT).as_posix()) != RAY_HOME
        for line in _ray_init_calls(path)
    ]
    assert not found, f"ray.init outside {RAY_HOME} (use dpn_base.ray_session.connect_ray): {found}"
    assert _ray_init_calls(ROOT / RAY_HOME)
