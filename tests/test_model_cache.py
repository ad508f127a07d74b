"""The model cache (tracking.models.fetch_once / resolve_model_dir): atomic, downloaded once, crash-safe. No Ray.

Resolvers of one reference race as threads and as processes (multiprocessing spawn, as separate replicas would):
one download, every resolver gets the whole model. A resolver killed with SIGKILL in the middle of its download
leaves nothing a loader could mistake for a model, and the next resolver cleans its temporary folder.
The download of the "slow" cases copies a real checkpoint file by file with a pause in the middle of each file,
so that the race window is seconds wide, not the milliseconds of a local copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_tracking import mlflow_uri, tiny_model_dir  # noqa: F401 - the tracking tests' fixtures

import tracking
from tracking.models import COMPLETE_MARKER, TMP_INFIX, fetch_once, model_cache_dir

SPAWN = multiprocessing.get_context("spawn")


def _slow_copy(source: str, counter: str, pause_s: float, hang: str | None = None) -> Callable[[Path], None]:
    """A download: appends a line to ``counter``, then copies ``source``'s files, each in two halves with a pause
    between (with ``hang``: touches that file after the first half of the first file and sleeps for good)."""

    def download(into: Path) -> None:
        with open(counter, "a") as out:
            out.write(f"{os.getpid()}\n")
        for path in sorted(Path(source).iterdir(), key=lambda p: p.name != "model.safetensors"):
            data = path.read_bytes()
            with open(into / path.name, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                if hang:
                    Path(hang).touch()
                    time.sleep(600)
                time.sleep(pause_s)
                out.write(data[len(data) // 2 :])

    return download


def _digests(folder: str | Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in Path(folder).iterdir()
        if p.is_file() and p.name != COMPLETE_MARKER
    }


def _check_complete(folder: str | Path, source: str | Path) -> None:
    """The folder is the whole model: every file byte-identical, the weights parse, the config reads."""
    import safetensors.numpy

    assert _digests(folder) == _digests(source)
    assert safetensors.numpy.load_file(str(Path(folder) / "model.safetensors"))
    json.loads((Path(folder) / "config.json").read_text())


def _downloads(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f"{target.name}{TMP_INFIX}*"))


# ----------------------------------------------------------------------------------------------
# Children (spawned: these functions are imported by name in a fresh interpreter)
# ----------------------------------------------------------------------------------------------


def _child_fetch(target: str, source: str, counter: str, barrier, results) -> None:
    barrier.wait()
    downloaded = fetch_once(target, _slow_copy(source, counter, pause_s=0.5))
    _check_complete(target, source)
    results.put(("ok", downloaded))


def _child_resolve(ref: str, barrier, results) -> None:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("tracking.models").addHandler(handler)
    logging.getLogger("tracking.models").setLevel(logging.INFO)
    barrier.wait()
    path = tracking.resolve_model_dir(ref)
    results.put((path, sum(message.startswith("downloading ") for message in seen)))


def _child_hang(target: str, source: str, counter: str, started: str) -> None:
    fetch_once(target, _slow_copy(source, counter, pause_s=0, hang=started))


def _run_children(target: Callable, args: list[tuple], timeout_s: float = 180) -> list:
    """Start one spawned process per ``args`` (a barrier and a result queue are appended), collect the results."""
    barrier, results = SPAWN.Barrier(len(args)), SPAWN.Queue()
    children = [SPAWN.Process(target=target, args=(*a, barrier, results)) for a in args]
    for child in children:
        child.start()
    try:
        out = [results.get(timeout=timeout_s) for _ in children]
    finally:
        for child in children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
    assert [c.exitcode for c in children] == [0] * len(children)
    return out


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_two_threads_resolving_one_folder_download_it_once(tmp_path, tiny_model_dir):  # noqa: F811
    target, counter = tmp_path / "cache" / "abc", tmp_path / "downloads"
    barrier = threading.Barrier(2)
    results: list[bool] = []
    errors: list[BaseException] = []

    def resolve() -> None:
        try:
            barrier.wait()
            results.append(fetch_once(target, _slow_copy(tiny_model_dir, str(counter), pause_s=0.3)))
        except BaseException as err:  # re-raised below, in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=resolve) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(results) == [False, True] and _downloads(counter) == 1
    _check_complete(target, tiny_model_dir)
    assert _leftovers(target) == []


@pytest.mark.slow  # spawned interpreters import MLflow: tens of seconds on 2 cores
def test_two_processes_resolving_one_folder_download_it_once(tmp_path, tiny_model_dir):  # noqa: F811
    target, counter = tmp_path / "cache" / "abc", tmp_path / "downloads"
    args = [(str(target), tiny_model_dir, str(counter))] * 2
    results = _run_children(_child_fetch, args)
    assert sorted(downloaded for _, downloaded in results) == [False, True]
    assert _downloads(counter) == 1
    _check_complete(target, tiny_model_dir)
    assert _leftovers(target) == []


@pytest.fixture(scope="module")
def registered(mlflow_uri, tiny_model_dir):  # noqa: F811
    """``models:/dpn-cache@champion``: the tiny model, registered once for this module."""
    run_id, _ = tracking.start_or_resume_run("exp", "job-cache")
    assert tracking.log_hf_model(run_id, tiny_model_dir, registered_model="dpn-cache") == "1"
    tracking.end_run(run_id)
    MlflowClient(mlflow_uri).set_registered_model_alias("dpn-cache", "champion", "1")
    return "models:/dpn-cache@champion"


def _loads_like(path: str, reference_dir: str) -> None:
    import torch

    from dpn_model import DPNForConditionalGeneration

    reference = DPNForConditionalGeneration.from_pretrained(reference_dir)
    loaded = DPNForConditionalGeneration.from_pretrained(path)
    for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_threads_resolving_a_registry_ref_download_it_once(registered, tiny_model_dir, tmp_path, caplog):  # noqa: F811
    cache = str(tmp_path / "cache")
    barrier = threading.Barrier(3)
    paths: list[str] = []

    def resolve() -> None:
        barrier.wait()
        paths.append(tracking.resolve_model_dir(registered, cache_dir=cache))

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="tracking.models"):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert len(paths) == 3 and len(set(paths)) == 1
    assert sum(r.getMessage().startswith("downloading ") for r in caplog.records) == 1
    _loads_like(paths[0], tiny_model_dir)


@pytest.mark.slow  # spawned interpreters import MLflow: tens of seconds on 2 cores
def test_processes_resolving_a_registry_ref_download_it_once(registered, tiny_model_dir):  # noqa: F811
    results = _run_children(_child_resolve, [(registered,)] * 2)
    paths = {path for path, _ in results}
    assert len(paths) == 1 and sum(n for _, n in results) == 1
    assert tracking.resolve_model_dir(registered) in paths
    _loads_like(paths.pop(), tiny_model_dir)


@pytest.mark.slow  # spawned interpreters import MLflow: tens of seconds on 2 cores
def test_a_resolver_killed_mid_download_leaves_no_partial_model(registered, tiny_model_dir, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    target = model_cache_dir(registered, cache_dir=str(cache))
    started, counter = tmp_path / "started", tmp_path / "downloads"
    child = SPAWN.Process(target=_child_hang, args=(str(target), tiny_model_dir, str(counter), str(started)))
    child.start()
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # half of model.safetensors is on disk now
            assert child.is_alive() and time.monotonic() < deadline, "the child never started its download"
            time.sleep(0.1)
        assert not target.exists()  # what a loader looks at: nothing until the download is whole
        assert len(_leftovers(target)) == 1
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL
    assert not target.exists() and len(_leftovers(target)) == 1  # the orphan of the crash

    path = tracking.resolve_model_dir(registered, cache_dir=str(cache))  # takes the lock the kernel released
    assert Path(path).is_relative_to(target) and (target / COMPLETE_MARKER).is_file()
    assert _leftovers(target) == []
    _loads_like(path, tiny_model_dir)


def test_a_failed_download_commits_nothing_and_the_next_resolver_succeeds(tmp_path, tiny_model_dir):  # noqa: F811
    target, counter = tmp_path / "cache" / "abc", tmp_path / "downloads"

    def broken(into: Path) -> None:
        (into / "model.safetensors").write_bytes(b"partial")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        fetch_once(target, broken)
    assert not target.exists() and _leftovers(target) == []
    assert fetch_once(target, _slow_copy(tiny_model_dir, str(counter), pause_s=0)) is True
    _check_complete(target, tiny_model_dir)


def test_a_complete_folder_is_reused_untouched_and_an_old_incomplete_one_replaced(tmp_path, tiny_model_dir):  # noqa: F811
    target, counter = tmp_path / "cache" / "abc", tmp_path / "downloads"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"cut")  # left by the old in-place download: no marker
    assert fetch_once(target, _slow_copy(tiny_model_dir, str(counter), pause_s=0)) is True
    _check_complete(target, tiny_model_dir)
    inode = (target / "model.safetensors").stat().st_ino
    assert fetch_once(target, _slow_copy(tiny_model_dir, str(counter), pause_s=0)) is False
    assert (target / "model.safetensors").stat().st_ino == inode and _downloads(counter) == 1
    assert _leftovers(target) == []


def test_a_resolver_waits_for_the_lock_no_longer_than_told(tmp_path):
    import filelock

    target = tmp_path / "cache" / "abc"
    target.parent.mkdir(parents=True)
    with (
        filelock.FileLock(f"{target}.lock"),
        pytest.raises(TimeoutError, match="another process downloading"),
    ):
        fetch_once(target, lambda into: None, lock_timeout_s=0.2)
