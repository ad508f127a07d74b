"""What a person watching a long job sees: its stages, progress and results on the console, everything else in a log.

Ray workers, Ray Data, DeepSpeed, MLflow, torch and Ray itself print hundreds of lines per run. The long jobs
(`dpn quickstart`, `dpn train`, `dpn eval`, `dpn retrain`) send all of that, at the file-descriptor level so that
C extensions and subprocesses are caught too, to one log file whose path they print, and keep the console for
their own lines: their stages (their own log records, :data:`JOB_ECHO`), progress bars (training steps read back
from MLflow, where rank 0 logs every step anyway; evaluated samples) and their results. ``--verbose`` runs a job
as before, everything on the console. The routing itself, the flags and the failure report are
:mod:`dpn_base.console`'s (``dpn serve`` uses them too); this module holds what is the jobs' own.

Off a terminal (CI, ``ray job submit``, a pipe) the console keeps this form, with a plain progress line every
30 s instead of a bar: such logs are read after the fact, for the outcome and the errors, which a hundred lines
of library start-up would bury. Nothing needed is lost: the result lines are on stdout as before, the job's own
warnings reach the console, a failure prints the log's last lines and the error there, and the log holds all.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from dpn_base.console import announce_log, console_and_log, default_log_path, report_failure

logger = logging.getLogger(__name__)

# the project's own packages: which of their log records a job's console shows (the rest only go to its log)
JOB_ECHO: dict[str, int] = {
    "jobs": logging.INFO,  # the jobs' stages: run started, steps planned, model logged, gate decided, ...
    "tracking": logging.INFO,  # MLflow runs opened, versions registered, models downloaded
    "pipelines": logging.WARNING,
    "dpn_model": logging.WARNING,
    "dpn_base": logging.WARNING,
    "serve_apps": logging.WARNING,
}
INDENT = "      "  # the console's detail lines sit under its stage lines


def _is_terminal(stream: TextIO) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


# ----------------------------------------------------------------------------------------------
# The jobs' console: `dpn train`, `dpn eval`, `dpn retrain` (and their `python -m` forms)
# ----------------------------------------------------------------------------------------------


class JobFailed(Exception):
    """A job run under :func:`job_console` failed; its error and the log's last lines are on the console
    already, its traceback in the log. ``exit_code``: what the command exits with (1; 130 after Ctrl-C)."""

    def __init__(self, job: str, log_path: Path, exit_code: int):
        super().__init__(f"dpn {job} failed; its log: {log_path}")
        self.log_path, self.exit_code = log_path, exit_code


@contextlib.contextmanager
def job_console(
    job: str, args: argparse.Namespace, folder: str | Path, expected: tuple[type[BaseException], ...] = ()
) -> Iterator[Path | None]:
    """Run the body (a job) with the clean console; yields its log's path (None with ``args.verbose``).

    The console (stderr) gets the log's path first, then the job's stages (:data:`JOB_ECHO`) and progress
    (``dpn_base.console.active_console``), then a closing line; everything else goes to ``args.log_file`` or
    ``dpn_base.console.default_log_path`` under ``folder``. With ``args.verbose`` the body runs as without a console.

    Args:
        job: the command's name (``train``, ``eval``, ``retrain``).
        args: the parsed flags of ``dpn_base.console.add_console_arguments``.
        folder: the job's work or storage folder, where the default log goes.
        expected: exceptions that are the caller's to report (a usage error): raised as they are.

    Raises:
        JobFailed: the body raised anything else, or was interrupted; the error is on the console.
    """
    if getattr(args, "verbose", False):
        yield None
        return
    log_path = Path(getattr(args, "log_file", None) or default_log_path(folder, job)).resolve()
    announce_log(job, log_path)
    start, failure = time.perf_counter(), None
    with console_and_log(log_path, console_fd=2, echo=JOB_ECHO) as out:
        logger.info("dpn %s: %s", job, " ".join(sys.argv), extra={"console": False})
        try:
            yield log_path
        except expected:
            raise
        except (Exception, KeyboardInterrupt) as err:
            logger.error("dpn %s failed", job, exc_info=True, extra={"console": False})
            failure = err
        else:
            print(f"dpn {job} finished in {time.perf_counter() - start:.0f} s; its log: {log_path}",
                  file=out, flush=True)  # fmt: skip
    if failure is not None:
        report_failure(sys.stderr, job, failure, log_path)
        raise JobFailed(job, log_path, 130 if isinstance(failure, KeyboardInterrupt) else 1) from failure


# ----------------------------------------------------------------------------------------------
# Progress
# ----------------------------------------------------------------------------------------------


class ProgressView:
    """A count towards a total on ``file``: a tqdm bar on a terminal; anywhere else (a log, a pipe, ``ray job
    logs``) a plain line at most every ``every_s`` seconds and one at the end, so that a log read after the fact
    holds a few lines rather than thousands of carriage returns.

    Lines read ``<label>: <unit> <n>/<total>, <key> <value> (<seconds> s)`` (``step 120/300, loss 0.412 (64 s)``
    for training: the form benchmark scripts match). Use as a context manager; :meth:`update_to` moves it.
    """

    def __init__(self, file: TextIO, total: int | None, unit: str, label: str = "", every_s: float = 30.0):
        self.file, self.total, self.unit, self.label, self.every_s = file, total, unit, label, every_s
        self.n, self._shown = 0, 0
        self._postfix: dict[str, Any] = {}
        self._start = self._last = time.monotonic()
        self._bar = None
        if _is_terminal(file):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=INDENT + (label or f"{unit}s"), unit=unit, file=file, dynamic_ncols=True
            )

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update_to(self, n: int, **postfix: Any) -> None:
        """Move to ``n`` done (never back); ``postfix``: the figures shown beside it (``loss="0.412"``)."""
        self._postfix = postfix
        if self._bar is not None:
            self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(max(0, n - self._bar.n))
        self.n = max(self.n, n)
        if self._bar is None and time.monotonic() - self._last >= self.every_s:
            self._line()

    def close(self) -> None:
        """Close the bar, or print the last count if no line showed it yet."""
        if self._bar is not None:
            self._bar.close()
        elif self.n > self._shown:
            self._line()

    def _line(self) -> None:
        self._shown, self._last = self.n, time.monotonic()
        total = f"/{self.total}" if self.total else ""
        figures = "".join(f", {key} {value}" for key, value in self._postfix.items())
        prefix = f"{self.label}: " if self.label else ""
        print(f"{INDENT}{prefix}{self.unit} {self.n}{total}{figures} ({self._last - self._start:.0f} s)",
              file=self.file, flush=True)  # fmt: skip


class TrainingProgress:
    """A progress bar of a training run, fed by the run's per-step ``loss`` metric in MLflow.

    Polls from a daemon thread; the driver needs no hook inside Ray Train. Use as a context manager around
    ``trainer.fit()``.
    """

    def __init__(self, run_id: str, total_steps: int, uri: str, file: TextIO, poll_s: float = 2.0):
        self.run_id, self.total_steps, self.uri, self.file, self.poll_s = (
            run_id,
            total_steps,
            uri,
            file,
            poll_s,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="training-progress", daemon=True)

    def __enter__(self) -> TrainingProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _latest(self, client: object) -> tuple[int, float] | None:
        try:
            history = client.get_metric_history(self.run_id, "loss")
        except Exception:  # the store is busy or the run not yet visible: try at the next poll
            return None
        if not history:
            return None
        last = max(history, key=lambda m: m.step)
        return last.step, last.value

    def _follow(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        with ProgressView(self.file, self.total_steps, unit="step") as view:
            while True:
                stopping = self._stop.wait(self.poll_s)
                latest = self._latest(client)
                if latest:
                    view.update_to(latest[0], loss=f"{latest[1]:.3f}")
                if stopping:
                    return


__all__ = [
    "JOB_ECHO",
    "JobFailed",
    "ProgressView",
    "TrainingProgress",
    "job_console",
]
