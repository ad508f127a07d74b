"""Runs the real jobs for the quality benchmarks: one process per job, as ``ray job submit`` would, resumable.

``benchmarks/headroom.py`` and ``benchmarks/quality.py`` train every variant with ``python -m jobs.train`` and
evaluate it with ``python -m jobs.evaluate`` on the dev and the test (``eval``) split; this module holds what
they share: running a job with its log, the training of one (variant, seed), one evaluation pass per split,
and a state file that records every finished run, so a long benchmark interrupted halfway resumes where it
stopped (``--resume``) instead of training everything again.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CONFIG = "configs/train_tiny.yaml"
PROGRESS = re.compile(r"step[ =]\d+|Error|error:|finished|model_uri=|accuracy")

logger = logging.getLogger("benchmarks")


def run_job(cmd: list[str], log_path: Path) -> str:
    """Run a job in its own process, its output in ``log_path`` (progress lines echoed); its output, or a
    RuntimeError with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("$ %s  (log: %s)", shlex.join(cmd), log_path)
    start, lines = time.time(), []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env
        ) as proc,
    ):
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line)
            if PROGRESS.search(line):
                sys.stderr.write(line)
        code = proc.wait()
    if code != 0:
        tail = "".join(lines[-40:])
        raise RuntimeError(
            f"{cmd[2]} failed (exit {code}) after {time.time() - start:.0f} s; log {log_path}\n{tail}"
        )
    logger.info("done in %.0f s", time.time() - start)
    return "".join(lines)


class State:
    """The finished runs of one benchmark directory (``state.json``), so that ``--resume`` skips them."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def train(
    name: str, seed: int, overrides: Sequence[str], run_dir: Path, data: str, experiment: str, state: State
) -> dict[str, Any]:
    """Train variant ``name`` with ``seed`` (``configs/train_tiny.yaml`` plus ``overrides``); its model dir and
    the training's wall time. A run finished before (the state file) is returned as it was."""
    key = f"train/{name}/{seed}"
    if state.get(key):
        return state.get(key)
    run_name = f"{run_dir.name}-{name}-s{seed}"
    cmd = [sys.executable, "-m", "jobs.train", "--config", CONFIG, *overrides, f"model.seed={seed}",
           f"run.name={run_name}", f"run.work_dir={run_dir / 'work'}", f"data.path={data}",
           f"mlflow.experiment={experiment}", f"mlflow.registered_model={experiment}-{name}"]  # fmt: skip
    start = time.time()
    out = run_job(cmd, run_dir / "logs" / f"train-{name}-s{seed}.log")
    fields = dict(re.findall(r"^(run_id|model_uri|steps|seconds|model_dir)=(.*)$", out, flags=re.M))
    if "model_dir" not in fields:
        raise RuntimeError(f"jobs.train printed no model_dir for {name} seed {seed}")
    result = {
        "name": name,
        "seed": seed,
        "overrides": list(overrides),
        "wall_s": time.time() - start,
        **fields,
    }
    state.put(key, result)
    return result


def evaluate(
    models: Mapping[str, tuple[str, Sequence[str]]], split: str, tag: str, run_dir: Path, data: str,
    experiment: str, state: State, batch_size: int = 32,
) -> list[dict[str, Any]]:  # fmt: skip
    """One ``jobs.evaluate`` pass over ``split`` for ``models`` (label -> (model dir, compressions)); the
    per-sample prediction records. A pass finished before is read back from its predictions file."""
    key = f"eval/{tag}/{split}"
    out_dir = run_dir / "eval" / f"{tag}-{split}"
    if not state.get(key):
        cmd = [sys.executable, "-m", "jobs.evaluate", "--data", data, "--split", split,
               "--output-dir", str(out_dir), "--experiment", experiment, "--run-name", f"{run_dir.name}-{tag}-{split}",
               "--batch-size", str(batch_size), "--max-new-tokens", "4"]  # fmt: skip
        for label, (model_dir, compressions) in models.items():
            cmd += ["--model", f"{label}={model_dir}", "--compression", f"{label}={','.join(compressions)}"]
        run_job(cmd, run_dir / "logs" / f"eval-{tag}-{split}.log")
        state.put(key, str(out_dir / "predictions.jsonl"))
    with open(state.get(key)) as f:
        return [json.loads(line) for line in f]


def machine() -> str:
    """The machine the figures come from, as BENCHMARKS.md states it beside every number."""
    import torch

    where = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(0)
    )
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}"
