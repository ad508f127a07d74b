"""The retrain gate cannot race: leases in MLflow tags, promotion as a compare-and-set, NaN metrics. No Ray.

MLflow on a SQLite file (the tracking tests' fixture); model versions registered from an empty folder (the
gate never loads them); the evaluation is a function of the champion version (``decide_and_apply(evaluate=)``),
the hours-long step the champion may move during. Races between processes use real spawned processes.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_tracking import mlflow_uri  # noqa: F401 - the tracking tests' fixture

import tracking
from jobs.retraining.config import GateConfig, RetrainConfig
from jobs.retraining.gate import comparison_table, decide
from jobs.retraining.job import (
    CHAMPION_MOVED,
    LEASE_HELD,
    ROLE_TAG,
    STATE_TAG,
    STEP_EVENT,
    decide_and_apply,
    retrain,
)
from tracking import registry as reg_lib
from tracking.registry import ChampionMoved, Registry
from tracking.runs import LeaseHeld, LeaseLost, LeaseOwner

REPO = Path(__file__).resolve().parents[1]
SPAWN = multiprocessing.get_context("spawn")
SETTLE_S = 0.05  # Fischer's wait in the single-process tests (nobody else races them)
FOREIGN = LeaseOwner("f" * 32, "cron-node-2", 4242)  # another machine's job, as its tag reads


def _row(accuracy: float, flops: float = 100.0) -> dict:
    return {"accuracy": accuracy, "mean_prefill_flops": flops, "num_samples": 24}


def _registry(uri: str, name: str, versions: int, tmp_path: Path) -> Registry:
    client = MlflowClient(uri)
    client.create_registered_model(name)
    for _ in range(versions):
        client.create_model_version(name, source=str(tmp_path), run_id=None)
    return Registry(client, name, lease_settle_s=SETTLE_S)


def _config(uri: str, name: str, **sections) -> RetrainConfig:
    return RetrainConfig.model_validate({
        "training": {"config": str(REPO / "configs" / "train_tiny.yaml")},
        "lease": {"ttl_s": 30.0, "settle_s": SETTLE_S},
        "mlflow": {"tracking_uri": uri, "experiment": "gate-race", "model_name": name, "ready_timeout_s": 10},
        **sections,
    })  # fmt: skip


def _retrain_run(name: str) -> str:
    run_id, _ = tracking.start_or_resume_run(
        "gate-race", name, tags={ROLE_TAG: "retrain", STATE_TAG: "trained"}
    )
    return run_id


# an action at a step boundary of the retrain job (its audit event), switched on per test
_at_step: ContextVar[tuple[str, Callable[[], None]] | None] = ContextVar("gate_race_step", default=None)
_hooked = False


def _hook(event: str, args: tuple) -> None:
    if event == STEP_EVENT and (action := _at_step.get()) is not None and args[0] == action[0]:
        action[1]()


@contextmanager
def at_step(step: str, action: Callable[[], None]) -> Iterator[None]:
    global _hooked
    if not _hooked:
        sys.addaudithook(_hook)  # cannot be removed: it only reads the switch
        _hooked = True
    token = _at_step.set((step, action))
    try:
        yield
    finally:
        _at_step.reset(token)


# ----------------------------------------------------------------------------------------------
# The gate: a decision is applied only against the champion it was made against
# ----------------------------------------------------------------------------------------------


def test_a_decision_made_against_v1_is_not_applied_after_the_champion_moved_to_v3(mlflow_uri, tmp_path):  # noqa: F811
    registry = _registry(mlflow_uri, "race", 3, tmp_path)
    registry.promote("1")
    cfg, run_id = _config(mlflow_uri, "race"), _retrain_run("retrain-race")
    evaluated: list[str | None] = []

    def evaluate(champion: str | None) -> dict:  # the challenger beats v1 clearly and loses to v3
        evaluated.append(champion)
        return {"champion": _row(0.5), "challenger": _row(0.9 if champion == "1" else 0.1)}

    def move_champion() -> None:  # a person promotes v3 while the decision waits to be applied
        registry.client.set_registered_model_alias("race", "champion", "3")

    with at_step("evaluate", move_champion):
        outcome = decide_and_apply(cfg, registry, run_id, {"job_name": "retrain-race", "key": "k"}, "2",
                                   mlflow_uri, evaluate=evaluate)  # fmt: skip
    assert outcome.decision.promote and outcome.status == CHAMPION_MOVED
    assert "moved from version 1 to version 3" in outcome.reason
    assert registry.champion_version() == "3" and registry.alias("previous") is None  # nothing moved
    tags = registry.get("2").tags
    assert "moved from version 1 to version 3" in tags[reg_lib.REFUSED_TAG]
    assert reg_lib.DECISION_TAG not in tags
    run = registry.client.get_run(run_id)
    assert run.data.tags[STATE_TAG] == "decided" and run.info.status == "RUNNING"  # the next run takes it up

    # the next invocation: the recorded decision was made against v1, the champion is v3: evaluate again
    outcome = decide_and_apply(cfg, registry, run_id, {"job_name": "retrain-race", "key": "k"}, "2",
                               mlflow_uri, evaluate=evaluate)  # fmt: skip
    assert evaluated == ["1", "3"]
    assert outcome.status == reg_lib.REJECTED and "below the champion" in outcome.reason
    assert registry.champion_version() == "3" and registry.get("2").tags[reg_lib.DECISION_TAG] == "rejected"


def test_an_unmoved_champion_is_replaced_and_previous_kept(mlflow_uri, tmp_path):  # noqa: F811
    registry = _registry(mlflow_uri, "calm", 2, tmp_path)
    registry.promote("1")
    cfg, run_id = _config(mlflow_uri, "calm"), _retrain_run("retrain-calm")
    outcome = decide_and_apply(cfg, registry, run_id, {"job_name": "retrain-calm", "key": "k"}, "2", mlflow_uri,
                               evaluate=lambda champion: {"champion": _row(0.5), "challenger": _row(0.6)})  # fmt: skip
    assert outcome.status == reg_lib.PROMOTED and (outcome.champion, outcome.previous) == ("2", "1")
    assert registry.client.get_run(run_id).info.status == "FINISHED"


def test_promote_is_a_compare_and_set_under_the_alias_lease(mlflow_uri, tmp_path):  # noqa: F811
    registry = _registry(mlflow_uri, "cas", 3, tmp_path)
    assert registry.promote("1", expected_champion=None) is None  # the first champion: there was none
    registry.client.set_registered_model_alias("cas", "champion", "3")
    with pytest.raises(ChampionMoved, match="moved from version 1 to version 3"):
        registry.promote("2", expected_champion="1")
    assert registry.champion_version() == "3" and registry.alias("previous") is None
    other = registry.lease(reg_lib.ALIAS_LEASE_TAG, "alias moves", ttl_s=30, owner=FOREIGN)
    other.acquire()
    with pytest.raises(LeaseHeld, match="cron-node-2 pid 4242"):
        registry.promote("2", expected_champion="3")  # another promotion is moving the aliases right now
    other.release()
    assert registry.promote("2", expected_champion="3") == "3"
    assert registry.champion_version() == "2" and str(registry.alias("previous").version) == "3"


# ----------------------------------------------------------------------------------------------
# NaN and missing metrics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenger", "champion", "named"),
    [
        (_row(math.nan), _row(0.5), "challenger's evaluation has accuracy nan"),
        (_row(0.9, math.nan), _row(0.5), "challenger's evaluation has mean_prefill_flops nan"),
        (
            _row(0.9),
            _row(math.nan, math.inf),
            "champion's evaluation has accuracy nan, mean_prefill_flops inf",
        ),
        ({"mean_prefill_flops": 100.0}, _row(0.5), "challenger's evaluation has no accuracy"),
        ({"accuracy": 0.9}, _row(0.5), "challenger's evaluation has no mean_prefill_flops"),
        ({"accuracy": None}, None, "challenger's evaluation has no accuracy"),
        (_row(math.nan), None, "challenger's evaluation has accuracy nan"),
    ],
)
def test_nan_or_missing_metrics_reject_with_a_reason(challenger, champion, named):
    gate = GateConfig(
        accuracy_tolerance=1.0, flops_tolerance=10.0, min_accuracy=0.0
    )  # everything else passes
    decision = decide(challenger, champion, gate)
    assert not decision.promote
    assert named in decision.reason and "not comparable" in decision.reason
    rows = {"challenger": challenger, **({"champion": champion} if champion else {})}
    assert "**REJECT**" in comparison_table(rows, decision)  # the report of a broken evaluation still renders


def test_a_nan_challenger_is_rejected_by_the_job_and_the_champion_kept(mlflow_uri, tmp_path):  # noqa: F811
    registry = _registry(mlflow_uri, "nan", 2, tmp_path)
    registry.promote("1")
    cfg, run_id = _config(mlflow_uri, "nan"), _retrain_run("retrain-nan")
    outcome = decide_and_apply(cfg, registry, run_id, {"job_name": "retrain-nan", "key": "k"}, "2", mlflow_uri,
                               evaluate=lambda champion: {"champion": _row(0.5), "challenger": _row(math.nan)})  # fmt: skip
    assert outcome.status == reg_lib.REJECTED and "accuracy nan" in outcome.reason
    assert registry.champion_version() == "1"
    assert "accuracy nan" in registry.get("2").tags[reg_lib.REASON_TAG]


# ----------------------------------------------------------------------------------------------
# One retrain at a time: the retrain lease
# ----------------------------------------------------------------------------------------------


def test_a_second_retrain_exits_0_naming_the_lease_holder(mlflow_uri, tmp_path, capsys):  # noqa: F811
    from jobs.retraining.job import main

    registry = _registry(mlflow_uri, "busy", 1, tmp_path)
    holder = registry.retrain_lease(ttl_s=60, owner=FOREIGN)
    holder.acquire()
    cfg = _config(mlflow_uri, "busy")
    result = retrain(cfg)
    assert result.status == LEASE_HELD
    assert "another retrain is running" in result.reason and "cron-node-2 pid 4242" in result.reason
    assert holder.held()  # untouched

    config = tmp_path / "retrain.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert (
        main(["--config", str(config), "--log-file", str(tmp_path / "retrain.log")]) == 0
    )  # what a schedule wants: the next tick tries again
    assert "status=lease_held" in capsys.readouterr().out


def test_an_expired_retrain_lease_is_taken_over_and_released_after_a_crash(mlflow_uri, tmp_path):  # noqa: F811
    registry = _registry(mlflow_uri, "crashed", 1, tmp_path)
    dead = registry.retrain_lease(ttl_s=0.3, owner=FOREIGN)  # a retrain that died: nothing renews it
    dead.acquire()
    time.sleep(0.4)
    cfg = _config(mlflow_uri, "crashed", training={"config": str(tmp_path / "missing.yaml")})
    with pytest.raises(Exception, match="missing.yaml"):  # past the lease, the job fails on its config
        retrain(cfg)
    assert registry.retrain_lease(ttl_s=30).holder() is None  # released on the way out
    with pytest.raises(LeaseLost, match="lost the retrain of crashed lease"):
        dead.renew()  # the dead holder cannot come back to life

    mine = registry.retrain_lease(ttl_s=30)
    mine.acquire()
    assert mine.held() and mine.holder().host == socket.gethostname() and mine.holder().pid == os.getpid()
    with pytest.raises(LeaseHeld):
        registry.retrain_lease(ttl_s=30).acquire()  # another owner, even in this process
    mine.release()
    assert mine.holder() is None


def _child_take_lease(uri: str, name: str, barrier, results, done) -> None:
    registry = Registry(MlflowClient(uri), name, lease_settle_s=1.0)
    lease = registry.retrain_lease(ttl_s=60)
    barrier.wait()
    try:
        lease.acquire()
        results.put(("held", os.getpid()))
    except LeaseHeld as held:
        results.put(("refused", str(held)))
    done.wait(timeout=120)  # the holder keeps it until every taker has tried
    lease.release()


@pytest.mark.slow
def test_of_three_retrains_started_at_once_exactly_one_holds_the_lease(mlflow_uri, tmp_path):  # noqa: F811
    Registry(MlflowClient(mlflow_uri), "three").ensure_model()
    barrier, done, results = SPAWN.Barrier(3), SPAWN.Barrier(3), SPAWN.Queue()
    children = [SPAWN.Process(target=_child_take_lease, args=(mlflow_uri, "three", barrier, results, done))
                for _ in range(3)]  # fmt: skip
    for child in children:
        child.start()
    try:
        outcomes = sorted(results.get(timeout=180) for _ in children)
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
    assert [kind for kind, _ in outcomes] == ["held", "refused", "refused"], outcomes
    assert all("lease" in str(detail) for _, detail in outcomes[1:])


# ----------------------------------------------------------------------------------------------
# A RUNNING run under a live lease is another job's
# ----------------------------------------------------------------------------------------------


def _child_hold_run(uri: str, job: str, results) -> None:
    run_id, _ = tracking.start_or_resume_run("gate-race", job, uri=uri, lease_ttl_s=3.0)
    results.put(run_id)
    time.sleep(600)  # training: the lease is renewed every second until the process is killed


@pytest.mark.slow
def test_a_running_run_is_not_resumed_while_its_owner_lives_and_is_once_it_died(mlflow_uri):  # noqa: F811
    results = SPAWN.Queue()
    child = SPAWN.Process(target=_child_hold_run, args=(mlflow_uri, "trainer", results))
    child.start()
    try:
        run_id = results.get(timeout=180)
        time.sleep(3.5)  # longer than the lease: only renewals keep it live
        with pytest.raises(
            LeaseHeld, match=rf"run {run_id} of job 'trainer' \(RUNNING\) is in use.*pid {child.pid}"
        ):
            tracking.start_or_resume_run("gate-race", "trainer", uri=mlflow_uri)
        os.kill(child.pid, signal.SIGKILL)  # the trainer dies; its run stays RUNNING
    finally:
        child.join(timeout=30)
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "RUNNING"
    deadline = time.monotonic() + 30
    while True:  # resumable once the dead owner's lease ran out (at most 3 s after its last renewal)
        try:
            resumed = tracking.start_or_resume_run("gate-race", "trainer", uri=mlflow_uri)
            break
        except LeaseHeld:
            assert time.monotonic() < deadline, "the dead owner's lease never expired"
            time.sleep(0.5)
    assert resumed == (run_id, True)
    tracking.end_run(run_id, "FAILED", uri=mlflow_uri)
    assert tracking.start_or_resume_run("gate-race", "trainer", uri=mlflow_uri) == (run_id, True)  # at once


def test_a_run_lease_held_by_a_live_foreign_owner_refuses_and_its_expiry_allows(mlflow_uri):  # noqa: F811
    client = MlflowClient(mlflow_uri)
    run_id, _ = tracking.start_or_resume_run("gate-race", "foreign", uri=mlflow_uri)
    tracking.end_run(run_id, "FAILED", uri=mlflow_uri)
    other = tracking.run_lease(client, run_id, ttl_s=0.5, settle_s=SETTLE_S, owner=FOREIGN)
    other.acquire()  # another machine is resuming it right now (its status still says FAILED)
    with pytest.raises(LeaseHeld, match="cron-node-2 pid 4242"):
        tracking.start_or_resume_run("gate-race", "foreign", uri=mlflow_uri)
    time.sleep(0.6)
    assert tracking.start_or_resume_run("gate-race", "foreign", uri=mlflow_uri) == (run_id, True)
    assert tracking.run_lease(client, run_id).held()  # ours now, and renewed
    tracking.end_run(run_id, uri=mlflow_uri)
    assert tracking.run_lease(client, run_id).holder() is None
