"""The oracle router: every static path on the same model and data, and how close a router comes to it.

A learned router can only be as good as the best per-sample routing the model itself allows. ``dpn eval
--oracle`` evaluates every **static path** (one expert per pooling layer: ``len(expert_strides) **
len(pooling_layers)`` paths, 27 for the default three experts and three pooling layers) on the same samples,
through the same Ray Data actor pool as every mode (:class:`jobs.evaluation.predictor.Predictor` runs all paths on each
batch it holds). That gives, per sample and path, whether the greedy answer is right and the sample's prefill
FLOPs. Everything below is computed from that table by the pure functions of this module (no Ray, no model),
so each definition is unit-tested on hand-made tables.

Definitions (``A`` accuracy as a fraction, ``F`` FLOPs ratio; every FLOPs ratio is a ratio of means over the
same samples: mean prefill FLOPs / mean dense prefill FLOPs, the dense reference being compression 1 without
routers, as the report rows use):

- **path** ``p``: ``A_p`` and ``F_p`` of the static path (e.g. ``"1-2-4"``: 1x after the first pooling layer,
  2x after the second, 4x after the third). A forced path runs no router.
- **frontier**: the static paths not dominated by another path (one with no more FLOPs and at least the same
  accuracy, better in one of them), in increasing FLOPs (their accuracy then increases strictly). Between two
  neighbouring frontier paths it is **interpolated linearly**: sending a fraction of the samples through one
  path and the rest through the other reaches that point on average, so it is an achievable static baseline.
  ``frontier_accuracy(F)``: the frontier's accuracy at FLOPs ``F`` (undefined below its cheapest path, the
  accuracy of its most accurate path above it). ``frontier_flops(A)``: the FLOPs the frontier needs for
  accuracy ``A`` (its cheapest path's FLOPs at or below that path's accuracy, undefined above its best).
- **oracle**: per sample the cheapest path (by that sample's prefill FLOPs; ties: the first in path order) that
  answers correctly; if no path does, the cheapest path overall, counted wrong. Its accuracy is the share of
  samples some path answers, at the least FLOPs that reaches it.
- **oracle at a budget**, ``oracle_accuracy(F)``: the highest accuracy any per-sample choice among the static
  paths reaches with a FLOPs ratio of at most ``F`` (choices may be randomised, i.e. the linear-programming
  relaxation). Per sample only two paths matter: the cheapest (``base``) and the cheapest correct one, which
  costs ``extra = flops(cheapest correct) - flops(base)`` more; the optimum buys the smallest extras first (a
  fractional knapsack with unit values), the last one possibly in part. ``oracle_flops(A)`` is its inverse:
  the least FLOPs that reach accuracy ``A``. Both bound any router that picks a static path per sample, and
  ``oracle_accuracy(F) >= frontier_accuracy(F)`` (a frontier mix is one such choice).
- **regret** of an evaluated mode ``m`` (accuracy ``A_m``, FLOPs ratio ``F_m``; a router's FLOPs include its own
  router calls):

  - ``accuracy_lost_vs_frontier = frontier_accuracy(F_m) - A_m``: negative when the router beats every static
    mix at its FLOPs (which is what DPN claims);
  - ``accuracy_lost_vs_oracle = oracle_accuracy(F_m) - A_m``: >= 0 for a router that takes a static path per
    sample (a DPN router also scales pooled tokens by its probability, so it can in principle do better);
  - ``flops_wasted_vs_frontier = F_m - frontier_flops(A_m)`` and ``flops_wasted_vs_oracle = F_m -
    oracle_flops(A_m)``: FLOPs ratio spent beyond what the frontier / the oracle need for the same accuracy;
  - ``gap_closed = (A_m - frontier_accuracy(F_m)) / (oracle_accuracy(F_m) - frontier_accuracy(F_m))``: the
    share of the frontier-to-oracle gap at the mode's FLOPs the router closes (1: as good as the oracle; 0: no
    better than the static frontier).

  An undefined value (outside the frontier's or the oracle's range) is ``None``.
- **per family / kind**: the oracle restricted to a question family or kind: accuracy, FLOPs ratio, the FLOPs
  the oracle needs there for the dense path's accuracy (how much dynamic routing could save on that family at
  no accuracy loss), the factor it picks at each pooling layer and the visual tokens it keeps.
- **family router**: every question family sent through its own most accurate single path (the cheapest of
  equals): what a router that knew each question's family, and nothing about the sample, could reach. Unlike
  the oracle it chooses before seeing which path happens to answer a sample, so it carries no selection luck
  (with 27 tries a sample is often answered right by some path by chance); the oracle's margin over it is
  that luck plus what per-sample routing within a family could add. Defined when the data has families.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpn_model.configuration import routing_mode
from jobs.evaluation.report import UNLABELLED, file_safe, pct, render_table

# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def static_paths(config: Any) -> list[tuple[int, ...]]:
    """Every static path of a model: one expert factor per pooling layer, in the order of the config's
    experts (default: ``(1, 1, 1)``, dense, first and ``(4, 4, 4)`` last). ``config`` needs ``expert_strides``
    and ``pooling_layers``: the paths are enumerated from the model, never assumed."""
    factors = [int(h) * int(w) for h, w in config.expert_strides]
    return list(itertools.product(factors, repeat=len(config.pooling_layers)))


def path_label(path: Sequence[int]) -> str:
    """``(1, 2, 4)`` -> ``"1-2-4"``: the label ``compression_label`` gives the same schedule."""
    return "-".join(str(int(f)) for f in path)


def path_labels(config: Any) -> list[str]:
    """Labels of :func:`static_paths`."""
    return [path_label(p) for p in static_paths(config)]


# ----------------------------------------------------------------------------------------------
# The per-sample table
# ----------------------------------------------------------------------------------------------


@dataclass
class PathTable:
    """Per-sample results of every static path on the same samples: what the oracle is computed from.

    Attributes:
        paths: path labels (``"1-2-4"``), the columns.
        correct: ``(N, P)`` bool, the greedy answer of sample ``i`` on path ``p`` is right.
        flops: ``(N, P)`` float, prefill FLOPs of sample ``i`` on path ``p``.
        dense: ``(N,)`` float, the sample's dense prefill FLOPs (the FLOPs ratios' denominator).
        family, kind: ``(N,)`` str, the sample's question family and kind (``""`` when unknown).
        ids: ``(N,)`` str, sample ids.
        visual: ``(N, P, L + 1)`` visual tokens before the first pooling layer and after each, or None.
        split: the data split the samples come from (``"dev"``, ``"eval"``; ``""`` when unknown): choices are
            made on dev only (jobs.evaluation.protocol).
    """

    paths: list[str]
    correct: np.ndarray
    flops: np.ndarray
    dense: np.ndarray
    family: np.ndarray
    kind: np.ndarray
    ids: np.ndarray
    visual: np.ndarray | None = None
    split: str = ""

    def __post_init__(self) -> None:
        self.correct = np.asarray(self.correct, dtype=bool)
        self.flops = np.asarray(self.flops, dtype=np.float64)
        self.dense = np.asarray(self.dense, dtype=np.float64)
        n = len(self.dense)
        if self.correct.shape != (n, len(self.paths)) or self.flops.shape != self.correct.shape:
            raise ValueError(
                f"path table shapes disagree: {n} samples, {len(self.paths)} paths, correct "
                f"{self.correct.shape}, flops {self.flops.shape}"
            )
        self.family = np.asarray(self.family, dtype=str).reshape(n)
        self.kind = np.asarray(self.kind, dtype=str).reshape(n)
        self.ids = np.asarray(self.ids, dtype=str).reshape(n)

    @property
    def num_samples(self) -> int:
        return len(self.dense)

    def subset(self, mask: np.ndarray) -> PathTable:
        """The table restricted to the samples where ``mask`` is true (a family, a kind)."""
        return PathTable(
            self.paths, self.correct[mask], self.flops[mask], self.dense[mask], self.family[mask],
            self.kind[mask], self.ids[mask], None if self.visual is None else self.visual[mask], self.split,
        )  # fmt: skip


class PathCollector:
    """Streams the evaluation's per-(sample, mode) result rows into a :class:`PathTable`.

    Rows are matched by sample id, not by position: Ray Data may cut the predictor's output into blocks
    anywhere. A sample id seen twice for one path (duplicate ids in the data) is an error, as is a sample
    some path never returned.

    Args:
        paths: the path labels to collect (other modes' rows are ignored).
    """

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._column = {p: i for i, p in enumerate(self.paths)}
        self._index: dict[str, int] = {}
        self._correct: list[np.ndarray] = []
        self._flops: list[np.ndarray] = []
        self._visual: list[np.ndarray | None] = []
        self._dense: list[float] = []
        self._family: list[str] = []
        self._kind: list[str] = []

    def _row(self, sample_id: str, dense: float, family: str, kind: str) -> int:
        if sample_id not in self._index:
            self._index[sample_id] = len(self._dense)
            self._correct.append(np.zeros(len(self.paths), dtype=np.int8) - 1)  # -1: not seen yet
            self._flops.append(np.full(len(self.paths), np.nan))
            self._visual.append(None)
            self._dense.append(dense)
            self._family.append(family)
            self._kind.append(kind)
        return self._index[sample_id]

    def add(self, batch: Mapping[str, Any]) -> None:
        """Add result rows (the columns :class:`jobs.evaluation.predictor.Predictor` returns; rows of other modes are skipped)."""
        modes = np.asarray(batch["compression"]).astype(str)
        for i in np.flatnonzero(np.isin(modes, self.paths)):
            column = self._column[str(modes[i])]
            row = self._row(
                str(batch["id"][i]),
                float(batch["dense_flops"][i]),
                str(batch["family"][i]),
                str(batch["kind"][i]),
            )
            if self._correct[row][column] >= 0:
                raise ValueError(
                    f"sample id {batch['id'][i]!r} appears twice for path {modes[i]}: the oracle needs unique "
                    "sample ids (question_id / id)"
                )
            self._correct[row][column] = bool(batch["correct"][i])
            self._flops[row][column] = float(batch["prefill_flops"][i])
            if "visual_tokens" in batch:
                tokens = np.asarray(batch["visual_tokens"][i], dtype=np.float64).reshape(-1)
                if self._visual[row] is None:
                    self._visual[row] = np.full((len(self.paths), len(tokens)), np.nan)
                self._visual[row][column] = tokens

    def table(self) -> PathTable:
        """The complete table; raises if a sample misses a path."""
        correct = np.asarray(self._correct, dtype=np.int8).reshape(-1, len(self.paths))
        missing = np.argwhere(correct < 0)
        if len(missing):
            sample = next(k for k, v in self._index.items() if v == missing[0][0])
            raise ValueError(
                f"{len(missing)} (sample, path) results missing, e.g. sample {sample!r} on path "
                f"{self.paths[missing[0][1]]}"
            )
        visual = None
        if self._visual and all(v is not None for v in self._visual):
            visual = np.stack(self._visual)  # type: ignore[arg-type]
        return PathTable(
            self.paths, correct.astype(bool), np.asarray(self._flops).reshape(correct.shape),
            np.asarray(self._dense), np.asarray(self._family, dtype=str), np.asarray(self._kind, dtype=str),
            np.asarray(list(self._index), dtype=str), visual,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Oracle, frontier, budgets
# ----------------------------------------------------------------------------------------------


def oracle_choice(correct: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample, the cheapest correct path (else the cheapest path) and whether it is correct.

    Args:
        correct: ``(N, P)`` bool; flops: ``(N, P)`` prefill FLOPs.

    Returns:
        ``(choice, right)``: ``(N,)`` path index and ``(N,)`` bool. Ties in FLOPs go to the lower index.
    """
    correct = np.asarray(correct, dtype=bool)
    flops = np.asarray(flops, dtype=np.float64)
    cheapest = np.argmin(flops, axis=1)  # argmin returns the first of equal values
    cheapest_correct = np.argmin(np.where(correct, flops, np.inf), axis=1)
    right = correct.any(axis=1)
    return np.where(right, cheapest_correct, cheapest), right


def pareto_frontier(flops: Sequence[float], accuracy: Sequence[float]) -> list[int]:
    """Indices of the non-dominated points, in increasing FLOPs (and strictly increasing accuracy).

    A point is dominated when another has no more FLOPs and at least its accuracy, and is better in one; of
    identical points the first is kept.
    """
    order = sorted(range(len(flops)), key=lambda i: (float(flops[i]), -float(accuracy[i]), i))
    frontier: list[int] = []
    best = -math.inf
    for i in order:
        if float(accuracy[i]) > best:
            frontier.append(i)
            best = float(accuracy[i])
    return frontier


def _interpolate(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Linear interpolation on increasing ``xs``, with ``xs[0] <= x <= xs[-1]``."""
    return float(np.interp(x, np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)))


def frontier_accuracy_at(points: Sequence[tuple[float, float]], flops: float) -> float | None:
    """Accuracy of the frontier (``[(flops, accuracy), ...]`` in increasing FLOPs) at ``flops``: linear
    between neighbours, its best accuracy beyond its most expensive point, None below its cheapest."""
    if not points or flops < points[0][0]:
        return None
    if flops >= points[-1][0]:
        return float(points[-1][1])
    return _interpolate(flops, [p[0] for p in points], [p[1] for p in points])


def frontier_flops_at(points: Sequence[tuple[float, float]], accuracy: float) -> float | None:
    """FLOPs the frontier needs for ``accuracy``: its cheapest point's at or below that point's accuracy,
    linear between neighbours, None above its best accuracy."""
    if not points or accuracy > points[-1][1]:
        return None
    if accuracy <= points[0][1]:
        return float(points[0][0])
    return _interpolate(accuracy, [p[1] for p in points], [p[0] for p in points])


def _knapsack(table: PathTable) -> tuple[float, np.ndarray, int]:
    """``(sum of the cheapest paths' FLOPs, sorted extra FLOPs of making each answerable sample right,
    samples right at no extra cost)`` - the ingredients of the oracle's budget curve."""
    base = table.flops.min(axis=1)
    cheapest_correct = np.where(table.correct, table.flops, np.inf).min(axis=1)
    answerable = table.correct.any(axis=1)
    extra = np.sort(cheapest_correct[answerable] - base[answerable])
    free = int((extra <= 0).sum())
    return float(base.sum()), extra[free:], free


def oracle_accuracy_at(table: PathTable, flops_ratio: float) -> float | None:
    """Best accuracy of any (randomised) per-sample choice of static paths with FLOPs ratio <= ``flops_ratio``;
    None when even the cheapest path of every sample costs more."""
    base, extra, free = _knapsack(table)
    tolerance = 1e-9 * max(base + float(extra.sum()), 1.0)  # the ratio went through a division
    slack = flops_ratio * float(table.dense.sum()) - base + tolerance
    if table.num_samples == 0 or slack < 0:
        return None
    spent = np.cumsum(extra)
    whole = int(np.searchsorted(spent, slack, side="right"))  # extras bought in full
    part = 0.0
    if whole < len(extra):
        left = slack - (spent[whole - 1] if whole else 0.0)
        part = min(max(left - tolerance, 0.0) / extra[whole], 1.0)
    return (free + whole + part) / table.num_samples


def oracle_flops_at(table: PathTable, accuracy: float) -> float | None:
    """Least FLOPs ratio at which per-sample static choices reach ``accuracy``; None above the oracle's."""
    base, extra, free = _knapsack(table)
    needed = accuracy * table.num_samples - free
    if table.num_samples == 0 or needed > len(extra) + 1e-9:
        return None
    needed = min(max(needed, 0.0), float(len(extra)))
    whole = int(math.floor(needed + 1e-12))
    cost = float(extra[:whole].sum())
    if whole < len(extra):
        cost += (needed - whole) * float(extra[whole])
    return (base + cost) / float(table.dense.sum())


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def regret(
    table: PathTable, frontier: Sequence[tuple[float, float]], accuracy: float, flops_ratio: float
) -> dict:
    """How far a mode at (``accuracy``, ``flops_ratio``) is from the static frontier and the oracle (module
    docstring: the definitions)."""
    at_frontier = frontier_accuracy_at(frontier, flops_ratio)
    at_oracle = oracle_accuracy_at(table, flops_ratio)
    gap = _sub(at_oracle, at_frontier)
    gained = _sub(accuracy, at_frontier)
    return {
        "accuracy": accuracy,
        "flops_ratio": flops_ratio,
        "frontier_accuracy": at_frontier,
        "oracle_accuracy": at_oracle,
        "accuracy_lost_vs_frontier": _sub(at_frontier, accuracy),
        "accuracy_lost_vs_oracle": _sub(at_oracle, accuracy),
        "frontier_flops_ratio": frontier_flops_at(frontier, accuracy),
        "oracle_flops_ratio": oracle_flops_at(table, accuracy),
        "flops_wasted_vs_frontier": _sub(flops_ratio, frontier_flops_at(frontier, accuracy)),
        "flops_wasted_vs_oracle": _sub(flops_ratio, oracle_flops_at(table, accuracy)),
        "gap_closed": gained / gap if gap is not None and gained is not None and gap > 1e-12 else None,
    }


# ----------------------------------------------------------------------------------------------
# The report section
# ----------------------------------------------------------------------------------------------


def _ratio(flops: np.ndarray, dense: np.ndarray) -> float:
    return float(flops.sum() / dense.sum()) if dense.sum() > 0 else float("nan")


def path_summaries(table: PathTable) -> list[dict[str, Any]]:
    """One entry per path: ``path``, ``num_samples``, ``correct``, ``accuracy``, ``mean_prefill_flops``,
    ``flops_ratio``, ``visual_tokens_per_layer`` (mean), ``on_frontier``."""
    n = max(table.num_samples, 1)
    entries = []
    for p, label in enumerate(table.paths):
        entries.append({
            "path": label,
            "num_samples": table.num_samples,
            "correct": int(table.correct[:, p].sum()),
            "accuracy": float(table.correct[:, p].sum()) / n,
            "mean_prefill_flops": float(table.flops[:, p].sum()) / n,
            "flops_ratio": _ratio(table.flops[:, p], table.dense),
            "visual_tokens_per_layer": None if table.visual is None else table.visual[:, p].mean(axis=0).tolist(),
        })  # fmt: skip
    front = pareto_frontier([e["flops_ratio"] for e in entries], [e["accuracy"] for e in entries])
    for i in front:
        entries[i]["on_frontier"] = True
    for e in entries:
        e.setdefault("on_frontier", False)
    return entries


def _choice_per_layer(paths: Sequence[str], choice: np.ndarray) -> list[dict[str, float]]:
    """Share of samples whose chosen path has each factor at each pooling layer."""
    factors = [label.split("-") for label in paths]
    if len(choice) == 0 or not all(f.isdigit() for parts in factors for f in parts):
        return []  # no sample, or paths that are not schedule labels
    layers = len(factors[0])
    shares = []
    for layer in range(layers):
        counts = Counter(factors[c][layer] for c in choice)
        shares.append({f: counts[f] / len(choice) for f in sorted(counts, key=int)})
    return shares


def _best_path(table: PathTable) -> tuple[int, np.ndarray, np.ndarray]:
    """Index of the most accurate single path (the cheapest of equals), and every path's accuracy and FLOPs ratio."""
    accuracies = table.correct.mean(axis=0)
    ratios = np.array([_ratio(table.flops[:, p], table.dense) for p in range(len(table.paths))])
    best = min(range(len(table.paths)), key=lambda p: (-accuracies[p], ratios[p], p))
    return best, accuracies, ratios


def oracle_summary(table: PathTable, dense_path: str | None = None) -> dict[str, Any]:
    """The oracle on ``table``: ``num_samples``, ``correct``, ``accuracy``, ``mean_prefill_flops``,
    ``flops_ratio``, ``dense_accuracy`` and ``flops_ratio_at_dense_accuracy`` (when the dense path is there),
    ``best_path`` / ``best_path_accuracy`` / ``best_path_flops_ratio`` (the most accurate single path, the
    cheapest of equals), ``path_counts`` (samples per chosen path), ``choice_per_layer`` (over the samples the
    oracle gets right, where the choice matters) and ``visual_tokens_per_layer`` (mean, when known)."""
    n = table.num_samples
    if n == 0:
        return {"num_samples": 0}
    choice, right = oracle_choice(table.correct, table.flops)
    chosen = table.flops[np.arange(n), choice]
    best, accuracies, ratios = _best_path(table)
    summary: dict[str, Any] = {
        "num_samples": n,
        "correct": int(right.sum()),
        "accuracy": float(right.mean()),
        "mean_prefill_flops": float(chosen.mean()),
        "flops_ratio": _ratio(chosen, table.dense),
        "best_path": table.paths[best],
        "best_path_accuracy": float(accuracies[best]),
        "best_path_flops_ratio": float(ratios[best]),
        "path_counts": dict(Counter(table.paths[c] for c in choice).most_common()),
        "choice_per_layer": _choice_per_layer(table.paths, choice[right]),
        "visual_tokens_per_layer": None
        if table.visual is None
        else table.visual[np.arange(n), choice].mean(axis=0).tolist(),
    }
    if dense_path in table.paths:
        dense_accuracy = float(accuracies[table.paths.index(dense_path)])
        summary["dense_accuracy"] = dense_accuracy
        summary["flops_ratio_at_dense_accuracy"] = oracle_flops_at(table, dense_accuracy)
    return summary


def dense_path(paths: Sequence[str]) -> str | None:
    """The path that pools nothing (every factor 1), if the model has a factor-1 expert."""
    return next((p for p in paths if set(p.split("-")) == {"1"}), None)


def _groups(table: PathTable, column: np.ndarray, with_kind: bool) -> dict[str, dict[str, Any]]:
    """:func:`oracle_summary` per value of ``column`` (a family or a kind)."""
    out = {}
    for name in sorted({str(v) for v in column}):
        sub = table.subset(column == name)
        entry = oracle_summary(sub, dense_path(table.paths))
        if with_kind and sub.num_samples and sub.kind[0]:
            entry["kind"] = str(sub.kind[0])
        out[name or UNLABELLED] = entry
    return out


def family_router(table: PathTable) -> dict[str, Any] | None:
    """The family router (module docstring): ``accuracy``, ``flops_ratio`` and ``paths`` (family -> path), or
    None when the samples carry no family."""
    families = sorted({str(v) for v in table.family})
    if table.num_samples == 0 or families == [""]:
        return None
    correct = np.zeros(table.num_samples, dtype=bool)
    flops = np.zeros(table.num_samples)
    chosen = {}
    for name in families:
        rows = table.family == name
        sub = table.subset(rows)
        p = _best_path(sub)[0]
        correct[rows], flops[rows] = sub.correct[:, p], sub.flops[:, p]
        chosen[name or UNLABELLED] = table.paths[p]
    return {"accuracy": float(correct.mean()), "flops_ratio": _ratio(flops, table.dense), "paths": chosen}


def analyse(table: PathTable, modes: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The report's oracle section for one model.

    Args:
        table: every path's per-sample results (:class:`PathCollector`).
        modes: the model's report rows (``compression``, ``accuracy``, ``flops_ratio``): each gets a regret
            entry (``routed`` true for ``auto`` / ``random``).

    Returns:
        ``{"num_samples", "num_paths", "paths": [...], "frontier": [labels], "oracle": {...},
        "regret": {mode: {...}}, "per_family": {...}, "per_kind": {...}}`` (module docstring: definitions).
        ``dense_path`` is the path of factors 1 (None without a factor-1 expert).
    """
    paths = path_summaries(table)
    frontier_idx = pareto_frontier([p["flops_ratio"] for p in paths], [p["accuracy"] for p in paths])
    frontier = [(paths[i]["flops_ratio"], paths[i]["accuracy"]) for i in frontier_idx]
    regrets = {}
    for row in modes:
        mode = str(row["compression"])
        regrets[mode] = {
            "routed": routing_mode(mode) is not None,
            **regret(table, frontier, float(row["accuracy"]), float(row["flops_ratio"])),
        }
    return {
        "num_samples": table.num_samples,
        "num_paths": len(table.paths),
        "paths": paths,
        "frontier": [paths[i]["path"] for i in frontier_idx],
        "dense_path": dense_path(table.paths),
        "oracle": oracle_summary(table, dense_path(table.paths)),
        "family_router": family_router(table),
        "regret": regrets,
        "per_family": _groups(table, table.family, with_kind=True),
        "per_kind": {k: v for k, v in _groups(table, table.kind, with_kind=False).items() if k != UNLABELLED},
    }


def budget_curve(table: PathTable, points: int = 41) -> list[tuple[float, float]]:
    """``oracle_accuracy_at`` sampled from the cheapest choice to the oracle's FLOPs (for the plot)."""
    base, extra, _ = _knapsack(table)
    dense = float(table.dense.sum())
    if dense <= 0:
        return []
    lo, hi = base / dense, (base + float(extra.sum())) / dense
    return [(x, oracle_accuracy_at(table, x) or 0.0) for x in np.linspace(lo, hi, points)]


def sample_records(table: PathTable, label: str) -> list[dict[str, Any]]:
    """Per sample: the oracle's path, whether it is right, its FLOPs ratio and every path that answers
    right (``oracle_samples.jsonl``)."""
    choice, right = oracle_choice(table.correct, table.flops)
    records = []
    for i in range(table.num_samples):
        records.append({
            "label": label, "id": str(table.ids[i]), "family": str(table.family[i]), "kind": str(table.kind[i]),
            "oracle_path": table.paths[choice[i]], "correct": bool(right[i]),
            "flops_ratio": float(table.flops[i, choice[i]] / table.dense[i]) if table.dense[i] else None,
            "correct_paths": [p for p, ok in zip(table.paths, table.correct[i]) if ok],
        })  # fmt: skip
    return records


# ----------------------------------------------------------------------------------------------
# Table, metrics, plot
# ----------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_section(label: str, section: Mapping[str, Any]) -> str:
    """The oracle section as text: paths (``*`` on the frontier) in increasing FLOPs, the oracle, every mode's
    regret, and the oracle per family."""
    paths = sorted(section["paths"], key=lambda p: (p["flops_ratio"], -p["accuracy"]))
    body = [[("* " if p["on_frontier"] else "  ") + p["path"], pct(p["accuracy"]), _num(p["flops_ratio"])]
            for p in paths]  # fmt: skip
    oracle = section["oracle"]
    body.append(["oracle", pct(oracle.get("accuracy")), _num(oracle.get("flops_ratio"))])
    family = section.get("family_router")
    if family:
        body.append(["family router", pct(family["accuracy"]), _num(family["flops_ratio"])])
    parts = [f"{label}: static paths (* Pareto frontier) and the oracle (and the family router)",
             render_table(["path", "accuracy %", "x dense"], body)]  # fmt: skip
    if oracle.get("flops_ratio_at_dense_accuracy") is not None:
        parts.append(
            f"oracle at dense accuracy ({pct(oracle['dense_accuracy'])}%): "
            f"{_num(oracle['flops_ratio_at_dense_accuracy'])} x dense"
        )
    if section["regret"]:
        keys = ["accuracy_lost_vs_frontier", "accuracy_lost_vs_oracle", "flops_wasted_vs_frontier",
                "flops_wasted_vs_oracle", "gap_closed"]  # fmt: skip
        rows = [[mode, pct(r["accuracy"]), _num(r["flops_ratio"]),
                 *(pct(r[k]) if "accuracy" in k else _num(r[k]) for k in keys)]
                for mode, r in section["regret"].items()]  # fmt: skip
        heads = ["mode", "accuracy %", "x dense", "acc lost vs frontier (pt)", "acc lost vs oracle (pt)",
                 "FLOPs wasted vs frontier", "FLOPs wasted vs oracle", "gap closed"]  # fmt: skip
        parts += ["regret (accuracy in points, FLOPs as a ratio of dense)", render_table(heads, rows)]
    fam = [[name, e.get("kind", ""), str(e["num_samples"]), pct(e.get("accuracy")), _num(e.get("flops_ratio")),
            pct(e.get("dense_accuracy")), _num(e.get("flops_ratio_at_dense_accuracy")), str(e.get("best_path"))]
           for name, e in {**section["per_family"], **section["per_kind"]}.items()]  # fmt: skip
    heads = ["family/kind", "kind", "samples", "oracle acc %", "oracle x dense", "dense acc %",
             "oracle x dense at dense acc", "best path"]  # fmt: skip
    parts += ["oracle per question family and kind", render_table(heads, fam)]
    return "\n".join(parts)


def mlflow_metrics(label: str, section: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics of one model's oracle section (``<label>/oracle/...``, ``<label>/path/<path>/...``,
    ``<label>/<mode>/regret/...``); undefined values are left out."""
    metrics: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if value is not None and math.isfinite(float(value)):
            metrics[name] = float(value)

    oracle = section["oracle"]
    for key in ("accuracy", "flops_ratio", "dense_accuracy", "flops_ratio_at_dense_accuracy"):
        put(f"{label}/oracle/{key}", oracle.get(key))
    for key in ("accuracy", "flops_ratio"):
        put(f"{label}/family_router/{key}", (section.get("family_router") or {}).get(key))
    for p in section["paths"]:
        put(f"{label}/path/{p['path']}/accuracy", p["accuracy"])
        put(f"{label}/path/{p['path']}/flops_ratio", p["flops_ratio"])
    for mode, r in section["regret"].items():
        for key in ("accuracy_lost_vs_frontier", "accuracy_lost_vs_oracle", "flops_wasted_vs_frontier",
                    "flops_wasted_vs_oracle", "gap_closed"):  # fmt: skip
            put(f"{label}/{mode}/regret/{key}", r.get(key))
    for name, entry in {**section["per_family"], **section["per_kind"]}.items():
        put(f"{label}/oracle/accuracy/{name}", entry.get("accuracy"))
        put(f"{label}/oracle/flops_ratio/{name}", entry.get("flops_ratio"))
    return metrics


_ROUTER_MARKERS = {"auto": ("D", "#d7191c"), "random": ("P", "#7b3294")}


def plot_section(
    label: str,
    section: Mapping[str, Any],
    path: str | Path,
    curve: Sequence[tuple[float, float]] = (),
    title: str = "",
) -> Path:
    """Accuracy (%) against FLOPs ratio: every path a labelled point, the frontier a line (its interpolation),
    the oracle a star, the oracle's budget curve dotted, routed modes (auto, random) as their own markers."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 5.0), dpi=120)
    ax = fig.add_subplot()
    for p in section["paths"]:
        x, y = p["flops_ratio"], 100.0 * p["accuracy"]
        ax.scatter(x, y, s=22, color="#2b83ba" if p["on_frontier"] else "#999999", zorder=3)
        ax.annotate(p["path"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color="#555555")
    by_label = {p["path"]: p for p in section["paths"]}
    front = [by_label[name] for name in section["frontier"]]
    if front:
        xs = [p["flops_ratio"] for p in front] + [max(1.0, front[-1]["flops_ratio"])]
        ys = [100.0 * p["accuracy"] for p in front] + [100.0 * front[-1]["accuracy"]]
        ax.plot(xs, ys, color="#2b83ba", linewidth=1.5, label="static frontier", zorder=2)
    if curve:
        ax.plot([c[0] for c in curve], [100.0 * c[1] for c in curve], linestyle=":", color="#fdae61",
                label="oracle at a FLOPs budget", zorder=2)  # fmt: skip
    oracle = section["oracle"]
    if oracle.get("num_samples"):
        ax.scatter(oracle["flops_ratio"], 100.0 * oracle["accuracy"], marker="*", s=260, color="#fdae61",
                   edgecolors="black", label="oracle", zorder=5)  # fmt: skip
    for mode, r in section["regret"].items():
        if mode in _ROUTER_MARKERS:
            marker, colour = _ROUTER_MARKERS[mode]
            ax.scatter(r["flops_ratio"], 100.0 * r["accuracy"], marker=marker, s=110, color=colour,
                       edgecolors="black", label=f"router ({mode})", zorder=6)  # fmt: skip
    ax.set_xlabel("mean prefill FLOPs / dense")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0.0, 1.1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or f"{label}: static paths, frontier, oracle and router")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_outputs(
    sections: Mapping[str, Mapping[str, Any]],
    tables: Mapping[str, PathTable],
    out_dir: str | Path,
    title: str = "",
) -> list[Path]:
    """Per model ``plots/oracle_<label>.png``, and ``oracle_samples.jsonl`` (:func:`sample_records` of every
    model); returns the paths written."""
    import json

    out = Path(out_dir)
    paths = []
    for label, section in sections.items():
        curve = budget_curve(tables[label]) if label in tables else ()
        paths.append(
            plot_section(label, section, out / "plots" / f"oracle_{file_safe(label)}.png", curve, title)
        )
    samples = out / "oracle_samples.jsonl"
    with samples.open("w") as f:
        for label, table in tables.items():
            for record in sample_records(table, label):
                f.write(json.dumps(record) + "\n")
    return [*paths, samples]


__all__ = [
    "PathCollector",
    "PathTable",
    "analyse",
    "budget_curve",
    "dense_path",
    "format_section",
    "frontier_accuracy_at",
    "frontier_flops_at",
    "mlflow_metrics",
    "oracle_accuracy_at",
    "oracle_choice",
    "oracle_flops_at",
    "oracle_summary",
    "pareto_frontier",
    "path_label",
    "path_labels",
    "path_summaries",
    "plot_section",
    "regret",
    "sample_records",
    "static_paths",
    "write_outputs",
]
