"""The headroom check: can any router beat the best static schedule on the synthetic benchmark at all?

    python benchmarks/headroom.py [--seeds 0,1,2] [--steps 300] [--resume] [--write]

A benchmark is valid for routing only if a router that knows each question's family (and nothing else) beats
the trained static frontier clearly; this checks it before any DPN is trained on it (issue 26, item 2). It
drives the real jobs (``benchmarks/runner.py``), one process each:

1. trains, for every seed, the static schedules that span 0.45-0.75 of dense prefill FLOPs (:data:`STATIC`),
   dense, and random routing, each with the same budget: ``configs/train_tiny.yaml`` from the same stage-1
   checkpoint (``--init``), the same data, steps, batch and schedule, one routed path per sample;
2. evaluates every model on the dev and the test (``eval``) split at the compression it was trained at (the
   random-routing model also at every static path: one shared decoder);
3. chooses on dev, per FLOPs budget, the **budgeted family router** (each family's mix of trained static
   models, ``jobs.evaluation.protocol.budgeted_family_router``) and the **static frontier** (the best mix of
   two trained static models for all questions alike), and scores both once on test, question by question;
4. reports per seed and as mean +- SD over seeds the gain of the family router over the static frontier at
   each budget, with McNemar's paired test, the trained points, per-family accuracy, and a plot; the target
   (issue 26): gain >= 5 points at <= 0.55 of dense FLOPs as mean minus one SD over 3 seeds.

``--write`` puts the section "Quality: headroom of the cells benchmark" into BENCHMARKS.md and the JSON and
plot into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runner  # noqa: E402

from jobs.evaluation.oracle import PathTable  # noqa: E402
from jobs.evaluation.protocol import (  # noqa: E402
    apply_route,
    budgeted_family_router,
    columns_table,
    mcnemar,
    mean_sd,
    table_from_predictions,
)

# variant -> the compression it is trained and evaluated at
STATIC = {
    "sched-4-4-4": "4-4-4",
    "sched-2-4-4": "2-4-4",
    "sched-2-2-4": "2-2-4",
    "fixed2": "2-2-2",
    "sched-1-4-4": "1-4-4",
    "sched-1-2-4": "1-2-4",
    "sched-1-1-4": "1-1-4",
    "dense": "1-1-1",
}
RANDOM = "random"
BUDGETS = (0.48, 0.50, 0.52, 0.55, 0.60, 0.65, 0.70, 0.75)
TARGET_BUDGET, TARGET_GAIN, TARGET_SEEDS = 0.55, 0.05, 3
SECTION = "## Quality: headroom of the cells benchmark"
RESULTS = runner.REPO / "benchmarks" / "results"

logger = logging.getLogger("headroom")


def train_all(args: argparse.Namespace, run_dir: Path, state: runner.State) -> dict[int, dict[str, str]]:
    """Every (seed, variant) trained (or read back from the state file): seed -> variant -> model dir."""
    common = ["model.paths_per_sample=1", f"train.max_steps={args.steps}", f"model.init={args.init}"]
    models: dict[int, dict[str, str]] = {}
    for seed in args.seeds:
        for name, compression in [*STATIC.items(), (RANDOM, RANDOM)]:
            overrides = [*common, f"model.compression={compression.replace('-', ',')}", *args.override]
            result = runner.train(name, seed, overrides, run_dir, args.data, args.experiment, state)
            models.setdefault(seed, {})[name] = result["model_dir"]
    return models


def seed_tables(models: dict[str, str], split: str, seed: int, args, run_dir, state) -> dict[str, PathTable]:
    """Per model, its table on ``split``: each static model at its own path, the random model at every path."""
    paths = list(STATIC.values())
    specs = {name: (model_dir, [STATIC[name]]) for name, model_dir in models.items() if name in STATIC}
    specs[RANDOM] = (models[RANDOM], [RANDOM, *paths])
    records = runner.evaluate(specs, split, f"s{seed}", run_dir, args.data, args.experiment, state)
    tables = {name: table_from_predictions(records, name, [STATIC[name]], split) for name in STATIC}
    tables[RANDOM] = table_from_predictions(records, RANDOM, [RANDOM, *paths], split)
    return tables


def _one_family(table: PathTable) -> PathTable:
    """The table with every question in one family: a route on it is the same mix for all questions."""
    same = np.full(table.num_samples, "all")
    return PathTable(
        table.paths, table.correct, table.flops, table.dense, same, same, table.ids, split=table.split
    )


def _ratio(flops: np.ndarray, table: PathTable) -> float:
    return float(flops.sum() / table.dense.sum())


def compare_at(dev: PathTable, test: PathTable, budget: float) -> dict[str, Any] | None:
    """At ``budget``: the family router and the static frontier, both chosen on ``dev`` and scored on
    ``test`` per question, and McNemar's test between them (None when the budget is below every column)."""
    route = budgeted_family_router(dev, budget)
    static = budgeted_family_router(_one_family(dev), budget)
    if not route.feasible or not static.feasible:
        return None
    fr_ok, fr_flops = apply_route(route, test)
    st_ok, st_flops = apply_route(static, _one_family(test))
    test_paired = mcnemar(fr_ok, st_ok)
    return {
        "budget": budget,
        "family_router": {"accuracy": float(fr_ok.mean()), "flops_ratio": _ratio(fr_flops, test), "shares": route.shares},
        "static": {"accuracy": float(st_ok.mean()), "flops_ratio": _ratio(st_flops, test), "shares": static.shares},
        "gain": float(fr_ok.mean() - st_ok.mean()),
        "mcnemar": {"only_router": test_paired.only_a, "only_static": test_paired.only_b, "p": test_paired.p_value},
    }  # fmt: skip


def analyse_seed(dev: dict[str, PathTable], test: dict[str, PathTable]) -> dict[str, Any]:
    """One seed's figures: trained points, per-family accuracy, and the comparisons at every budget on the
    separately trained models and on the random-routing model's shared decoder."""
    column = dict(STATIC)
    statics_dev = columns_table({n: dev[n] for n in STATIC}, column, "dev")
    statics_test = columns_table({n: test[n] for n in STATIC}, column, "eval")
    shared_dev, shared_test = dev[RANDOM], test[RANDOM]
    paths = list(STATIC.values())
    keep = [shared_dev.paths.index(p) for p in paths]

    def only_paths(t: PathTable) -> PathTable:
        return PathTable(
            paths, t.correct[:, keep], t.flops[:, keep], t.dense, t.family, t.kind, t.ids, split=t.split
        )

    points = {}
    for name in [*STATIC, RANDOM]:
        t, p = test[name], 0  # each table's first column is the compression the model was trained at
        families = sorted(set(t.family))
        points[name] = {
            "compression": t.paths[p],
            "accuracy": float(t.correct[:, p].mean()),
            "flops_ratio": _ratio(t.flops[:, p], t),
            "per_family": {f: float(t.correct[t.family == f, p].mean()) for f in families},
        }
    return {
        "points": points,
        "separate": [c for b in BUDGETS if (c := compare_at(statics_dev, statics_test, b)) is not None],
        "shared": [
            c for b in BUDGETS if (c := compare_at(only_paths(shared_dev), only_paths(shared_test), b))
        ],
    }


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and SD over seeds of every point and of the gain at every budget, and the target's verdict."""
    seeds = sorted(per_seed)
    points = {}
    for name in per_seed[seeds[0]]["points"]:
        acc = [per_seed[s]["points"][name]["accuracy"] for s in seeds]
        flops = [per_seed[s]["points"][name]["flops_ratio"] for s in seeds]
        families = per_seed[seeds[0]]["points"][name]["per_family"]
        points[name] = {
            "compression": per_seed[seeds[0]]["points"][name]["compression"],
            "accuracy": mean_sd(acc),
            "flops_ratio": mean_sd(flops),
            "per_family": {f: mean_sd([per_seed[s]["points"][name]["per_family"][f] for s in seeds]) for f in families},
        }  # fmt: skip
    curves = {}
    for kind in ("separate", "shared"):
        rows = []
        for budget in BUDGETS:
            at = [next((c for c in per_seed[s][kind] if c["budget"] == budget), None) for s in seeds]
            if any(c is None for c in at):
                continue
            rows.append({
                "budget": budget,
                "family_router": mean_sd([c["family_router"]["accuracy"] for c in at]),
                "family_router_flops": mean_sd([c["family_router"]["flops_ratio"] for c in at]),
                "static": mean_sd([c["static"]["accuracy"] for c in at]),
                "gain": mean_sd([c["gain"] for c in at]),
                "max_p": max(c["mcnemar"]["p"] for c in at),
            })  # fmt: skip
        curves[kind] = rows
    target = next((r for r in curves["separate"] if r["budget"] == TARGET_BUDGET), None)
    verdict = None
    if target is not None:
        low = target["gain"][0] - target["gain"][1]
        decided = len(seeds) >= TARGET_SEEDS  # with fewer seeds there is no spread to subtract
        verdict = {"gain_mean": target["gain"][0], "gain_sd": target["gain"][1], "mean_minus_sd": low,
                   "decided": decided, "met": decided and low >= TARGET_GAIN, "max_p": target["max_p"],
                   "flops_ratio": target["family_router_flops"][0]}  # fmt: skip
    return {"seeds": seeds, "points": points, "curves": curves, "target": verdict}


def _pm(value: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * value[0]:.{digits}f} +- {scale * value[1]:.{digits}f}"


def markdown(summary: dict[str, Any], args: argparse.Namespace, wall_s: float) -> str:
    """The BENCHMARKS.md section."""
    command = "python benchmarks/headroom.py " + shlex.join(sys.argv[1:])
    families = sorted(next(iter(summary["points"].values()))["per_family"])
    lines = [
        SECTION, "",
        f"Command: `{command}` ({wall_s / 60:.0f} min in all). Machine: {runner.machine()}.  ",
        f"Seeds {summary['seeds']}; every model `{runner.CONFIG}` with `model.paths_per_sample=1 "
        f"train.max_steps={args.steps} model.init={args.init}` and its `model.compression`; data `{args.data}` "
        "(the cells benchmark: train, dev, eval = test). Choices (each family's mix, the static mix) on dev; "
        "every figure below on test, mean +- SD over the seeds.", "",
        "Trained points (test):", "",
        "| model | compression | accuracy % | x dense | " + " | ".join(families) + " |",
        "|---|---|---|---|" + "---|" * len(families),
    ]  # fmt: skip
    for name, p in summary["points"].items():
        fam = " | ".join(_pm(p["per_family"][f]) for f in families)
        lines.append(
            f"| {name} | {p['compression']} | {_pm(p['accuracy'])} | {_pm(p['flops_ratio'], 1, 3)} | {fam} |"
        )
    for kind, title in (("separate", "separately trained static models (each family's mix of them)"),
                        ("shared", "the random-routing model's shared decoder (each family's mix of its paths)")):  # fmt: skip
        lines += ["", f"Budgeted family router vs static frontier, on {title}:", "",
                  "| budget (x dense) | family router % | its x dense | static frontier % | gain (points) | max McNemar p |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in summary["curves"][kind]:
            lines.append(f"| {r['budget']:.2f} | {_pm(r['family_router'])} | {_pm(r['family_router_flops'], 1, 3)} | "
                         f"{_pm(r['static'])} | {_pm(r['gain'])} | {r['max_p']:.2g} |")  # fmt: skip
    t = summary["target"]
    if t:
        n = len(summary["seeds"])
        mark = (
            ("MET" if t["met"] else "MISSED")
            if t["decided"]
            else (f"NOT DECIDED ({n} seed{'s' * (n != 1)}; the target is judged over {TARGET_SEEDS})")
        )
        lines += ["", f"**Target (family router >= static frontier + 5 points at <= {TARGET_BUDGET} of dense FLOPs, "
                  f"mean - SD over {TARGET_SEEDS} seeds): {mark}**: gain {100 * t['gain_mean']:.1f} +- "
                  f"{100 * t['gain_sd']:.1f} points, mean - SD {100 * t['mean_minus_sd']:.1f}, the router at "
                  f"{t['flops_ratio']:.3f} of dense FLOPs on test (its budget holds on dev); McNemar p <= "
                  f"{t['max_p']:.2g} in every seed."]  # fmt: skip
    lines += ["", "![headroom](benchmarks/results/headroom.png)", ""]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p in summary["points"].items():
        if name == RANDOM:
            continue
        ax.errorbar(
            p["flops_ratio"][0], 100 * p["accuracy"][0], yerr=100 * p["accuracy"][1], fmt="o", color="C0"
        )
        ax.annotate(p["compression"], (p["flops_ratio"][0], 100 * p["accuracy"][0]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")  # fmt: skip
    for kind, color, label in (("separate", "C3", "family router (trained static models)"),
                               ("shared", "C2", "family router (random-routing model)")):  # fmt: skip
        rows = summary["curves"][kind]
        if rows:
            x = [r["family_router_flops"][0] for r in rows]
            y = np.array([100 * r["family_router"][0] for r in rows])
            e = np.array([100 * r["family_router"][1] for r in rows])
            ax.plot(x, y, "-", color=color, label=label)
            ax.fill_between(x, y - e, y + e, color=color, alpha=0.2)
    rows = summary["curves"]["separate"]
    ax.plot([r["budget"] for r in rows], [100 * r["static"][0] for r in rows], "--", color="C0",
            label="static frontier (mix of trained points, chosen on dev)")  # fmt: skip
    ax.axvline(TARGET_BUDGET, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("prefill FLOPs (x dense)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"cells benchmark: headroom for routing ({len(summary['seeds'])} seeds, mean +- SD)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_benchmarks_md(section: str, title: str = SECTION) -> None:
    """Replace (or append) one section of BENCHMARKS.md, leaving the others alone."""
    path = runner.REPO / "BENCHMARKS.md"
    text = path.read_text()
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        nxt = text.find("\n## ", start + len(title))
        text = text[:start] + section + ("\n" + text[nxt + 1 :] if nxt >= 0 else "\n")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--init", default="checkpoints/tiny-dense", help="the stage-1 checkpoint")
    parser.add_argument("--data", default=str(runner.REPO / "runs" / "data" / "cells"),
                        help="a cells dataset root with dev and eval splits")  # fmt: skip
    parser.add_argument("--run-dir", default=str(runner.REPO / "runs" / "headroom"))
    parser.add_argument("--experiment", default="dpn-headroom")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true", help="keep the runs the state file records")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md and benchmarks/results/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    if not args.resume and (run_dir / "state.json").exists():
        parser.error(f"{run_dir} holds an earlier run: pass --resume to continue it, or another --run-dir")
    state = runner.State(run_dir)
    start = time.time()
    from jobs.training.config import SyntheticConfig
    from jobs.training.driver import ensure_synthetic_data

    ensure_synthetic_data(SyntheticConfig(num_train=20000, num_dev=600, num_eval=600), args.data)
    models = train_all(args, run_dir, state)
    per_seed = {}
    for seed, seed_models in models.items():
        dev = seed_tables(seed_models, "dev", seed, args, run_dir, state)
        test = seed_tables(seed_models, "eval", seed, args, run_dir, state)
        per_seed[seed] = analyse_seed(dev, test)
    summary = summarise(per_seed)
    out = {"summary": summary, "per_seed": per_seed, "args": {k: str(v) for k, v in vars(args).items()}}
    (run_dir / "headroom.json").write_text(json.dumps(out, indent=1))
    section = markdown(summary, args, time.time() - start)
    print(section)
    if args.write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "headroom.json").write_text(json.dumps(out, indent=1))
        plot(summary, RESULTS / "headroom.png")
        update_benchmarks_md(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
