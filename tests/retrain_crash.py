"""Crash injection for tests of the retrain job's crash recovery (test-only; production has none).

The job announces each step boundary as the audit event ``dpn.retrain.step``
(``jobs.retraining.job.STEP_EVENT``) with the step's name. :func:`crash_after` installs, once per process, an audit hook that raises
:class:`InjectedCrash` at the named steps; audit hooks cannot be removed, so the hook only reads a switch
(a ContextVar) that the context manager sets and resets::

    with crash_after("train") as seen, pytest.raises(InjectedCrash):
        retrain(cfg)
    assert seen == ["plan", "mix", "train"]

(A job run in a subprocess would need this module imported there, with tests/ on ``PYTHONPATH``, and the
switch set in that process; no test does that now.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar

from jobs.retraining.job import STEP_EVENT, STEPS


class InjectedCrash(RuntimeError):
    """Raised by the test hook at a step boundary the test named."""


# (steps to crash after, list that records every boundary seen); None: the hook does nothing
_switch: ContextVar[tuple[frozenset[str], list[str]] | None] = ContextVar("retrain_crash", default=None)
_installed = False


def _hook(event: str, args: tuple) -> None:
    if event != STEP_EVENT:  # every audited operation (open, import, ...) passes here: keep it cheap
        return
    state = _switch.get()
    if state is None:
        return
    steps, seen = state
    step = args[0]
    seen.append(step)
    if step in steps:
        raise InjectedCrash(f"injected crash after step {step!r}")


def _install() -> None:
    global _installed
    if not _installed:
        sys.addaudithook(_hook)
        _installed = True


def _checked(steps: tuple[str, ...] | list[str]) -> frozenset[str]:
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown retrain steps {sorted(unknown)}; choose from {list(STEPS)}")
    return frozenset(steps)


@contextlib.contextmanager
def crash_after(*steps: str) -> Iterator[list[str]]:
    """Within the block, the retrain job raises :class:`InjectedCrash` after each of ``steps`` (none: it
    only records). Yields the list of step boundaries the job passed, in order."""
    _install()
    seen: list[str] = []
    token = _switch.set((_checked(steps), seen))
    try:
        yield seen
    finally:
        _switch.reset(token)
