"""Models in MLflow: log a trained Hugging Face checkpoint as a registered model, resolve a model reference.

- :func:`log_hf_model`: the final model as an MLflow pyfunc model (:mod:`tracking.pyfunc_model`, logged as
  code) whose artifacts hold the Hugging Face checkpoint directory, registered as a new version of a
  registered model.
- :func:`resolve_model_dir`: a local directory, ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>``
  or ``models:/<name>/<version>`` -> local Hugging Face checkpoint directory (what serving, evaluation
  and ``model.init`` load).

**The model cache** (``$DPN_MODEL_CACHE``, default ``~/.cache/dpn/models``; one folder per tracking store,
model version and source run) is shared by every process on the machine: the replicas of a Ray Serve app,
evaluation actors, a training driver. :func:`fetch_once` keeps it safe for them: a folder is downloaded into a
private temporary folder beside it (``<digest>.tmp-*``), marked complete (``.complete``, written last, after
the files are synced) and renamed into place; the rename is the commit, so a loader never sees a partial
model. The download happens under a file lock (``<digest>.lock``, ``filelock``: an OS lock the kernel
releases when its holder dies), so concurrent resolvers of one reference, threads or processes, download it
once: the others wait for the lock and find the complete folder. A complete folder is never deleted (another
process may be reading it); the temporary folder of a download that crashed is removed by the next resolver
of the same reference, under the lock, when nobody can be writing to it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import filelock
import mlflow
from mlflow.tracking import MlflowClient

from dpn_base.redact import redact
from tracking.runs import setup_tracking, tracking_uri

HF_ARTIFACT = "hf_model"  # key in the pyfunc model's artifacts: the Hugging Face checkpoint directory
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc model, logged as code (no pickle)
MODEL_ARTIFACT_PATH = "model"  # name of the logged MLflow model inside its run
_CACHE_ENV = "DPN_MODEL_CACHE"
_LOCK_TIMEOUT_ENV = "DPN_MODEL_CACHE_LOCK_TIMEOUT_S"  # how long a resolver waits for another's download
COMPLETE_MARKER = ".complete"  # written last into a cached folder: its presence means complete
TMP_INFIX = ".tmp-"  # <digest>.tmp-<random>: a download in progress (or an orphan of a crashed one)

logger = logging.getLogger(__name__)


def log_hf_model(
    run_id: str,
    hf_dir: str | Path,
    registered_model: str | None = "dpn",
    uri: str | None = None,
) -> str | None:
    """Log ``hf_dir`` (config.json, model.safetensors, processor files) as the run's MLflow model
    (``runs:/<run_id>/model``, artifacts under ``artifacts/hf_model``) and register it.

    Returns:
        The new registered model version (as a string), or None when ``registered_model`` is empty.
    """
    setup_tracking(uri)
    import mlflow.pyfunc
    import torch
    import transformers

    import dpn_model

    requirements = [
        f"torch=={torch.__version__.split('+')[0]}",
        f"transformers=={transformers.__version__}",
        f"mlflow=={mlflow.__version__}",
        "safetensors",
        "pillow",
    ]
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT_PATH,
            python_model=str(PYFUNC_CODE),  # "models from code": MLflow stores the file, never a pickle
            artifacts={HF_ARTIFACT: str(hf_dir)},
            pip_requirements=requirements,
            code_paths=[str(Path(dpn_model.__file__).parent)],
            registered_model_name=registered_model or None,
            await_registration_for=60,
        )
    version = getattr(info, "registered_model_version", None)
    if registered_model:
        logger.info("registered %s version %s from run %s", registered_model, version, run_id)
    return str(version) if version is not None else None


def _is_hf_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def _find_hf_dir(root: Path) -> Path:
    """The Hugging Face checkpoint inside a downloaded MLflow model or artifact folder."""
    for candidate in (root, root / "artifacts" / HF_ARTIFACT, root / HF_ARTIFACT):
        if _is_hf_dir(candidate):
            return candidate
    found = sorted(p.parent for p in root.rglob("config.json"))
    if found:
        return found[0]
    raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) under {root}")


def _cache_root() -> Path:
    return Path(os.environ.get(_CACHE_ENV, Path.home() / ".cache" / "dpn" / "models"))


def _fsync_dir(folder: str | Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    """fsync every file and folder under ``root``, so that the rename that commits it never outlives its data
    (after a power loss the folder is either absent or whole)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(folder)


def _remove_orphans(target: Path) -> None:
    """Delete the temporary folders of ``target`` (caller holds its lock, so their writers are dead), and set
    aside an incomplete ``target`` left by an older version of this code (never read: no marker)."""
    for orphan in target.parent.glob(f"{target.name}{TMP_INFIX}*"):
        logger.info("removing %s, left by a download that did not finish", orphan)
        shutil.rmtree(orphan, ignore_errors=True)
    if target.exists() and not (target / COMPLETE_MARKER).is_file():
        aside = target.with_name(f"{target.name}{TMP_INFIX}stale-{uuid.uuid4().hex[:8]}")
        os.rename(target, aside)
        shutil.rmtree(aside, ignore_errors=True)


def fetch_once(
    target: str | os.PathLike,
    download: Callable[[Path], None],
    identity: str = "",
    lock_timeout_s: float | None = None,
) -> bool:
    """Make ``target`` a complete cached folder, downloading it at most once across threads and processes.

    Args:
        target: the cache folder (its parent is created; ``<target>.lock`` and ``<target>.tmp-*`` live
            beside it).
        download: writes the folder's contents into the empty folder it is given; an exception aborts
            (nothing is committed, the temporary folder is removed).
        identity: what was downloaded (written into the completion marker, for a person looking).
        lock_timeout_s: how long to wait for another process's download (default
            ``$DPN_MODEL_CACHE_LOCK_TIMEOUT_S`` or 3600 s).

    Returns:
        True if this call downloaded, False if the folder was complete (already, or after waiting).

    Raises:
        TimeoutError: another process still holds the download lock after ``lock_timeout_s``.
    """
    target = Path(target)
    if (target / COMPLETE_MARKER).is_file():  # the rename is the commit: a marker means a whole folder
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get(_LOCK_TIMEOUT_ENV, 3600)) if lock_timeout_s is None else lock_timeout_s
    lock = filelock.FileLock(f"{target}.lock", timeout=timeout)
    try:
        with lock:
            if (target / COMPLETE_MARKER).is_file():  # another resolver finished while this one waited
                return False
            _remove_orphans(target)
            tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}{TMP_INFIX}", dir=target.parent))
            try:
                download(tmp)
                (tmp / COMPLETE_MARKER).write_text(identity + "\n")
                _sync_tree(tmp)
                os.rename(tmp, target)
                _fsync_dir(target.parent)  # the rename itself, durable
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            return True
    except filelock.Timeout as err:
        raise TimeoutError(
            f"waited {timeout:.0f} s for another process downloading into {target} (it holds {lock.lock_file}); "
            f"check that process, or set {_LOCK_TIMEOUT_ENV} to wait longer"
        ) from err


def _is_registry_ref(text: str) -> bool:
    return text.startswith(("runs:/", "models:/"))


def _cache_key(text: str, uri: str) -> tuple[str, str]:
    """``(artifact URI to download, identity)`` of a ``runs:/`` or ``models:/`` reference.

    Aliases and versions resolve to a fixed version, so the cache never serves a moved alias, and the key
    names the run the version was made from too: a registry recreated at the same URI reuses version numbers.
    """
    if not text.startswith("models:/"):
        return text, text
    client = MlflowClient(uri)
    ref = text[len("models:/") :].strip("/")
    name, _, rest = ref.partition("@") if "@" in ref else (ref.split("/")[0], "", "")
    try:
        if "@" in ref:
            found = client.get_model_version_by_alias(name, rest)
        else:
            parts = ref.split("/")
            if len(parts) != 2:
                raise ValueError(
                    f"model URI {text!r} must be models:/<name>@<alias> or models:/<name>/<version>"
                )
            found = client.get_model_version(name, parts[1])
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(
            f"model {text!r} not found in the registry at {redact(uri)}: {redact(str(err))}"
        ) from err
    key = f"models:/{name}/{found.version}"
    return key, f"{key}|{found.run_id}|{found.source}"


def model_cache_dir(uri: str, tracking: str | None = None, cache_dir: str | None = None) -> Path:
    """The cache folder of a ``runs:/`` or ``models:/`` reference (aliases resolved now), downloaded or not."""
    uri_in_effect = tracking_uri(tracking)
    return _cache_target(uri_in_effect, _cache_key(str(uri), uri_in_effect)[1], cache_dir)


def _cache_target(uri: str, identity: str, cache_dir: str | None) -> Path:
    digest = hashlib.sha256(f"{uri}|{identity}".encode()).hexdigest()[:16]
    return (Path(cache_dir) if cache_dir else _cache_root()) / digest


def resolve_model_dir(
    uri: str | os.PathLike, tracking: str | None = None, cache_dir: str | None = None
) -> str:
    """Local Hugging Face checkpoint directory of a model reference.

    Args:
        uri: a local directory (a checkpoint, an MLflow model folder, or a training checkpoint with
            ``hf_model/``), ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>`` or
            ``models:/<name>/<version>``.
        tracking: tracking URI (default: :func:`tracking_uri`).
        cache_dir: where downloads go (default $DPN_MODEL_CACHE or ``~/.cache/dpn/models``); a model
            version or run artifact is downloaded once, atomically (:func:`fetch_once`), and reused.

    Returns:
        Path of a directory holding ``config.json``, ``model.safetensors`` and the processor files.

    Raises:
        FileNotFoundError / ValueError: the reference names nothing loadable (the message says why).
    """
    text = str(uri)
    if not _is_registry_ref(text) and ("://" not in text or text.startswith("file://")):
        path = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {text!r} not found: give a checkpoint directory, runs:/<run_id>/model, "
                "models:/<name>@<alias> or models:/<name>/<version>"
            )
        return str(_find_hf_dir(path))
    if not _is_registry_ref(text):
        raise ValueError(
            f"unsupported model URI {redact(text)!r}: use a local directory, runs:/... or models:/..."
        )
    uri_in_effect = tracking_uri(tracking)
    key, identity = _cache_key(text, uri_in_effect)
    target = _cache_target(uri_in_effect, identity, cache_dir)

    def download(into: Path) -> None:
        logger.info("downloading %s to %s", key, target)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=key, dst_path=str(into), tracking_uri=uri_in_effect
            )
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(
                f"could not download {text!r} from {redact(uri_in_effect)}: {redact(str(err))}"
            ) from err

    fetch_once(target, download, identity)
    return str(_find_hf_dir(target))


def load_model_and_processor_from_ref(
    ref: str | os.PathLike,
    device: str | None = None,
    dtype: Any = None,
    tracking: str | None = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` of a model reference: a local checkpoint, ``runs:/``, ``models:/`` or an MLflow model
    folder, resolved by :func:`resolve_model_dir`, then loaded by ``dpn_model.load_model_and_processor``.

    Args:
        ref: see :func:`resolve_model_dir`.
        device, dtype: see ``dpn_model.loading.load_model_and_processor`` (``auto``: GPU and bf16 when present).
        tracking: tracking URI for registry and run references.
    """
    from dpn_model.loading import load_model_and_processor

    path = os.path.expanduser(os.fspath(ref))
    if not _is_hf_dir(Path(path)):
        path = resolve_model_dir(ref, tracking=tracking)
    return load_model_and_processor(path, device=device, dtype=dtype)


__all__ = [
    "COMPLETE_MARKER",
    "HF_ARTIFACT",
    "MODEL_ARTIFACT_PATH",
    "fetch_once",
    "load_model_and_processor_from_ref",
    "log_hf_model",
    "model_cache_dir",
    "resolve_model_dir",
]
