"""Eval tasks: how a generated answer is scored, one registry entry per benchmark metric.

An :class:`EvalTask` says how to score a prediction against its reference (``score``) and which rows it
scores (``applies_to``; the other rows are scored by the default task, exact match). ``dpn eval --task NAME``
(``task:`` in ``configs/eval_*.yaml``) picks one by name; :func:`get_task` looks it up and an unknown name is an
error listing the known ones. The default, ``exact_match``, is VQA-normalised exact match
(:func:`jobs.evaluation.scoring.exact_match`), as the evaluation always scored.

Adding a benchmark whose answers are not exact matches is one entry, at the end of this module (registered on
import, so the Ray actors that score have it too)::

    register_task(EvalTask("numeric", score=within_one_percent, description="numbers within 1%"))

Nothing else changes: the :class:`jobs.evaluation.predictor.Predictor` actors score every row with
:func:`score_answers`, and the report counts ``correct`` as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jobs.evaluation.scoring import exact_match

Reference = str | Sequence[str]
DEFAULT_TASK = "exact_match"


def every_row(row: Mapping[str, Any]) -> bool:
    """``applies_to`` of a task that scores every row."""
    return True


@dataclass(frozen=True)
class EvalTask:
    """One way to score an evaluation's answers.

    Attributes:
        name: what ``--task`` / ``task:`` calls it.
        score: ``(prediction, reference) -> correct``; ``prediction`` is the generated answer's first line,
            ``reference`` the row's answer (or a list of acceptable answers).
        applies_to: ``row -> bool`` on a row's ``id``, ``family``, ``kind``, ``question`` and ``answer``
            (strings): the rows this task scores; the others are scored by the default task. Every row by default.
        description: one line for listings and error messages.
    """

    name: str
    score: Callable[[str, Reference], bool]
    applies_to: Callable[[Mapping[str, Any]], bool] = every_row
    description: str = ""


_TASKS: dict[str, EvalTask] = {}


def register_task(task: EvalTask, *, replace: bool = False) -> EvalTask:
    """Add ``task`` to the registry (returned, so it can be kept in a module-level name).

    Raises:
        ValueError: a task of that name is registered already (``replace=True`` replaces it), or the name is empty.
    """
    if not task.name or not task.name.strip():
        raise ValueError("an eval task needs a name")
    if task.name in _TASKS and not replace:
        raise ValueError(f"eval task {task.name!r} is registered already (register_task(..., replace=True))")
    _TASKS[task.name] = task
    return task


def task_names() -> list[str]:
    """The registered task names, in registration order (the default first)."""
    return list(_TASKS)


def get_task(name: str | EvalTask) -> EvalTask:
    """The registered task called ``name`` (an :class:`EvalTask` is returned as it is).

    Raises:
        ValueError: no task has that name; the message lists the known ones.
    """
    if isinstance(name, EvalTask):
        return name
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        known = ", ".join(task_names())
        raise ValueError(f"unknown eval task {name!r}; known tasks: {known}") from None


def score_answers(
    task: str | EvalTask, predictions: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> list[bool]:
    """Whether each prediction is right: ``task`` scores the rows it applies to, the default task the others.

    Args:
        task: a task or a registered name.
        predictions: the generated answers, one per row.
        rows: per row at least ``answer`` (the reference), and the columns ``applies_to`` reads.
    """
    chosen, default = get_task(task), _TASKS[DEFAULT_TASK]
    return [
        bool((chosen if chosen.applies_to(row) else default).score(prediction, row["answer"]))
        for prediction, row in zip(predictions, rows, strict=True)
    ]


# ----------------------------------------------------------------------------------------------
# The registered tasks. A new benchmark metric: one register_task(...) here.
# ----------------------------------------------------------------------------------------------

EXACT_MATCH = register_task(
    EvalTask(
        DEFAULT_TASK,
        score=exact_match,
        description="VQA-normalised exact match (case, punctuation, articles, number words)",
    )
)


__all__ = [
    "DEFAULT_TASK",
    "EXACT_MATCH",
    "EvalTask",
    "every_row",
    "get_task",
    "register_task",
    "score_answers",
    "task_names",
]
