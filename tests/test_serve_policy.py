"""The serving engine's scheduling policy (serve_apps.policy) on hand-made engine states: no model, no Ray, no
event loop. Then the baselines of benchmarks/serve_load.py, as policies behind the same interface, and the app
that script builds for each of its variants."""

from __future__ import annotations

import logging
import subprocess
import sys

import cloudpickle
import pytest
from test_serve import serve_load

from dpn_base.config_models import ConfigError
from serve_apps.policy import (
    RETIRED_KEYS,
    BatchingConfig,
    ContinuousPolicy,
    EngineState,
    PrefillGroup,
    RunningRow,
    StepPlan,
    WaitingRequest,
)

NOW = 100.0


def waiting(*rates, tokens=10, ages=None) -> tuple[WaitingRequest, ...]:
    """Requests keyed 0, 1, ... of `rates`, the first the oldest (arrived `ages[i]` seconds ago, default 1 s
    apart, all due)."""
    ages = ages or [10.0 - i for i in range(len(rates))]
    sizes = tokens if isinstance(tokens, list) else [tokens] * len(rates)
    return tuple(WaitingRequest(i, rate, sizes[i], NOW - ages[i]) for i, rate in enumerate(rates))


def running(live: int, batch: int = 0, start: int = 100) -> tuple[RunningRow, ...]:
    """`live` rows still generating, keyed from `start`."""
    return tuple(RunningRow(start + i, batch) for i in range(live))


def policy(**config) -> ContinuousPolicy:
    return ContinuousPolicy(BatchingConfig(**config))


# ---------------------------------------------------------------------------------------- the production policy


def test_one_prefill_group_per_rate_fifo_within_each():
    plan = policy().plan(EngineState(NOW, waiting(2, 4, 2, "auto", 4, "1-2-4")))
    assert plan.prefill == (
        PrefillGroup("2", 2, (0, 2)),
        PrefillGroup("4", 4, (1, 4)),
        PrefillGroup("auto", "auto", (3,)),
        PrefillGroup("1-2-4", "1-2-4", (5,)),
    )
    assert all(group.joins for group in plan.prefill) and not plan.idle
    # listed in any order, each rate's requests keep their arrival order
    shuffled = waiting(2, 2, 2, 4, ages=[1.0, 3.0, 2.0, 4.0])
    plan = policy().plan(EngineState(NOW, tuple(reversed(shuffled))))
    assert plan.prefill == (PrefillGroup("4", 4, (3,)), PrefillGroup("2", 2, (1, 2, 0)))


def test_free_slots_go_to_the_oldest_requests_whatever_their_rate():
    # two slots, three waiting: the two oldest are prefilled, each in its rate's group; the youngest waits, though
    # it shares a rate with the oldest
    plan = policy(max_num_seqs=2).plan(EngineState(NOW, waiting(4, 2, 4)))
    assert plan.prefill == (PrefillGroup("4", 4, (0,)), PrefillGroup("2", 2, (1,)))


def test_the_policy_imports_without_torch_or_ray():
    """The policy is tested on hand-made states: importing it loads no model code and no cluster code."""
    check = (
        "import sys, serve_apps.policy; "
        "print(sorted(m for m in ('torch', 'ray', 'transformers', 'dpn_model') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, check=True, text=True)
    assert out.stdout.strip() == "[]"


def test_retired_batching_keys_load_with_a_warning_or_say_where_the_engine_went(caplog):
    old_config = {
        "engine": "continuous",
        "mode": "bucketed",
        "max_batch_size": 16,
        "max_queue_delay_s": 0.25,
        "max_running_batches": 4,
        "max_num_seqs": 64,
    }
    with caplog.at_level(logging.WARNING, logger="serve_apps.policy"):
        config = BatchingConfig.from_dict(old_config)
    assert ContinuousPolicy(config).capacity == 64  # what the continuous engine ran with before
    assert set(RETIRED_KEYS) == set(old_config) - {"max_num_seqs"}
    assert all(key in caplog.text for key in RETIRED_KEYS) and "max_num_seqs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serve_apps.policy"):
        BatchingConfig.from_dict({"max_num_seqs": 8, "batch_wait_timeout_s": 0.01})
    assert not caplog.records  # today's keys: nothing to warn about
    for retired in ({"engine": "static"}, {"mode": "mixed"}, {"mode": "dense"}):
        with pytest.raises(
            ConfigError,
            match=r"^batching: (engine|mode): \w+ is no longer served: .*benchmarks/serve_load\.py",
        ):
            BatchingConfig.from_dict(retired)
    with pytest.raises(ConfigError, match=r"to serve every request dense, set default_compression: 1"):
        BatchingConfig.from_dict({"mode": "dense"})
    # an old config's typo gets the message it got before
    with pytest.raises(ConfigError, match=r"batching\.mode: must be one of 'bucketed', 'mixed' or 'dense'"):
        BatchingConfig.from_dict({"mode": "fifo"})
    with pytest.raises(ConfigError, match=r"batching\.max_queue_delay_s: must be >= 0, got -1"):
        BatchingConfig.from_dict({"max_queue_delay_s": -1})


def test_app_args_validate_their_sections_once_and_the_replica_takes_them_as_they_are():
    from serve_apps.app import build_app
    from serve_apps.limits import Limits
    from serve_apps.model import DPNServer

    # the messages the sections' own validation gives, naming the dotted key
    with pytest.raises(ConfigError, match=r"^batching\.max_num_seqs: must be >= 1, got 0$"):
        build_app({"model": "m", "batching": {"max_num_seqs": 0}})
    with pytest.raises(ConfigError, match=r"^unknown config key limits\.max_image_byte in section 'limits'"):
        build_app({"model": "m", "limits": {"max_image_byte": 1}})
    with pytest.raises(ConfigError, match=r"^batching: mode: dense is no longer served"):
        build_app({"model": "m", "batching": {"mode": "dense"}})
    app = build_app(
        {
            "model": "m",
            "batching": {"max_num_seqs": 4, "max_batch_size": 2},
            "limits": {"max_tokens": 16, "default_max_tokens": 8},
        }
    )
    # both deployments get the validated sections themselves: nothing for a replica to validate again
    ingress = app._bound_deployment
    model, settings = ingress.init_args[0]._bound_deployment, ingress.init_args[1]
    assert model.init_kwargs["batching"] == BatchingConfig(max_num_seqs=4, max_batch_size=2)
    limits = model.init_kwargs["limits"]
    assert isinstance(limits, Limits) and limits.max_tokens == 16 and settings["limits"] is limits
    with pytest.raises(TypeError, match=r"batching must be a BatchingConfig .*got dict"):
        DPNServer(batching={"max_num_seqs": 4})


def test_max_num_seqs_counts_running_and_resuming_requests():
    finished = (RunningRow(200, 0, finished=True),)  # leaves: takes no slot
    state = EngineState(NOW, waiting(2, 2, 4), running(2) + finished, resuming=1)
    assert policy(max_num_seqs=4).plan(state).prefill == (PrefillGroup("2", 2, (0,)),)  # 4 - 2 - 1: one slot
    full = EngineState(NOW, waiting(2, 2), running(4))
    assert policy(max_num_seqs=4).plan(full).prefill == ()
    assert policy(max_num_seqs=4).plan(full).decode == (100, 101, 102, 103)


def test_max_prefill_tokens_takes_the_oldest_that_fit_and_a_long_prompt_alone():
    def keys(tokens: list[int]) -> list[int]:
        plan = policy(max_prefill_tokens=100).plan(
            EngineState(NOW, waiting(*[2] * len(tokens), tokens=tokens))
        )
        return [key for group in plan.prefill for key in group.keys]

    assert keys([60, 30, 20]) == [0, 1]  # the third would pass the budget
    assert keys([500, 10]) == [0]  # over the budget: prefilled alone
    assert keys([60, 50, 10]) == [0]  # the 10 fits but does not overtake the older 50
    assert keys([10, 500]) == [0]  # a long prompt waits for a step of its own
    assert keys([40, 60]) == [0, 1]  # exactly the budget


def test_waiting_served_ratio_holds_back_up_to_max_waiting_steps():
    held = policy(waiting_served_ratio=1.0, max_waiting_steps=2)
    one_waits = EngineState(NOW, waiting(2), running(2))
    plans = [held.plan(one_waits) for _ in range(4)]
    assert [bool(p.prefill) for p in plans] == [
        False,
        False,
        True,
        False,
    ]  # held 2 steps, then the count restarts
    assert all(p.decode == (100, 101) for p in plans)  # the running rows decode meanwhile
    # as many waiting as ratio x running: prefilled at once
    assert held.plan(EngineState(NOW, waiting(2, 4), running(2))).prefill
    # or when they would fill max_num_seqs
    assert policy(waiting_served_ratio=1.0, max_num_seqs=3).plan(one_waits).prefill
    # ratio 0 (the default) prefills whatever waits at every step
    assert policy().plan(one_waits).prefill == (PrefillGroup("2", 2, (0,)),)


def test_an_idle_engine_waits_for_company_then_prefills():
    cfg = {"batch_wait_timeout_s": 0.05, "max_num_seqs": 3}
    assert policy(**cfg).plan(EngineState(NOW)) == StepPlan.wait(None)  # nothing at all: wait for a request
    young = policy(**cfg).plan(EngineState(NOW, waiting(2, ages=[0.01])))
    assert young.idle and young.wait_s == pytest.approx(0.04) and not young.prefill
    assert policy(**cfg).plan(EngineState(NOW, waiting(2, ages=[0.06]))).prefill  # waited long enough
    full = EngineState(NOW, waiting(2, 2, 4, ages=[0.01, 0.01, 0.01]))  # as many as max_num_seqs: at once
    assert len(policy(**cfg).plan(full).prefill) == 2
    # a request resumed after a failure is not idle time
    assert not policy(**cfg).plan(EngineState(NOW, waiting(2, ages=[0.01]), resuming=1)).idle


def test_finished_and_cancelled_rows_leave_and_the_others_decode():
    rows = (
        RunningRow(10, 0),
        RunningRow(11, 0, finished=True),
        RunningRow(12, 0, cancelled=True),
        RunningRow(13, 1),
    )
    plan = policy().plan(EngineState(NOW, (), rows))
    assert plan.leave == (11, 12) and plan.decode == (10, 13) and not plan.prefill and not plan.idle
    # a cancelled row frees its slot for a waiting request at once
    plan = policy(max_num_seqs=3).plan(EngineState(NOW, waiting(4), rows))
    assert plan.prefill == (PrefillGroup("4", 4, (0,)),)


# ---------------------------------------------------------------------------- the baselines of serve_load.py


def test_static_baseline_starts_due_batches_and_keeps_their_rows():
    static = serve_load().StaticPolicy(
        BatchingConfig(batch_wait_timeout_s=0.05),
        max_batch_size=2,
        max_queue_delay_s=0.5,
        max_running_batches=2,
    )
    assert static.capacity == 4
    young = static.plan(EngineState(NOW, waiting(2, ages=[0.01])))
    assert young.idle and young.wait_s == pytest.approx(0.04)
    plan = static.plan(EngineState(NOW, waiting(2, 2, 2, 4, ages=[1.0, 0.9, 0.3, 0.01])))
    # idle: the due queue becomes a full batch; then, busy, the rest waits for max_queue_delay_s (or a full queue)
    assert plan.prefill == (PrefillGroup("2", 2, (0, 1), joins=False),)
    busy = EngineState(NOW, waiting(2, 4, ages=[0.6, 0.01]), running(1) + (RunningRow(7, 0, finished=True),))
    plan = static.plan(busy)
    assert plan.prefill == (PrefillGroup("2", 2, (0,), joins=False),) and plan.leave == ()  # no row leaves
    assert plan.decode == (100,)
    two_running = EngineState(NOW, waiting(2, ages=[5.0]), running(1) + running(1, batch=1, start=200))
    assert static.plan(two_running).prefill == ()  # max_running_batches


def test_one_queue_baselines_run_a_group_at_one_rate():
    baselines, config = serve_load(), BatchingConfig()
    mixed = baselines.MixedPolicy(config).plan(EngineState(NOW, waiting(2, "1-2-4", 4)))
    assert mixed.prefill == (PrefillGroup("mixed", "1-2-2", (0, 1, 2)),)  # the densest any member needs
    assert baselines.MixedPolicy(config).plan(EngineState(NOW, waiting("auto", 4))).prefill[0].rate == 1
    dense = baselines.DensePolicy(config).plan(EngineState(NOW, waiting(2, "auto", 4)))
    assert dense.prefill == (PrefillGroup("dense", 1, (0, 1, 2)),)


def test_mixed_baseline_runs_a_batch_at_the_densest_rate_any_member_needs():
    batch_rate, densest = serve_load().batch_rate, serve_load().densest
    assert batch_rate([4, 4]) == 4
    assert batch_rate([2, 4, 4]) == 2
    assert batch_rate(["auto", 4]) == 1
    assert batch_rate(["auto", "auto"]) == "auto"
    assert batch_rate(["auto:lambda=2", 4]) == 1  # a routed member, dial or not, may need every visual token
    # schedules: per pooling layer, the smallest factor any member applies there
    assert batch_rate(["1-2-4", [1, 2, 4]]) == "1-2-4"
    assert batch_rate([2, "1-2-4"]) == "1-2-2"
    assert batch_rate(["1-2-4", "4-2-1", 4]) == "1-2-1"
    assert batch_rate(["2-2-2", 4]) == 2  # a uniform schedule is its factor
    assert batch_rate([[4, 4, 4], 4]) == 4
    assert batch_rate(["auto", "1-2-4"]) == 1
    assert densest([2, "1-2-4", 4]) == "1-2-2" and densest([4, "4-2-4"]) == "4-2-4"
    assert densest(["1-2", "1-2-4"]) == 1  # schedules of different lengths: the smallest factor everywhere
    with pytest.raises(ValueError, match="routed"):
        densest(["auto", 2])


def test_serve_load_builds_each_variant_with_its_policy():
    module = serve_load()
    args = module.build_parser().parse_args([])
    expected = {"a": None, "b": "MixedPolicy", "c": "DensePolicy", "d": "StaticPolicy"}
    policies = []
    for variant, name in expected.items():
        ingress = module.variant_app(variant, "preset:tiny", args)._bound_deployment
        model = ingress.init_args[0]._bound_deployment
        policy = model.init_kwargs["policy"]
        assert (type(policy).__name__ if policy is not None else None) == name, variant
        assert model.max_ongoing_requests == 64  # 2 x 32 running at once, in every variant
        if policy is not None:
            policies.append(policy)
    # the replica gets its policy by value: a process without benchmarks/ on its path can load it
    check = "import cloudpickle, sys; print([type(p).__name__ for p in cloudpickle.loads(sys.stdin.buffer.read())])"
    out = subprocess.run(
        [sys.executable, "-c", check],
        input=cloudpickle.dumps(policies),
        capture_output=True,
        check=True,
        cwd="/",
    )
    assert out.stdout.decode().strip() == "['MixedPolicy', 'DensePolicy', 'StaticPolicy']"
