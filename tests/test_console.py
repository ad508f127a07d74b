"""Every command's clean console (dpn_base/console.py; the jobs' in jobs/console.py, `dpn serve`'s, `dpn stack`'s
installer): stages, progress and results on the console, the rest in a log.

A stand-in job (a script run in its own process, since the console works on file descriptors 1 and 2) writes
what Ray, DeepSpeed and MLflow write: to the descriptors directly, with print, through library loggers and as
warnings; then the job's own stage, warning and progress. No Ray, no server.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpn_base.console import log_tail
from jobs.console import ProgressView

REPO = Path(__file__).resolve().parents[1]
TRAIN_TINY = str(REPO / "configs" / "train_tiny.yaml")

JOB = textwrap.dedent(
    """
    import argparse, logging, os, sys, warnings

    from dpn_base.console import active_console, add_console_arguments
    from jobs.console import JobFailed, ProgressView, job_console

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
    from dpn_base.console import add_console_arguments

    parser = argparse.ArgumentParser()
    add_console_arguments(parser, "<dir>/logs/x-<time>.log")
    text = parser.format_help()
    assert "-v, --verbose" in text and "--log-file PATH" in text and "<dir>/logs/x-<time>.log" in text


# ----------------------------------------------------------------------------------------------
# `dpn serve` and `dpn stack`
# ----------------------------------------------------------------------------------------------


def test_serve_takes_verbose_and_log_file(capsys):
    from dpn_cli import _build_parser

    parser = _build_parser("serve")
    args = parser.parse_args(["serve", "--model", "m"])
    assert (args.verbose, args.log_file) == (False, None)
    args = parser.parse_args(["serve", "--model", "m", "-v", "--log-file", "x.log"])
    assert (args.verbose, args.log_file) == (True, "x.log")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    assert "-v, --verbose" in text and "--log-file PATH" in text and "serve-<time>.log" in text


def test_serve_shows_its_stages_and_logs_what_ray_serve_says(tmp_path, capsys):
    """`dpn serve`'s console in this process (no Ray): its own stage reaches the console, a library's record, a
    detail of ours below the echo level and raw output on the descriptors go to the log only.

    The library logger is one that propagates to the root (not Ray's: once imported, as earlier tests do, it has
    its own handler on the sys.stderr of that time, which under pytest is a capture, not file descriptor 2)."""
    from serve_apps.commands import _serve_console

    log = tmp_path / "logs" / "serve.log"
    with _serve_console(argparse.Namespace(verbose=False, log_file=str(log))):
        logging.getLogger("urllib3.connectionpool").info("library noise: starting a new connection")
        logging.getLogger("dpn_model.loading").info("model detail noise")
        os.write(2, b"raw noise on fd 2\n")
        logging.getLogger("serve_apps.commands").info("deploying the app dpn (model m) ...")
    console = capsys.readouterr().err
    assert str(log) in console.splitlines()[0]  # the log's path first
    assert (
        "deploying the app dpn (model m) ..." in console and f"dpn serve stopped; its log: {log}" in console
    )
    assert "noise" not in console
    text = log.read_text()
    assert "library noise: starting a new connection" in text and "model detail noise" in text
    assert "raw noise on fd 2" in text and "deploying the app dpn" in text

    with _serve_console(argparse.Namespace(verbose=True, log_file=str(tmp_path / "v.log"))):
        logging.getLogger("serve_apps.commands").warning("verbose: as without a console")
    assert not (tmp_path / "v.log").exists()


def test_serve_that_fails_shows_the_log_tail_and_exits_1(tmp_path, capsys):
    from serve_apps.commands import _serve_console

    log = tmp_path / "serve.log"
    args = argparse.Namespace(verbose=False, log_file=str(log))
    with pytest.raises(SystemExit) as exited, _serve_console(args):
        os.write(
            2, b"(ServeReplica:dpn) replica dpn#1 died: out of memory\n"
        )  # what Ray forwards to the driver
        raise RuntimeError("the app did not become healthy")
    assert exited.value.code == 1
    console = capsys.readouterr().err
    assert "  | " in console and "replica dpn#1 died: out of memory" in console  # the log's last lines
    assert "dpn serve failed: RuntimeError: the app did not become healthy" in console
    assert f"traceback included: {log}" in console and "dpn serve stopped" not in console
    assert "Traceback (most recent call last)" in log.read_text()


@pytest.mark.parametrize("code", [0, 1])
def test_stack_install_output_goes_to_its_log(tmp_path, capsys, code):
    """`dpn stack up`'s installer (a stand-in script here): apt-get and pip in STATE/logs/install.log, the
    console a status line; a failure says why, from the log's end."""
    from jobs.stack import _script

    stack = _script()
    script = tmp_path / "install.sh"
    script.write_text(f"echo 'Reading package lists... noise'\necho 'pip resolver noise' >&2\n"
                      f"echo 'install.sh: prometheus missing; run as root'\nexit {code}\n")  # fmt: skip
    layout = stack.Layout(tmp_path / "state")
    if code:
        with pytest.raises(stack.StackError, match="prometheus missing; run as root") as failed:
            stack.run_install(layout, script=script)
        assert str(layout.log("install")) in str(failed.value)
    else:
        stack.run_install(layout, script=script)
    out = capsys.readouterr().out
    assert str(layout.log("install")) in out and "noise" not in out
    assert ("install: done" in out) == (code == 0)
    text = layout.log("install").read_text()
    assert "Reading package lists... noise" in text and "pip resolver noise" in text
