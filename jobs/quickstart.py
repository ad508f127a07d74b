"""`dpn quickstart`: the whole system on one machine, one stage after another.

    dpn quickstart [--work-dir work] [--max-steps 300] [--dense-warmup-steps N] [--keep-serving] [--port 8000]

1. data      the synthetic benchmark, written as Parquet shards        (pipelines.synthetic)
2. train     the tiny DPN, 2 CPU workers, DeepSpeed ZeRO-2             (jobs.training, configs/train_tiny.yaml)
3. evaluate  DPN (router) against dense on the held-out split          (jobs.evaluation)
4. register  the trained version becomes `champion` in the MLflow registry
5. serve     the OpenAI-compatible Ray Serve app on models:/dpn@champion (serve_apps)
6. ask       a real chat request with an image, through the `openai` client

Every stage writes what it made under the work dir and the MLflow store (`./mlflow.db` unless
$MLFLOW_TRACKING_URI is set); a second run reuses them and only serves and asks again.

The endpoint requires an API key, as every DPN endpoint does: each run makes a random one for its own
endpoint, hands it to the app in $DPN_QUICKSTART_API_KEY (set before this run starts its local Ray, whose
processes inherit it) and uses it in its own request. With --keep-serving it is written to
<work-dir>/quickstart/api_key (readable by you only), never to the console or the log.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dpn_base.cli_harness import run_module
from dpn_base.config_models import ConfigError
from dpn_base.console import console_and_log
from dpn_base.model_ref import ModelRef, RefKind

if TYPE_CHECKING:
    from jobs.training.config import TrainConfig

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
STAGES = ["data", "train", "evaluate", "register", "serve", "ask"]
API_KEY_ENV = "DPN_QUICKSTART_API_KEY"  # the quickstart endpoint's own key (not the user's DPN_API_KEY)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir", default="work", help="where data, checkpoints and reports go (default work)"
    )
    parser.add_argument("--config", default=str(CONFIGS / "train_tiny.yaml"), help="training config")
    parser.add_argument("--max-steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument(
        "--dense-warmup-steps",
        type=int,
        default=None,
        help="of those, how many train dense before the router starts (default: the config's)",
    )
    parser.add_argument(
        "--eval-samples", type=int, default=120, help="held-out samples to evaluate (default 120)"
    )
    parser.add_argument(
        "--registered-model", default="dpn", help="MLflow registered model name (default dpn)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the endpoint (default 8000)")
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the endpoint up after the demo request"
    )
    parser.add_argument(
        "--retrain", action="store_true", help="train again even if an earlier run left a model"
    )


def _stage(out: TextIO, i: int, title: str) -> float:
    print(f"\n[{i}/{len(STAGES)}] {title}", file=out, flush=True)
    return time.perf_counter()


def _done(out: TextIO, start: float, what: str) -> None:
    print(f"      {what} ({time.perf_counter() - start:.0f} s)", file=out, flush=True)


def _load_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def _version_exists(name: str, version: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tracking import tracking_uri

    try:
        MlflowClient(tracking_uri()).get_model_version(name, version)
        return True
    except MlflowException:
        return False


def quickstart_train_config(args: argparse.Namespace, work: Path) -> TrainConfig:
    """The training config of the quickstart: ``--config`` with its work dir, data, steps and names set."""
    from jobs.training.config import load_train_config

    overrides = [
        f"run.work_dir={work}",
        f"data.path={work / 'data' / 'synthetic'}",
        "run.name=dpn-quickstart" + (f"-{int(time.time())}" if args.retrain else ""),
        f"mlflow.registered_model={args.registered_model}",
    ]
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.dense_warmup_steps is not None:
        overrides.append(f"model.dense_warmup_steps={args.dense_warmup_steps}")
    cfg = load_train_config(args.config, overrides)
    init = Path(cfg.model.init)
    if not init.is_absolute() and (REPO / init).is_dir():  # the shipped checkpoint, from any working dir
        cfg.model.init = str(REPO / init)
    return cfg


def stage_data(out: TextIO, cfg: TrainConfig) -> Path:
    from jobs.training.driver import ensure_synthetic_data

    root = Path(cfg.data.path)
    syn = cfg.data.synthetic
    if syn is None:
        raise ConfigError("the quickstart trains on the synthetic benchmark: its config needs data.synthetic")
    action = ensure_synthetic_data(syn, str(root))  # the training job's own data step
    what = f"the {syn.benchmark} benchmark, {syn.num_train} train / {syn.num_dev} dev / {syn.num_eval} test"
    if action == "reused":
        print(f"      reusing {root} ({what}: its manifest matches)", file=out)
    else:
        if action.startswith("replaced"):
            print(
                f"      {root} held another dataset ({action.split(': ', 1)[1]}): writing the one asked for",
                file=out,
            )
        print(f"      wrote {what} samples to {root}", file=out)
    return root


def stage_train(
    out: TextIO, args: argparse.Namespace, cfg: TrainConfig, state: dict[str, Any]
) -> dict[str, Any]:
    from jobs.training.job import train

    previous = state.get("train")
    if previous and not args.retrain and _version_exists(args.registered_model, previous["version"]):
        print(f"      reusing {args.registered_model} version {previous['version']} ({previous['model_uri']})",
              file=out)  # fmt: skip
        return previous
    print(f"      from {cfg.model.init}, compression {cfg.model.compression}, {cfg.train.max_steps} steps",
          file=out)  # fmt: skip
    result = train(cfg, progress=out)
    return {
        "run_id": result.run_id,
        "model_uri": result.model_uri,
        "version": result.registered_version,
        "steps": result.steps,
        "seconds": round(result.seconds),
        "loss": result.metrics.get("loss"),
    }


def stage_evaluate(
    out: TextIO,
    args: argparse.Namespace,
    work: Path,
    data: Path,
    trained: dict[str, Any],
    state: dict[str, Any],
) -> dict[str, Any]:
    from jobs.evaluation.job import EvalConfig, ModelSpec, evaluate

    previous = state.get("evaluate")
    if previous and previous.get("version") == trained["version"]:
        print(
            f"      reusing the evaluation of version {trained['version']} ({previous['report']})", file=out
        )
        return previous
    where = work / "quickstart" / "eval"
    version = str(trained["version"])
    model_uri = str(ModelRef(RefKind.REGISTRY_VERSION, name=args.registered_model, version=version))
    report = evaluate(
        EvalConfig(
            models=[ModelSpec(label="dpn", uri=model_uri, compressions=["auto", 1])],
            data=str(data),
            max_samples=args.eval_samples,
            output_dir=str(where),
            json_path=str(where / "report.json"),
            run_name="quickstart",
        )
    )
    rows = {str(r["compression"]): r for r in report["rows"]}
    summary = {
        "version": trained["version"],
        "report": str(where / "report.json"),
        "accuracy_auto": rows["auto"]["accuracy"],
        "accuracy_dense": rows["1"]["accuracy"],
        "flops_ratio_auto": rows["auto"]["flops_ratio"],
        "per_kind_auto": _groups(rows["auto"].get("per_kind", {})),
        "per_family_auto": _groups(rows["auto"].get("per_family", {})),
        "per_family_dense": _groups(rows["1"].get("per_family", {})),
    }
    return summary


def _groups(entries: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per family (or kind) of a report row: accuracy, FLOPs ratio and visual tokens kept per layer."""
    keys = ("accuracy", "flops_ratio", "visual_tokens_per_layer")
    return {name: {k: entry[k] for k in keys} for name, entry in entries.items()}


def stage_register(out: TextIO, args: argparse.Namespace, trained: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from tracking import Registry, tracking_uri

    registry = Registry(MlflowClient(tracking_uri()), args.registered_model)
    replaced = registry.promote(trained["version"])
    where = f" (previous champion: version {replaced})" if replaced else ""
    print(f"      models:/{args.registered_model}@champion -> version {trained['version']}{where}", file=out)


def stage_serve(args: argparse.Namespace, version: str) -> str:
    from ray import serve

    from dpn_base.ray_session import connect_ray
    from serve_apps.app import build_app

    connect_ray()  # $RAY_ADDRESS or a new local Ray; the replicas get the driver's WORKER_ENV_VARS
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    app = build_app(
        {
            "model": str(ModelRef(RefKind.REGISTRY_ALIAS, name=args.registered_model, alias="champion")),
            "version": f"champion-{version}",
            "api_key_env": API_KEY_ENV,
        }
    )
    serve.run(app, name="dpn", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{args.port}/v1"


def _example(data: Path) -> tuple[bytes, str, str, str]:
    """An image question from the held-out split: (png bytes, question, reference answer, family)."""
    import pyarrow.parquet as pq

    table = pq.read_table(
        sorted(data.glob("eval-*.parquet"))[0], columns=["image", "question", "answer", "family"]
    )
    row = table.slice(0, 1).to_pylist()[0]
    return row["image"], row["question"], row["answer"], row["family"]


def stage_ask(out: TextIO, base_url: str, data: Path, model_name: str = "dpn") -> dict[str, Any]:
    from openai import OpenAI

    image, question, reference, family = _example(data)
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    client = OpenAI(base_url=base_url, api_key=os.environ[API_KEY_ENV])
    reply = client.chat.completions.create(
        model=model_name,
        max_tokens=8,
        temperature=0.0,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        extra_body={"compression": "auto"},
    )
    usage = reply.usage.model_extra or {}
    answer = reply.choices[0].message.content.strip()
    print(f"      question ({family}): {question}", file=out)
    print(f"      answer: {answer!r} (reference {reference!r})", file=out)
    print(
        f"      router's compression per pooling layer: {usage.get('compression_per_pooling_layer')}",
        file=out,
    )
    print(f"      visual tokens per decoder layer: {usage.get('visual_tokens_per_layer')}", file=out)
    saved = usage.get("prefill_flops_saved")
    if saved is not None:
        print(f"      prefill FLOPs saved vs dense: {saved:.0%}", file=out)
    return {"answer": answer, "reference": reference, "usage": usage}


def run(args: argparse.Namespace) -> int:
    work = Path(args.work_dir).resolve()
    log_path = work / "quickstart" / "quickstart.log"
    print(f"dpn quickstart: stages and results here; Ray, DeepSpeed, MLflow and torch output in {log_path}",
          flush=True)  # fmt: skip
    stage = "start"
    with console_and_log(log_path) as out, _endpoint_key():
        try:
            for stage in _run_stages(out, args, work):
                logger.info("quickstart stage %s", stage)
        except KeyboardInterrupt:
            pass
        except Exception as err:
            logger.exception("quickstart failed at stage %s", stage)
            print(f"\nquickstart failed at stage {stage!r}: {type(err).__name__}: {err}\n"
                  f"the full log, traceback included: {log_path}", file=out, flush=True)  # fmt: skip
            return 1
    return 0


@contextlib.contextmanager
def _endpoint_key() -> Iterator[str]:
    """A random API key for this run's endpoint in $DPN_QUICKSTART_API_KEY while the run lasts (the local Ray
    started during the run inherits it, the ingress reads it there); the variable is restored after."""
    previous = os.environ.get(API_KEY_ENV)
    os.environ[API_KEY_ENV] = key = secrets.token_urlsafe(32)
    try:
        yield key
    finally:
        if previous is None:
            os.environ.pop(API_KEY_ENV, None)
        else:
            os.environ[API_KEY_ENV] = previous


def _write_key_file(path: Path) -> None:
    """The endpoint's key in `path`, readable by its owner only (the key never goes to the console or the log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.environ[API_KEY_ENV])


def _print_families(out: TextIO, ev: dict[str, Any]) -> None:
    """One line per question family: the router's accuracy (and dense's), tokens kept per layer, FLOPs.

    This is the quickstart's point: fine questions keep more visual tokens than coarse ones.
    """
    dense = ev.get("per_family_dense", {})
    routed = ev.get("per_family_auto", {})
    for family, entry in routed.items():  # the router at work: fine questions keep more
        tokens = ">".join(f"{v:.0f}" for v in entry["visual_tokens_per_layer"])
        versus = f" (dense {dense[family]['accuracy']:.1%})" if family in dense else ""
        print(f"      {family}: accuracy {entry['accuracy']:.1%}{versus}, visual tokens per layer {tokens}, "
              f"prefill FLOPs {entry['flops_ratio']:.0%} of dense", file=out)  # fmt: skip


def _keep_serving(out: TextIO, work: Path, base_url: str) -> None:
    """Write the endpoint's key to a file, say how to try the endpoint, and wait until interrupted.

    The key goes to an owner-only file, never to the console, so the printed commands read it from there.
    """
    key_file = work / "quickstart" / "api_key"
    _write_key_file(key_file)
    print(
        f"\nThe endpoint stays up at {base_url} (Ctrl-C to stop). Its API key (new each run) is in "
        f"{key_file}. Try:\n"
        f'  curl -H "Authorization: Bearer $(cat {key_file})" {base_url}/models\n'
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base_url}', "
        f"api_key=open('{key_file}').read()); "
        "print(c.chat.completions.create(model='dpn', messages=[{'role': 'user', 'content': 'hi'}]))\"\n"
        "MLflow UI (runs, metrics, plots, registry):  mlflow ui --backend-store-uri sqlite:///mlflow.db",
        file=out,
        flush=True,
    )
    while True:
        time.sleep(3600)


def _run_stages(out: TextIO, args: argparse.Namespace, work: Path) -> Iterator[str]:
    """The six stages in order; yields each stage's name as it starts (for the failure message)."""
    state_path = work / "quickstart" / "state.json"
    state = _load_state(state_path)
    begin = time.perf_counter()

    yield "data"
    t = _stage(out, 1, "data: the synthetic benchmark (coarse and fine question families)")
    cfg = quickstart_train_config(args, work)
    data = stage_data(out, cfg)
    _done(out, t, "data ready")

    yield "train"
    t = _stage(out, 2, "train: tiny DPN on Ray Train + DeepSpeed, 2 CPU workers, tracked in MLflow")
    state["train"] = stage_train(out, args, cfg, state)
    _save_state(state_path, state)
    _done(out, t, f"model {state['train']['model_uri']}, registered as {args.registered_model} "
                  f"version {state['train']['version']}")  # fmt: skip

    yield "evaluate"
    t = _stage(out, 3, "evaluate: DPN (router) against dense on held-out questions")
    state["evaluate"] = stage_evaluate(out, args, work, data, state["train"], state)
    _save_state(state_path, state)
    ev = state["evaluate"]
    _print_families(out, ev)
    _done(out, t, f"accuracy auto {ev['accuracy_auto']:.1%} vs dense {ev['accuracy_dense']:.1%}; "
                  f"auto prefill FLOPs {ev['flops_ratio_auto']:.0%} of dense")  # fmt: skip

    yield "register"
    t = _stage(out, 4, "register: champion alias in the MLflow model registry")
    stage_register(out, args, state["train"])
    _done(out, t, "champion set")

    from ray import serve

    yield "serve"
    t = _stage(out, 5, "serve: OpenAI-compatible Ray Serve app, batching by compression rate")
    base_url = stage_serve(args, state["train"]["version"])
    _done(out, t, f"serving at {base_url}")
    try:
        yield "ask"
        t = _stage(out, 6, "ask: a chat completion with an image, through the openai client")
        state["ask"] = stage_ask(out, base_url, data)
        _save_state(state_path, state)
        _done(out, t, "answered")
        print(
            f"\nquickstart finished in {time.perf_counter() - begin:.0f} s; state in {state_path}", file=out
        )
        if args.keep_serving:
            _keep_serving(out, work, base_url)
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.quickstart ...`: the same as `dpn quickstart ...`."""
    return run_module("jobs.quickstart", argv)


if __name__ == "__main__":
    sys.exit(main())
