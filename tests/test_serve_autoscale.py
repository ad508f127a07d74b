"""Serve autoscaling, observed: load adds a model replica, a lull removes it, and no request fails either way.

One local Ray cluster, the tiny random model, the app built by `serve_apps.app.build_app` with the model deployment
autoscaled between 1 and 2 replicas (half a CPU each) through `model_options`, as a config file's `deployments`
section would set it. Serve scales on the ongoing requests per replica (queued in the caller's handle + running on
the replica, averaged over `look_back_period_s`) against `target_ongoing_requests`: 6 clients that keep long
generations in flight are 3x the target of 2 a replica, which asks for 2 replicas; one client afterwards is half
the target, which asks for 1. Every response of both moves must be a 200 with a complete answer.

Measured on 2 cores shared with a training job (load average 10): the controller decided to upscale 3 s into the
load, but the new replica took 54 s to start (a fresh worker process importing torch), so the second replica ran
57 s in; the scale-down came 9 s into the lull. The whole module took 213 s there, most of it starting processes.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from serve_cluster import served_tiny_app

# with ignore_eos every answer is exactly this long, so each request stays ongoing for a while
MAX_TOKENS = 48
LOAD_CLIENTS = 6
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "metrics_interval_s": 0.5,  # how often the ingress's handle reports its ongoing requests to the controller
    "look_back_period_s": 2.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 3.0,
}
# Each move: the autoscaler decides within a few seconds (the delays above), but a new replica is a new worker process
# that imports torch and loads the model; on 2 busy cores that alone took 40-54 s. Generous, to fail only when
# Serve never scales.
SCALE_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("ray")
    # room for the ingress (1 CPU) and both model replicas (0.5 each): the second replica must not wait for CPUs
    with served_tiny_app(
        tmp_path_factory.mktemp("autoscale"),
        {
            "version": "v1",
            "api_key_env": "DPN_AUTOSCALE_TEST_UNSET_KEY",
            "limits": {"max_tokens": MAX_TOKENS, "default_max_tokens": 4},
            "model_options": {
                "autoscaling_config": AUTOSCALING,
                "ray_actor_options": {"num_cpus": 0.5},
                "graceful_shutdown_timeout_s": 60,  # a stopping replica finishes what it runs
            },
        },
    ) as base:
        yield base


@dataclass
class Load:
    """Clients that each keep one chat completion in flight until stopped, recording every outcome."""

    url: str
    clients: int
    stop: threading.Event = field(default_factory=threading.Event)
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.clients)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        assert not any(thread.is_alive() for thread in self._threads), "a client hung"

    def _client(self, index: int) -> None:
        body = {
            "messages": [{"role": "user", "content": f"count to a hundred, client {index}"}],
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "temperature": 0,
        }
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(self.url + "/v1/chat/completions", json=body)
                    problem = _completion_problem(response)
                except httpx.HTTPError as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    if problem is None:
                        self.ok += 1
                    else:
                        self.failures.append(problem)


def _completion_problem(response: httpx.Response) -> str | None:
    """None for a 200 carrying a complete answer of MAX_TOKENS tokens, else what is wrong with it."""
    if response.status_code != 200:
        return f"{response.status_code}: {response.text[:300]}"
    payload = response.json()
    choice = payload["choices"][0]
    if not isinstance(choice["message"]["content"], str) or choice["finish_reason"] != "length":
        return f"incomplete answer: {choice}"
    if payload["usage"]["completion_tokens"] != MAX_TOKENS:
        return f"{payload['usage']['completion_tokens']} tokens instead of {MAX_TOKENS}"
    return None


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["dpn"].deployments["DPNServer"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for_replicas(count: int, load: Load, what: str) -> float:
    """Seconds until Serve reports exactly `count` RUNNING model replicas (and no other), polled every 0.25 s."""
    from ray import serve

    start = time.monotonic()
    while True:
        states = serve.status().applications["dpn"].deployments["DPNServer"].replica_states
        if states == {"RUNNING": count}:
            return time.monotonic() - start
        assert time.monotonic() - start < SCALE_TIMEOUT_S, (
            f"no {what} within {SCALE_TIMEOUT_S} s: replicas {states}, {load.ok} answers, failures {load.failures[:3]}"
        )
        time.sleep(0.25)


@pytest.mark.ray
@pytest.mark.slow
def test_load_adds_a_replica_and_the_lull_removes_it_without_a_failed_request(served):
    assert _running_replicas() == 1

    with Load(served, LOAD_CLIENTS) as heavy:
        up_s = _wait_for_replicas(2, heavy, "scale-up")
        answered_before_up = heavy.ok
        # both replicas serve: keep the load a little longer so requests are routed to the new one
        time.sleep(2)
    assert heavy.failures == [], heavy.failures
    assert heavy.ok > answered_before_up, "no answer after the second replica came up"

    # a lull, not silence: one client keeps requests in flight while Serve drains and stops a replica
    with Load(served, 1) as light:
        down_s = _wait_for_replicas(1, light, "scale-down")
        answered_at_down = light.ok
        time.sleep(1)
    assert light.failures == [], light.failures
    assert light.ok > answered_at_down, "no answer after the replica was removed"
    print(
        f"scale-up after {up_s:.1f} s of load ({answered_before_up} answers), scale-down after {down_s:.1f} s"
    )
