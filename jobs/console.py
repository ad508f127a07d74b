"""What a person watching a long job sees: its stages and progress on the console, everything else in a log.

Ray workers, DeepSpeed, MLflow, torch and Ray itself print hundreds of lines per run. A job that shows a
newcomer its stages (`dpn quickstart`) sends all of that, at the file-descriptor level so that C extensions
and subprocesses are caught too, to one log file whose path it prints, and keeps the console for its own
lines and progress bars. Training progress is read back from MLflow, where rank 0 logs every step anyway.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from dpn_base.redact import install_log_redaction
from pipelines.cli_harness import LOG_FORMAT


def _writes_to_std_fd(stream: TextIO) -> bool:
    try:
        return stream.fileno() in (1, 2)
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False  # a captured stream (pytest, a notebook): writing to it never reaches fd 1


@contextlib.contextmanager
def console_and_log(log_path: str | Path) -> Iterator[TextIO]:
    """Send stdout, stderr, logging and warnings to ``log_path``; yield a stream that still reaches the console.

    Restores every file descriptor, stream, handler and the warnings capture on exit.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 - closed below
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    console = (
        open(os.dup(saved_fds[0]), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        if _writes_to_std_fd(sys.stdout)
        else sys.stdout
    )
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    install_log_redaction([handler])  # the log file gets what every command's logging gets: no credentials
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    root.handlers = [handler]
    root.setLevel(min(saved_level or logging.INFO, logging.INFO))
    logging.captureWarnings(True)
    try:
        yield console
    finally:
        logging.captureWarnings(False)
        root.handlers, root.level = saved_handlers, saved_level
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        if console is not saved_streams[0]:
            console.close()
        log.close()


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
        if hasattr(self.file, "isatty") and self.file.isatty():
            self._follow_bar(client)
        else:  # a log or a pipe: a plain line now and then instead of carriage returns
            self._follow_lines(client, every_s=30.0)

    def _follow_bar(self, client: object) -> None:
        from tqdm import tqdm

        with tqdm(
            total=self.total_steps, desc="      steps", unit="step", file=self.file, dynamic_ncols=True
        ) as bar:
            while True:
                stopping = self._stop.wait(self.poll_s)
                latest = self._latest(client)
                if latest:
                    bar.set_postfix(loss=f"{latest[1]:.3f}", refresh=False)
                    bar.update(max(0, latest[0] - bar.n))
                if stopping:
                    return

    def _follow_lines(self, client: object, every_s: float) -> None:
        start = last_print = time.monotonic()
        shown = 0
        while True:
            stopping = self._stop.wait(self.poll_s)
            latest = self._latest(client)
            now = time.monotonic()
            if latest and latest[0] > shown and (stopping or now - last_print >= every_s):
                shown, last_print = latest[0], now
                print(f"      step {shown}/{self.total_steps}, loss {latest[1]:.3f} ({now - start:.0f} s)",
                      file=self.file, flush=True)  # fmt: skip
            if stopping:
                return


__all__ = ["LOG_FORMAT", "TrainingProgress", "console_and_log"]
