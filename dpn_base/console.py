"""A command's clean console: its stages and results on the console, what the libraries print in a log file.

Ray, Ray Serve, Ray Data, DeepSpeed, MLflow and torch print hundreds of lines per run. Every long-running ``dpn``
command (the jobs in :mod:`jobs.console`, ``dpn serve``) sends all of that, at the file-descriptor level so that C
extensions, Ray's workers' forwarded output and subprocesses are caught too, to one log file whose path it
prints, and keeps the console for its own lines. ``-v/--verbose`` runs a command as before, everything on the
console; ``--log-file PATH`` says where the log goes.

It lives in :mod:`dpn_base` because commands of several layers use it (``serve_apps`` may not import ``jobs``);
it imports nothing beyond the standard library and :mod:`dpn_base`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TextIO

from dpn_base.cli_harness import LOG_FORMAT
from dpn_base.redact import install_log_redaction

LOG_TAIL_LINES = 40  # lines of the log a failure shows on the console
LIBRARIES = "Ray, Ray Data, DeepSpeed, MLflow and torch"  # what a job's log holds, in its console's words

# the console stream of the console_and_log open now: one per process, as it owns file descriptors 1 and 2
_active: TextIO | None = None


def active_console() -> TextIO | None:
    """The console stream of the :func:`console_and_log` open in this process, None when there is none (no
    console, or ``--verbose``): where a command draws its progress bars, however deep the call that draws them
    (the training and evaluation inside a retrain)."""
    return _active


def _writes_to_std_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False  # a captured stream (pytest, a notebook): writing to it never reaches the fd


class _EchoFilter(logging.Filter):
    """The records of the packages in ``echo`` at their level or above, unless logged with
    ``extra={"console": False}`` (what the console already says in its own words)."""

    def __init__(self, echo: Mapping[str, int]):
        super().__init__()
        self.echo = dict(echo)

    def filter(self, record: logging.LogRecord) -> bool:
        level = self.echo.get(record.name.split(".", 1)[0])
        return level is not None and record.levelno >= level and getattr(record, "console", True)


class _EchoFormatter(logging.Formatter):
    """One short line per record: the time and the message, warnings and errors saying so. Tracebacks stay in
    the log."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{when} {level}{record.getMessage()}"


@contextlib.contextmanager
def console_and_log(
    log_path: str | Path, *, console_fd: int = 1, echo: Mapping[str, int] | None = None
) -> Iterator[TextIO]:
    """Send stdout, stderr, logging and warnings to ``log_path``; yield a stream that still reaches the console.

    Args:
        log_path: the log file (appended to; its folder is created).
        console_fd: what the yielded stream writes to: 1 (stdout, the quickstart's) or 2 (stderr, the jobs':
            their stdout carries only the result lines scripts parse).
        echo: ``{top-level package: level}`` of log records also shown on the console, one short line each
            (a command's stages: ``jobs.console.JOB_ECHO``, ``serve_apps.commands.SERVE_ECHO``); None: none
            (every record goes to the log only).

    Restores every file descriptor, stream, handler and the warnings capture on exit.
    """
    global _active
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    own = saved_streams[console_fd - 1]
    console = (
        open(os.dup(saved_fds[console_fd - 1]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        if _writes_to_std_fd(own, console_fd)
        else own
    )
    root = logging.getLogger()
    saved_handlers, saved_level, saved_active = root.handlers[:], root.level, _active
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handlers: list[logging.Handler] = [handler]
    if echo:
        shown = logging.StreamHandler(console)
        shown.addFilter(_EchoFilter(echo))
        shown.setFormatter(_EchoFormatter())
        handlers.append(shown)
    install_log_redaction(handlers)  # the log file gets what every command's logging gets: no credentials
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    root.handlers = handlers
    root.setLevel(min(saved_level or logging.INFO, logging.INFO))
    logging.captureWarnings(True)
    _active = console
    try:
        yield console
    finally:
        _active = saved_active
        logging.captureWarnings(False)
        root.handlers, root.level = saved_handlers, saved_level
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        if console is not own:
            console.close()
        log.close()


# ----------------------------------------------------------------------------------------------
# What every such command shares: its flags, its log's default path, its opening line, its failure report
# ----------------------------------------------------------------------------------------------


def add_console_arguments(
    parser: argparse.ArgumentParser, default_log: str, libraries: str = LIBRARIES
) -> None:
    """``-v/--verbose`` and ``--log-file PATH`` of a command; ``default_log`` names the default log path in the
    help, ``libraries`` what else prints (the command's own lines stay on the console)."""
    parser.add_argument(
        "-v", "--verbose", action="store_true",
        help=f"print everything {libraries} print on the console (no log file)",
    )  # fmt: skip
    parser.add_argument(
        "--log-file", metavar="PATH",
        help=f"where everything but the command's stages, progress and results goes (default {default_log})",
    )  # fmt: skip


def default_log_path(folder: str | Path, command: str) -> Path:
    """``<folder>/logs/<command>-<YYYYmmdd-HHMMSS>.log``: a new log per run, beside what the run writes."""
    return Path(folder) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


def announce_log(command: str, log_path: Path, libraries: str = LIBRARIES) -> None:
    """The console's first line (stderr): where everything but the command's own lines goes, and how to see it."""
    print(f"dpn {command}: stages, progress and results here; everything {libraries} print in {log_path} "
          "(-v: all on the console)", file=sys.stderr, flush=True)  # fmt: skip


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``lines`` non-empty lines of a log, as a terminal would have shown them (a line rewritten with
    carriage returns, as progress bars do, shows its last state)."""
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    shown = (line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n"))
    return [line for line in shown if line.strip()][-lines:]


def report_failure(out: TextIO, command: str, err: BaseException, log_path: Path) -> None:
    """The console's account of a failed command: the log's last lines, then the error and where the rest is."""
    tail = log_tail(log_path)
    print(f"\nthe last {len(tail)} lines of {log_path}:", file=out)
    for line in tail:
        print(f"  | {line}", file=out)
    what = "was interrupted" if isinstance(err, KeyboardInterrupt) else f"failed: {type(err).__name__}: {err}"
    print(f"\ndpn {command} {what}\nthe full log, traceback included: {log_path}", file=out, flush=True)


__all__ = [
    "LIBRARIES",
    "LOG_TAIL_LINES",
    "active_console",
    "add_console_arguments",
    "announce_log",
    "console_and_log",
    "default_log_path",
    "log_tail",
    "report_failure",
]
