#!/usr/bin/env python3
"""The main job end to end through the cluster's own interfaces, on the stack `dpn stack up` started.

    eval "$(dpn stack env)" && python deploy/local/e2e.py        # or --env-file ~/.dpn/stack/stack.env

At tiny size (the tiny preset, 4 training steps, 16 evaluation questions), every stage as a user runs it, each
checked from the outside:

1. data: the synthetic benchmark written to ``$DPN_DATA_ROOT/synthetic`` (``dpn data synth s3://...``; once per
   stack) plus a fresh train shard per run, so that retraining always has new data;
2. train: ``ray job submit --working-dir . -- python -m jobs.train ...`` with data, checkpoints
   (``run.storage_path=$DPN_STORAGE_PATH``) on S3 and one worker per node (``dpn_train_slot``); checked: the
   training workers ran on both nodes (Ray's state API), checkpoints are in the bucket (boto3), the MLflow run
   has the loss at steps 1..N once each and the model is registered;
3. eval: ``ray job submit ... python -m jobs.evaluate`` of the registered version on the S3 eval split; its run
   is in MLflow;
4. retrain: ``ray job submit ... python -m jobs.retrain``: the new shard -> challenger -> gate; the
   ``champion`` alias exists afterwards;
5. serve: ``serve deploy`` of ``configs/serve_tiny.yaml`` with ``model: models:/dpn@champion`` (and the stack's
   Serve port), one chat answered through the official ``openai`` client with the stack's API key;
6. metrics: Prometheus answers ``ray_dpn_requests_total``, and accepts every query of the Grafana dashboard.

Per-stage wall times, the checks' figures and every job's log go to ``$DPN_STACK_DIR/e2e/<tag>/``
(``summary.json``); the exit status is 0 when every check passed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
REQUIRED = (
    "RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "DPN_S3_BUCKET",
    "DPN_STORAGE_PATH", "DPN_DATA_ROOT", "DPN_WORK_DIR", "PROMETHEUS_URL", "DPN_SERVE_URL", "DPN_API_KEY",
    "DPN_STACK_DIR",
)  # fmt: skip
NODE_IPS = {"127.0.0.2", "127.0.0.3"}
TRAIN_STEPS = 4
EVAL_SAMPLES = 16
MODEL_NAME = "dpn"
GRAFANA_DASHBOARD = REPO / "deploy" / "grafana" / "dpn-dashboard.json"


class CheckFailed(AssertionError):
    """A stage ran but what it left behind is wrong; the message says what was found."""


def read_env_file(path: Path) -> dict[str, str]:
    """``export NAME=value`` lines (as ``dpn stack env`` prints them) -> a mapping."""
    env = {}
    for line in path.read_text().splitlines():
        parts = shlex.split(line, comments=True)
        if len(parts) == 2 and parts[0] == "export" and "=" in parts[1]:
            name, value = parts[1].split("=", 1)
            env[name] = value
    return env


@dataclass
class Run:
    """One end-to-end run: its environment, names, log folder and the summary it builds."""

    env: dict[str, str]
    tag: str
    out: Path
    summary: dict = field(default_factory=lambda: {"stages": {}})

    @property
    def data_root(self) -> str:
        return f"{self.env['DPN_DATA_ROOT'].rstrip('/')}/synthetic"

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time one stage; what the block puts in the yielded dict goes to the summary."""
        record: dict = {}
        self.summary["stages"][name] = record
        print(f"[e2e] {name} ...", flush=True)
        t0 = time.monotonic()
        try:
            yield record
        finally:
            record["seconds"] = round(time.monotonic() - t0, 1)
            print(f"[e2e] {name}: {record['seconds']} s {json.dumps({k: v for k, v in record.items() if k != 'seconds'})}",
                  flush=True)  # fmt: skip

    def command(self, name: str, argv: list[str], timeout: float = 1200) -> str:
        """Run ``argv`` with the stack's variables, its output to ``<out>/<name>.log``; the output, or a
        CheckFailed with the log's tail."""
        log = self.out / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                  cwd=REPO, timeout=timeout)  # fmt: skip
        text = log.read_text(errors="replace")
        if proc.returncode:
            tail = "\n".join(text.splitlines()[-40:])
            raise CheckFailed(
                f"{name}: `{shlex.join(argv[:6])} ...` exited {proc.returncode}; log {log}:\n{tail}"
            )
        return text

    def submit(self, name: str, entrypoint: list[str]) -> tuple[str, str]:
        """``ray job submit --working-dir .`` through the Jobs API; returns (submission id, the job's output)."""
        submission = f"{self.tag}-{name}"
        argv = ["ray", "job", "submit", "--address", self.env["RAY_ADDRESS"], "--working-dir", ".",
                "--submission-id", submission, "--", *entrypoint]  # fmt: skip
        return submission, self.command(name, argv)


def summary_values(text: str) -> dict[str, str]:
    """The ``key=value`` lines a job prints last (``dpn train``/``dpn retrain`` summaries)."""
    return dict(re.findall(r"^([a-z_]+)=(\S*)$", text, flags=re.M))


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


def stage_data(run: Run) -> None:
    import pyarrow.fs as pafs

    with run.stage("data") as rec:
        fs, path = pafs.FileSystem.from_uri(f"{run.data_root}/synthetic.json")
        if fs.get_file_info(path).type != pafs.FileType.File:
            run.command("data-synth", ["dpn", "data", "synth", run.data_root, "--format", "parquet",
                                       "--num-train", "128", "--num-eval", "32"])  # fmt: skip
        seed = int(time.time()) % 100_000
        run.command("data-shard", ["dpn", "data", "synth", run.data_root, "--new-shard", run.tag,
                                   "--num-train", "32", "--seed", str(seed)])  # fmt: skip
        files = fs.get_file_info(pafs.FileSelector(path.rsplit("/", 1)[0]))
        rec["root"], rec["files"] = run.data_root, len(files)


def stage_train(run: Run) -> None:
    import boto3
    from mlflow import MlflowClient

    with run.stage("train") as rec:
        submission, text = run.submit("train", [
            "python", "-m", "jobs.train", "--config", "configs/train_tiny.yaml", f"data.path={run.data_root}",
            "data.synthetic=null", f"run.storage_path={run.env['DPN_STORAGE_PATH']}",
            f"run.work_dir={run.env['DPN_WORK_DIR']}", f"run.name={run.tag}", f"train.max_steps={TRAIN_STEPS}",
            "train.log_every=1", "checkpoint.every_steps=2", "run.resources_per_worker={dpn_train_slot: 1}",
        ])  # fmt: skip
        out = summary_values(text)
        if not out.get("run_id") or not out.get("registered_version"):
            raise CheckFailed(f"train: no run_id / registered_version in the job's summary: {out}")
        rec["run_id"], rec["version"] = out["run_id"], out["registered_version"]
        rec["worker_nodes"] = worker_nodes(run, submission, "RayTrainWorker")
        if set(rec["worker_nodes"]) != NODE_IPS:
            raise CheckFailed(
                f"train: training workers ran on {rec['worker_nodes']}, not one on each of {NODE_IPS}"
            )
        bucket, prefix = s3_parts(f"{run.env['DPN_STORAGE_PATH']}/{run.tag}/")
        keys = list_keys(boto3.client("s3"), bucket, prefix)
        rec["checkpoints"] = sorted(
            {k.split("/")[0] for k in keys if k.startswith("checkpoint_") and "/" in k}
        )
        if not rec["checkpoints"]:
            raise CheckFailed(f"train: no checkpoint under s3://{bucket}/{prefix} ({len(keys)} objects)")
        client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
        steps = sorted(m.step for m in client.get_metric_history(out["run_id"], "loss"))
        rec["loss_steps"] = steps
        if steps != list(range(1, TRAIN_STEPS + 1)):
            raise CheckFailed(f"train: MLflow has the loss at steps {steps}, want 1..{TRAIN_STEPS} once each")
        version = client.get_model_version(MODEL_NAME, out["registered_version"])
        if version.run_id != out["run_id"]:
            raise CheckFailed(
                f"train: {MODEL_NAME} version {version.version} belongs to run {version.run_id}"
            )
        # the server proxies artifacts to s3://<bucket>/mlflow/<experiment>/models/<model id>/artifacts/
        model_id = getattr(version, "model_id", None) or version.source.rsplit("/", 1)[-1]
        artifacts = list_keys(boto3.client("s3"), run.env["DPN_S3_BUCKET"], "mlflow/")
        weights = [k for k in artifacts if model_id in k and k.endswith("model.safetensors")]
        if not weights:
            raise CheckFailed(
                f"train: the model's weights ({model_id}) are not in s3://{run.env['DPN_S3_BUCKET']}/mlflow/"
            )
        rec["model_weights"] = f"s3://{run.env['DPN_S3_BUCKET']}/mlflow/{weights[0]}"
        run.summary["version"] = out["registered_version"]


def stage_eval(run: Run) -> None:
    from mlflow import MlflowClient

    with run.stage("eval") as rec:
        client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
        if "version" not in run.summary:  # run without the train stage: the newest version
            versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
            run.summary["version"] = str(max(int(v.version) for v in versions))
        run.submit("eval", [
            "python", "-m", "jobs.evaluate", "--model", f"models:/{MODEL_NAME}/{run.summary['version']}",
            "--data", run.data_root, "--split", "eval", "--compression", "auto,1", "--max-samples",
            str(EVAL_SAMPLES), "--max-new-tokens", "4", "--experiment", "dpn-eval", "--run-name", f"{run.tag}-eval",
        ])  # fmt: skip
        found = client.search_runs(
            [client.get_experiment_by_name("dpn-eval").experiment_id],
            filter_string=f"attributes.run_name = '{run.tag}-eval'",
        )
        if not found or not found[0].data.metrics:
            raise CheckFailed(f"eval: no MLflow run {run.tag}-eval with metrics in experiment dpn-eval")
        metrics = found[0].data.metrics
        rec["run_id"], rec["metrics"] = found[0].info.run_id, len(metrics)
        rec["accuracy"] = next((round(v, 3) for k, v in sorted(metrics.items()) if "accuracy" in k), None)


def stage_retrain(run: Run) -> None:
    from mlflow import MlflowClient

    with run.stage("retrain") as rec:
        _, text = run.submit("retrain", [
            "python", "-m", "jobs.retrain", "--config", "configs/retrain_tiny.yaml", f"data.root={run.data_root}",
            "data.synthetic=null", "data.min_new_samples=10",
            f"training.overrides.run.storage_path={run.env['DPN_STORAGE_PATH']}",
            f"training.overrides.run.work_dir={run.env['DPN_WORK_DIR']}",
            "training.overrides.run.resources_per_worker={dpn_train_slot: 1}",
            f"training.overrides.train.max_steps={TRAIN_STEPS}",
            f"training.initial_overrides.train.max_steps={TRAIN_STEPS}", f"eval.max_samples={EVAL_SAMPLES}",
        ])  # fmt: skip
        out = summary_values(text)
        rec["status"], rec["challenger"] = out.get("status"), out.get("challenger")
        if out.get("status") not in ("promoted", "rejected"):
            raise CheckFailed(
                f"retrain: status {out.get('status')!r} ({out.get('reason')}), want promoted/rejected"
            )
        champion = MlflowClient(run.env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
            MODEL_NAME, "champion"
        )
        rec["champion"] = run.summary["champion"] = champion.version


def serve_config(run: Run) -> Path:
    """configs/serve_tiny.yaml with ``model: models:/dpn@champion`` and the stack's Serve port."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "serve_tiny.yaml").read_text())
    config["http_options"]["port"] = urllib.parse.urlsplit(run.env["DPN_SERVE_URL"]).port
    args = config["applications"][0]["args"]
    args["model"], args["version"] = f"models:/{MODEL_NAME}@champion", f"champion-{run.summary['champion']}"
    path = run.out / "serve_tiny.stack.yaml"
    path.write_text(
        "# configs/serve_tiny.yaml for the local stack (deploy/local/e2e.py)\n" + yaml.safe_dump(config)
    )
    return path


def stage_serve(run: Run) -> None:
    from openai import OpenAI

    with run.stage("serve") as rec:
        if "champion" not in run.summary:  # run without the retrain stage
            from mlflow import MlflowClient

            client = MlflowClient(run.env["MLFLOW_TRACKING_URI"])
            run.summary["champion"] = client.get_model_version_by_alias(MODEL_NAME, "champion").version
        run.command(
            "serve-deploy", ["serve", "deploy", str(serve_config(run)), "--address", run.env["RAY_ADDRESS"]]
        )
        base = run.env["DPN_SERVE_URL"]
        deadline = time.monotonic() + 300
        while not http_ok(f"{base}/health"):
            if time.monotonic() > deadline:
                raise CheckFailed(f"serve: {base}/health not 200 after 300 s; `serve status` says why")
            time.sleep(2)
        rec["ready_s"] = round(time.monotonic() - deadline + 300, 1)
        image, question = eval_sample(run)
        client = OpenAI(base_url=f"{base}/v1", api_key=run.env["DPN_API_KEY"], timeout=120, max_retries=2)
        reply = client.chat.completions.create(model="dpn", max_tokens=8, extra_body={"compression": "auto"},
            messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
                {"type": "text", "text": question}]}],
        )  # fmt: skip
        answer = reply.choices[0].message.content
        rec["question"], rec["answer"], rec["finish_reason"] = (
            question,
            answer,
            reply.choices[0].finish_reason,
        )
        if not answer:
            raise CheckFailed(f"serve: the chat answered nothing: {reply}")


def eval_sample(run: Run) -> tuple[bytes, str]:
    """The first question of the eval split on S3, with its image bytes."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"{run.data_root}/eval-000000.parquet", columns=["image", "question"])
    row = table.slice(0, 1).to_pylist()[0]
    return row["image"], row["question"]


def stage_metrics(run: Run) -> None:
    with run.stage("metrics") as rec:
        url = run.env["PROMETHEUS_URL"]
        deadline, value = time.monotonic() + 120, 0.0
        while value < 1:
            if time.monotonic() > deadline:
                raise CheckFailed("metrics: Prometheus has no ray_dpn_requests_total >= 1 after 120 s")
            time.sleep(3)
            result = prom_query(url, "sum(ray_dpn_requests_total)")
            value = float(result[0]["value"][1]) if result else 0.0
        rec["ray_dpn_requests_total"] = value
        answered, with_data = 0, 0
        for expr in dashboard_queries():
            result = prom_query(url, expr)  # raises on a query Prometheus rejects
            answered += 1
            with_data += bool(result)
        rec["dashboard_queries"], rec["dashboard_queries_with_data"] = answered, with_data


def dashboard_queries() -> list[str]:
    """The Grafana dashboard's PromQL, its variables filled in (every application, a 5-minute rate window)."""
    dashboard = json.loads(GRAFANA_DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", []) if t.get("expr")]
    return [e.replace("$application", ".*").replace("$__rate_interval", "5m") for e in exprs]


def prom_query(base: str, expr: str) -> list:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    if body.get("status") != "success":
        raise CheckFailed(f"metrics: Prometheus rejected {expr!r}: {body}")
    return body["data"]["result"]


# ----------------------------------------------------------------------------------------------
# Helpers: Ray's state API, S3 listings, HTTP
# ----------------------------------------------------------------------------------------------


def worker_nodes(run: Run, submission: str, class_name: str) -> list[str]:
    """Node IPs of the ``class_name`` actors a job created (finished ones included), from Ray's state API."""
    from ray.util.state import list_actors, list_jobs, list_nodes

    address = run.env["RAY_ADDRESS"]
    job = next(j for j in list_jobs(address=address, limit=1000) if j.submission_id == submission)
    ips = {n.node_id: n.node_ip for n in list_nodes(address=address, limit=100)}
    actors = list_actors(address=address, filters=[("class_name", "=", class_name), ("job_id", "=", job.job_id)],
                         limit=1000, detail=True)  # fmt: skip
    return sorted(ips.get(a.node_id, a.node_id) for a in actors)


def s3_parts(uri: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(uri)
    return parts.netloc, parts.path.lstrip("/")


def list_keys(client, bucket: str, prefix: str) -> list[str]:
    """Keys under ``prefix``, relative to it."""
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return keys


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------


STAGES = {"data": stage_data, "train": stage_train, "eval": stage_eval, "retrain": stage_retrain,
          "serve": stage_serve, "metrics": stage_metrics}  # fmt: skip


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--env-file", default=os.environ.get("DPN_STACK_ENV"),
                        help="the stack's env file (default $DPN_STACK_ENV; else the current environment)")  # fmt: skip
    parser.add_argument("--tag", default=time.strftime("e2e-%Y%m%d-%H%M%S"), help="run name prefix")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}"
    )
    parser.add_argument(
        "--summary", default=None, help="also write summary.json here (it is always written beside the logs)"
    )
    args = parser.parse_args(argv)
    env = read_env_file(Path(args.env_file).expanduser()) if args.env_file else {}
    env = {**{k: os.environ[k] for k in REQUIRED if k in os.environ}, **env}
    missing = [k for k in REQUIRED if k not in env]
    if missing:
        parser.error(f"missing {', '.join(missing)}: start the stack (`dpn stack up`) and pass --env-file")
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    return args, env


def main(argv: list[str] | None = None) -> int:
    args, env = parse_args(argv)
    os.environ.update(env)  # boto3, MLflow and Ray's state API in this process
    run = Run(env, args.tag, Path(env["DPN_STACK_DIR"]) / "e2e" / args.tag)
    run.out.mkdir(parents=True, exist_ok=True)
    t0, failed = time.monotonic(), None
    try:
        for name in args.stages.split(","):
            STAGES[name](run)
    except (CheckFailed, subprocess.TimeoutExpired) as err:
        failed = str(err)
    except Exception:  # noqa: BLE001 - whatever broke, the summary says where
        import traceback

        failed = traceback.format_exc()
    run.summary.update(tag=run.tag, seconds=round(time.monotonic() - t0, 1), ok=failed is None, error=failed)
    text = json.dumps(run.summary, indent=1) + "\n"
    (run.out / "summary.json").write_text(text)
    if args.summary:
        Path(args.summary).write_text(text)
    print(
        f"[e2e] {'passed' if failed is None else 'FAILED'} in {run.summary['seconds']} s; {run.out / 'summary.json'}"
    )
    if failed:
        print(failed, file=sys.stderr)
    return 0 if failed is None else 1


if __name__ == "__main__":
    sys.exit(main())
