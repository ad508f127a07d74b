"""Models in MLflow: log a trained Hugging Face checkpoint as a registered model, resolve a model reference.

- :func:`log_hf_model`: the final model as an MLflow pyfunc model (:mod:`tracking.pyfunc_model`, logged as
  code) whose artifacts hold the Hugging Face checkpoint directory, registered as a new version of a
  registered model.
- :func:`resolve_model_dir`: a local directory, ``runs:/<run_id>/<path>``, ``models:/<name>@<alias>``
  or ``models:/<name>/<version>`` -> local Hugging Face checkpoint directory (what serving, evaluation
  and ``model.init`` load).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from tracking.runs import setup_tracking, tracking_uri

HF_ARTIFACT = "hf_model"  # key in the pyfunc model's artifacts: the Hugging Face checkpoint directory
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # the pyfunc model, logged as code (no pickle)
MODEL_ARTIFACT_PATH = "model"  # name of the logged MLflow model inside its run
_CACHE_ENV = "DPN_MODEL_CACHE"

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
            version or run artifact is downloaded once and reused.

    Returns:
        Path of a directory holding ``config.json``, ``model.safetensors`` and the processor files.

    Raises:
        FileNotFoundError / ValueError: the reference names nothing loadable (the message says why).
    """
    text = str(uri)
    if not text.startswith(("runs:/", "models:/")) and ("://" not in text or text.startswith("file://")):
        path = Path(text[len("file://") :] if text.startswith("file://") else text).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {text!r} not found: give a checkpoint directory, runs:/<run_id>/model, "
                "models:/<name>@<alias> or models:/<name>/<version>"
            )
        return str(_find_hf_dir(path))
    if not (text.startswith("runs:/") or text.startswith("models:/")):
        raise ValueError(f"unsupported model URI {text!r}: use a local directory, runs:/... or models:/...")
    uri_in_effect = tracking_uri(tracking)
    client = MlflowClient(uri_in_effect)
    key = identity = text
    if text.startswith("models:/"):
        # Resolve aliases / versions to a fixed version, so the cache never serves a moved alias, and key it by
        # the run the version was made from too: a registry recreated at the same URI reuses version numbers.
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
                f"model {text!r} not found in the registry at {uri_in_effect}: {err}"
            ) from err
        key = f"models:/{name}/{found.version}"
        identity = f"{key}|{found.run_id}|{found.source}"
    digest = hashlib.sha256(f"{uri_in_effect}|{identity}".encode()).hexdigest()[:16]
    target = (Path(cache_dir) if cache_dir else _cache_root()) / digest
    done = target / ".complete"
    if not done.exists():
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        logger.info("downloading %s to %s", key, target)
        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=key, dst_path=str(target), tracking_uri=uri_in_effect
            )
        except mlflow.exceptions.MlflowException as err:
            shutil.rmtree(target, ignore_errors=True)
            raise FileNotFoundError(f"could not download {text!r} from {uri_in_effect}: {err}") from err
        done.write_text(identity + "\n")
    return str(_find_hf_dir(target))


def load_model_and_processor(
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
    from dpn_model.loading import load_model_and_processor as load_local

    path = os.path.expanduser(os.fspath(ref))
    if not _is_hf_dir(Path(path)):
        path = resolve_model_dir(ref, tracking=tracking)
    return load_local(path, device=device, dtype=dtype)


__all__ = [
    "HF_ARTIFACT",
    "MODEL_ARTIFACT_PATH",
    "load_model_and_processor",
    "log_hf_model",
    "resolve_model_dir",
]
