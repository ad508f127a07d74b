"""The paper's claim on the synthetic benchmark, measured against equal-budget baselines and the oracle router.

    python benchmarks/quality.py [--variants dense,fixed2,...] [--tag NAME] [--override KEY=VALUE ...]
    python benchmarks/quality.py --model dense=URI --model dpn-ref=URI ...   # evaluate already trained models

Drives the real jobs end to end, each in its own process (as ``ray job submit`` would):

1. ``python -m jobs.train --config configs/train_tiny.yaml <variant overrides>`` trains every variant with the
   same budget: the same start (the stage-1 model ``checkpoints/tiny-dense``, as the authors' recipe starts
   from the LLM and the stage-1 projector), data, steps, batch and learning-rate schedule; the variants differ
   only in how the visual tokens are pooled in training (``model.compression``) and in the router's options:
   dense; fixed 2x and 4x; the static schedules 1-2-4 and 1-4-4 (PyramidDrop-style); random routing; DPN with
   the authors' semantics and recipe (``dpn-ref``); DPN with our earlier semantics (``dpn-earlier``: routing-loss
   weight 0.1, sampled expert, per-layer hinge, no token floor, router bias, last ``<router>`` token); and DPN
   with our REINFORCE router estimator (``router_estimator=reinforce``; not the authors'): with a learned
   baseline and exploration (``dpn-critic``), and with self-imitation and two routed paths per sample as well
   (``dpn-reinforce``, what ``configs/train_tiny.yaml`` trains; it pays two forward passes per sample, the other
   variants one).
2. ``python -m jobs.evaluate`` evaluates every model at the rate it was trained at (DPN in ``auto``), and a
   second pass with ``--oracle`` runs every static path (27) on each DPN model: the oracle router, the paths'
   Pareto frontier and the router's regret.
3. Checks the issue's targets and writes ``benchmarks/results/quality.{json,md}``, the plots, and the section
   "Quality: accuracy vs FLOPs" of ``BENCHMARKS.md`` (other sections are left alone).

Targets (the paper, LLaVA-1.5-7B: -56% FLOPs at +0.74% accuracy):

- DPN auto accuracy >= dense - 0.5 points at <= 0.50 of dense prefill FLOPs; if the oracle on the DPN model
  needs more than 0.50 of dense FLOPs to reach dense accuracy, instead: DPN auto closes >= 2/3 of the gap between
  the static frontier and the oracle at its FLOPs;
- DPN auto lies >= 3 points above the static frontier (the trained fixed rates and schedules) at its FLOPs;
- questions that need detail (the tile families, "fine") keep more visual tokens than coarse ones.

A missed target is reported as missed with the settings used; nothing here tunes the benchmark to pass.
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
CONFIG = "configs/train_tiny.yaml"
EARLIER = [  # the semantics our configs had before the authors' code was read (DPNConfig LEGACY_DEFAULTS, weight 0.1)
    "model.config_overrides.routing_loss_weight=0.1",
    "model.config_overrides.routing_loss_expert=sampled",
    "model.config_overrides.routing_loss_reduction=per_layer",
    "model.config_overrides.train_token_floor=null",
    "model.config_overrides.inference_token_floor=null",
    "model.config_overrides.router_bias=true",
    "model.config_overrides.router_token_reduction=last",
]
REFERENCE = [
    "model.config_overrides.router_estimator=scale",
    "optim.router_lr_scale=1",
]  # the authors' estimator, one lr
CRITIC = [  # our REINFORCE estimator with a learned baseline and exploration (the config of 2026-12-02)
    "model.config_overrides.router_estimator=reinforce",
    "model.config_overrides.router_baseline=critic",
    "model.config_overrides.router_explore=0.3",
    "optim.router_lr_scale=30",
]
# the config's (configs/train_tiny.yaml), spelt out so the variant stays what it was measured as: CRITIC plus
# self-imitation and two routed paths per training sample
REINFORCE = [*CRITIC, "model.config_overrides.router_imitation_weight=1.0", "model.paths_per_sample=2"]
ONE_PATH = "model.paths_per_sample=1"  # every other variant routes (or pools) each sample once
# name -> (overrides of configs/train_tiny.yaml, mode evaluated, is a static baseline, routed by a router)
VARIANTS: dict[str, tuple[list[str], str, bool, bool]] = {
    "dense": (["model.compression=1", ONE_PATH], "1", True, False),
    "fixed2": (["model.compression=2", ONE_PATH], "2", True, False),
    "fixed4": (["model.compression=4", ONE_PATH], "4", True, False),
    "sched-1-2-4": (["model.compression=1,2,4", ONE_PATH], "1-2-4", True, False),
    "sched-1-4-4": (["model.compression=1,4,4", ONE_PATH], "1-4-4", True, False),
    "random": (["model.compression=random", ONE_PATH], "random", False, False),
    "dpn-ref": (["model.compression=auto", ONE_PATH, *REFERENCE], "auto", False, True),
    "dpn-earlier": (["model.compression=auto", ONE_PATH, *REFERENCE, *EARLIER], "auto", False, True),
    "dpn-critic": (["model.compression=auto", ONE_PATH, *CRITIC], "auto", False, True),
    "dpn-reinforce": (["model.compression=auto", *REINFORCE], "auto", False, True),
}
MAX_FLOPS_RATIO = 0.5
MAX_ACCURACY_DROP = 0.005  # 0.5 points
MIN_ABOVE_FRONTIER = 0.03  # 3 points
MIN_GAP_CLOSED = 2 / 3

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


def train_variant(name: str, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Train one variant with the shared budget of ``configs/train_tiny.yaml``."""
    overrides = [*VARIANTS[name][0], f"run.name=quality-{name}-{args.tag}", f"mlflow.experiment={args.experiment}",
                 f"run.work_dir={run_dir / 'work'}", f"data.path={data_path(args)}", *args.override]  # fmt: skip
    cmd = [sys.executable, "-m", "jobs.train", "--config", CONFIG, *overrides]
    start = time.time()
    out = _run(cmd, run_dir / f"train_{name}.log")
    fields = dict(re.findall(r"^(run_id|model_uri|steps|seconds|model_dir)=(.*)$", out, flags=re.M))
    if "model_uri" not in fields:
        raise RuntimeError(f"jobs.train printed no model_uri for {name}; see {run_dir / f'train_{name}.log'}")
    return {"name": name, "config": CONFIG, "overrides": overrides, "wall_s": time.time() - start, **fields}


def data_path(args: argparse.Namespace) -> str:
    """The synthetic dataset: ``--data``, else the one ``configs/train_tiny.yaml`` generates under its work dir."""
    if args.data:
        return str(Path(args.data).resolve())
    import yaml

    cfg = yaml.safe_load((REPO / CONFIG).read_text())
    path = Path(cfg["data"]["path"])
    return str(path if path.is_absolute() else REPO / cfg["run"]["work_dir"] / path)


def evaluate(models: dict[str, str], args: argparse.Namespace, run_dir: Path, oracle: bool) -> dict[str, Any]:
    """One ``jobs.evaluate`` pass over ``models`` (each at its variant's mode; ``oracle``: plus every static path)."""
    name = "oracle" if oracle else "eval"
    cmd = [sys.executable, "-m", "jobs.evaluate", "--data", data_path(args), "--json", str(run_dir / f"{name}.json"),
           "--output-dir", str(run_dir / name), "--experiment", args.experiment,
           "--run-name", f"quality-{name}-{args.tag}", "--batch-size", str(args.batch_size),
           "--max-new-tokens", "4", "--title", "Synthetic benchmark: accuracy vs prefill FLOPs"]  # fmt: skip
    if oracle:
        cmd.append("--oracle")
    for label, uri in models.items():
        cmd += ["--model", f"{label}={uri}", "--compression", f"{label}={VARIANTS[label][1]}"]
    _run(cmd, run_dir / f"{name}.log")
    return json.loads((run_dir / f"{name}.json").read_text())


def _row(rows: list[dict[str, Any]], label: str) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["label"] == label and str(r["compression"]) == VARIANTS[label][1]), None
    )


def _mean_tokens(entry: dict[str, Any]) -> float:
    """Mean visual tokens over the layers after each pooling layer (how much a group was pooled)."""
    tokens = entry["visual_tokens_per_layer"][1:]
    return sum(tokens) / max(len(tokens), 1)


def static_frontier(rows: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """The accuracy-vs-FLOPs frontier of the trained static baselines (fixed rates and schedules)."""
    from jobs.evaluation.oracle import pareto_frontier

    points = [(r["flops_ratio"], r["accuracy"]) for name, (_, _, static, _) in VARIANTS.items()
              if static and (r := _row(rows, name)) is not None]  # fmt: skip
    keep = pareto_frontier([p[0] for p in points], [p[1] for p in points])
    return sorted(points[i] for i in keep)


def check_variant(
    name: str, rows: list[dict[str, Any]], oracle: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """The issue's targets for one routed variant, each ``{"target", "passed", "detail"}``."""
    from jobs.evaluation.oracle import frontier_accuracy_at

    dpn, dense = _row(rows, name), _row(rows, "dense")
    if dpn is None:
        return [{"target": f"{name} evaluated", "passed": False, "detail": "no auto row"}]
    checks: list[dict[str, Any]] = []
    headline_reachable = True
    if oracle is not None:
        o = oracle["oracle"]
        dense_acc = o.get("dense_accuracy", 0.0)
        need = o.get("flops_ratio_at_dense_accuracy")
        headline_reachable = need is None or need <= MAX_FLOPS_RATIO
        checks.append({
            "target": "oracle (on this model) reaches dense accuracy within 0.50 of dense FLOPs",
            "passed": None if need is None else need <= MAX_FLOPS_RATIO,
            "detail": f"oracle {100 * o['accuracy']:.1f}% at {o['flops_ratio']:.3f}; cheapest FLOPs for dense "
            f"accuracy ({100 * dense_acc:.1f}%): {need if need is None else f'{need:.3f}'}",
        })  # fmt: skip
    if dense is not None:
        drop = dense["accuracy"] - dpn["accuracy"]
        checks.append({
            "target": "auto accuracy >= dense - 0.5 points at <= 0.50 of dense FLOPs",
            "passed": drop <= MAX_ACCURACY_DROP + 1e-12 and dpn["flops_ratio"] <= MAX_FLOPS_RATIO,
            "detail": f"{100 * dpn['accuracy']:.1f}% at {dpn['flops_ratio']:.3f} vs dense "
            f"{100 * dense['accuracy']:.1f}% ({-100 * drop:+.1f} points)",
        })  # fmt: skip
    frontier = static_frontier(rows)
    at = frontier_accuracy_at(frontier, dpn["flops_ratio"])
    checks.append({
        "target": "auto >= 3 points above the trained static frontier at its FLOPs",
        "passed": None if at is None else dpn["accuracy"] - at >= MIN_ABOVE_FRONTIER - 1e-12,
        "detail": "below the cheapest static point" if at is None else
        f"{100 * dpn['accuracy']:.1f}% vs frontier {100 * at:.1f}% at {dpn['flops_ratio']:.3f} "
        f"({100 * (dpn['accuracy'] - at):+.1f} points)",
    })  # fmt: skip
    if oracle is not None and not headline_reachable:
        at_oracle = oracle["regret"].get("auto", {}).get("oracle_accuracy")
        gap = None if at is None or at_oracle is None else at_oracle - at
        closed = None if gap is None or gap <= 1e-12 else (dpn["accuracy"] - at) / gap
        checks.append({
            "target": "the oracle rules the headline out, so: auto closes >= 2/3 of the static-frontier-to-oracle "
            "gap at its FLOPs",
            "passed": None if closed is None else closed >= MIN_GAP_CLOSED,
            "detail": "n/a" if closed is None else f"frontier {100 * at:.1f}%, oracle {100 * at_oracle:.1f}%, "
            f"auto {100 * dpn['accuracy']:.1f}%: {100 * closed:.0f}% of the gap closed",
        })  # fmt: skip
    kinds = dpn.get("per_kind", {})
    if "fine" in kinds and "coarse" in kinds:
        fine, coarse = _mean_tokens(kinds["fine"]), _mean_tokens(kinds["coarse"])
        checks.append({
            "target": "fine questions keep more visual tokens than coarse ones",
            "passed": fine > coarse,
            "detail": f"mean visual tokens after the pooling layers: fine {fine:.1f}, coarse {coarse:.1f}",
        })  # fmt: skip
    return checks


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
            if not torch.cuda.is_available() else torch.cuda.get_device_name(0)) + (
        f"; Python {platform.python_version()}, torch {torch.__version__}"
    )  # fmt: skip


def write_results(report: dict[str, Any], oracle_report: dict[str, Any] | None, trained: list[dict[str, Any]],
                  checks: dict[str, list[dict[str, Any]]], args: argparse.Namespace, run_dir: Path,
                  wall_s: float) -> str:  # fmt: skip
    from jobs.evaluation.oracle import format_section
    from jobs.evaluation.report import format_family_table, format_table, write_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    for old in RESULTS.glob("quality_*.png"):
        old.unlink()
    rows = report["rows"]
    plots = []
    for pass_name in ("eval", "oracle"):
        for png in sorted((run_dir / pass_name / "plots").glob("*.png")):
            target = RESULTS / f"quality_{pass_name}_{png.name}"
            shutil.copyfile(png, target)
            plots.append(target)
    oracles = (oracle_report or {}).get("oracle", {})
    write_json({**report, "oracle": oracles, "targets": checks, "training": trained,
                "static_frontier": static_frontier(rows)}, RESULTS / "quality.json")  # fmt: skip
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    lines = [
        SECTION,
        "",
        f"Command: `{command}` (tag `{args.tag}`, {wall_s / 60:.0f} min in all).  ",
        f"Machine: {machine()}.  ",
        f"Data: `{data_path(args)}` eval split ({rows[0]['num_samples'] if rows else 0} questions; "
        "coarse = big_color/big_count/big_side, fine = tile_half/tile_corner/tile_diagonal).",
        "",
        f"Every variant is one `python -m jobs.train --config {CONFIG}` run with the same budget (start: the "
        "stage-1 model `checkpoints/tiny-dense`; same data, steps, batch and lr schedule), differing only in the "
        "overrides listed:",
        "",
    ]
    for label, uri in report.get("given_models", {}).items():
        lines.append(
            f"- {label}: trained earlier, passed as `--model {label}={uri}` ({' '.join(VARIANTS[label][0])})"
        )
    for t in trained:
        extra = [o for o in t["overrides"] if not o.startswith(("run.", "mlflow.", "data.path="))]
        lines.append(f"- {t['name']}: `{' '.join(extra)}` -> {t.get('steps', '?')} steps, "
                     f"{float(t.get('seconds', t['wall_s'])):.0f} s of training")  # fmt: skip
    lines += [
        "",
        "FLOPs are analytic prefill FLOPs per sample (`dpn_model.flops`); `x dense` is the whole prefill "
        "(vision tower + projector + language model), `LLM x dense` the language model alone.",
        "",
        format_table(rows, markdown=True),
        "",
        "Accuracy per question family (%; routed rows: accuracy / mean visual tokens kept after the last pooling "
        "layer):",
        "",
        format_family_table(rows, markdown=True),
        "",
        "Static frontier of the trained baselines (x dense, accuracy): "
        + ", ".join(f"({f:.3f}, {100 * a:.1f}%)" for f, a in static_frontier(rows)),
        "",
    ]
    for label, section in oracles.items():
        lines += [f"Oracle analysis of `{label}` (`dpn eval --oracle`: all {section['num_paths']} static paths "
                  "run on this one model):", "", "```", format_section(label, section), "```", ""]  # fmt: skip
    lines += ["Targets (the paper, LLaVA-1.5-7B: -56% FLOPs at +0.74% accuracy):", ""]
    for label, items in checks.items():
        for c in items:
            mark = "PASS" if c["passed"] else ("n/a" if c["passed"] is None else "MISSED")
            lines.append(f"- `{label}` **{mark}** {c['target']}: {c['detail']}")
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
        "--variants", default=",".join(VARIANTS), help="which variants to train, in this order"
    )
    parser.add_argument("--model", action="append", default=[], metavar="NAME=URI",
                        help="use an already trained model for a variant instead of training it")  # fmt: skip
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra jobs.train override for every variant (e.g. train.max_steps=600)")  # fmt: skip
    parser.add_argument("--oracle-variants", default="dpn-ref,dpn-reinforce",
                        help="routed variants the oracle pass runs all static paths on ('' skips the pass)")  # fmt: skip
    parser.add_argument(
        "--data", help="the synthetic dataset root (default: the one the training config generates)"
    )
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
    unknown = [n for n in [*given, *args.variants.split(",")] if n.strip() and n.strip() not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    models = dict(given)
    trained: list[dict[str, Any]] = []
    for name in [v.strip() for v in args.variants.split(",") if v.strip() and v.strip() not in given]:
        result = train_variant(name, args, run_dir)
        trained.append(result)
        models[name] = result["model_uri"]
        (run_dir / "trained.json").write_text(json.dumps(trained, indent=1))  # resume by hand with --model
    models = {name: models[name] for name in VARIANTS if name in models}  # table order
    report = evaluate(models, args, run_dir, oracle=False)
    report["given_models"] = {k: v for k, v in models.items() if k in given}
    routed = {k: v for k, v in models.items() if VARIANTS[k][3]}
    wanted = {v.strip() for v in args.oracle_variants.split(",") if v.strip()}
    on_oracle = {k: v for k, v in routed.items() if k in wanted}
    oracle_report = evaluate(on_oracle, args, run_dir, oracle=True) if on_oracle else None
    sections = (oracle_report or {}).get("oracle", {})
    checks = {name: check_variant(name, report["rows"], sections.get(name)) for name in routed}
    if args.no_write:
        from jobs.evaluation.report import format_table

        print(format_table(report["rows"]))
    else:
        print(write_results(report, oracle_report, trained, checks, args, run_dir, time.time() - start))
    for name, items in checks.items():
        for c in items:
            logger.info("%s %s %s: %s", name, {True: "PASS", False: "MISSED"}.get(c["passed"], "n/a"), c["target"],
                        c["detail"])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
