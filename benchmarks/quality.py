"""Reproduce the paper's claim on the synthetic benchmark: accuracy against prefill FLOPs.

    python benchmarks/quality.py [--finetune-steps N] [--finetune-lr LR] [--tag NAME]
                                 [--override KEY=VALUE ...] [--dpn-override KEY=VALUE ...]
    python benchmarks/quality.py --from-scratch [--max-steps N]        # every variant from random weights
    python benchmarks/quality.py --model dense=URI --model fixed2=URI ...   # evaluate only

Drives the real jobs end to end, each in its own process (as ``ray job submit`` would), with the
paper's recipe: DPN starts from a trained dense model (LLaVA-1.5), and so do the fixed-rate
baselines it is compared with.

1. ``python -m jobs.train --config configs/train_tiny_dense.yaml`` trains the dense model from
   random weights (the configs' schedule);
2. ``python -m jobs.train --config configs/train_tiny{,_fixed4,_fixed2}.yaml model.init=<dense>``
   fine-tunes DPN (compression auto) and the fixed-4x and fixed-2x baselines from it with identical
   settings (``--finetune-steps``, ``--finetune-lr``; the configs differ only in
   ``model.compression``; no dense warm-up, the model is already dense-trained), each logged and
   registered in MLflow. ``--from-scratch`` instead trains every variant from random weights with the
   configs' own schedule (DPN's includes its dense warm-up, ``model.dense_warmup_steps``);
3. ``python -m jobs.evaluate`` evaluates them all in one run on the eval split of the same
   synthetic dataset: each baseline at its own rate, DPN in auto and at every forced rate;
4. checks the paper's targets and writes the tables and plots to ``benchmarks/results/``
   (``quality.json``, ``quality.md``, ``quality_*.png``) and the section "Quality: accuracy vs
   FLOPs" of ``BENCHMARKS.md`` (other sections are left alone).

Targets (mirroring LLaVA-1.5-7B in the paper: -56% FLOPs, +0.74% accuracy):

- DPN auto needs at most 50% of dense prefill FLOPs,
- with accuracy no more than 0.5 points below dense,
- more accurate than the fixed-rate baseline closest to it in FLOPs,
- fine questions routed to less pooling (more visual tokens kept) than coarse ones.

A missed target is reported as missed, with the settings that were used; nothing here tunes the
benchmark to pass.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SECTION = "## Quality: accuracy vs FLOPs"
VARIANTS: dict[str, tuple[str, str]] = {  # name -> (config, modes evaluated)
    "dense": ("configs/train_tiny_dense.yaml", "1"),
    "fixed2": ("configs/train_tiny_fixed2.yaml", "2"),
    "fixed4": ("configs/train_tiny_fixed4.yaml", "4"),
    "dpn": ("configs/train_tiny.yaml", "auto,1,2,4"),
}
MAX_FLOPS_RATIO = 0.5
MAX_ACCURACY_DROP = 0.005  # 0.5 points

logger = logging.getLogger("quality")


def _run(cmd: list[str], log_path: Path) -> str:
    """Run a job in its own process, tee its output to ``log_path``; return its stdout+stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s  (log: %s)", shlex.join(cmd), log_path)
    start = time.time()
    lines: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # progress lines as they happen
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line)
            if re.search(r"step[ =]\d+|Error|error:|finished|model_uri=|accuracy", line):
                sys.stderr.write(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(
            f"{cmd[2]} failed (exit {code}) after {time.time() - start:.0f} s; log {log_path}\n{tail}"
        )
    logger.info("done in %.0f s", time.time() - start)
    return "".join(lines)


def train_variant(name: str, args: argparse.Namespace, run_dir: Path, init: str | None = None) -> dict[str, Any]:
    """Train one variant; ``init`` (a model URI) makes it a fine-tune of that model."""
    config, _ = VARIANTS[name]
    overrides = [f"run.name=quality-{name}-{args.tag}", f"mlflow.experiment={args.experiment}"]
    if init is not None:
        # the init model is dense-trained already: no dense warm-up
        overrides += [f"model.init={init}", f"train.max_steps={args.finetune_steps}",
                      f"optim.lr={args.finetune_lr}", "optim.warmup_ratio=0.0", "model.dense_warmup_steps=0"]  # fmt: skip
    elif args.max_steps:
        overrides.append(f"train.max_steps={args.max_steps}")
    overrides += args.override
    if name == "dpn":
        overrides += args.dpn_override
    cmd = [sys.executable, "-m", "jobs.train", "--config", config, *overrides]
    start = time.time()
    out = _run(cmd, run_dir / f"train_{name}.log")
    fields = dict(re.findall(r"^(run_id|model_uri|steps|seconds|model_dir)=(.*)$", out, flags=re.M))
    if "model_uri" not in fields:
        raise RuntimeError(f"jobs.train printed no model_uri for {name}; see {run_dir / f'train_{name}.log'}")
    return {"name": name, "config": config, "overrides": overrides, "wall_s": time.time() - start, **fields}


def data_path(args: argparse.Namespace) -> str:
    """The synthetic dataset the training configs generate (``run.work_dir`` / ``data.path``)."""
    if args.data:
        return args.data
    import yaml

    cfg = yaml.safe_load((REPO / VARIANTS["dpn"][0]).read_text())
    path = Path(cfg["data"]["path"])
    return str(path if path.is_absolute() else REPO / cfg["run"]["work_dir"] / path)


def evaluate(models: dict[str, str], args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    json_path = run_dir / "eval.json"
    cmd = [sys.executable, "-m", "jobs.evaluate", "--data", data_path(args), "--json", str(json_path),
           "--output-dir", str(run_dir / "eval"), "--experiment", args.experiment,
           "--run-name", f"quality-{args.tag}", "--batch-size", str(args.batch_size),
           "--max-new-tokens", "4", "--title", "Synthetic benchmark: accuracy vs prefill FLOPs"]  # fmt: skip
    for name, uri in models.items():
        modes = VARIANTS.get(name, ("", "auto,1,2,4"))[1]
        cmd += ["--model", f"{name}={uri}", "--compression", f"{name}={modes}"]
    _run(cmd, run_dir / "eval.log")
    return json.loads(json_path.read_text())


def _row(rows: list[dict[str, Any]], label: str, mode: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["label"] == label and str(r["compression"]) == mode), None)


def _final_tokens(entry: dict[str, Any]) -> float:
    """Mean visual tokens over the layers after each pooling layer (how much a group was pooled)."""
    tokens = entry["visual_tokens_per_layer"][1:]
    return sum(tokens) / max(len(tokens), 1)


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's targets, each ``{"target", "passed", "detail"}`` (``passed`` None: not measurable)."""
    dpn, dense = _row(rows, "dpn", "auto"), _row(rows, "dense", "1")
    checks: list[dict[str, Any]] = []
    if dpn is None:
        return [{"target": "DPN auto evaluated", "passed": False, "detail": "no dpn/auto row"}]
    checks.append({
        "target": f"DPN auto prefill FLOPs <= {MAX_FLOPS_RATIO:.0%} of dense",
        "passed": dpn["flops_ratio"] <= MAX_FLOPS_RATIO,
        "detail": f"{dpn['flops_ratio']:.3f} of dense (language model alone: {dpn['llm_flops_ratio']:.3f})",
    })  # fmt: skip
    if dense is not None:
        drop = dense["accuracy"] - dpn["accuracy"]
        checks.append({
            "target": "DPN auto accuracy >= dense - 0.5 points",
            "passed": drop <= MAX_ACCURACY_DROP + 1e-12,
            "detail": f"DPN {100 * dpn['accuracy']:.1f}% vs dense {100 * dense['accuracy']:.1f}% ({-100 * drop:+.1f} points)",
        })  # fmt: skip
    fixed = [r for r in (_row(rows, "fixed2", "2"), _row(rows, "fixed4", "4")) if r is not None]
    if fixed:
        near = min(fixed, key=lambda r: abs(r["flops_ratio"] - dpn["flops_ratio"]))
        checks.append({
            "target": "DPN auto more accurate than the fixed rate of closest FLOPs",
            "passed": dpn["accuracy"] > near["accuracy"],
            "detail": f"DPN {100 * dpn['accuracy']:.1f}% at {dpn['flops_ratio']:.3f} vs {near['label']} "
            f"{100 * near['accuracy']:.1f}% at {near['flops_ratio']:.3f}",
        })  # fmt: skip
    kinds = dpn.get("per_kind", {})
    if "fine" in kinds and "coarse" in kinds:
        fine, coarse = _final_tokens(kinds["fine"]), _final_tokens(kinds["coarse"])
        checks.append({
            "target": "fine questions pooled less than coarse ones (DPN auto)",
            "passed": fine > coarse,
            "detail": f"mean visual tokens after pooling layers: fine {fine:.1f}, coarse {coarse:.1f}; "
            f"FLOPs ratio fine {kinds['fine']['flops_ratio']:.3f}, coarse {kinds['coarse']['flops_ratio']:.3f}",
        })  # fmt: skip
    return checks


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(0)) + (
        f"; Python {platform.python_version()}, torch {torch.__version__}"
    )  # fmt: skip


def write_results(report: dict[str, Any], trained: list[dict[str, Any]], checks: list[dict[str, Any]],
                  args: argparse.Namespace, run_dir: Path, wall_s: float) -> str:  # fmt: skip
    from jobs.eval_report import format_family_table, format_table, write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    plots = []
    for png in sorted((run_dir / "eval" / "plots").glob("*.png")):
        target = RESULTS / f"quality_{png.name}"
        shutil.copyfile(png, target)
        plots.append(target)
    write_json({**report, "targets": checks, "training": trained}, RESULTS / "quality.json")
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (tag `{args.tag}`, {wall_s / 60:.0f} min in all).  ",
        f"Machine: {machine()}.  ",
        f"Data: `{data_path(args)}` eval split ({rows[0]['num_samples'] if rows else 0} questions; "
        "coarse = big_color/big_count/big_side, fine = tile_half/tile_corner/tile_diagonal).",
        "",
        "Training runs (`python -m jobs.train`, one per variant, identical except `model.compression`):",
        "",
    ]
    for label in report.get("given_models", {}):
        lines.append(f"- {label}: trained by an earlier run of this script, passed as `--model {label}=...`: "
                     f"`{report['given_models'][label]}`")  # fmt: skip
    for t in trained:
        lines.append(f"- {t['name']}: `{t['config']}` {' '.join(t['overrides'])} -> {t.get('steps', '?')} steps, "
                     f"{float(t.get('seconds', t['wall_s'])):.0f} s, `{t['model_uri']}`")  # fmt: skip
    recipe = ("every variant trained from random weights" if args.from_scratch else
              f"DPN and the fixed-rate baselines fine-tuned from the dense model for {args.finetune_steps} steps "
              f"at peak lr {args.finetune_lr:g}, as the paper fine-tunes DPN from LLaVA-1.5")  # fmt: skip
    lines += [
        "",
        f"Recipe: {recipe}.",
        "",
        "FLOPs are analytic prefill FLOPs per sample (`dpn_model.flops`); `x dense` is the whole prefill "
        "(vision tower + projector + language model), `LLM x dense` the language model alone (the part "
        "pooling acts on; the paper's 7B model is ~96% language model, the tiny preset ~65%).",
        "",
        format_table(rows, markdown=True),
        "",
        "Accuracy per question family (%; auto rows: accuracy / mean visual tokens kept after the last "
        "pooling layer):",
        "",
        format_family_table(rows, markdown=True),
        "",
        "Targets (paper, LLaVA-1.5-7B: -56% FLOPs, +0.74% accuracy):",
        "",
    ]
    for c in checks:
        mark = "PASS" if c["passed"] else ("n/a" if c["passed"] is None else "MISSED")
        lines.append(f"- **{mark}** {c['target']}: {c['detail']}")
    lines += ["", *[f"![{p.stem}](benchmarks/results/{p.name})" for p in plots], ""]
    text = "\n".join(lines)
    (RESULTS / "quality.md").write_text(text.replace("](benchmarks/results/", "](") + "\n")
    _update_benchmarks_md(text)
    return text


def _update_benchmarks_md(section: str) -> None:
    """Replace (or append) this benchmark's section of BENCHMARKS.md, leaving the others alone."""
    path = REPO / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt >= 0 else "\n")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants", default="dense,dpn,fixed4,fixed2", help="which models to train (in this order)"
    )
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URI",
                        help="use an already trained model for a variant instead of training it")  # fmt: skip
    parser.add_argument(
        "--max-steps", type=int, help="train.max_steps of runs from random weights (default: the configs')"
    )
    parser.add_argument("--from-scratch", action="store_true",
                        help="train every variant from random weights (default: dense first, the others from it)")  # fmt: skip
    parser.add_argument("--finetune-steps", type=int, default=400, help="steps of the runs that start from dense")
    parser.add_argument("--finetune-lr", type=float, default=3e-4, help="peak learning rate of those runs")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra jobs.train override for every variant")  # fmt: skip
    parser.add_argument("--dpn-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the DPN run only (e.g. model.config_overrides.routing_loss_weight=0.5)")  # fmt: skip
    parser.add_argument("--data", help="eval data (default: the dataset the training configs generate)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--experiment", default="dpn-quality")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="suffix of run names")
    parser.add_argument(
        "--no-write", action="store_true", help="do not touch BENCHMARKS.md / benchmarks/results"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = REPO / "runs" / "quality" / args.tag
    start = time.time()
    given = dict(m.split("=", 1) for m in args.model)
    models = {name: uri for name, uri in given.items() if name in VARIANTS}
    trained: list[dict[str, Any]] = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        if name in given:
            continue
        from_dense = None
        if not args.from_scratch and name != "dense":
            from_dense = models.get("dense")
            if from_dense is None:
                parser.error(f"{name} starts from the dense model: put dense first in --variants or pass --model dense=URI")
        result = train_variant(name, args, run_dir, init=from_dense)
        trained.append(result)
        models[name] = result["model_uri"]
        (run_dir / "trained.json").write_text(json.dumps(trained, indent=1))  # resume by hand with --model
    models = {name: models[name] for name in VARIANTS if name in models}  # table order: baselines, then DPN
    report = evaluate(models, args, run_dir)
    report["given_models"] = {k: v for k, v in models.items() if k in given}
    checks = check_targets(report["rows"])
    if args.no_write:
        from jobs.eval_report import format_table

        print(format_table(report["rows"]))
    else:
        print(write_results(report, trained, checks, args, run_dir, time.time() - start))
    for c in checks:
        logger.info("%s %s: %s", "PASS" if c["passed"] else "MISSED", c["target"], c["detail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
