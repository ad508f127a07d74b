"""Scheduled retraining: shard discovery, the gate, registry alias moves, and the whole job on Ray.

Unit tests (no Ray): shard listing and counting, the gate rule, alias promotion (crash between the
two alias moves, re-run). Integration tests (one local Ray cluster for the module, a tiny model,
a tiny synthetic dataset, a few training steps) run one scenario in order against one registry:

1. fresh registry -> the first champion (floor 0.0);
2. a new shard -> challenger trained on it plus replay, evaluated, promoted (``previous`` = old);
3. no new data -> no-op, exit 0;
4. a shard whose answers are all one word outside the answer set (a broken labelling job, 10 epochs) ->
   the challenger answers that word everywhere (accuracy 0) -> rejected with the reason, champion kept;
5. a crash injected after training (an audit hook at the job's step boundaries, ``tests/retrain_crash.py``)
   -> the re-run promotes without training again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from jobs.retraining.config import GateConfig
from jobs.retraining.gate import decide
from jobs.retraining.shards import list_shards

REPO = Path(__file__).resolve().parents[1]
WRONG_ANSWER = "zebra"  # never a correct answer of the synthetic benchmark


# ----------------------------------------------------------------------------------------------
# Unit tests: no Ray
# ----------------------------------------------------------------------------------------------


def test_list_shards_counts_and_filters(tmp_path):
    from pipelines.synthetic import write_synthetic_dataset, write_synthetic_shard

    for fmt in ("llava", "parquet", "webdataset"):
        root = tmp_path / fmt
        write_synthetic_dataset(root, fmt, num_train=30, num_eval=8, seed=0, samples_per_shard=20)
        write_synthetic_shard(root, "day2", 12, seed=1)
        (root / "_train-incoming.json").write_text("[]")  # being written: never a shard
        shards = list_shards(str(root))
        assert sum(s.num_samples for s in shards) == 42, fmt
        assert all(not s.name.startswith(("eval", "_")) for s in shards)
        assert [s.num_samples for s in shards if "day2" in s.name] == [12], fmt
        assert all(s.size_bytes > 0 for s in shards)
        skipped = list_shards(str(root), skip=[s.name for s in shards if "day2" not in s.name])
        assert {s.name: s.num_samples for s in skipped if "day2" not in s.name} == {
            s.name: -1 for s in shards if "day2" not in s.name
        }
    folder = tmp_path / "folders"
    (folder / "train-2025-01").mkdir(parents=True)
    (folder / "train-2025-01" / "a.jsonl").write_text('{"question": "q", "answer": "a"}\n' * 3)
    (folder / "train-2025-02").mkdir()  # no data files yet
    assert [(s.name, s.num_samples) for s in list_shards(str(folder))] == [("train-2025-01", 3)]
    with pytest.raises(FileNotFoundError, match="data.root"):
        list_shards(str(tmp_path / "missing"))


def test_shipped_retrain_config_writes_a_missing_data_root_and_a_missing_root_names_the_command(tmp_path):
    from jobs.retraining.config import load_retrain_config
    from jobs.training.driver import ensure_synthetic_data

    root = tmp_path / "work" / "data" / "synthetic"
    cfg = load_retrain_config(
        REPO / "configs" / "retrain_tiny.yaml",
        [f"data.root={root}", "data.synthetic.num_train=12", "data.synthetic.num_eval=4"],
    )
    ensure_synthetic_data(cfg.data.synthetic, cfg.data.root)  # what `dpn retrain` does before discovery
    assert sum(s.num_samples for s in list_shards(cfg.data.root)) == 12
    with pytest.raises(FileNotFoundError, match=r"dpn data synth .*missing"):
        list_shards(str(tmp_path / "missing"))


def test_dpn_data_synth_new_shard_adds_a_shard_the_job_discovers(tmp_path, capsys):
    from dpn_cli import main

    root = tmp_path / "data"
    assert (
        main(["data", "synth", str(root), "--format", "llava", "--num-train", "10", "--num-eval", "4"]) == 0
    )
    assert main(["data", "synth", str(root), "--new-shard", "day2", "--num-train", "6", "--seed", "1"]) == 0
    assert "shard day2" in capsys.readouterr().out
    assert {s.name: s.num_samples for s in list_shards(str(root))} == {"train.json": 10, "train-day2.json": 6}


def _row(acc: float, flops: float) -> dict:
    return {"accuracy": acc, "mean_prefill_flops": flops}


def test_shipped_retrain_config_starts_the_first_champion_from_the_shipped_dense_model(monkeypatch):
    """The first champion follows the authors' recipe from the shipped stage-1 checkpoint (routers from step 0,
    a longer schedule); a challenger fine-tunes the champion briefly."""
    from jobs.retraining.config import load_retrain_config
    from jobs.retraining.job import training_config

    monkeypatch.chdir(REPO)  # the config names its training config relative to the repository
    cfg = load_retrain_config("configs/retrain_tiny.yaml")
    first, challenger = training_config(cfg, first=True), training_config(cfg)
    assert first.model.compression == challenger.model.compression == "auto"
    assert (
        first.model.init == "checkpoints/tiny-dense"
        and (REPO / first.model.init / "model.safetensors").is_file()
    )
    assert first.model.dense_warmup_steps == challenger.model.dense_warmup_steps == 0
    assert first.train.max_steps > challenger.train.max_steps > 0


def test_gate_rules():
    g = GateConfig(accuracy_tolerance=0.01, flops_tolerance=0.05, min_accuracy=0.3)
    assert decide(_row(0.5, 100), None, g).promote
    first = decide(_row(0.2, 100), None, g)
    assert not first.promote and "floor" in first.reason
    assert decide(_row(0.495, 104), _row(0.5, 100), g).promote  # within both tolerances
    worse = decide(_row(0.48, 100), _row(0.5, 100), g)
    assert not worse.promote and "below the champion" in worse.reason
    assert worse.accuracy_delta == pytest.approx(-0.02)
    costly = decide(_row(0.6, 106), _row(0.5, 100), g)
    assert not costly.promote and "FLOPs" in costly.reason
    assert costly.flops_rel_change == pytest.approx(0.06)
    assert not decide(_row(0.29, 50), _row(0.2, 100), g).promote  # the floor applies to every challenger


def test_promote_moves_previous_then_champion_and_survives_a_crash_between(tmp_path):
    from mlflow.tracking import MlflowClient

    from tracking import Registry

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model("m")
    for _ in range(2):
        client.create_model_version("m", source=str(tmp_path), run_id=None)
    reg = Registry(client, "m")
    assert reg.champion() is None
    assert reg.promote("1") is None
    assert reg.champion_version() == "1" and reg.alias("previous") is None

    def crash() -> None:
        raise RuntimeError("crash between the alias moves")

    with pytest.raises(RuntimeError):
        reg.promote("2", between_moves=crash)
    # consistent state: the champion did not move; previous already names it
    assert reg.champion_version() == "1" and str(reg.alias("previous").version) == "1"
    assert reg.promote("2") == "1"
    assert reg.champion_version() == "2" and str(reg.alias("previous").version) == "1"
    assert reg.promote("2") is None  # no double promotion
    assert str(reg.alias("previous").version) == "1"


def test_crash_hook_raises_at_the_named_step_boundary_only_inside_its_block():
    from retrain_crash import InjectedCrash, crash_after

    from jobs.retraining.job import STEPS, step_done

    step_done("plan")  # no switch set: the audit event passes
    with crash_after("mix", "alias") as seen:
        step_done("plan")
        with pytest.raises(InjectedCrash, match="'mix'"):
            step_done("mix")
        with pytest.raises(InjectedCrash, match="'alias'"):
            step_done("alias")
    assert seen == ["plan", "mix", "alias"]
    step_done("mix")  # the hook stays installed, switched off
    with pytest.raises(ValueError, match="unknown retrain steps"), crash_after("trian"):
        pass
    assert STEPS == ("plan", "mix", "train", "evaluate", "alias")


# ----------------------------------------------------------------------------------------------
# Integration: the retrain job on a local Ray cluster
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A data root, an MLflow store, a config, one Ray cluster; environment restored afterwards."""
    import ray

    from pipelines.synthetic import write_synthetic_dataset

    base = tmp_path_factory.mktemp("retrain")
    root = base / "data"
    # one question family with two answers: a briefly trained tiny model learns to answer it
    write_synthetic_dataset(root, "llava", num_train=64, num_eval=24, seed=0, families=("big_side",))
    config = {
        "data": {"root": str(root), "min_new_samples": 8},
        "replay": {"fraction": 0.5, "max_samples": 0, "seed": 0},
        "training": {
            "config": str(REPO / "configs" / "train_tiny.yaml"),
            "initial_model": "preset:tiny",
            "overrides": {
                "model": {"freeze_vision_tower": True, "dense_warmup_steps": 0},
                "data": {"max_length": 384, "preprocess_num_cpus": 0.5},
                "optim": {"lr": 1.0e-3, "warmup_ratio": 0.0},
                "train": {"micro_batch_size": 8, "epochs": 1, "max_steps": 0, "log_every": 4},
                "checkpoint": {"every_steps": 1000, "keep": 1},
                "run": {"storage_path": str(base / "runs"), "work_dir": str(base / "work"),
                        "num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
            },
            "initial_overrides": {"optim": {"lr": 2.0e-3}, "train": {"epochs": 5}},
        },
        "eval": {"batch_size": 24, "max_new_tokens": 4, "cpus_per_actor": 0.5},
        "gate": {"accuracy_tolerance": 1.0, "flops_tolerance": 10.0, "min_accuracy": 0.0},
        "mlflow": {"experiment": "retrain-test", "ready_timeout_s": 60},
    }  # fmt: skip
    config_path = base / "retrain.yaml"
    config_path.write_text(yaml.safe_dump(config))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "DPN_MODEL_CACHE")}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{base / 'mlflow.db'}"
    os.environ["DPN_MODEL_CACHE"] = str(base / "model-cache")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                                       "DPN_MODEL_CACHE": os.environ["DPN_MODEL_CACHE"], "HF_HUB_OFFLINE": "1"}})  # fmt: skip
    try:
        yield {"base": base, "root": root, "config": config_path}
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(world, *overrides: str):
    from jobs.retraining.config import load_retrain_config
    from jobs.retraining.job import retrain

    return retrain(load_retrain_config(world["config"], list(overrides)))


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _registry():
    from tracking import Registry

    return Registry(_client(), "dpn")


def _training_runs() -> int:
    client = _client()
    exp = client.get_experiment_by_name("retrain-test")
    return len(client.search_runs([exp.experiment_id], "tags.`dpn.retrain.role` = 'train'"))


@pytest.mark.ray
@pytest.mark.slow
def test_first_run_makes_the_first_champion(world):
    result = _run(world)
    assert result.status == "promoted", result.reason
    assert result.trained and result.challenger == "1" and result.champion == "1" and result.previous == ""
    reg = _registry()
    v1 = reg.champion()
    assert str(v1.version) == "1" and reg.alias("previous") is None
    assert reg.shards_of(v1) == {"train.json": 64}
    assert v1.tags["dpn.retrain.decision"] == "promoted"
    assert v1.tags["dpn.retrain.parent"] == "none"
    assert set(result.comparison) == {"challenger"}
    run = _client().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["dpn.retrain.state"] == "done"


@pytest.mark.ray
@pytest.mark.slow
def test_new_shard_challenger_is_trained_evaluated_and_promoted(world):
    from pipelines.synthetic import write_synthetic_shard

    write_synthetic_shard(world["root"], "day2", 32, seed=2)
    result = _run(world)
    assert result.status == "promoted", result.reason
    assert result.trained and result.challenger == "2" and result.previous == "1"
    reg = _registry()
    assert reg.champion_version() == "2" and str(reg.alias("previous").version) == "1"
    v2 = reg.get("2")
    assert reg.shards_of(v2) == {"train-day2.json": 32}  # only the new shard counts as consumed by v2
    assert v2.tags["dpn.retrain.parent"] == "1"
    assert int(v2.tags["dpn.data.replay_samples"]) > 0  # half of the 64 earlier samples, drawn at random
    assert set(result.comparison) == {"champion", "challenger"}
    assert (
        result.comparison["champion"]["num_samples"] == result.comparison["challenger"]["num_samples"] == 24
    )
    client = _client()
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"comparison.json", "comparison.md", "plan.json", "mix.json"} <= artifacts
    metrics = client.get_run(result.run_id).data.metrics
    assert metrics["promoted"] == 1.0 and "champion.accuracy" in metrics and "challenger.accuracy" in metrics


@pytest.mark.ray
def test_no_new_data_is_a_no_op_with_exit_0(world):
    from jobs.retraining.job import main

    before = len(_registry().versions())
    runs = _training_runs()
    assert main(["--config", str(world["config"])]) == 0
    assert len(_registry().versions()) == before and _training_runs() == runs
    assert _run(world).status == "no_new_data"


@pytest.mark.ray
def test_mix_counts_the_rows_a_damaged_new_shard_loses(world, tmp_path):
    from data_samples import good_records, truncate, write_parquet

    from jobs.retraining.shards import build_mix, list_shards

    root = tmp_path / "root"
    write_parquet(root, good_records(6, text_only=0), name="train-a.parquet")
    truncate(write_parquet(root, good_records(4, text_only=0), name="train-b.parquet"))
    marker = build_mix(tmp_path / "mix", list_shards(str(root), count=False), [], 0.0, 0, seed=0)
    assert marker["new_samples"] == 6
    assert marker["bad_by_reason"] == {"truncated_shard": 1}


@pytest.mark.ray
@pytest.mark.slow
def test_worse_challenger_is_rejected_and_the_champion_kept(world):
    from pipelines.synthetic import write_synthetic_shard

    write_synthetic_shard(world["root"], "broken", 32, seed=3)
    path = world["root"] / "train-broken.json"
    records = json.loads(path.read_text())
    for record in records:  # a broken labelling job: every answer is the same wrong word
        record["conversations"][1]["value"] = WRONG_ANSWER
    path.write_text(json.dumps(records))

    # 10 epochs at 1e-3: 4 at 3e-3 was noisy (the loss rose before it fell) and, on a loaded CI machine, the
    # challenger still answered "left" like the champion
    result = _run(world, "gate.accuracy_tolerance=0.0", "replay.fraction=0.0", "training.overrides.train.epochs=10",
                  "training.overrides.optim.lr=1e-3")  # fmt: skip
    champion_acc = result.comparison["champion"]["accuracy"]
    assert champion_acc > 0, (
        "the champion answers nothing right: the tiny model did not learn; test setup broken"
    )
    assert result.comparison["challenger"]["accuracy"] < champion_acc
    assert result.status == "rejected", result.reason
    assert "below the champion" in result.reason
    reg = _registry()
    assert reg.champion_version() == "2" and str(reg.alias("previous").version) == "1"
    v3 = reg.get(result.challenger)
    assert v3.tags["dpn.retrain.decision"] == "rejected"
    assert "below the champion" in v3.tags["dpn.retrain.reason"]
    assert _client().get_run(result.run_id).data.metrics["promoted"] == 0.0
    # its shard counts as consumed (no retraining on it), but it is not replayed later
    consumed, kept = reg.consumed_shards()
    assert "train-broken.json" in consumed and "train-broken.json" not in kept


@pytest.mark.ray
@pytest.mark.slow
def test_crash_after_training_then_rerun_promotes_without_training(world):
    from retrain_crash import InjectedCrash, crash_after

    from pipelines.synthetic import write_synthetic_shard

    write_synthetic_shard(world["root"], "day3", 32, seed=4)
    with crash_after("train") as seen, pytest.raises(InjectedCrash):
        _run(world)
    assert seen == ["plan", "mix", "train"]
    reg = _registry()
    versions, runs = len(reg.versions()), _training_runs()
    assert versions == 4 and reg.champion_version() == "2"  # trained and registered, not promoted
    assert "dpn.retrain.decision" not in reg.get("4").tags

    with crash_after() as seen:  # no crash: record the step boundaries of the re-run
        result = _run(world)
    assert seen == ["plan", "train", "evaluate", "alias"]  # no mix: nothing to train
    assert result.status == "promoted", result.reason
    assert not result.trained and result.challenger == "4"
    assert len(reg.versions()) == versions and _training_runs() == runs  # nothing trained twice
    assert reg.champion_version() == "4" and str(reg.alias("previous").version) == "2"
    assert _run(world).status == "no_new_data"  # and nothing left to finish
