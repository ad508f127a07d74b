"""Measuring like a paper: choices on dev, one score on test, trained points only, paired tests.

The rules every quality figure of this project follows (BENCHMARKS.md "Quality", benchmarks/quality.py and
benchmarks/headroom.py), as pure functions on per-sample result tables (:class:`jobs.evaluation.oracle.PathTable`),
each unit-tested on hand-made tables:

- **Splits.** Every choice (a family's path, a budget's mix, a setting) is made on the ``dev`` split; a table
  from any other split is refused by the functions that choose (:func:`require_dev`). The ``eval`` split is the
  test split: it is scored once per reported figure, with the choice made on dev.
- **The static frontier is drawn from trained points only** (:func:`trained_frontier`): a static baseline is a
  model evaluated at the compression it was trained at. Paths evaluated on a model trained otherwise are not
  points of it. Between two neighbouring frontier points the frontier is linear (sending a share of the
  questions to each of the two trained models reaches that point), never below its cheapest point.
- **The budgeted family router** (:func:`budgeted_family_router`): a router that knows each question's family
  and nothing else about the sample. Per family it mixes columns (paths, or separately trained models) to
  maximise the expected accuracy under a FLOPs budget: the linear-programming relaxation of a
  multiple-choice knapsack, solved exactly by walking each family's upper convex hull by the best accuracy
  gained per FLOP. At most one family ends up split between two neighbouring columns of its hull.
  :func:`apply_route` scores a route on another table (test) with a deterministic split of that family's
  questions, so the routed figure is a real per-question result that a paired test can use.
- **Paired tests** (:func:`mcnemar`): an "above" or "below" claim between two systems on the same questions
  is McNemar's exact test on the discordant pairs (two-sided binomial, p = 0.5).
- **Seeds** (:func:`mean_sd`): every figure is a mean over seeds with its sample standard deviation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from jobs.evaluation.oracle import PathTable, frontier_accuracy_at, pareto_frontier

DEV_SPLIT = "dev"


def require_dev(table: PathTable, what: str) -> None:
    """Refuse a choice (``what``) made on any split but dev: the test split is scored, never chosen on."""
    if table.split != DEV_SPLIT:
        raise ValueError(
            f"{what} must be chosen on the {DEV_SPLIT!r} split, this table is from {table.split or 'an unnamed'!r} "
            "split: choose on dev, then score the choice once on test"
        )


# ----------------------------------------------------------------------------------------------
# The static frontier from trained points
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One evaluated model at one compression: ``trained`` is the compression it was trained at."""

    name: str
    compression: str
    trained: str
    accuracy: float
    flops_ratio: float

    @property
    def is_trained_point(self) -> bool:
        return self.compression == self.trained


def trained_frontier(points: Sequence[Point]) -> list[Point]:
    """The Pareto frontier (increasing FLOPs, strictly increasing accuracy) of the trained points alone."""
    trained = [p for p in points if p.is_trained_point]
    front = pareto_frontier([p.flops_ratio for p in trained], [p.accuracy for p in trained])
    return [trained[i] for i in front]


def frontier_at(frontier: Sequence[Point], flops_ratio: float) -> float | None:
    """The frontier's accuracy at ``flops_ratio`` (linear between neighbours; None below its cheapest)."""
    return frontier_accuracy_at([(p.flops_ratio, p.accuracy) for p in frontier], flops_ratio)


# ----------------------------------------------------------------------------------------------
# The budgeted family router
# ----------------------------------------------------------------------------------------------


@dataclass
class FamilyRoute:
    """Per family, the columns it is sent to and the share of its questions each takes.

    Attributes:
        budget: the FLOPs ratio the route was chosen for.
        shares: ``{family: [(column, share), ...]}``, shares summing to 1 (two columns at most).
        accuracy, flops_ratio: what the route reaches on the table it was chosen on (expected values).
    """

    budget: float
    shares: dict[str, list[tuple[str, float]]]
    accuracy: float
    flops_ratio: float
    split: str = DEV_SPLIT
    feasible: bool = True
    notes: list[str] = field(default_factory=list)


def _hull(flops: np.ndarray, accuracy: np.ndarray) -> list[int]:
    """Columns on the upper-left convex hull of ``(flops, accuracy)``, in increasing FLOPs: the only columns
    a budgeted mix uses (any other is beaten by a mix of two hull columns)."""
    front = pareto_frontier(flops.tolist(), accuracy.tolist())
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or below the segment a -> i
            if (accuracy[b] - accuracy[a]) * (flops[i] - flops[a]) <= (accuracy[i] - accuracy[a]) * (
                flops[b] - flops[a]
            ):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def _family_stats(table: PathTable) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    """Per family: its share of the questions, each column's accuracy and FLOPs (a sum over the family's
    questions, divided by the whole table's dense FLOPs, so shares add up to the table's FLOPs ratio)."""
    dense = float(table.dense.sum())
    stats = {}
    for name in sorted({str(f) for f in table.family}):
        rows = table.family == name
        stats[name] = (
            float(rows.mean()),
            table.correct[rows].mean(axis=0),
            table.flops[rows].sum(axis=0) / dense,
        )
    return stats


def budgeted_family_router(table: PathTable, budget: float) -> FamilyRoute:
    """The most accurate family router within a FLOPs ratio of ``budget``, chosen on ``table`` (dev).

    Every family starts on its cheapest hull column; the upgrade with the most accuracy per FLOP over all
    families is bought next, whole while the budget allows, the last one in part. This is optimal for the
    linear relaxation (the classic greedy of the multiple-choice knapsack on convex hulls).
    """
    require_dev(table, "a budgeted family router")
    stats = _family_stats(table)
    hulls = {f: _hull(flops, acc) for f, (_, acc, flops) in stats.items()}
    at = dict.fromkeys(stats, 0)  # index into each family's hull
    spent = sum(stats[f][2][hulls[f][0]] for f in stats)
    shares = {f: [(table.paths[hulls[f][0]], 1.0)] for f in stats}
    route = FamilyRoute(budget, shares, 0.0, spent, table.split, feasible=spent <= budget + 1e-12)
    if not route.feasible:
        route.notes.append(f"the cheapest columns already cost {spent:.3f} > budget {budget:.3f}")
    while route.feasible:
        steps = []
        for f, (weight, acc, flops) in stats.items():
            if at[f] + 1 < len(hulls[f]):
                a, b = hulls[f][at[f]], hulls[f][at[f] + 1]
                d_flops, d_acc = flops[b] - flops[a], weight * (acc[b] - acc[a])
                steps.append((d_acc / max(d_flops, 1e-15), f, a, b, d_flops))
        if not steps:
            break
        _, f, a, b, d_flops = max(steps, key=lambda s: (s[0], s[1]))
        left = budget - spent
        if d_flops <= left + 1e-12:
            at[f] += 1
            spent += d_flops
            shares[f] = [(table.paths[b], 1.0)]
            continue
        part = max(left, 0.0) / d_flops
        if part > 0:
            shares[f] = [(table.paths[a], 1.0 - part), (table.paths[b], part)]
            spent += part * d_flops
        break
    route.flops_ratio = float(spent)
    route.accuracy = float(
        sum(
            stats[f][0] * sum(share * stats[f][1][table.paths.index(c)] for c, share in shares[f])
            for f in stats
        )
    )
    return route


def _stable_order(ids: np.ndarray) -> np.ndarray:
    """A fixed pseudo-random order of sample ids (by hash): the deterministic split of a mixed family."""
    keys = [hashlib.blake2b(str(i).encode(), digest_size=8).hexdigest() for i in ids]
    return np.argsort(np.asarray(keys), kind="stable")


def apply_route(route: FamilyRoute, table: PathTable) -> tuple[np.ndarray, np.ndarray]:
    """Per sample of ``table``: whether the routed answer is right and its prefill FLOPs.

    A family split between two columns sends the first ``round(share * n)`` of its questions (in a fixed
    order by id hash) to the first column. A family the route does not know goes to the table's cheapest
    column (it was absent from dev).
    """
    correct = np.zeros(table.num_samples, dtype=bool)
    flops = np.zeros(table.num_samples)
    cheapest = int(np.argmin(table.flops.sum(axis=0)))
    for name in sorted({str(f) for f in table.family}):
        rows = np.flatnonzero(table.family == name)
        rows = rows[_stable_order(table.ids[rows])]
        columns = route.shares.get(name, [(table.paths[cheapest], 1.0)])
        start = 0
        for k, (column, share) in enumerate(columns):
            stop = len(rows) if k == len(columns) - 1 else start + int(round(share * len(rows)))
            p = table.paths.index(column)
            correct[rows[start:stop]] = table.correct[rows[start:stop], p]
            flops[rows[start:stop]] = table.flops[rows[start:stop], p]
            start = stop
    return correct, flops


# ----------------------------------------------------------------------------------------------
# Paired tests and seeds
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test of two systems on the same questions.

    Attributes:
        only_a: questions A answers right and B wrong; only_b: the reverse.
        p_value: two-sided exact binomial p-value of ``only_a`` among ``only_a + only_b`` at p = 0.5.
    """

    only_a: int
    only_b: int
    p_value: float

    @property
    def a_better(self) -> bool:
        return self.only_a > self.only_b


def mcnemar(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray) -> McNemar:
    """McNemar's exact test on paired per-question results ``a`` and ``b`` (same questions, same order)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired results must have one entry per question each, got {a.shape} and {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return McNemar(only_a, only_b, min(1.0, 2 * tail))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed figures."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values: every figure needs at least one seed")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def table_from_predictions(
    records: Sequence[Mapping[str, object]], label: str, paths: Sequence[str], split: str
) -> PathTable:
    """The :class:`PathTable` of one model (``label``) from the evaluation's ``predictions.jsonl`` records: one
    column per compression in ``paths`` (each must have a record for every sample)."""
    mine = [r for r in records if r["label"] == label and str(r["compression"]) in paths]
    ids = sorted({str(r["id"]) for r in mine})
    row = {i: k for k, i in enumerate(ids)}
    correct = np.zeros((len(ids), len(paths)), dtype=np.int8) - 1
    flops = np.zeros((len(ids), len(paths)))
    dense, family, kind = np.zeros(len(ids)), [""] * len(ids), [""] * len(ids)
    for r in mine:
        k, p = row[str(r["id"])], list(paths).index(str(r["compression"]))
        correct[k, p], flops[k, p] = bool(r["correct"]), float(r["prefill_flops"])
        dense[k], family[k], kind[k] = float(r["dense_flops"]), str(r["family"]), str(r["kind"])
    if (correct < 0).any():
        missing = paths[int(np.argwhere(correct < 0)[0][1])]
        raise ValueError(f"{label}: predictions lack compression {missing} for some samples")
    return PathTable(list(paths), correct.astype(bool), flops, dense, family, kind, ids, split=split)


def columns_table(tables: Mapping[str, PathTable], column: Mapping[str, str], split: str) -> PathTable:
    """One table whose columns are separately trained models, each at the path it was trained at.

    Args:
        tables: model name -> its evaluated table (the same questions in every table).
        column: model name -> the path label of that model's column (its trained compression).
        split: the split the tables come from.
    """
    names = list(column)
    first = tables[names[0]]
    order = {i: k for k, i in enumerate(first.ids)}
    correct = np.zeros((first.num_samples, len(names)), dtype=bool)
    flops = np.zeros((first.num_samples, len(names)))
    for j, name in enumerate(names):
        t = tables[name]
        if sorted(t.ids) != sorted(first.ids):
            raise ValueError(f"model {name!r} was evaluated on other questions than {names[0]!r}")
        rows = np.array([order[i] for i in t.ids])
        p = t.paths.index(column[name])
        correct[rows, j] = t.correct[:, p]
        flops[rows, j] = t.flops[:, p]
    return PathTable(names, correct, flops, first.dense, first.family, first.kind, first.ids, split=split)


__all__ = [
    "DEV_SPLIT",
    "FamilyRoute",
    "McNemar",
    "Point",
    "apply_route",
    "budgeted_family_router",
    "columns_table",
    "frontier_at",
    "mcnemar",
    "mean_sd",
    "require_dev",
    "table_from_predictions",
    "trained_frontier",
]
