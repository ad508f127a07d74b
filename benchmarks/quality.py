"""The paper's claim on the cells benchmark, measured like a paper: DPN against the static frontier, the budgeted
family router and dense, with seeds, a dev/test protocol, paired tests, and the cost dial.

    python benchmarks/headroom.py --write                  # first: the baselines and the headroom check
    python benchmarks/quality.py [--variants dpn,dpn-ref] [--resume] [--write]

Runs in the headroom check's directory (``--run-dir``, default ``runs/headroom``) and reuses its trained static
schedules, dense and random-routing models and their dev/test evaluations (same data, seeds, budget). For every
seed it trains each DPN variant (:data:`VARIANTS`) with the same budget: ``configs/train_tiny.yaml`` from the same
stage-1 checkpoint, the same steps, batch and schedule, **one routed path per sample** (so a DPN step costs what a
baseline step costs; the shipped quickstart config routes each sample twice, and is not what is compared here).
Each is evaluated on dev and test in ``auto`` and along its cost dial (``auto:lambda=X`` for :attr:`Variant.dial`).
The outcome router (``dpn-outcome``) takes the likeliest path in plain ``auto`` (its densest choice); its
reported operating point is the dial point furthest above the static frontier on dev (:func:`auto_column`),
scored once on test.

Protocol (``jobs/evaluation/protocol.py``): every choice on dev (the static mix at a budget, each family's mix,
the dial's ``lambda`` for a budget), every figure on test, once; per seed, then mean +- SD over seeds; every
"above" / "below" is McNemar's paired test on the same test questions (``p`` per seed). Targets (issue 26):

- auto >= static frontier + 3 points at its own FLOPs, and within 1 point of the budgeted family router at equal
  FLOPs, significant by the paired test;
- auto >= dense - 0.5 points at <= 0.55 of dense FLOPs;
- the dial: DPN's curve on or above the static frontier at every budget from 0.5 to 0.8 of dense FLOPs.

``--write`` puts the section "Quality: DPN on the cells benchmark" into BENCHMARKS.md, and the JSON, the
accuracy-vs-FLOPs plot (the headline: the dial's curve and the static points, with the seeds' spread) and the
per-family routing histogram into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import headroom  # noqa: E402
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

ONE_PATH = "model.paths_per_sample=1"
DIAL = (-4.0, -2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 4.0, 8.0)
# the outcome router's auto takes the likeliest path (lambda 0: the densest it trusts); its dial only pools harder
# (0.01-0.03 fill the gap the seeds left between lambda 0, at 0.84 of dense FLOPs, and 0.05, at 0.63)
OUTCOME_DIAL = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


class Variant(NamedTuple):
    """A DPN variant: its overrides of ``configs/train_tiny.yaml`` (on top of the headroom check's common ones),
    its dial, and how its reported ``auto`` operating point is chosen: the router's own (``"auto"``), or, with
    ``auto_on_dev``, the dial point furthest above the static frontier on dev (:func:`auto_column`), then scored
    once on test."""

    overrides: tuple[str, ...]
    dial: tuple[float, ...] = DIAL
    auto_on_dev: bool = False

    def modes(self) -> list[str]:
        return ["auto", *(f"auto:lambda={x:g}" for x in self.dial)]


VARIANTS: dict[str, Variant] = {
    # configs/train_tiny.yaml's router (REINFORCE with a learned baseline, exploration and self-imitation; ours),
    # at one path per sample: the baselines' compute
    "dpn": Variant(("model.compression=auto", ONE_PATH)),
    # the authors' estimator (the router learns only through the probability scaling the pooled tokens)
    "dpn-ref": Variant(
        (
            "model.compression=auto",
            ONE_PATH,
            "model.config_overrides.router_estimator=scale",
            "optim.router_lr_scale=1",
        )
    ),
    # the outcome router (ours): paths drawn uniformly in training (one path per sample), each router fitted to
    # predict whether the answer survives each expert; auto is the dial point chosen on dev
    "dpn-outcome": Variant(
        (
            "model.compression=auto",
            ONE_PATH,
            "model.config_overrides.router_estimator=outcome",
            "model.config_overrides.router_temperature=1",  # chosen on dev (seed 0): 10 fits slower
        ),
        dial=OUTCOME_DIAL,
        auto_on_dev=True,
    ),
}
DIAL_BUDGETS = (0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80)
SECTION = "## Quality: DPN on the cells benchmark"
MIN_ABOVE_FRONTIER, MAX_BELOW_ROUTER, MAX_BELOW_DENSE, DENSE_BUDGET = 0.03, 0.01, 0.005, 0.55

logger = logging.getLogger("quality")


def modes() -> list[str]:
    """``auto`` and the default dial (the variants' modes: :meth:`Variant.modes`)."""
    return Variant(()).modes()


def dpn_tables(model_dir: str, name: str, split: str, seed: int, args, run_dir, state) -> PathTable:
    """A DPN model's table on ``split``: one column per mode (``auto`` first, then the variant's dial)."""
    modes_ = VARIANTS[name].modes()
    records = runner.evaluate(
        {name: (model_dir, modes_)}, split, f"{name}-s{seed}", run_dir, args.data, args.experiment, state
    )
    return table_from_predictions(records, name, modes_, split)


def auto_column(dev: PathTable, statics_dev: PathTable | None = None) -> int:
    """The column reported as ``auto``: the router's own (0), or given the static schedules' dev table the dial
    point furthest above the static frontier on dev, each at its own dev FLOPs (ties: the cheaper) (:class:`Variant`).
    Points below the cheapest trained schedule have no frontier to compare with and are not chosen."""
    if statics_dev is None:
        return 0
    acc = dev.correct.mean(axis=0)
    best, best_key = 0, None
    for p in range(len(dev.paths)):
        frontier = _baseline_at(statics_dev, statics_dev, _ratio(dev.flops[:, p], dev), by_family=False)
        if frontier is None:
            continue
        key = (acc[p] - frontier.mean(), -dev.flops[:, p].sum())
        if best_key is None or key > best_key:
            best, best_key = p, key
    return best


def _ratio(flops: np.ndarray, table: PathTable) -> float:
    return float(flops.sum() / table.dense.sum())


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    test = mcnemar(a, b)
    return {
        "diff": float(a.mean() - b.mean()),
        "only_a": test.only_a,
        "only_b": test.only_b,
        "p": test.p_value,
    }


def _baseline_at(dev: PathTable, test: PathTable, budget: float, by_family: bool) -> np.ndarray | None:
    """Per test question, the static frontier's (``by_family`` False) or the family router's answer at
    ``budget``, chosen on dev; None below the cheapest trained point."""
    if not by_family:
        dev, test = headroom._one_family(dev), headroom._one_family(test)
    route = budgeted_family_router(dev, budget)
    return apply_route(route, test)[0] if route.feasible else None


def analyse_seed(
    statics: tuple[PathTable, PathTable],
    dense: PathTable,
    dpn: tuple[PathTable, PathTable],
    auto_on_dev: bool = False,
):
    """One seed of one DPN variant: auto (:func:`auto_column`) against the frontier, the family router and
    dense; the dial's operating points (each chosen on dev for a budget) against the frontier."""
    s_dev, s_test = statics
    d_dev, d_test = dpn
    col = auto_column(d_dev, s_dev if auto_on_dev else None)
    auto_ok, auto_flops = d_test.correct[:, col], _ratio(d_test.flops[:, col], d_test)
    out: dict[str, Any] = {
        "auto": {"mode": d_test.paths[col], "accuracy": float(auto_ok.mean()), "flops_ratio": auto_flops},
        "dense": {"accuracy": float(dense.correct[:, 0].mean())},
    }
    frontier = _baseline_at(s_dev, s_test, auto_flops, by_family=False)
    router = _baseline_at(s_dev, s_test, auto_flops, by_family=True)
    order = {i: k for k, i in enumerate(s_test.ids)}
    align = np.array([order[i] for i in d_test.ids])  # the DPN table's questions in the statics' order
    if frontier is not None:
        out["vs_frontier"] = _paired(auto_ok, frontier[align])
    if router is not None:
        out["vs_family_router"] = _paired(auto_ok, router[align])
    dense_order = {i: k for k, i in enumerate(dense.ids)}
    out["vs_dense"] = _paired(auto_ok, dense.correct[[dense_order[i] for i in d_test.ids], 0])
    out["dial"] = [
        {"mode": m, "accuracy": float(d_test.correct[:, p].mean()), "flops_ratio": _ratio(d_test.flops[:, p], d_test)}
        for p, m in enumerate(d_test.paths)
    ]  # fmt: skip
    out["dial_at_budget"] = []
    dev_flops = [_ratio(d_dev.flops[:, p], d_dev) for p in range(len(d_dev.paths))]
    dev_acc = d_dev.correct.mean(axis=0)
    for budget in DIAL_BUDGETS:
        fits = [p for p in range(len(d_dev.paths)) if dev_flops[p] <= budget + 1e-9]
        static = _baseline_at(s_dev, s_test, budget, by_family=False)
        if not fits or static is None:
            continue
        p = max(fits, key=lambda q: (dev_acc[q], -dev_flops[q]))  # chosen on dev
        ok = d_test.correct[:, p]
        out["dial_at_budget"].append({
            "budget": budget, "mode": d_test.paths[p], "accuracy": float(ok.mean()),
            "flops_ratio": _ratio(d_test.flops[:, p], d_test), "vs_frontier": _paired(ok, static[align]),
        })  # fmt: skip
    return out


def routing_counts(records: list[dict[str, Any]], name: str, mode: str, counts: dict[str, Counter]) -> None:
    """Add to ``counts`` (per family) the paths (factors per pooling layer) ``mode`` took on ``records``."""
    factors = (1, 2, 4)
    for r in records:
        if r["label"] == name and r["compression"] == mode:
            path = "-".join(str(factors[c]) if c >= 0 else "x" for c in r["expert_choices"])
            counts.setdefault(r["family"], Counter())[path] += 1


def routing_histogram(counts: dict[str, Counter]) -> dict[str, dict[str, float]]:
    """Per family, the share of the test questions on each path."""
    return {f: {p: n / sum(c.values()) for p, n in c.most_common()} for f, c in sorted(counts.items())}


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)

    def over(get) -> tuple[float, float] | None:
        values = [get(per_seed[s]) for s in seeds]
        return None if any(v is None for v in values) else mean_sd(values)

    summary: dict[str, Any] = {"seeds": seeds}
    summary["auto_modes"] = [per_seed[s]["auto"].get("mode", "auto") for s in seeds]
    summary["auto"] = over(lambda r: r["auto"]["accuracy"])
    summary["auto_flops"] = over(lambda r: r["auto"]["flops_ratio"])
    summary["dense"] = over(lambda r: r["dense"]["accuracy"])
    for key in ("vs_frontier", "vs_family_router", "vs_dense"):
        diff = over(lambda r, k=key: r.get(k, {}).get("diff"))
        ps = [per_seed[s].get(key, {}).get("p") for s in seeds]
        summary[key] = None if diff is None else {"diff": diff, "p": ps}
    dial = []
    for i, point in enumerate(per_seed[seeds[0]]["dial"]):
        dial.append({
            "mode": point["mode"],
            "accuracy": over(lambda r, i=i: r["dial"][i]["accuracy"]),
            "flops_ratio": over(lambda r, i=i: r["dial"][i]["flops_ratio"]),
        })  # fmt: skip
    summary["dial"] = dial
    rows = []
    for budget in DIAL_BUDGETS:
        at = [next((b for b in per_seed[s]["dial_at_budget"] if b["budget"] == budget), None) for s in seeds]
        if any(b is None for b in at):
            continue
        rows.append({
            "budget": budget, "modes": [b["mode"] for b in at],
            "accuracy": mean_sd([b["accuracy"] for b in at]),
            "flops_ratio": mean_sd([b["flops_ratio"] for b in at]),
            "vs_frontier": mean_sd([b["vs_frontier"]["diff"] for b in at]),
            "p": [b["vs_frontier"]["p"] for b in at],
        })  # fmt: skip
    summary["dial_at_budget"] = rows
    summary["targets"] = targets(summary)
    return summary


def targets(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's DPN targets, each ``{"target", "passed", "detail"}`` (means over seeds, p-values per seed)."""
    out = []
    front, router, dense = s["vs_frontier"], s["vs_family_router"], s["vs_dense"]
    if front:
        passed = front["diff"][0] >= MIN_ABOVE_FRONTIER and all(p < 0.05 for p in front["p"])
        out.append({"target": "auto >= static frontier + 3 points at its FLOPs (paired test, every seed)",
                    "passed": passed, "detail": f"{100 * front['diff'][0]:+.1f} +- {100 * front['diff'][1]:.1f} "
                    f"points at {s['auto_flops'][0]:.3f}; McNemar p {_ps(front['p'])}"})  # fmt: skip
    if router:
        out.append({"target": "auto within 1 point of the budgeted family router at equal FLOPs",
                    "passed": router["diff"][0] >= -MAX_BELOW_ROUTER,
                    "detail": f"{100 * router['diff'][0]:+.1f} +- {100 * router['diff'][1]:.1f} points; "
                    f"McNemar p {_ps(router['p'])}"})  # fmt: skip
    if dense:
        passed = dense["diff"][0] >= -MAX_BELOW_DENSE and s["auto_flops"][0] <= DENSE_BUDGET
        out.append({"target": "auto >= dense - 0.5 points at <= 0.55 of dense FLOPs", "passed": passed,
                    "detail": f"{100 * s['auto'][0]:.1f}% at {s['auto_flops'][0]:.3f} vs dense {100 * s['dense'][0]:.1f}% "
                    f"({100 * dense['diff'][0]:+.1f} points; McNemar p {_ps(dense['p'])})"})  # fmt: skip
    rows = s["dial_at_budget"]
    if rows:
        worst = min(rows, key=lambda r: r["vs_frontier"][0])
        out.append({"target": "the dial's curve on or above the static frontier at every budget 0.5-0.8",
                    "passed": all(r["vs_frontier"][0] >= 0 for r in rows),
                    "detail": f"worst at {worst['budget']:.2f}: {100 * worst['vs_frontier'][0]:+.1f} points "
                    f"({len(rows)} budgets)"})  # fmt: skip
    return out


def _ps(values) -> str:
    """P-values, two significant digits."""
    return ", ".join(f"{p:.2g}" for p in values)


def _pm(v: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if v is None else f"{scale * v[0]:.{digits}f} +- {scale * v[1]:.{digits}f}"


def markdown(summaries: dict[str, dict[str, Any]], histograms, args, wall_s: float) -> str:
    command = "python benchmarks/quality.py " + shlex.join(sys.argv[1:])
    lines = [
        SECTION, "",
        f"Command: `{command}` ({wall_s / 60:.0f} min in all, the baselines of `benchmarks/headroom.py` reused). "
        f"Machine: {runner.machine()}.  ",
        "Every DPN variant: one path per sample (the baselines' compute per step), the headroom check's budget and "
        "seeds; settings chosen on dev, figures on test, mean +- SD over the seeds; `diff` is DPN minus the "
        "baseline on the same questions, with McNemar's p per seed.", "",
    ]  # fmt: skip
    for name, s in summaries.items():
        variant = VARIANTS[name]
        chosen = f"; chosen on dev per seed: {', '.join(s['auto_modes'])}" if variant.auto_on_dev else ""
        lines += [f"**{name}** ({' '.join(variant.overrides)}), seeds {s['seeds']}:", "",
                  f"- auto{chosen}: {_pm(s['auto'])}% at {_pm(s['auto_flops'], 1, 3)} of dense FLOPs "
                  f"(dense {_pm(s['dense'])}%)"]  # fmt: skip
        for key, what in (("vs_frontier", "the static frontier"), ("vs_family_router", "the budgeted family router"),
                          ("vs_dense", "dense")):  # fmt: skip
            if s[key]:
                lines.append(
                    f"- vs {what} at equal FLOPs: {_pm(s[key]['diff'])} points, p {_ps(s[key]['p'])}"
                )
        lines += ["", "| dial | accuracy % | x dense |", "|---|---|---|"]
        lines += [
            f"| {d['mode']} | {_pm(d['accuracy'])} | {_pm(d['flops_ratio'], 1, 3)} |" for d in s["dial"]
        ]
        lines += ["", "| budget | dial chosen on dev (per seed) | accuracy % | x dense | vs static frontier (points) | p |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in s["dial_at_budget"]:
            lines.append(f"| {r['budget']:.2f} | {', '.join(r['modes'])} | {_pm(r['accuracy'])} | "
                         f"{_pm(r['flops_ratio'], 1, 3)} | {_pm(r['vs_frontier'])} | {_ps(r['p'])} |")  # fmt: skip
        lines += ["", "Targets:", ""]
        for t in s["targets"]:
            mark = "MET" if t["passed"] else "MISSED"
            lines.append(f"- **{mark}** {t['target']}: {t['detail']}")
        lines += [
            "",
            "Paths auto takes per family (test, all seeds):",
            "",
            "| family | paths (share) |",
            "|---|---|",
        ]
        for family, shares in histograms[name].items():
            lines.append(
                f"| {family} | {', '.join(f'{p} {100 * v:.0f}%' for p, v in list(shares.items())[:4])} |"
            )
        lines.append("")
    lines += ["![accuracy vs FLOPs](benchmarks/results/quality.png)",
              "![routing per family](benchmarks/results/quality_routing.png)", ""]  # fmt: skip
    return "\n".join(lines)


def plot(summaries, baseline_summary, histograms, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p in baseline_summary["points"].items():
        if name == headroom.RANDOM:
            continue
        ax.errorbar(
            p["flops_ratio"][0], 100 * p["accuracy"][0], yerr=100 * p["accuracy"][1], fmt="o", color="C0"
        )
        ax.annotate(p["compression"], (p["flops_ratio"][0], 100 * p["accuracy"][0]), fontsize=7,
                    xytext=(3, -9), textcoords="offset points")  # fmt: skip
    rows = baseline_summary["curves"]["separate"]
    ax.plot(
        [r["budget"] for r in rows],
        [100 * r["static"][0] for r in rows],
        "--",
        color="C0",
        label="static frontier",
    )
    ax.plot(
        [r["family_router_flops"][0] for r in rows],
        [100 * r["family_router"][0] for r in rows],
        ":",
        color="C2",
        label="budgeted family router (the bound)",
    )
    for k, (name, s) in enumerate(summaries.items()):
        dial = sorted(s["dial"], key=lambda d: d["flops_ratio"][0])
        x = [d["flops_ratio"][0] for d in dial]
        y = np.array([100 * d["accuracy"][0] for d in dial])
        e = np.array([100 * d["accuracy"][1] for d in dial])
        color = f"C{3 + k}"
        ax.plot(x, y, "-", color=color, label=f"{name}: the dial (one model)")
        ax.fill_between(x, y - e, y + e, color=color, alpha=0.2)
        ax.plot(s["auto_flops"][0], 100 * s["auto"][0], "*", color=color, markersize=14)
    ax.set_xlabel("prefill FLOPs (x dense)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("cells benchmark, test: DPN's cost dial vs trained static schedules", fontsize=10)
    ax.text(0.01, 0.01, "mean +- SD over seeds", transform=ax.transAxes, fontsize=7)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=120)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(histograms), figsize=(6 * len(histograms), 3.5), squeeze=False)
    for ax, (name, per_family) in zip(axes[0], histograms.items()):
        paths = sorted({p for shares in per_family.values() for p in shares})
        bottom = np.zeros(len(per_family))
        for path in paths:
            values = np.array([per_family[f].get(path, 0.0) for f in per_family])
            ax.bar(list(per_family), 100 * values, bottom=100 * bottom, label=path)
            bottom += values
        ax.set_title(f"{name}: paths auto takes per family")
        ax.set_ylabel("% of test questions")
        ax.legend(fontsize=7, title="path", loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "quality_routing.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--init", default="checkpoints/tiny-dense")
    parser.add_argument("--data", default=str(runner.REPO / "runs" / "data" / "cells"))
    parser.add_argument("--run-dir", default=str(runner.REPO / "runs" / "headroom"))
    parser.add_argument("--experiment", default="dpn-headroom")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir)
    state = runner.State(run_dir)
    start = time.time()
    baselines = headroom.train_all(args, run_dir, state)  # read back from the headroom check's state
    base_per_seed, summaries, histograms = {}, {}, {}
    for name in [v for v in args.variants.split(",") if v]:
        variant, per_seed, counts = VARIANTS[name], {}, {}
        for seed in args.seeds:
            common = ["model.paths_per_sample=1", f"train.max_steps={args.steps}", f"model.init={args.init}"]
            model = runner.train(name, seed, [*common, *variant.overrides, *args.override], run_dir, args.data,
                                 args.experiment, state)["model_dir"]  # fmt: skip
            dev = headroom.seed_tables(baselines[seed], "dev", seed, args, run_dir, state)
            test = headroom.seed_tables(baselines[seed], "eval", seed, args, run_dir, state)
            base_per_seed[seed] = headroom.analyse_seed(dev, test)
            statics = (columns_table({n: dev[n] for n in headroom.STATIC}, dict(headroom.STATIC), "dev"),
                       columns_table({n: test[n] for n in headroom.STATIC}, dict(headroom.STATIC), "eval"))  # fmt: skip
            dpn = (dpn_tables(model, name, "dev", seed, args, run_dir, state),
                   dpn_tables(model, name, "eval", seed, args, run_dir, state))  # fmt: skip
            per_seed[seed] = analyse_seed(statics, test["dense"], dpn, variant.auto_on_dev)
            records = runner.evaluate({name: (model, variant.modes())}, "eval", f"{name}-s{seed}", run_dir,
                                      args.data, args.experiment, state)  # fmt: skip
            routing_counts(records, name, per_seed[seed]["auto"]["mode"], counts)
        summaries[name] = summarise(per_seed)
        histograms[name] = routing_histogram(counts)
    baseline_summary = headroom.summarise(base_per_seed)
    out = {"summaries": summaries, "histograms": histograms, "baselines": baseline_summary}
    (run_dir / "quality.json").write_text(json.dumps(out, indent=1))
    section = markdown(summaries, histograms, args, time.time() - start)
    print(section)
    if args.write:
        results = runner.REPO / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        (results / "quality.json").write_text(json.dumps(out, indent=1))
        plot(summaries, baseline_summary, histograms, results)
        headroom.update_benchmarks_md(section, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
