"""Scheduled retraining with a champion/challenger gate in the MLflow model registry.

    dpn retrain --config configs/retrain_tiny.yaml [key=value ...]
    ray job submit --working-dir . -- python -m jobs.retrain --config configs/retrain_llava7b.yaml

The console shows the steps below, the training's and evaluation's progress and the result lines (``status=``,
``run_id=``, ... on stdout); Ray, DeepSpeed and MLflow print to ``<work_dir>/retrain/logs/`` (:mod:`jobs.console`;
``--log-file PATH`` elsewhere, ``-v`` everything on the console).

One run of the job (one Ray job: data, training and evaluation share one Ray cluster):

1. **discover**: shards under ``data.root`` (:mod:`jobs.retraining.shards`) that no registered version was
   trained on (each version records its new shards in the tag ``dpn.data.new_shards``). Fewer new
   samples than ``data.min_new_samples``: log it, exit 0.
2. **train**: a retrain run ``retrain-<key>`` is opened in MLflow (``<key>`` = hash of the parent
   model and the new shards) with the plan as an artifact; the new shards plus a replay sample of
   earlier shards are written once as a Parquet mix; the champion (``models:/dpn/<champion>``,
   or the configured initialisation when there is none) is fine-tuned on it with the training job
   (:func:`jobs.training.job.train`: Ray Train + DeepSpeed, checkpoints, registers a new version).
3. **evaluate**: champion and challenger, pinned by version, with the evaluation job
   (:func:`jobs.evaluation.job.evaluate`) on the same held-out set in one run.
4. **gate** (:mod:`jobs.retraining.gate`): promote when the challenger is not worse than the champion by more
   than ``gate.accuracy_tolerance`` in accuracy and ``gate.flops_tolerance`` in FLOPs (and reaches
   ``gate.min_accuracy``); otherwise tag the version ``dpn.retrain.decision=rejected`` with the
   reason. The comparison table, metrics and decision go to the retrain run. Promotion moves
   ``champion`` to the challenger and ``previous`` to the old champion (:mod:`tracking.registry`).
5. With no champion the first run trains from the initialisation and becomes champion if it
   reaches the floor.

**Safe to re-run after a crash at any step.** The retrain run carries a state tag
(``dpn.retrain.state``: planned -> trained -> decided -> done). A new invocation first finishes the
oldest retrain run that is not done, from its recorded plan, before it looks for new data:

* the training run is found by its name (``retrain-<key>-train``); if it registered a version, that
  version is the challenger (no second training); if it died mid-training, the training job
  resumes it from its last Ray Train checkpoint;
* the mix is reused when its completion marker exists;
* a recorded decision is applied without re-evaluating when the champion has not moved since;
* aliases only move to a READY, evaluated version, and promotion is a no-op when the challenger
  already is champion.

To abandon a stuck retrain run, set its tag ``dpn.retrain.state`` to ``abandoned`` in MLflow.

**No races.** One retrain job at a time per registered model, however it was started (cron, a CronJob,
``kubectl create job --from=cronjob/...``, by hand): the job holds the registry's retrain lease (a tag on the
registered model with owner, host, pid and expiry, :meth:`tracking.registry.Registry.retrain_lease`) for its
whole run, renews it every ``lease.ttl_s / 3`` and releases it at the end. A second invocation finds the lease
held, logs who holds it and until when, and exits 0 doing nothing (status ``lease_held``: what a schedule
wants, the next tick tries again); a lease left by a job that died expires after ``lease.ttl_s`` and is taken
over. ``flock`` in the cron line and ``concurrencyPolicy: Forbid`` (deploy/schedule, deploy/k8s) stay as a
first guard. A decision is applied only against the champion it was made against: the champion is recorded
with the decision and read again under the registry's alias lease when the decision is applied (promotion is
a compare-and-set, :meth:`tracking.registry.Registry.promote`). If it moved in between (a person rolled back,
another tool promoted), the decision is refused: the challenger is tagged ``dpn.retrain.refused`` with the
reason, the retrain run stays ``decided``, the status is ``champion_moved``, and the next invocation evaluates
the challenger again against the new champion (the path a recorded decision always took when the champion had
moved). The gate rejects missing or non-finite (NaN) metrics with a reason (:mod:`jobs.retraining.gate`).

**Step boundaries** (an observability hook): after each step the job raises the standard-library audit
event ``dpn.retrain.step`` (:data:`STEP_EVENT`) with the step's name, one of :data:`STEPS`: ``plan``,
``mix``, ``train``, ``evaluate``, ``alias`` (between the two alias moves). A hook installed with
:func:`sys.addaudithook` sees it (progress, tracing; the tests inject crashes there: an exception the hook
raises propagates from that boundary). With no hook installed the event costs next to nothing.

**Serving the new champion.** Aliases are resolved when a replica loads, so a running Ray Serve app
keeps its model until told to reload. After a promotion (the job logs the new version), set the model
deployment's ``user_config: {model: models:/dpn@champion, version: champion-<N>}`` in the serve config
(configs/serve_*.yaml, ``DPNServer`` deployment section) and ``serve deploy`` it again: this is a lightweight
update, Serve calls ``DPNServer.reconfigure`` on the running replicas, each loads the new weights in the
background while serving with the old ones and then swaps (serve_apps/model.py). Roll back the same way
after moving ``champion`` back to the ``previous`` version.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

import tracking
from dpn_base.cli_harness import add_config_arguments, run_config_job, run_module
from dpn_base.config_models import merge_dicts
from dpn_base.console import add_console_arguments
from dpn_base.model_ref import ModelRef, RefKind
from jobs.config import ConfigError, dump_config, flatten, load_config
from jobs.console import JobFailed, job_console
from jobs.retraining import gate as gate_lib
from jobs.retraining import shards as shard_lib
from jobs.retraining.config import RetrainConfig, load_retrain_config
from jobs.training.config import TrainConfig
from pipelines.storage import atomic_write_text
from tracking import registry as reg_lib
from tracking.registry import ChampionMoved, Registry
from tracking.runs import Lease, LeaseHeld

logger = logging.getLogger(__name__)

STEP_EVENT = "dpn.retrain.step"  # audit event at each step boundary: sys.audit(STEP_EVENT, step)
STEPS = ("plan", "mix", "train", "evaluate", "alias")  # its argument, in the order the steps end

# retrain-run tags
ROLE_TAG = "dpn.retrain.role"  # retrain | train
STATE_TAG = "dpn.retrain.state"  # planned | trained | decided | done | abandoned
CHALLENGER_TAG = "dpn.retrain.challenger"
CHAMPION_AT_DECISION_TAG = "dpn.retrain.champion_at_decision"
PLAN_ARTIFACT = "plan.json"
NO_CHAMPION = "none"
LEASE_HELD = "lease_held"  # status: another retrain holds the lease, nothing done
CHAMPION_MOVED = "champion_moved"  # status: the decision was not applied, the champion moved since


def step_done(step: str) -> None:
    """Announce the end of ``step`` (one of :data:`STEPS`) as the audit event :data:`STEP_EVENT`.

    An exception raised by an audit hook propagates from here (how the tests crash the job at a step).
    """
    sys.audit(STEP_EVENT, step)


@dataclass
class RetrainResult:
    """What one invocation did.

    Attributes:
        status: ``no_new_data``, ``promoted``, ``rejected``, ``lease_held`` (another retrain holds the
            lease: nothing done) or ``champion_moved`` (the decision was not applied; the next run evaluates
            again).
        reason: why (the gate's reason, the data count, the lease holder, the champion's move).
        key: the retrain key (hash of parent model and new shards); "" when nothing was planned.
        run_id: the retrain run in MLflow.
        challenger: the challenger's version.
        champion: the champion's version after this run ("" when none).
        previous: the replaced champion ("" when none moved).
        trained: whether this invocation trained (False when it found the challenger registered).
        new_samples: samples in the new shards.
        comparison: ``{label: evaluation row}`` of the gate.
    """

    status: str
    reason: str
    key: str = ""
    run_id: str = ""
    challenger: str = ""
    champion: str = ""
    previous: str = ""
    trained: bool = False
    new_samples: int = 0
    comparison: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def training_config(
    cfg: RetrainConfig, extra: dict[str, Any] | None = None, first: bool = False
) -> TrainConfig:
    """The training job's config: ``training.config`` + ``training.overrides`` (+
    ``training.initial_overrides`` when ``first``) + ``extra``."""
    data = merge_dicts(dict(cfg.training.overrides), cfg.training.initial_overrides if first else {})
    return load_config(TrainConfig, cfg.training.config, data=merge_dicts(data, extra or {}))


def version_ref(model_name: str, version: str | int) -> str:
    """``models:/<name>/<version>`` as :class:`~dpn_base.model_ref.ModelRef` spells it: the canonical text every
    stage parses back to the same reference (and ``retrain_key`` hashes)."""
    return str(ModelRef(RefKind.REGISTRY_VERSION, name=model_name, version=str(version)))


def retrain_key(model_name: str, init: str, new: list[shard_lib.Shard]) -> str:
    """Deterministic key of one retraining: the model it starts from and the new shards it trains on."""
    payload = {
        "model": model_name,
        "init": init,
        "shards": {s.name: [s.num_samples, s.size_bytes] for s in new},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _work_dir(train_cfg: TrainConfig) -> Path:
    return Path(train_cfg.run.work_dir).expanduser().resolve() / "retrain"


# ----------------------------------------------------------------------------------------------
# Step 1: plan (resume an unfinished retrain run, or discover new data)
# ----------------------------------------------------------------------------------------------


def pending_runs(client: MlflowClient, experiment_id: str) -> list[Any]:
    """Retrain runs that are not done (oldest first)."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'retrain' and tags.`{STATE_TAG}` != 'done' "
        f"and tags.`{STATE_TAG}` != 'abandoned'",
        order_by=["attributes.start_time ASC"],
    )


def load_plan(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The plan artifact of a retrain run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, PLAN_ARTIFACT, tmp)
        return json.loads(Path(path).read_text())


def discover(cfg: RetrainConfig, registry: Registry, train_cfg: TrainConfig) -> dict[str, Any]:
    """Find new shards and decide what to train: returns the plan (``plan["new"]`` may be short of
    ``min_new_samples``; the caller checks)."""
    consumed, kept = registry.consumed_shards()
    listed = shard_lib.list_shards(cfg.data.root, cfg.data.include, cfg.data.exclude, skip=list(consumed),
                                   policy=cfg.data.read_policy())  # fmt: skip
    new = [s for s in listed if s.name not in consumed]
    earlier = [shard_lib.Shard(s.name, s.uri, kept[s.name], s.size_bytes) for s in listed if s.name in kept]
    missing = sorted(set(kept) - {s.name for s in listed})
    if missing:
        logger.warning("%d earlier shard(s) are gone from %s and cannot be replayed: %s", len(missing),
                       cfg.data.root, ", ".join(missing[:10]))  # fmt: skip
    champion = registry.champion()
    if champion is not None:
        registry.wait_ready(str(champion.version), cfg.mlflow.ready_timeout_s)
        init = version_ref(registry.name, champion.version)
    else:
        init = cfg.training.initial_model or train_cfg.model.init
    new_samples = sum(s.num_samples for s in new)
    return {
        "key": retrain_key(registry.name, init, new) if new else "",
        "init": init,
        "parent": str(champion.version) if champion is not None else NO_CHAMPION,
        "data_root": cfg.data.root,
        "new": shard_lib.shards_to_json(new),
        "earlier": shard_lib.shards_to_json(earlier),
        "new_samples": new_samples,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def open_retrain_run(client: MlflowClient, cfg: RetrainConfig, plan: dict[str, Any], uri: str) -> str:
    """Create the retrain run of a plan (params, plan artifact), then mark it ``planned``."""
    base = f"retrain-{plan['key']}"
    name, attempt = base, 1
    while True:  # a finished run of the same key (its version was deleted since): a new attempt
        existing = tracking.find_job_run(cfg.mlflow.experiment, name, uri)
        if existing is None or existing.info.status != "FINISHED":
            break
        attempt += 1
        name = f"{base}-a{attempt}"
    plan["job_name"] = name
    params = {
        **{f"retrain.{k}": v for k, v in flatten(cfg).items()},
        "plan.key": plan["key"], "plan.init": plan["init"], "plan.parent": plan["parent"],
        "plan.new_shards": len(plan["new"]), "plan.new_samples": plan["new_samples"],
        "plan.earlier_shards": len(plan["earlier"]),
    }  # fmt: skip
    run_id, resumed = tracking.start_or_resume_run(
        cfg.mlflow.experiment, name, params=params,
        tags={ROLE_TAG: "retrain", reg_lib.KEY_TAG: plan["key"], reg_lib.PARENT_TAG: plan["parent"]}, uri=uri,
    )  # fmt: skip
    client.log_text(run_id, json.dumps(plan, indent=1), PLAN_ARTIFACT)
    client.set_tag(run_id, STATE_TAG, "planned")  # last: the run is complete enough to resume
    logger.info("%s retrain run %s (%s): %d new samples in %d shard(s) from %s", "resumed" if resumed else "opened",
                run_id, name, plan["new_samples"], len(plan["new"]), plan["init"])  # fmt: skip
    return run_id


# ----------------------------------------------------------------------------------------------
# Step 2: the challenger
# ----------------------------------------------------------------------------------------------


def _registered_challenger(registry: Registry, experiment: str, train_name: str, uri: str) -> str | None:
    """The version registered by the training run ``train_name``, if any (waits for READY)."""
    run = tracking.find_job_run(experiment, train_name, uri)
    if run is None:
        return None
    versions = [v for v in registry.versions_of_run(run.info.run_id) if v.status != "FAILED_REGISTRATION"]
    return str(versions[-1].version) if versions else None


def train_challenger(
    cfg: RetrainConfig, registry: Registry, plan: dict[str, Any], run_id: str, uri: str
) -> tuple[str, bool]:
    """The challenger version of a plan: found registered, or trained now. Returns ``(version, trained)``."""
    from jobs.training.job import train

    train_name = f"{plan['job_name']}-train"
    version = _registered_challenger(registry, cfg.mlflow.experiment, train_name, uri)
    trained = False
    train_cfg = training_config(cfg)
    if version is None:
        mix = shard_lib.build_mix(
            _work_dir(train_cfg) / plan["job_name"] / "mix",
            shard_lib.shards_from_json(plan["new"]),
            shard_lib.shards_from_json(plan["earlier"]),
            cfg.replay.fraction, cfg.replay.max_samples, cfg.replay.seed, cfg.data.image_folder,
            policy=cfg.data.read_policy(),
        )  # fmt: skip
        step_done("mix")
        train_cfg = training_config(cfg, first=plan["parent"] == NO_CHAMPION, extra={
            "model": {"init": plan["init"]},
            "data": {"path": mix["path"], "split": None, "synthetic": None, "image_folder": None,
                     "num_samples": mix["num_samples"],  # the mix embeds the image bytes
                     **cfg.data.read_policy().model_dump()},  # decoded under this job's data policy
            "run": {"name": train_name},
            "mlflow": {
                "tracking_uri": uri, "experiment": cfg.mlflow.experiment, "registered_model": registry.name,
                "tags": {**train_cfg.mlflow.tags, ROLE_TAG: "train", reg_lib.KEY_TAG: plan["key"],
                         "mlflow.parentRunId": run_id},
            },
        })  # fmt: skip
        client = registry.client
        client.log_dict(run_id, mix, "mix.json")
        result = train(train_cfg)
        if not result.registered_version:
            raise RuntimeError(f"training run {result.run_id} registered no version of {registry.name}")
        version, trained = result.registered_version, True
        replay_samples = mix["replay_samples"]
    else:
        logger.info("challenger for %s is already registered: %s version %s (not training again)",
                    plan["job_name"], registry.name, version)  # fmt: skip
        marker = shard_lib.read_mix(_work_dir(train_cfg) / plan["job_name"] / "mix") or {}
        replay_samples = marker.get("replay_samples", "")
    registry.wait_ready(version, cfg.mlflow.ready_timeout_s)
    registry.tag(version, {
        reg_lib.KEY_TAG: plan["key"],
        reg_lib.PARENT_TAG: plan["parent"],
        reg_lib.RUN_TAG: run_id,
        reg_lib.DATA_ROOT_TAG: plan["data_root"],
        reg_lib.SHARDS_TAG: json.dumps({s["name"]: s["num_samples"] for s in plan["new"]}, sort_keys=True),
        reg_lib.NEW_SAMPLES_TAG: plan["new_samples"],
        reg_lib.REPLAY_SAMPLES_TAG: replay_samples,
    })  # fmt: skip
    return version, trained


# ----------------------------------------------------------------------------------------------
# Steps 3-4: evaluate and decide
# ----------------------------------------------------------------------------------------------


def evaluate_pair(
    cfg: RetrainConfig,
    registry: Registry,
    plan: dict[str, Any],
    challenger: str,
    champion: str | None,
    uri: str,
) -> dict[str, dict[str, Any]]:
    """Evaluate champion (if any) and challenger on the held-out set in one evaluation run.

    Returns:
        ``{"champion": row, "challenger": row}`` (report rows of :mod:`jobs.evaluation.report`).
    """
    from jobs.evaluation.job import EvalConfig, ModelSpec, evaluate, parse_compressions

    modes = parse_compressions(cfg.eval.compression)  # one mode: checked when the config was loaded
    models = [ModelSpec(label="challenger", uri=version_ref(registry.name, challenger), compressions=modes)]
    if champion is not None:
        models.insert(
            0, ModelSpec(label="champion", uri=version_ref(registry.name, champion), compressions=modes)
        )
    train_cfg = training_config(cfg)
    out_dir = _work_dir(train_cfg) / plan["job_name"] / f"eval-{champion or NO_CHAMPION}-vs-{challenger}"
    report = evaluate(EvalConfig(
        models=models,
        data=cfg.eval.data or cfg.data.root,
        split=cfg.eval.split,
        batch_size=cfg.eval.batch_size,
        num_actors=cfg.eval.num_actors,
        cpus_per_actor=cfg.eval.cpus_per_actor,
        max_new_tokens=cfg.eval.max_new_tokens,
        max_samples=cfg.eval.max_samples,
        device=cfg.eval.device,
        output_dir=str(out_dir),
        experiment=cfg.mlflow.experiment,
        run_name=f"{plan['job_name']}-eval",
        tracking_uri=uri,
        title=f"retrain {plan['key']}: champion {champion or '-'} vs challenger {challenger}",
    ))  # fmt: skip
    rows = {r["label"]: r for r in report["rows"] if not r.get("baseline")}
    eval_run = report["meta"].get("mlflow_run_id")
    if eval_run:
        registry.client.set_tag(eval_run, ROLE_TAG, "evaluate")
    return rows


def record_decision(
    client: MlflowClient,
    run_id: str,
    rows: dict[str, dict[str, Any]],
    decision: gate_lib.Decision,
    challenger: str,
    champion: str | None,
) -> None:
    """Log the comparison (table, JSON, metrics) and the decision to the retrain run; mark it ``decided``."""
    slim = {
        label: {k: row.get(k) for k in ("model", "compression", "num_samples", "correct", "accuracy",
                                        "mean_prefill_flops", "mean_dense_flops", "flops_ratio", "per_kind")}
        for label, row in rows.items()
    }  # fmt: skip
    comparison = {
        "challenger": challenger,
        "champion": champion,
        "rows": slim,
        "decision": decision.to_dict(),
    }
    client.log_dict(run_id, comparison, "comparison.json")
    client.log_text(run_id, gate_lib.comparison_table(slim, decision), "comparison.md")
    metrics = {f"{label}.{k}": float(row[k]) for label, row in slim.items()
               for k in ("accuracy", "mean_prefill_flops", "flops_ratio") if row.get(k) is not None}  # fmt: skip
    metrics["promoted"] = float(decision.promote)
    if decision.accuracy_delta is not None:
        metrics["accuracy_delta"] = decision.accuracy_delta
        metrics["flops_rel_change"] = decision.flops_rel_change
    now = int(time.time() * 1000)
    import mlflow.entities

    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items()],
        tags=[mlflow.entities.RunTag(k, str(v)) for k, v in {
            reg_lib.DECISION_TAG: reg_lib.PROMOTED if decision.promote else reg_lib.REJECTED,
            reg_lib.REASON_TAG: decision.reason[:5000],
            CHALLENGER_TAG: challenger,
            CHAMPION_AT_DECISION_TAG: champion or NO_CHAMPION,
        }.items()],
    )  # fmt: skip
    client.set_tag(run_id, STATE_TAG, "decided")  # after the comparison: a decided run has its record


def _recorded_decision(
    client: MlflowClient, run_id: str
) -> tuple[gate_lib.Decision, str, dict[str, Any]] | None:
    """``(decision, champion_at_decision, rows)`` recorded on a decided retrain run, else None."""
    run = client.get_run(run_id)
    if run.data.tags.get(STATE_TAG) != "decided":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        comparison = json.loads(Path(client.download_artifacts(run_id, "comparison.json", tmp)).read_text())
    decision = gate_lib.Decision(**comparison["decision"])
    return decision, run.data.tags[CHAMPION_AT_DECISION_TAG], comparison["rows"]


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------


def _finish(
    cfg: RetrainConfig,
    registry: Registry,
    run_id: str,
    plan: dict[str, Any],
    challenger: str,
    decision: gate_lib.Decision,
    rows: dict[str, Any],
    uri: str,
    against: str | None = reg_lib.UNCHECKED,
) -> tuple[str, str]:
    """Apply a recorded decision: move aliases or tag the rejection; close the retrain run.
    ``against``: the champion the decision was made against (None: none); it must still be the champion.
    Returns ``(champion after, previous moved or "")``.

    Raises:
        ChampionMoved: the champion is not ``against`` any more; nothing was applied.
    """
    client = registry.client
    eval_tags = {}
    if "challenger" in rows:
        eval_tags = {"dpn.eval.accuracy": rows["challenger"].get("accuracy"),
                     "dpn.eval.mean_prefill_flops": rows["challenger"].get("mean_prefill_flops")}  # fmt: skip
    previous = ""
    if decision.promote:
        previous = registry.promote(challenger, cfg.mlflow.ready_timeout_s, lambda: step_done("alias"),
                                    expected_champion=against) or ""  # fmt: skip
        registry.tag(challenger, {reg_lib.DECISION_TAG: reg_lib.PROMOTED, reg_lib.REASON_TAG: decision.reason,
                                  **eval_tags})  # fmt: skip
    else:
        now = registry.champion_version()
        if against != reg_lib.UNCHECKED and now not in (against, challenger):
            raise ChampionMoved(registry.name, challenger, against, now)
        registry.tag(challenger, {reg_lib.DECISION_TAG: reg_lib.REJECTED, reg_lib.REASON_TAG: decision.reason,
                                  **eval_tags})  # fmt: skip
        logger.warning("rejected %s version %s: %s", registry.name, challenger, decision.reason)
    client.set_tag(run_id, STATE_TAG, "done")
    tracking.end_run(run_id, "FINISHED", uri=uri)
    return registry.champion_version() or "", previous


@dataclass
class GateOutcome:
    """What the gate step did: ``status`` (``promoted``, ``rejected`` or ``champion_moved``) and why, the
    decision and its evaluation rows, the champion after it and the replaced champion ("" when none moved)."""

    status: str
    reason: str
    decision: gate_lib.Decision
    rows: dict[str, Any]
    champion: str
    previous: str


def decide_and_apply(
    cfg: RetrainConfig,
    registry: Registry,
    run_id: str,
    plan: dict[str, Any],
    challenger: str,
    uri: str,
    *,
    lease: Lease | None = None,
    evaluate: Callable[[str | None], dict[str, dict[str, Any]]] | None = None,
) -> GateOutcome:
    """Steps 3-4: decide (or take the decision recorded on the run), then apply it as a compare-and-set.

    The decision records the champion it was made against (read before the hours-long evaluation); applying
    it checks that this is still the champion (:func:`_finish`, :meth:`Registry.promote`). If not, nothing is
    applied: the challenger is tagged :data:`tracking.registry.REFUSED_TAG`, the run stays ``decided`` and the
    next invocation evaluates again (refusing rather than evaluating again at once keeps one rule for a
    champion moved while the job ran and one moved while it was down, and a job that ends).

    Args:
        lease: the job's retrain lease, checked before anything is applied (a job that lost it commits nothing).
        evaluate: ``champion version (None: none) -> {"challenger": row, "champion": row}``; default
            :func:`evaluate_pair` (the evaluation job on Ray).
    """
    client = registry.client
    evaluate = evaluate or (lambda champion: evaluate_pair(cfg, registry, plan, challenger, champion, uri))
    current = registry.champion_version()
    recorded = _recorded_decision(client, run_id)
    if recorded is not None and (current == challenger or recorded[1] == (current or NO_CHAMPION)):
        decision, against, rows = recorded  # applied already (champion is the challenger), or still valid
        against = None if against == NO_CHAMPION else against
        if current != challenger:
            logger.info("applying the recorded decision (%s)", decision.reason)
    else:
        if recorded is not None:
            logger.info("the champion moved since the recorded decision: evaluating again")
        rows, against = evaluate(current), current
        decision = gate_lib.decide(rows["challenger"], rows.get("champion"), cfg.gate)
        record_decision(client, run_id, rows, decision, challenger, current)
    logger.info("gate: %s", gate_lib.comparison_table(rows, decision))
    step_done("evaluate")
    if lease is not None:
        lease.check()
    try:
        champion, previous = _finish(cfg, registry, run_id, plan, challenger, decision, rows, uri, against)
    except ChampionMoved as moved:
        logger.warning("%s", moved)
        registry.tag(challenger, {reg_lib.REFUSED_TAG: str(moved)})
        return GateOutcome(CHAMPION_MOVED, str(moved), decision, rows, registry.champion_version() or "", "")
    status = reg_lib.PROMOTED if decision.promote else reg_lib.REJECTED
    return GateOutcome(status, decision.reason, decision, rows, champion, previous)


def retrain(cfg: RetrainConfig) -> RetrainResult:
    """Run one retraining cycle (see the module docstring). Safe to call again after any failure.

    The cycle runs under the registry's retrain lease; when another live retrain holds it, nothing is done and
    the result says who holds it (status ``lease_held``).
    """
    uri = tracking.setup_tracking(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    client = MlflowClient(uri)
    registry = Registry(client, cfg.mlflow.model_name, cfg.mlflow.champion_alias, cfg.mlflow.previous_alias,
                        lease_settle_s=cfg.lease.settle_s)  # fmt: skip
    lease = registry.retrain_lease(cfg.lease.ttl_s)
    try:
        lease.acquire()
    except LeaseHeld as held:
        reason = (f"another retrain is running: {held}; this invocation does nothing (a lease its holder "
                  "stopped renewing is taken over once it expires)")  # fmt: skip
        logger.warning("%s", reason)
        return RetrainResult(LEASE_HELD, reason, champion=registry.champion_version() or "")
    lease.start_renewing()
    try:
        return _cycle(cfg, uri, registry, lease)
    finally:
        lease.release()


def _cycle(cfg: RetrainConfig, uri: str, registry: Registry, lease: Lease) -> RetrainResult:
    """One retraining cycle, under the retrain lease (see :func:`retrain`)."""
    from jobs.training import driver as builders

    client = registry.client
    experiment_id = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    train_cfg = training_config(cfg)
    builders.ensure_synthetic_data(cfg.data.synthetic, cfg.data.root, replace=False)
    started_ray = builders.init_ray(train_cfg)
    try:
        pending = pending_runs(client, experiment_id)
        if pending:
            run_id = pending[0].info.run_id
            plan = load_plan(client, run_id)
            logger.info("finishing retrain run %s (%s, state %s) before looking for new data", run_id,
                        plan["job_name"], pending[0].data.tags.get(STATE_TAG))  # fmt: skip
            if len(pending) > 1:
                logger.warning(
                    "%d more unfinished retrain runs wait for the next invocation", len(pending) - 1
                )
        else:
            plan = discover(cfg, registry, train_cfg)
            if not plan["new"] or plan["new_samples"] < cfg.data.min_new_samples:
                reason = (f"{plan['new_samples']} new samples in {len(plan['new'])} new shard(s) under "
                          f"{cfg.data.root}; need {cfg.data.min_new_samples}: nothing to do")  # fmt: skip
                logger.info("%s", reason)
                return RetrainResult("no_new_data", reason, new_samples=plan["new_samples"],
                                     champion=registry.champion_version() or "")  # fmt: skip
            run_id = open_retrain_run(client, cfg, plan, uri)
        step_done("plan")

        challenger, trained = train_challenger(cfg, registry, plan, run_id, uri)
        if client.get_run(run_id).data.tags.get(STATE_TAG) == "planned":
            client.set_tag(run_id, CHALLENGER_TAG, challenger)
            client.set_tag(run_id, STATE_TAG, "trained")
        step_done("train")

        outcome = decide_and_apply(cfg, registry, run_id, plan, challenger, uri, lease=lease)
        if outcome.status == reg_lib.PROMOTED:
            logger.info(
                "%s version %s is the new %s. Serving: set the DPNServer deployment's user_config "
                "{model: models:/%s@%s, version: champion-%s} and `serve deploy` again (replicas reload in place)",
                registry.name, challenger, registry.champion_alias, registry.name, registry.champion_alias, challenger,
            )  # fmt: skip
        return RetrainResult(
            status=outcome.status, reason=outcome.reason, key=plan["key"], run_id=run_id, challenger=challenger,
            champion=outcome.champion, previous=outcome.previous, trained=trained, new_samples=plan["new_samples"],
            comparison=outcome.rows,
        )  # fmt: skip
    finally:
        if started_ray:
            import ray

            ray.shutdown()


# ----------------------------------------------------------------------------------------------
# Command line: `dpn retrain` and `python -m jobs.retrain`
# ----------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``dpn retrain`` / ``python -m jobs.retrain``."""
    add_config_arguments(
        parser,
        config_help="retrain config YAML (configs/retrain_*.yaml)",
        overrides_help="dotted overrides, e.g. gate.accuracy_tolerance=0.02 data.min_new_samples=500",
    )
    parser.add_argument("--json", dest="json_path", help="also write the result as JSON to this file")
    add_console_arguments(parser, "<training run.work_dir>/retrain/logs/retrain-<time>.log")


def run(args: argparse.Namespace) -> int:
    """``dpn retrain``: 0 when the cycle completed (promoted, rejected or nothing to do), 2 on a bad config.

    Also 0, with ``status=lease_held`` in the summary and a warning naming the holder, when another retrain
    holds the lease: overlapping schedules are expected, the next tick tries again, and a failed Job would only
    be retried into the same lease; 0 with ``status=champion_moved`` when the decision was refused (the next
    run evaluates again). A crash is exit 1, its error and the log's last lines on the console.
    """

    def cycle(cfg: RetrainConfig) -> dict[str, Any]:
        with job_console("retrain", args, _work_dir(training_config(cfg))):
            result = retrain(cfg)
        if args.json_path:
            atomic_write_text(args.json_path, json.dumps(result.__dict__, indent=1, default=str) + "\n")
        return {k: v for k, v in result.__dict__.items() if k != "comparison"}

    try:
        return run_config_job(args, load=_load_checked, dump=dump_config, job=cycle, invalid=ConfigError)
    except JobFailed as failed:
        return failed.exit_code


def _load_checked(path: str, overrides: list[str]) -> RetrainConfig:
    cfg = load_retrain_config(path, overrides)
    training_config(cfg)  # the training config must load too
    return cfg


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.retrain ...`: the same as `dpn retrain ...`."""
    return run_module("jobs.retraining.job", argv, prog="python -m jobs.retrain")
