"""The champion/challenger gate: evaluation rows in, a promote/reject decision with its reason out.

Pure functions (no Ray, no MLflow) so the rule is unit-tested on its own:

* every number the rule reads must be there and finite: a missing, NaN or infinite accuracy or FLOPs count
  rejects, with a reason naming it (NaN compares False with everything, so a plain ``<`` would let it pass);
* the challenger's accuracy must reach the absolute floor ``min_accuracy``;
* with a champion, the challenger's accuracy may be at most ``accuracy_tolerance`` (absolute)
  below the champion's, and its mean prefill FLOPs at most ``flops_tolerance`` (relative) above.

Both models are evaluated in the same run, on the same held-out samples, in the same compression
mode (``auto`` by default: each model's router picks its own pooling, so FLOPs can differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from jobs.retraining.config import GateConfig


@dataclass(frozen=True)
class Decision:
    """The gate's verdict.

    Attributes:
        promote: whether the challenger becomes champion.
        reason: one sentence a person can act on (which check passed or failed, with the numbers).
        accuracy_delta: challenger minus champion accuracy (None without a champion).
        flops_rel_change: challenger / champion mean prefill FLOPs - 1 (None without a champion).
    """

    promote: bool
    reason: str
    accuracy_delta: float | None = None
    flops_rel_change: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finite(row: Mapping[str, Any] | None, key: str) -> float | None:
    """``row[key]`` as a finite float, or None (absent, None, not a number, NaN or infinite)."""
    value = (row or {}).get(key)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def unusable(label: str, row: Mapping[str, Any] | None, keys: tuple[str, ...]) -> str | None:
    """Why ``row`` cannot be judged (a sentence naming each missing or non-finite metric), or None."""
    problems = [
        f"no {key}" if (row or {}).get(key) is None else f"{key} {row[key]!r}"
        for key in keys
        if finite(row, key) is None
    ]
    if not problems:
        return None
    return (
        f"the {label}'s evaluation has {', '.join(problems)}: a finite number is needed for each; "
        "check the evaluation (did it score any sample?) and run the job again"
    )


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, gate: GateConfig) -> Decision:
    """Apply the gate to two evaluation rows (``accuracy`` in [0, 1], ``mean_prefill_flops``).

    Args:
        challenger: the challenger's row.
        champion: the champion's row, or None when there is no champion yet.
        gate: tolerances and floor.
    """
    needed = ("accuracy",) if champion is None else ("accuracy", "mean_prefill_flops")
    for label, row in (("challenger", challenger), ("champion", champion)):
        problem = unusable(label, row, needed) if row is not None else None
        if problem:
            return Decision(False, f"not comparable: {problem}")
    acc = float(challenger["accuracy"])
    if champion is None:
        if acc < gate.min_accuracy:
            return Decision(
                False, f"no champion yet and accuracy {acc:.4f} is below the floor {gate.min_accuracy:.4f}"
            )
        return Decision(True, f"first champion: accuracy {acc:.4f} reaches the floor {gate.min_accuracy:.4f}")
    base_acc = float(champion["accuracy"])
    delta = acc - base_acc
    flops, base_flops = float(challenger["mean_prefill_flops"]), float(champion["mean_prefill_flops"])
    rel = flops / base_flops - 1.0 if base_flops > 0 else 0.0
    if acc < gate.min_accuracy:
        return Decision(False, f"accuracy {acc:.4f} is below the floor {gate.min_accuracy:.4f}", delta, rel)
    # a tiny epsilon so that "equal within float rounding" is not a rejection
    if delta < -gate.accuracy_tolerance - 1e-9:
        return Decision(
            False,
            f"accuracy {acc:.4f} is {-delta:.4f} below the champion's {base_acc:.4f} "
            f"(tolerance {gate.accuracy_tolerance:.4f})",
            delta, rel,
        )  # fmt: skip
    if rel > gate.flops_tolerance + 1e-9:
        return Decision(
            False,
            f"mean prefill FLOPs {flops:.4g} are {100 * rel:.2f}% above the champion's {base_flops:.4g} "
            f"(tolerance {100 * gate.flops_tolerance:.2f}%)",
            delta, rel,
        )  # fmt: skip
    return Decision(
        True,
        f"accuracy {acc:.4f} vs champion {base_acc:.4f} (delta {delta:+.4f}, tolerance {gate.accuracy_tolerance:.4f}); "
        f"FLOPs {100 * rel:+.2f}% (tolerance {100 * gate.flops_tolerance:.2f}%)",
        delta, rel,
    )  # fmt: skip


def comparison_table(rows: Mapping[str, Mapping[str, Any]], decision: Decision) -> str:
    """Markdown table of the evaluated models (``{label: row}``) and the decision."""
    lines = [
        "| model | version | accuracy | mean prefill GFLOPs | FLOPs vs dense | samples |",
        "|---|---|---|---|---|---|",
    ]

    def shown(row: Mapping[str, Any], key: str, scale: float, fmt: str, unit: str = "") -> str:
        value = finite(row, key)  # a missing or NaN metric is shown as it is, not a crash of the report
        return f"{scale * value:{fmt}}{unit}" if value is not None else str(row.get(key, "-"))

    for label, row in rows.items():
        lines.append(
            f"| {label} | {row.get('model', '')} | {shown(row, 'accuracy', 100, '.2f', '%')} "
            f"| {shown(row, 'mean_prefill_flops', 1e-9, '.4f')} | {float(row.get('flops_ratio') or 0):.3f} "
            f"| {row.get('num_samples', '')} |"
        )
    verdict = "PROMOTE" if decision.promote else "REJECT"
    return "\n".join(lines) + f"\n\n**{verdict}**: {decision.reason}\n"


__all__ = ["Decision", "comparison_table", "decide", "finite", "unusable"]
