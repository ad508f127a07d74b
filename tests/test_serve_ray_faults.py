"""A model replica dies mid-request on a real Ray Serve app: the client gets 503 + Retry-After, not a 500.

One local Ray cluster for the module, the tiny random model. The replica actor is killed while a long generation
runs on it; the request in flight must be answered with OpenAI's error shape and `Retry-After`, `/health` must say
503 within its timeout instead of hanging until the replacement is up, and the replacement must then serve.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from serve_cluster import served_tiny_app

HEALTH_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("ray")
    try:
        with served_tiny_app(
            tmp_path_factory.mktemp("faults"),
            {
                "version": "v1",
                "api_key_env": "DPN_FAULT_TEST_UNSET_KEY",
                "retry_after_s": 2,
                "health_timeout_s": HEALTH_TIMEOUT_S,
                "batching": {"batch_wait_timeout_s": 0.01},
                "limits": {"max_tokens": 900, "default_max_tokens": 4},
                "model_options": {"ray_actor_options": {"num_cpus": 1}},
            },
        ) as base:
            yield base
    finally:
        os.environ.pop("DPN_FAULT_TEST_UNSET_KEY", None)


def _kill_model_replica() -> None:
    import ray

    replicas = [
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "SERVE_REPLICA" in a["name"] and "DPNServer" in a["name"]
    ]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)


@pytest.mark.ray
def test_ray_replica_death_is_503_with_retry_after(served):
    url = served + "/v1/chat/completions"
    assert (
        httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60).status_code == 200
    )
    long = {
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 900,
        "ignore_eos": True,
        "temperature": 0,
    }
    with ThreadPoolExecutor(1) as pool:
        before = len(httpx.get(served + "/v1/dpn/batches", timeout=5).json()["data"])
        in_flight = pool.submit(httpx.post, url, json=long, timeout=60)
        deadline = time.monotonic() + 30
        while len(httpx.get(served + "/v1/dpn/batches", timeout=5).json()["data"]) == before:
            assert time.monotonic() < deadline, "the long request never started a batch"
            time.sleep(0.05)
        _kill_model_replica()
        start = time.monotonic()
        health = httpx.get(served + "/health", timeout=30)
        health_s = time.monotonic() - start
        response = in_flight.result()

    assert response.status_code == 503, response.text
    assert response.headers["retry-after"] == "2"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_unavailable"

    assert health.status_code == 503, health.text
    assert health_s < HEALTH_TIMEOUT_S + 1.5, health_s
    assert set(health.json()["error"]) == {"message", "type", "param", "code"}

    deadline = time.monotonic() + 90  # Serve replaces the replica; then requests are served again
    while httpx.get(served + "/health", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "no replacement replica"
        time.sleep(0.5)
    assert (
        httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60).status_code == 200
    )
