"""Evaluation report: per-sample results -> one row per (model, compression mode) -> table, JSON, plots.

A **row** (one per evaluated model and compression mode; the JSON report's ``rows``) holds:

=============================  ===================================================================
``label``, ``model``           the model's label and the URI it was loaded from
``compression``                ``"auto"``, ``"random"``, the forced factor (``1`` dense, ``2``, ``4``;
                               an ``int``) or a schedule's label (``"1-2-4"``: one factor per
                               pooling layer)
``num_samples``, ``correct``   scored samples and right answers (scored by ``--task``; exact match
                               by default, :mod:`jobs.evaluation.tasks`)
``accuracy``                   ``correct / num_samples`` as a fraction in [0, 1]
``mean_prefill_flops``         mean analytic prefill FLOPs per sample in this mode (the model's
                               ``prefill_flops`` output)
``mean_dense_flops``           mean prefill FLOPs of the same samples at compression 1 (dense
                               LLaVA, no routers), from ``dpn_model.flops``
``flops_ratio``                ``mean_prefill_flops / mean_dense_flops`` (ratio of total FLOPs)
``mean_llm_flops``,            the same without the vision tower and projector (identical in every
``llm_flops_ratio``            mode): the language model's share, which pooling acts on
``visual_tokens_per_layer``    mean visual tokens before the first pooling layer, then after each
``routing``                    routed modes (auto, random): ``{"per_layer": [dist, ...],
                               "mean_router_probs": [[p, ...], ...]}`` with ``dist`` = fraction of
                               samples per choice (``"1"``, ``"2"``, ``"4"``: the expert's factor;
                               ``"skipped"``: no pooling at that layer); ``mean_router_probs`` is
                               ``None`` for random routing (no router runs); ``None`` for forced modes
``per_family``, ``per_kind``   ``{name: {num_samples, correct, accuracy, mean_prefill_flops,
                               flops_ratio, visual_tokens_per_layer, routing, kind?}}``; the
                               family/kind ``routing`` is the ``per_layer`` list (routed modes)
``latency_ms_per_sample``      generation wall time (prefill + decoding) per sample in one actor
``dense_flops_max_rel_error``  compression 1 only: largest relative difference between the model's
                               ``prefill_flops`` and ``dpn_model.flops`` (both must agree: ~0)
=============================  ===================================================================

Plots (PNG, matplotlib's Agg canvas, no display needed): accuracy against prefill FLOPs with one
point per row (baselines from other reports included), and per routed row (auto, random) the choice
distribution per question family for every pooling layer plus the visual tokens each family keeps.

With ``dpn eval --oracle`` the report also has an ``oracle`` section per model (:mod:`jobs.evaluation.oracle`).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpn_model.configuration import routing_mode

UNLABELLED = "unlabelled"
SKIPPED = "skipped"
REPORT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------


class _Group:
    """Running sums for one group of samples (a mode, or a family/kind within a mode)."""

    def __init__(self, num_layers: int, num_experts: int):
        self.n = 0
        self.correct = 0
        self.flops = 0.0
        self.dense = 0.0
        self.image = 0.0
        self.visual = np.zeros(num_layers + 1, dtype=np.float64)
        self.choices = np.zeros((num_layers, num_experts + 1), dtype=np.int64)  # last column: skipped
        self.probs = np.zeros((num_layers, num_experts), dtype=np.float64)
        self.routed = np.zeros(num_layers, dtype=np.int64)

    def add(
        self,
        correct: np.ndarray,
        flops: np.ndarray,
        dense: np.ndarray,
        image: np.ndarray,
        visual: np.ndarray,
        choices: np.ndarray,
        probs: np.ndarray | None,
    ) -> None:
        self.n += len(correct)
        self.correct += int(correct.sum())
        self.flops += float(flops.sum())
        self.dense += float(dense.sum())
        self.image += float(image.sum())
        self.visual += visual.sum(axis=0)
        num_experts = self.choices.shape[1] - 1
        index = np.where(choices < 0, num_experts, choices)  # (N, layers)
        for layer in range(self.choices.shape[0]):
            self.choices[layer] += np.bincount(index[:, layer], minlength=num_experts + 1)
        if probs is not None:
            routed = choices >= 0  # (N, layers): router probabilities only count where it pooled
            self.probs += np.where(routed[..., None], probs, 0.0).sum(axis=0)
            self.routed += routed.sum(axis=0)

    def to_dict(self, factors: Sequence[int], routed: bool) -> dict[str, Any]:
        n = max(self.n, 1)
        routing = None
        if routed:
            keys = [str(f) for f in factors] + [SKIPPED]
            routing = [{k: float(c) / n for k, c in zip(keys, layer)} for layer in self.choices.tolist()]
        return {
            "num_samples": self.n,
            "correct": self.correct,
            "accuracy": self.correct / n,
            "mean_prefill_flops": self.flops / n,
            "mean_dense_flops": self.dense / n,
            "flops_ratio": self.flops / self.dense if self.dense else float("nan"),
            "mean_llm_flops": (self.flops - self.image) / n,
            "llm_flops_ratio": (self.flops - self.image) / (self.dense - self.image)
            if self.dense > self.image
            else float("nan"),
            "visual_tokens_per_layer": (self.visual / n).tolist(),
            "routing": routing,
        }


class ModeAccumulator:
    """Streams per-sample results of one model in one compression mode into a report row.

    Args:
        label: the model's label; model: its URI.
        compression: ``"auto"``, ``"random"``, a forced factor or a schedule label (``"1-2-4"``).
        factors: compression factor of each expert (``config.compression_factors``), expert order.
        num_layers: number of pooling layers.
    """

    def __init__(
        self, label: str, model: str, compression: str | int, factors: Sequence[int], num_layers: int
    ):
        self.label, self.model, self.compression = label, model, compression
        self.factors = [int(f) for f in factors]
        self.num_layers = num_layers
        self.total = _Group(num_layers, len(self.factors))
        self.families: dict[str, _Group] = {}
        self.kinds: dict[str, _Group] = {}
        self.family_kind: dict[str, str] = {}
        self.latency_s = 0.0
        self.max_rel_error = 0.0

    @property
    def auto(self) -> bool:
        """The learned router runs (router probabilities are recorded)."""
        return routing_mode(str(self.compression)) == "auto"  # "auto" and the cost dial "auto:lambda=X"

    @property
    def routed(self) -> bool:
        """The expert is chosen per sample (auto or random), so the choice distribution is reported."""
        return routing_mode(str(self.compression)) is not None

    def _group(self, table: dict[str, _Group], name: str) -> _Group:
        if name not in table:
            table[name] = _Group(self.num_layers, len(self.factors))
        return table[name]

    def add(self, batch: Mapping[str, np.ndarray]) -> None:
        """Add a batch of per-sample results (the columns :class:`jobs.evaluation.predictor.Predictor` returns)."""
        correct = np.asarray(batch["correct"], dtype=bool)
        flops = np.asarray(batch["prefill_flops"], dtype=np.float64)
        dense = np.asarray(batch["dense_flops"], dtype=np.float64)
        image = np.asarray(batch["image_flops"], dtype=np.float64)
        visual = np.asarray(batch["visual_tokens"], dtype=np.float64).reshape(len(correct), -1)
        choices = np.asarray(batch["expert_choices"], dtype=np.int64).reshape(len(correct), -1)
        probs = np.asarray(batch["router_probs"], dtype=np.float64) if self.auto else None
        columns = (correct, flops, dense, image, visual, choices, probs)
        self.total.add(*columns)
        self.latency_s += float(np.asarray(batch["latency_s"], dtype=np.float64).sum())
        if str(self.compression) == "1":
            rel = np.abs(flops - dense) / np.maximum(dense, 1.0)
            self.max_rel_error = max(self.max_rel_error, float(rel.max(initial=0.0)))
        families = np.asarray([str(f) or UNLABELLED for f in batch["family"]])
        kinds = np.asarray([str(k) for k in batch["kind"]])
        for name in np.unique(families):
            sel = families == name
            self._group(self.families, str(name)).add(*(c[sel] if c is not None else None for c in columns))
            if kinds[sel][0]:
                self.family_kind[str(name)] = str(kinds[sel][0])
        for name in np.unique(kinds):
            if name:
                sel = kinds == name
                self._group(self.kinds, str(name)).add(*(c[sel] if c is not None else None for c in columns))

    def row(self) -> dict[str, Any]:
        """The report row (schema in the module docstring)."""
        total = self.total.to_dict(self.factors, self.routed)
        routing = None
        if self.routed:
            routed = np.maximum(self.total.routed, 1)[:, None]
            routing = {
                "per_layer": total["routing"],
                "mean_router_probs": (self.total.probs / routed).tolist() if self.auto else None,
            }
        per_family = {}
        for name in sorted(self.families):
            entry = self.families[name].to_dict(self.factors, self.routed)
            if name in self.family_kind:
                entry["kind"] = self.family_kind[name]
            per_family[name] = entry
        row = {
            "label": self.label,
            "model": self.model,
            "compression": self.compression,
            **{k: v for k, v in total.items() if k != "routing"},
            "routing": routing,
            "per_family": per_family,
            "per_kind": {
                name: self.kinds[name].to_dict(self.factors, self.routed) for name in sorted(self.kinds)
            },
            "latency_ms_per_sample": 1000.0 * self.latency_s / max(self.total.n, 1),
            "expert_factors": self.factors,
        }
        if str(self.compression) == "1":
            row["dense_flops_max_rel_error"] = self.max_rel_error
        return row


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def make_report(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON report: ``{"version", "meta", "rows"}``."""
    return {"version": REPORT_VERSION, "meta": dict(meta), "rows": [dict(r) for r in rows]}


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the report as JSON (NaN -> null); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(report), indent=1) + "\n")
    return path


def load_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of earlier JSON reports (to plot and tabulate them as baselines next to new results)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read evaluation report {path}: {err}") from err
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError(f"{path} is not an evaluation report (expected a JSON object with 'rows')")
        rows.extend(data["rows"])
    return rows


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def pct(value: Any) -> str:
    """A fraction as a percentage with one decimal; ``-`` for None."""
    return "-" if value is None else f"{100.0 * float(value):.1f}"


def _tokens(row: Mapping[str, Any]) -> str:
    return ">".join(f"{v:.0f}" for v in row.get("visual_tokens_per_layer") or [])


def render_table(headers: list[str], body: list[list[str]], markdown: bool = False) -> str:
    """A table as aligned text (header, dashes, rows) or, with ``markdown``, as a Markdown table."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def format_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Summary table: accuracy (overall, per kind) in %, GFLOPs, ratios to dense (whole prefill, and
    the language model alone), visual tokens per layer, latency."""
    kinds = sorted({k for r in rows for k in r.get("per_kind", {})})
    headers = ["model", "compression", "samples", "accuracy %", *[f"{k} %" for k in kinds]]
    headers += ["prefill GFLOPs", "x dense", "LLM x dense", "visual tokens", "ms/sample"]
    body = []
    for r in rows:
        per_kind = r.get("per_kind", {})
        body.append(
            [
                str(r.get("label", "")),
                str(r["compression"]),
                str(r.get("num_samples", "")),
                pct(r["accuracy"]),
                *[pct(per_kind[k]["accuracy"]) if k in per_kind else "-" for k in kinds],
                f"{float(r['mean_prefill_flops']) / 1e9:.3f}",
                "-" if r.get("flops_ratio") is None else f"{float(r['flops_ratio']):.3f}",
                "-" if r.get("llm_flops_ratio") is None else f"{float(r['llm_flops_ratio']):.3f}",
                _tokens(r),
                f"{float(r.get('latency_ms_per_sample') or 0.0):.1f}",
            ]
        )
    return render_table(headers, body, markdown)


def format_family_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Accuracy (%) per question family, one line per row; routed rows (auto, random) add the mean
    visual tokens kept after the last pooling layer per family (``acc/tokens``)."""
    families = sorted({f for r in rows for f in r.get("per_family", {})})
    headers = ["model", "compression", *families]
    body = []
    for r in rows:
        cells = []
        for f in families:
            entry = r.get("per_family", {}).get(f)
            if entry is None:
                cells.append("-")
            elif routing_mode(str(r["compression"])):
                cells.append(f"{pct(entry['accuracy'])}/{entry['visual_tokens_per_layer'][-1]:.0f}")
            else:
                cells.append(pct(entry["accuracy"]))
        body.append([str(r.get("label", "")), str(r["compression"]), *cells])
    return render_table(headers, body, markdown)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

_MARKERS = {"auto": "*", "random": "P", "1": "o", "2": "s", "4": "^"}


def plot_accuracy_vs_flops(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Accuracy (%) against mean prefill FLOPs relative to dense, one point per row."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.6), dpi=120)
    ax = fig.add_subplot()
    labels = list(dict.fromkeys(str(r.get("label", "")) for r in rows))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for r in rows:
        x = r.get("flops_ratio")
        if x is None or not math.isfinite(float(x)):
            continue
        mode, label = str(r["compression"]), str(r.get("label", ""))
        ax.scatter(
            float(x), 100.0 * float(r["accuracy"]), s=140 if mode == "auto" else 60,
            marker=_MARKERS.get(mode, "D"), color=colours[label], edgecolors="black", zorder=3,
        )  # fmt: skip
        ax.annotate(
            f"{label} {mode + 'x' if mode.isdigit() else mode}", (float(x), 100.0 * float(r["accuracy"])),
            textcoords="offset points", xytext=(6, 5), fontsize=8,
        )  # fmt: skip
    ax.set_xlabel("mean prefill FLOPs / dense")
    ax.set_ylabel("accuracy (%)")
    ax.set_xlim(0.0, 1.1)
    ax.grid(True, alpha=0.3)
    ax.set_title(title or "Accuracy vs prefill FLOPs")
    fig.tight_layout()
    return _save(fig, path)


def plot_routing(row: Mapping[str, Any], path: str | Path) -> Path:
    """Router choices per question family at every pooling layer (stacked bars), and the visual
    tokens each family keeps per layer. ``row`` must be a routed row (auto or random)."""
    from matplotlib.figure import Figure

    if row.get("routing") is None:
        raise ValueError(f"plot_routing needs an auto-mode row, got compression={row.get('compression')!r}")
    per_family = row.get("per_family", {})
    families = sorted(per_family, key=lambda f: (per_family[f].get("kind", ""), f))
    num_layers = len(row["routing"]["per_layer"])
    keys = [str(f) for f in row.get("expert_factors", [1, 2, 4])] + [SKIPPED]
    fig = Figure(figsize=(3.2 * (num_layers + 1), 0.45 * len(families) + 2.2), dpi=120)
    axes = fig.subplots(1, num_layers + 1, squeeze=False)[0]
    names = [f"{f} ({per_family[f].get('kind', '')})" if per_family[f].get("kind") else f for f in families]
    colours = {k: c for k, c in zip(keys, ["#2b83ba", "#fdae61", "#d7191c", "#bbbbbb"])}
    for layer in range(num_layers):
        ax = axes[layer]
        left = np.zeros(len(families))
        for key in keys:
            widths = np.array(
                [(per_family[f]["routing"] or [{}] * num_layers)[layer].get(key, 0.0) for f in families]
            )
            ax.barh(names, widths, left=left, color=colours.get(key, "black"),
                    label=f"{key}x" if key != SKIPPED else key)  # fmt: skip
            left += widths
        ax.set_xlim(0, 1)
        ax.set_title(f"pooling layer {layer + 1}")
        ax.set_xlabel("fraction of samples")
        if layer:
            ax.set_yticklabels([])
    axes[0].legend(loc="lower left", fontsize=7, framealpha=0.8)
    ax = axes[-1]
    for f, name in zip(families, names):
        ax.plot(range(num_layers + 1), per_family[f]["visual_tokens_per_layer"], marker="o", label=name,
                linestyle="-" if per_family[f].get("kind") != "coarse" else "--")  # fmt: skip
    ax.set_xticks(range(num_layers + 1), ["in"] + [f"L{i + 1}" for i in range(num_layers)])
    ax.set_yscale("log", base=2)
    ax.set_title("visual tokens kept")
    ax.legend(fontsize=6)
    fig.suptitle(f"{row.get('label', '')}: router choices per question family")
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def write_plots(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, title: str = "") -> list[Path]:
    """``accuracy_vs_flops.png`` for all rows and ``routing_<label>.png`` per auto row
    (``routing_<label>_random.png`` for random routing)."""
    out = Path(out_dir)
    paths = [plot_accuracy_vs_flops(rows, out / "accuracy_vs_flops.png", title)]
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        if r.get("routing") is not None and r.get("per_family"):
            label = file_safe(str(r.get("label", "model")))
            if str(r["compression"]) != "auto":
                label += f"_{file_safe(str(r['compression']))}"
            seen[label] += 1
            suffix = "" if seen[label] == 1 else f"_{seen[label]}"
            paths.append(plot_routing(r, out / f"routing_{label}{suffix}.png"))
    return paths


def file_safe(name: str) -> str:
    """``name`` with every character but letters, digits and ``-_.`` replaced by ``_`` (for file names)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


__all__ = [
    "ModeAccumulator",
    "format_family_table",
    "format_table",
    "load_rows",
    "make_report",
    "plot_accuracy_vs_flops",
    "plot_routing",
    "write_json",
    "write_plots",
]
