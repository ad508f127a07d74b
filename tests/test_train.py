"""The training job: schedule and bookkeeping units (no Ray), then real 2-worker CPU DeepSpeed runs on
one local Ray cluster: the loss falls, MLflow gets params / step metrics / a registered model, killed
workers are recovered from checkpoints without losing or repeating a step, and checkpoints load back."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from jobs.config import load_config
from jobs.training.config import TrainConfig
from jobs.training.driver import plan_steps
from jobs.training.loop import StepStats, deepspeed_config, delayed_start, make_optimizer, warmup_cosine

# ----------------------------------------------------------------------------------------------
# Units
# ----------------------------------------------------------------------------------------------


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(100) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def _adamw_path(schedule, grads: list[torch.Tensor]) -> torch.Tensor:
    """Parameter after AdamW steps with these gradients (a zero gradient counts as a step, as under ZeRO)."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-12, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    for g in grads:
        p.grad = g.clone()
        opt.step()
        sched.step()
    return p.detach()


def test_delayed_start_makes_the_routers_first_updates_those_of_a_fresh_adamw():
    """After a dense warm-up the routers' AdamW state has seen only zero gradients but many steps; their
    updates must match a fresh AdamW run on the same gradients with the same learning rates."""
    start, base = 200, warmup_cosine(total_steps=300, warmup_steps=0, min_ratio=0.1)
    routed = [torch.tensor([1.0, -0.5, 0.25]) * (1 + 0.1 * k) for k in range(20)]
    fresh = _adamw_path(lambda k: base(start + k), routed)
    warmup = [torch.zeros(3)] * start
    delayed = _adamw_path(delayed_start(base, start, [0.9, 0.999]), warmup + routed)
    torch.testing.assert_close(delayed, fresh)
    stale = _adamw_path(base, warmup + routed)  # what the routers did without it: much larger steps
    assert ((stale - 1).abs() > 2 * (fresh - 1).abs()).all()
    assert _adamw_path(delayed_start(base, start, [0.9, 0.999]), warmup).eq(1).all()  # untouched before
    assert delayed_start(base, 0, [0.9, 0.999])(7) == pytest.approx(base(7))  # no warm-up: the same schedule


def test_optimizer_puts_the_routers_in_their_own_groups():
    from dpn_model import DPNForConditionalGeneration
    from dpn_model.presets import preset_config

    config = preset_config("tiny", vocab_size=300, image_token_id=4, router_token_id=5)
    model = DPNForConditionalGeneration(config)
    model.model.vision_tower.requires_grad_(False)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, betas=[0.9, 0.999], eps=1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        group_names = [names[id(p)] for p in group["params"]]
        assert all((".router." in n) == group["router"] for n in group_names), group_names
        assert all((p.ndim >= 2) == (group["weight_decay"] == 0.1) for p in group["params"])
    assert [g["router"] for g in opt.param_groups] == [False, False, True, True]
    grouped = sum(len(g["params"]) for g in opt.param_groups)
    assert grouped == sum(p.requires_grad for p in model.parameters())  # every trainable one, no frozen one


def test_deepspeed_config_fills_batches_precision_and_keeps_zero_stage():
    cfg = deepspeed_config(
        {"zero_optimization": {"stage": 3, "overlap_comm": True}},
        micro_batch_size=16, grad_accum_steps=2, world_size=8, precision="bf16", grad_clip=1.0,
        overrides={"zero_optimization": {"overlap_comm": False}},
    )  # fmt: skip
    assert cfg["train_batch_size"] == 256 and cfg["train_micro_batch_size_per_gpu"] == 16
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["zero_optimization"] == {"stage": 3, "overlap_comm": False}


def test_plan_steps_counts_full_optimizer_steps():
    cfg = load_config(
        TrainConfig, data={"train": {"micro_batch_size": 4, "grad_accum_steps": 2, "epochs": 3}}
    )
    assert plan_steps(cfg, 100) == (3 * (50 // 4)) // 2  # 2 workers: 50 samples, 12 micro-batches each
    cfg.train.max_steps = 5
    assert plan_steps(cfg, 100) == 5
    cfg.model.dense_warmup_steps = 5
    with pytest.raises(ValueError, match="dense_warmup_steps=5 leaves none of the run's 5 steps"):
        plan_steps(cfg, 100)
    with pytest.raises(ValueError, match="no full optimizer step"):
        plan_steps(cfg, 3)


def test_step_stats_maps_experts_to_compression_per_layer():
    from types import SimpleNamespace

    stats = StepStats(num_pool_layers=2, factors=[1, 2, 4])
    choices = torch.tensor([[0, 2], [1, -1], [2, 2]])  # -1: not pooled (e.g. too few tokens)
    one = torch.tensor(1.0)
    out = SimpleNamespace(
        loss=one, lm_loss=one, routing_loss=one, reinforce_loss=None, expert_choices=choices
    )
    stats.add(out, 3, 30)
    stats.add(SimpleNamespace(**{**vars(out), "reinforce_loss": torch.tensor(0.5)}), 3, 30)
    metrics = stats.metrics(stats.reduce(), step_time=2.0, lr=0.1)
    assert metrics["reinforce_loss"] == pytest.approx(0.25)  # mean over the two micro-batches
    assert metrics["compression_layer0"] == pytest.approx((1 + 2 + 4) / 3)
    assert metrics["compression_layer1"] == pytest.approx(4.0)
    assert metrics["samples_per_s"] == 3.0 and metrics["tokens_per_s"] == 30.0


# ----------------------------------------------------------------------------------------------
# Ray Train runs (one local cluster for the module)
# ----------------------------------------------------------------------------------------------

NUM_TRAIN = 48  # 2 workers x micro batch 4 -> 6 steps per epoch


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Local Ray (4 logical CPUs: 2 training workers + data preprocessing), a tiny model, synthetic data."""
    import ray

    from dpn_model.presets import create_checkpoint
    from pipelines.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("train")
    model_dir = create_checkpoint("tiny", str(root / "init_model"), seed=0)
    write_synthetic_dataset(root / "data", "parquet", num_train=NUM_TRAIN, num_eval=8, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("DPN_MODEL_CACHE", str(root / "cache"))
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": uri}})
        try:
            yield {"root": root, "model_dir": model_dir, "uri": uri}
        finally:
            ray.shutdown()


def make_config(cluster, name: str, **sections) -> TrainConfig:
    data = {
        "model": {"init": cluster["model_dir"], "compression": "auto", "freeze_vision_tower": False},
        "data": {"path": str(cluster["root"] / "data"), "max_length": 512},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "min_lr_ratio": 0.1},
        "train": {"micro_batch_size": 4, "epochs": 3, "max_steps": 14},
        "checkpoint": {"every_steps": 4, "keep": 2},
        "mlflow": {"experiment": "test-train", "registered_model": "dpn-test"},
        "run": {"name": name, "storage_path": str(cluster["root"] / "runs"), "work_dir": str(cluster["root"] / "work"),
                "num_workers": 2, "max_failures": 1},
    }  # fmt: skip
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return load_config(TrainConfig, data=data)


class WorkerKiller(threading.Thread):
    """SIGKILL one Ray Train worker process of a job each time its MLflow run logs one of ``kill_steps``.

    The pids come from the run's ``sys.worker_pids`` tag, which rank 0 rewrites at every (re)start. A kill
    also waits until Ray's controller has registered a checkpoint (its snapshot file names one): a worker
    reports a checkpoint a moment before the controller records it, and a kill in between restarts the
    job from scratch, which is correct but not what these tests are about.
    """

    def __init__(self, uri: str, job_name: str, kill_steps: list[int], run_dir: Path):
        super().__init__(daemon=True)
        self.uri, self.job_name, self.kill_steps = uri, job_name, list(kill_steps)
        self.run_dir = run_dir
        self.killed: list[tuple[int, int]] = []  # (step seen, pid)
        self.stop = threading.Event()

    def run(self) -> None:
        from tracking import find_job_run

        client = MlflowClient(self.uri)
        while self.kill_steps and not self.stop.is_set():
            time.sleep(0.3)
            run = find_job_run("test-train", self.job_name, self.uri)
            if run is None or "sys.worker_pids" not in run.data.tags:
                continue
            step = max((m.step for m in client.get_metric_history(run.info.run_id, "loss")), default=0)
            pid = int(run.data.tags["sys.worker_pids"].split(",")[-1].rsplit(":", 1)[1])  # the last rank
            if step < self.kill_steps[0] or pid in {p for _, p in self.killed} or not self._registered():
                continue
            assert b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes()  # one of ours
            os.kill(pid, signal.SIGKILL)
            self.killed.append((step, pid))
            self.kill_steps.pop(0)

    def _registered(self) -> bool:
        from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

        try:
            snapshot = json.loads((self.run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())
        except (OSError, ValueError):  # not written yet, or caught mid-write
            return False
        return snapshot.get("latest_checkpoint_result") is not None


def metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.ray
@pytest.mark.slow
def test_training_survives_worker_kills_and_resubmission_with_every_step_logged_once(cluster):
    """One job, three attempts: a killed worker is restarted from the last checkpoint (FailureConfig);
    a second kill exceeds max_failures=1 and the job dies; submitting the same run name resumes it.
    The MLflow run is the same throughout and each step is logged exactly once."""
    from ray.train import TrainingFailedError

    from dpn_model import DPNForConditionalGeneration
    from jobs.training.job import train
    from tracking import find_job_run, resolve_model_dir

    uri = cluster["uri"]
    cfg = make_config(cluster, "survivor")
    killer = WorkerKiller(
        uri, "survivor", kill_steps=[6, 10], run_dir=Path(cfg.run.storage_path) / "survivor"
    )
    killer.start()
    try:
        with pytest.raises(TrainingFailedError):
            train(cfg)
    finally:
        killer.stop.set()
    # the killer polls MLflow, so under load it may see a step or two later than it aimed for
    assert len(killer.killed) == 2 and killer.killed[0][0] >= 6 and killer.killed[1][0] >= 10, killer.killed
    dead = find_job_run("test-train", "survivor", uri)
    assert dead.info.status == "FAILED"

    result = train(cfg)  # resubmit the same run name
    run_id = result.run_id
    assert run_id == dead.info.run_id
    client = MlflowClient(uri)
    run = client.get_run(run_id)

    # attempts 2 and 3 resumed from checkpoints (every 4 steps): the latest one Ray had registered when the
    # worker died (step 4 or 8; a resume from the same step twice is one point); all 14 steps done
    assert result.steps == 14
    resumed = [m.value for m in client.get_metric_history(run_id, "resumed_from_step")]
    assert resumed and all(v % 4 == 0 and 0 < v < 14 for v in resumed), resumed
    for key in (
        "loss",
        "lm_loss",
        "routing_loss",
        "lr",
        "samples_per_s",
        "tokens_per_s",
        "compression_layer0",
    ):
        assert metric_steps(uri, run_id, key) == list(range(1, 15)), key  # no gaps, no duplicates

    # the loss fell
    losses = [m.value for m in sorted(client.get_metric_history(run_id, "lm_loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses

    # params, system facts, the final model as a registered version
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["derived.total_steps"] == "14"
    assert run.data.tags["sys.workers"] == "2" and "sys.deepspeed" in run.data.tags
    assert 1 <= run.data.metrics["compression_layer0"] <= 4
    version = client.get_model_version("dpn-test", result.registered_version)
    assert version.run_id == run_id

    # checkpoints load back: the final model dir, the registered version, a mid-run checkpoint
    final = DPNForConditionalGeneration.from_pretrained(result.model_dir)
    registered = DPNForConditionalGeneration.from_pretrained(
        resolve_model_dir(f"models:/dpn-test/{result.registered_version}")
    )
    assert all(
        torch.equal(a, b) for a, b in zip(final.state_dict().values(), registered.state_dict().values())
    )
    run_dir = Path(cfg.run.storage_path) / "survivor"
    kept = sorted(p.name for p in run_dir.glob("checkpoint_0*"))
    assert kept == ["checkpoint_00000012", "checkpoint_00000014"]  # keep the last 2
    mid = run_dir / "checkpoint_00000012"
    assert json.loads((mid / "train_state.json").read_text()) == {
        "step": 12, "epoch": 1, "batches_in_epoch": 6, "samples_seen": 96, "mlflow_run_id": run_id,
    }  # fmt: skip
    middle = DPNForConditionalGeneration.from_pretrained(mid / "hf_model")
    assert any(
        not torch.equal(a, b) for a, b in zip(middle.state_dict().values(), final.state_dict().values())
    )


@pytest.mark.ray
@pytest.mark.slow
def test_zero3_partitions_resume_after_a_kill_and_save_whole_weights(cluster):
    """ZeRO-3 (configs/deepspeed/zero3.json): parameters and optimizer state are partitioned over the two
    workers, so a resumed worker must reload its own partition and the saved model must be gathered.
    The run also starts with a dense warm-up (model.dense_warmup_steps): no pooling until step 4."""
    from dpn_model import DPNForConditionalGeneration
    from jobs.training.job import train

    uri = cluster["uri"]
    cfg = make_config(
        cluster,
        "zero3",
        deepspeed={"config": "zero3.json"},
        model={"dense_warmup_steps": 4},
        train={"max_steps": 12},  # long enough that the kill at step 3 lands mid-run even under load
        checkpoint={"every_steps": 2},
    )
    killer = WorkerKiller(uri, "zero3", kill_steps=[3], run_dir=Path(cfg.run.storage_path) / "zero3")
    killer.start()
    try:
        result = train(cfg)  # max_failures=1: the one kill is recovered within the job
    finally:
        killer.stop.set()
    assert len(killer.killed) == 1 and killer.killed[0][0] < 12, killer.killed
    assert result.steps == 12
    client = MlflowClient(uri)
    assert metric_steps(uri, result.run_id, "loss") == list(range(1, 13))
    resumed = [m.value for m in client.get_metric_history(result.run_id, "resumed_from_step")]
    assert resumed and all(v % 2 == 0 and 0 < v < 12 for v in resumed), resumed
    history = client.get_metric_history(result.run_id, "compression_layer0")
    compression = {m.step: m.value for m in history}
    assert all(compression[s] == 1.0 for s in range(1, 5)), compression  # dense warm-up
    assert sum(compression[s] for s in range(5, 13)) / 8 > 1.0, compression  # then the router pools
    # ZeRO-3 checkpoints hold model states per rank (ZeRO-2 has one mp_rank_00_model_states.pt)
    per_rank = list(
        (Path(cfg.run.storage_path) / "zero3").glob(
            "checkpoint_00000012/**/zero_pp_rank_1_mp_rank_00_model_states.pt"
        )
    )
    assert per_rank, "rank 1's parameter partition is in the checkpoint"

    init = DPNForConditionalGeneration.from_pretrained(cluster["model_dir"])
    final = DPNForConditionalGeneration.from_pretrained(result.model_dir)  # whole tensors, not shards
    shapes = {k: v.shape for k, v in init.state_dict().items()}
    assert {k: v.shape for k, v in final.state_dict().items()} == shapes
    assert any(not torch.equal(a, b) for a, b in zip(init.state_dict().values(), final.state_dict().values()))
