"""Models in MLflow: log a trained Hugging Face checkpoint as a registered model, resolve a model reference.

- :func:`log_hf_model`: the final model as an MLflow pyfunc model (:mod:`tracking.pyfunc_model`, logged as
  code) whose artifacts hold the Hugging Face checkpoint directory, registered as a new version of a
  registered model.
- :func:`resolve_model_dir`: the one resolver of a model reference (:class:`dpn_base.model_ref.ModelRef`: a
  preset, a local directory, ``runs:/``, ``models:/``, ``mlflow-artifacts:/``) -> local Hugging Face checkpoint
  directory (what training's ``model.init``, evaluation and serving load).

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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filelock
import mlflow
from mlflow.tracking import MlflowClient

from dpn_base.model_ref import HF_MODEL_DIR, ModelRef, RefKind, find_hf_dir, is_hf_dir
from dpn_base.redact import redact
from tracking.runs import setup_tracking, tracking_uri

HF_ARTIFACT = HF_MODEL_DIR  # key in the pyfunc model's artifacts: the Hugging Face checkpoint directory
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


def _cache_key(ref: ModelRef, uri: str) -> tuple[str, str]:
    """``(artifact URI to download, identity)`` of an MLflow reference.

    Aliases and versions resolve to a fixed version, so the cache never serves a moved alias, and the key
    names the run the version was made from too: a registry recreated at the same URI reuses version numbers.
    """
    if not ref.is_registry:
        return str(ref), str(ref)
    client = MlflowClient(uri)
    try:
        if ref.kind is RefKind.REGISTRY_ALIAS:
            found = client.get_model_version_by_alias(ref.name, ref.alias)
        else:
            found = client.get_model_version(ref.name, ref.version)
    except mlflow.exceptions.MlflowException as err:
        raise FileNotFoundError(
            f"model {str(ref)!r} not found in the registry at {redact(uri)}: {redact(str(err))}"
        ) from err
    key = str(ModelRef(RefKind.REGISTRY_VERSION, name=ref.name, version=str(found.version)))
    return key, f"{key}|{found.run_id}|{found.source}"


def _mlflow_ref(ref: str | os.PathLike | ModelRef) -> ModelRef:
    parsed = ModelRef.parse(ref)
    if not parsed.is_mlflow:
        raise ValueError(
            f"{str(parsed)!r} is a {parsed.kind.value} reference: only runs:/, models:/ and mlflow-artifacts:/ "
            "references are downloaded into the model cache"
        )
    return parsed


def model_cache_dir(uri: str | ModelRef, tracking: str | None = None, cache_dir: str | None = None) -> Path:
    """The cache folder of an MLflow reference (aliases resolved now), downloaded or not."""
    uri_in_effect = tracking_uri(tracking)
    return _cache_target(uri_in_effect, _cache_key(_mlflow_ref(uri), uri_in_effect)[1], cache_dir)


def _cache_target(uri: str, identity: str, cache_dir: str | None) -> Path:
    digest = hashlib.sha256(f"{uri}|{identity}".encode()).hexdigest()[:16]
    return (Path(cache_dir) if cache_dir else _cache_root()) / digest


def _download_once(ref: ModelRef, tracking: str | None, cache_dir: str | None) -> str:
    """The checkpoint directory of an MLflow reference, downloaded into the cache unless it is there."""
    uri_in_effect = tracking_uri(tracking)
    key, identity = _cache_key(ref, uri_in_effect)
    target = _cache_target(uri_in_effect, identity, cache_dir)

    def download(into: Path) -> None:
        logger.info("downloading %s to %s", key, target)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=key, dst_path=str(into), tracking_uri=uri_in_effect
            )
        except mlflow.exceptions.MlflowException as err:
            raise FileNotFoundError(
                f"could not download {redact(str(ref))!r} from {redact(uri_in_effect)}: {redact(str(err))}"
            ) from err

    fetch_once(target, download, identity)
    return str(find_hf_dir(target))


def _create_preset(
    ref: ModelRef, preset_dir: str | os.PathLike | None, seed: int, overrides: Mapping[str, Any]
) -> str:
    """A random model of the preset ``ref`` names, written to ``preset_dir`` unless a checkpoint is there already
    (every worker and every attempt of a job loads the same weights), or to a new temporary folder."""
    from dpn_model.presets import PRESETS, create_checkpoint

    name = ref.check_preset(PRESETS).name
    out = Path(preset_dir) if preset_dir else Path(tempfile.mkdtemp(prefix=f"dpn-preset-{name}-"))
    if not is_hf_dir(out):
        logger.info("creating a random %s model (seed %d) in %s", name, seed, out)
        create_checkpoint(name, str(out), seed=seed, **overrides)
    return str(out)


def resolve_model_dir(
    uri: str | os.PathLike | ModelRef,
    tracking: str | None = None,
    cache_dir: str | None = None,
    preset_dir: str | os.PathLike | None = None,
    preset_seed: int = 0,
    preset_overrides: Mapping[str, Any] | None = None,
) -> str:
    """Local Hugging Face checkpoint directory of a model reference: the one resolver of every kind.

    Args:
        uri: a :class:`~dpn_base.model_ref.ModelRef` or its text (parsed by ``ModelRef.parse``): ``preset:<name>``,
            a local directory (a checkpoint, an MLflow model folder, or a training checkpoint with
            ``hf_model/``), ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>``, ``models:/<name>/<version>``
            or ``mlflow-artifacts:/<path>``.
        tracking: tracking URI (default: :func:`tracking_uri`).
        cache_dir: where downloads go (default $DPN_MODEL_CACHE or ``~/.cache/dpn/models``); a model
            version or run artifact is downloaded once, atomically (:func:`fetch_once`), and reused.
        preset_dir: where a preset's random model is written (reused if it holds one; default: a new
            temporary folder).
        preset_seed, preset_overrides: the preset model's seed and ``DPNConfig`` overrides.

    Returns:
        Path of a directory holding ``config.json``, ``model.safetensors`` and the processor files.

    Raises:
        ValueError: a reference that does not parse, or an unknown preset (the message lists the accepted forms).
        FileNotFoundError: the reference names nothing loadable (the message says why).
    """
    ref = ModelRef.parse(uri)
    if ref.is_preset:
        return _create_preset(ref, preset_dir, preset_seed, preset_overrides or {})
    if ref.is_local:
        return ref.hf_dir()
    return _download_once(ref, tracking, cache_dir)


def load_model_and_processor_from_ref(
    ref: str | os.PathLike,
    device: str | None = None,
    dtype: Any = None,
    tracking: str | None = None,
) -> tuple[Any, Any]:
    """``(model, processor)`` of a model reference (any form :func:`resolve_model_dir` takes), resolved by it, then
    loaded by ``dpn_model.load_model_and_processor``.

    Args:
        ref: see :func:`resolve_model_dir`.
        device, dtype: see ``dpn_model.loading.load_model_and_processor`` (``auto``: GPU and bf16 when present).
        tracking: tracking URI for registry and run references.
    """
    from dpn_model.loading import load_model_and_processor

    return load_model_and_processor(resolve_model_dir(ref, tracking=tracking), device=device, dtype=dtype)


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
