"""The jobs' clean console (jobs/console.py): stages, progress and results on the console, the rest in a log.

A stand-in job (a script run in its own process, since the console works on file descriptors 1 and 2) writes
what Ray, DeepSpeed and MLflow write: to the descriptors directly, with print, through library loggers and as
warnings; then the job's own stage, warning and progress. No Ray.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from jobs.console import ProgressView, log_tail

REPO = Path(__file__).resolve().parents[1]
TRAIN_TINY = str(REPO / "configs" / "train_tiny.yaml")

JOB = textwrap.dedent(
    """
    import argparse, logging, os, sys, warnings

    from jobs.console import JobFailed, ProgressView, active_console, add_console_arguments, job_console

    parser = argparse.ArgumentParser()
    add_console_arguments(parser, "<folder>/logs/fake-<time>.log")
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("folder")
    args = parser.parse_args()


    def job():
        os.write(1, b"raw noise on fd 1\\n")
        os.write(2, b"raw noise on fd 2\\n")
        print("printed noise")
        logging.getLogger("ray.data").info("ray data noise")
        warnings.warn("`concurrency` is deprecated noise", DeprecationWarning)
        logging.getLogger("jobs.fake").info("stage: training 5 steps")
        logging.getLogger("pipelines.fake").info("pipeline detail noise")
        logging.getLogger("pipelines.fake").warning("3 bad samples skipped")
        with ProgressView(active_console() or sys.stderr, 5, unit="step") as view:
            for step in range(1, 6):
                view.update_to(step, loss="0.500")
        if args.fail:
            os.write(2, b"the last noise before the crash\\n")
            raise RuntimeError("boom")


    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    try:
        with job_console("fake", args, args.folder):
            job()
    except JobFailed as failed:
        sys.exit(failed.exit_code)
    sys.stdout.write("run_id=abc123\\nsteps=5\\n")
    """
)
NOISE = ("raw noise on fd", "printed noise", "ray data noise", "deprecated noise", "pipeline detail noise")


def _run_job(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    script = tmp_path / "fake_job.py"
    script.write_text(JOB)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path / "work"), *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _logs(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "work" / "logs").glob("fake-*.log"))


def test_the_clean_console_keeps_results_stages_and_progress_and_logs_the_rest(tmp_path):
    done = _run_job(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "run_id=abc123\nsteps=5\n"  # exactly the result lines scripts parse, nothing else
    [log] = _logs(tmp_path)
    console = done.stderr
    assert str(log) in console.splitlines()[0]  # the log's path first
    assert "stage: training 5 steps" in console and "warning: 3 bad samples skipped" in console
    assert "step 5/5, loss 0.500" in console  # off a terminal: a plain progress line, no carriage returns
    assert "\r" not in console and "dpn fake finished" in console
    assert not [noise for noise in NOISE if noise in console]
    text = log.read_text()
    assert all(noise in text for noise in NOISE)  # everything else is in the log, with the stages
    assert "stage: training 5 steps" in text and "run_id=" not in text


def test_verbose_shows_everything_on_the_console_and_writes_no_log(tmp_path):
    done = _run_job(tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    both = done.stdout + done.stderr
    assert all(noise in both for noise in NOISE) and "stage: training 5 steps" in both
    assert done.stdout.endswith("run_id=abc123\nsteps=5\n")
    assert not (tmp_path / "work" / "logs").exists()
    assert _run_job(tmp_path, "-v").stdout == done.stdout  # the short spelling


def test_a_failure_shows_the_log_tail_and_the_error(tmp_path):
    done = _run_job(tmp_path, "--fail")
    assert done.returncode == 1
    assert done.stdout == ""  # no result lines
    [log] = _logs(tmp_path)
    console = done.stderr
    assert "  | the last noise before the crash" in console  # the log's last lines
    assert "dpn fake failed: RuntimeError: boom" in console and f"traceback included: {log}" in console
    assert "dpn fake finished" not in console
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text


def test_log_file_puts_the_log_where_asked(tmp_path):
    where = tmp_path / "elsewhere" / "job.log"
    done = _run_job(tmp_path, "--log-file", str(where))
    assert done.returncode == 0, done.stderr
    assert str(where) in done.stderr.splitlines()[0] and "raw noise on fd 2" in where.read_text()
    assert not (tmp_path / "work" / "logs").exists()


def test_progress_off_a_terminal_prints_a_line_now_and_then_and_the_last_count():
    out = io.StringIO()
    with ProgressView(out, 3, unit="step", every_s=3600) as view:
        for step in (1, 2, 3, 2):  # never back
            view.update_to(step, loss="0.100")
    assert out.getvalue() == "      step 3/3, loss 0.100 (0 s)\n"  # the form benchmarks/runner.py matches

    out = io.StringIO()
    with ProgressView(out, None, unit="sample", label="eval dpn", every_s=0) as view:
        view.update_to(4, acc="0.250")
        view.update_to(8, acc="0.500")
    assert out.getvalue().splitlines() == [
        "      eval dpn: sample 4, acc 0.250 (0 s)",
        "      eval dpn: sample 8, acc 0.500 (0 s)",
    ]


def test_the_log_tail_shows_what_a_terminal_showed(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("first\n" + "".join(f"line {i}\n" for i in range(50)) + "bar 1%\rbar 50%\rbar 100%\n\n")
    assert log_tail(log, 3) == ["line 48", "line 49", "bar 100%"]


@pytest.mark.parametrize("command", ["train", "eval", "retrain"])
def test_the_jobs_take_verbose_and_log_file(command):
    from dpn_cli import _build_parser

    parser = _build_parser(command)
    args = parser.parse_args([command, "--config", "c.yaml"])
    assert (args.verbose, args.log_file) == (False, None)
    args = parser.parse_args([command, "--config", "c.yaml", "-v", "--log-file", "x.log"])
    assert (args.verbose, args.log_file) == (True, "x.log")
    assert parser.parse_args([command, "--config", "c.yaml", "--verbose"]).verbose


def test_train_logs_beside_its_checkpoints_or_in_its_work_dir(tmp_path):
    from jobs.training.config import load_train_config
    from jobs.training.job import log_folder

    local = load_train_config(TRAIN_TINY, [f"run.storage_path={tmp_path / 'runs'}", "run.name=exp"])
    assert log_folder(local) == tmp_path / "runs" / "exp"
    remote = load_train_config(
        TRAIN_TINY, ["run.storage_path=s3://bucket/runs", f"run.work_dir={tmp_path / 'w'}", "run.name=exp"]
    )
    assert log_folder(remote) == tmp_path / "w" / "exp"


def test_dpn_train_that_fails_shows_the_error_and_exits_1(tmp_path, capsys):
    """The real command, failing before it starts Ray (an unusable tracking URI)."""
    from dpn_cli import main

    code = main(["train", "--config", TRAIN_TINY, "mlflow.tracking_uri=bogus://nowhere",
                 f"run.storage_path={tmp_path / 'runs'}", f"run.work_dir={tmp_path / 'w'}", "run.name=t"])  # fmt: skip
    assert code == 1
    out, err = capsys.readouterr()
    [log] = (tmp_path / "runs" / "t" / "logs").glob("train-*.log")
    assert out == "" and "dpn train failed: " in err and "bogus://nowhere" in err and str(log) in err
    assert "Traceback" in log.read_text()


def test_console_arguments_have_one_help_line_each():
    from jobs.console import add_console_arguments

    parser = argparse.ArgumentParser()
    add_console_arguments(parser, "<dir>/logs/x-<time>.log")
    text = parser.format_help()
    assert "-v, --verbose" in text and "--log-file PATH" in text and "<dir>/logs/x-<time>.log" in text
