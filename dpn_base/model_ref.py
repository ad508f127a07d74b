"""A model reference, parsed once: what training's ``model.init``, ``dpn eval --model`` and serving's ``model`` name.

One text names the model every stage loads, and every stage must read it the same way, so the forms are spelled
here and nowhere else (``tests/test_layout.py`` fails on a scheme test outside this module):

- ``preset:<name>`` (``preset``): random weights of a ``dpn_model.presets`` preset;
- ``<dir>``, ``~/<dir>`` or ``file://<dir>`` (``local``): a Hugging Face checkpoint, an MLflow model folder or a
  training checkpoint (``hf_model/`` inside);
- ``runs:/<run_id>/<path>`` (``run``): an artifact of an MLflow run;
- ``models:/<name>@<alias>`` (``registry-alias``): the version an alias points at when it is resolved;
- ``models:/<name>/<version>`` (``registry-version``): one registered model version;
- ``mlflow-artifacts:/<path>`` (``mlflow-artifacts``): an artifact behind an MLflow server's artifact proxy (the
  tracking URI must then be that ``http(s)://`` server, as MLflow requires).

:meth:`ModelRef.parse` turns text into a :class:`ModelRef` or raises one ``ValueError`` that names the reference
(credentials masked, :func:`dpn_base.redact.redact`) and lists these forms; ``str(ref)`` gives the canonical text
back (``parse(str(ref)) == ref``). Parsing looks at no file and no server.

Resolving a reference to a local checkpoint directory needs the layers above this one (presets are built by
``dpn_model``, MLflow references downloaded by ``tracking``), so it lives in
:func:`tracking.models.resolve_model_dir`, the one resolver; the local part, which needs neither, is here
(:meth:`ModelRef.hf_dir`, :func:`find_hf_dir`), so that serving a local directory imports no MLflow.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dpn_base.redact import redact

# the folder of the Hugging Face checkpoint inside an MLflow model's artifacts and inside a training checkpoint
HF_MODEL_DIR = "hf_model"
ACCEPTED_FORMS = (
    "preset:<name>, a local directory (or file://<dir>), runs:/<run_id>/<path>, models:/<name>@<alias>, "
    "models:/<name>/<version> or mlflow-artifacts:/<path>"
)
_PRESET, _FILE, _RUNS, _MODELS, _ARTIFACTS = "preset:", "file://", "runs:/", "models:/", "mlflow-artifacts:"
_SCHEME = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]+):/")  # two letters or more: "C:/x" is a path
_KNOWN_SCHEMES = ("preset", "runs", "models", "mlflow-artifacts")
_PRESET_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*")
_ALIAS = re.compile(r"[\w\-]+")  # what MLflow allows in an alias
_SHOWN_CHARS = 200  # of a bad reference, in an error message


class RefKind(str, Enum):
    """What a :class:`ModelRef` names (the value is its name in messages and logs)."""

    PRESET = "preset"
    LOCAL = "local"
    RUN = "run"
    REGISTRY_ALIAS = "registry-alias"
    REGISTRY_VERSION = "registry-version"
    MLFLOW_ARTIFACTS = "mlflow-artifacts"


_MLFLOW_KINDS = frozenset(
    {RefKind.RUN, RefKind.REGISTRY_ALIAS, RefKind.REGISTRY_VERSION, RefKind.MLFLOW_ARTIFACTS}
)


def _shown(text: str) -> str:
    """``text`` as an error message may show it: credentials masked, at most :data:`_SHOWN_CHARS` characters."""
    text = redact(text)
    return repr(text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "...")


def _bad(text: str, problem: str, what: str = "bad model reference") -> ValueError:
    """The one error of :meth:`ModelRef.parse`: ``<what> '<text>': <problem>; a model reference is one of: ...``."""
    return ValueError(f"{what} {_shown(text)}: {problem}; a model reference is one of: {ACCEPTED_FORMS}")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference (build one with :meth:`parse`; the fields a kind does not use are empty).

    Attributes:
        kind: what it names.
        name: the preset (``preset``) or the registered model (``registry-*``).
        path: the directory as written (``local``: ``~`` not expanded), the artifact path inside the run
            (``run``), or everything after ``mlflow-artifacts:`` (``/<path>`` or ``//<host>/<path>``).
        run_id: the MLflow run (``run``).
        alias: the registry alias (``registry-alias``).
        version: the registered model version, digits (``registry-version``).
    """

    kind: RefKind
    name: str = ""
    path: str = ""
    run_id: str = ""
    alias: str = ""
    version: str = ""

    @classmethod
    def parse(cls, text: str | os.PathLike[str] | ModelRef) -> ModelRef:
        """The reference ``text`` names (surrounding whitespace ignored; a ``ModelRef`` is returned as it is).

        Raises:
            ValueError: empty text, a control character, a known scheme in a wrong form (``models:/`` without a
                name, ``runs:/<id>`` without a path, ...), or a URI of another scheme (``s3://``, ``hf://``):
                the message names the reference (credentials masked) and lists the accepted forms.
        """
        if isinstance(text, ModelRef):
            return text
        text = os.fspath(text).strip()
        if not text:
            raise _bad(text, "it is empty")
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise _bad(text, "it holds a control character")
        if text.startswith(_PRESET):
            return cls._parse_preset(text)
        if text.startswith(_FILE):
            return cls._parse_file(text)
        if text.startswith(_RUNS):
            return cls._parse_run(text)
        if text.startswith(_MODELS):
            return cls._parse_registry(text)
        if text.startswith(_ARTIFACTS + "/"):
            if not text[len(_ARTIFACTS) :].strip("/"):
                raise _bad(text, "mlflow-artifacts:/ needs an artifact path")
            return cls(RefKind.MLFLOW_ARTIFACTS, path=text[len(_ARTIFACTS) :])
        head, colon, _ = text.partition(":")
        if colon and head in _KNOWN_SCHEMES:  # "models:dpn@champion", "runs:abc"
            raise _bad(text, f"a {head} reference starts with {head}:/")
        scheme = _SCHEME.match(text)
        if scheme:
            where = f"{scheme.group('scheme')} is no store a model loads from"
            raise _bad(
                text, f"{where} (copy it to a local directory or log it to MLflow)", "unsupported model URI"
            )
        return cls(RefKind.LOCAL, path=text)

    @classmethod
    def _parse_file(cls, text: str) -> ModelRef:
        path = text[len(_FILE) :].strip()
        # the directory must read as one when written plainly, so that str() of the reference parses back to it
        local = cls(RefKind.LOCAL, path=path)
        try:
            plain = bool(path) and not path.startswith(_FILE) and cls.parse(path) == local
        except ValueError:
            plain = False
        if not plain:
            raise _bad(text, "file:// needs a directory, e.g. file:///abs/dir")
        return local

    @classmethod
    def _parse_preset(cls, text: str) -> ModelRef:
        name = text[len(_PRESET) :].strip()
        if not _PRESET_NAME.fullmatch(name):
            raise _bad(text, "a preset reference is preset:<name>, e.g. preset:tiny")
        return cls(RefKind.PRESET, name=name)

    @classmethod
    def _parse_run(cls, text: str) -> ModelRef:
        run_id, _, path = text[len(_RUNS) :].partition("/")
        path = path.strip("/")
        if not run_id or not path or any(c.isspace() for c in run_id):
            raise _bad(text, "a run reference is runs:/<run_id>/<path>, e.g. runs:/<run_id>/model")
        return cls(RefKind.RUN, run_id=run_id, path=path)

    @classmethod
    def _parse_registry(cls, text: str) -> ModelRef:
        rest = text[len(_MODELS) :].rstrip("/")
        if "@" in rest:
            name, _, alias = rest.partition("@")
            if _is_name(name) and _ALIAS.fullmatch(alias):
                return cls(RefKind.REGISTRY_ALIAS, name=name, alias=alias)
        else:
            name, _, version = rest.partition("/")
            if _is_name(name) and version.isascii() and version.isdigit():
                return cls(RefKind.REGISTRY_VERSION, name=name, version=version.lstrip("0") or "0")
        raise _bad(text, "a registry reference is models:/<name>@<alias> or models:/<name>/<version>")

    def __str__(self) -> str:
        """The canonical text: :meth:`parse` of it gives this reference back."""
        if self.kind is RefKind.PRESET:
            return f"{_PRESET}{self.name}"
        if self.kind is RefKind.RUN:
            return f"{_RUNS}{self.run_id}/{self.path}"
        if self.kind is RefKind.REGISTRY_ALIAS:
            return f"{_MODELS}{self.name}@{self.alias}"
        if self.kind is RefKind.REGISTRY_VERSION:
            return f"{_MODELS}{self.name}/{self.version}"
        if self.kind is RefKind.MLFLOW_ARTIFACTS:
            return f"{_ARTIFACTS}{self.path}"
        return self.path

    @property
    def is_preset(self) -> bool:
        return self.kind is RefKind.PRESET

    @property
    def is_local(self) -> bool:
        return self.kind is RefKind.LOCAL

    @property
    def is_mlflow(self) -> bool:
        """Whether MLflow resolves it (a run artifact, a registry version or alias, an artifact URI)."""
        return self.kind in _MLFLOW_KINDS

    @property
    def is_registry(self) -> bool:
        return self.kind in (RefKind.REGISTRY_ALIAS, RefKind.REGISTRY_VERSION)

    @property
    def preset_name(self) -> str | None:
        """The preset's name (``preset:tiny`` -> ``"tiny"``); None for any other kind."""
        return self.name if self.is_preset else None

    @property
    def local_path(self) -> Path | None:
        """The directory of a local reference, ``~`` expanded; None for any other kind."""
        return Path(self.path).expanduser() if self.is_local else None

    def check_preset(self, known: Collection[str]) -> ModelRef:
        """This reference, if it is not a preset or names one of ``known`` (``dpn_model.presets.PRESETS``).

        Raises:
            ValueError: a preset not in ``known``, naming those that are.
        """
        if self.is_preset and self.name not in known:
            raise ValueError(f"unknown preset {self.name!r} in {str(self)!r}; choose one of {sorted(known)}")
        return self

    def hf_dir(self) -> str:
        """The Hugging Face checkpoint directory of a local reference (the folder itself, or the checkpoint in
        it: ``artifacts/hf_model/`` of an MLflow model folder, ``hf_model/`` of a training checkpoint).

        Raises:
            FileNotFoundError: nothing at the path, or no ``config.json`` under it.
            ValueError: not a local reference (resolve it with ``tracking.resolve_model_dir``).
        """
        path = self.local_path
        if path is None:
            raise ValueError(
                f"{str(self)!r} is a {self.kind.value} reference: resolve it with tracking.resolve_model_dir"
            )
        if not path.exists():
            raise FileNotFoundError(
                f"model {_shown(self.path)} not found: give a checkpoint directory, runs:/<run_id>/model, "
                "models:/<name>@<alias>, models:/<name>/<version>, mlflow-artifacts:/<path> or preset:<name> "
                "(create a checkpoint with `dpn_model.presets.create_checkpoint('tiny', DIR)`, or train one)"
            )
        return str(find_hf_dir(path))


def _is_name(name: str) -> bool:
    """A registered model name as a reference can carry it: not empty, no ``/`` or ``@``, no outer spaces."""
    return bool(name) and name == name.strip() and not any(c in name for c in "/@")


def is_hf_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a Hugging Face checkpoint directory (it holds ``config.json``)."""
    return (Path(path) / "config.json").is_file()


def find_hf_dir(root: str | os.PathLike[str]) -> Path:
    """The Hugging Face checkpoint in ``root``: itself, ``artifacts/hf_model`` (an MLflow model), ``hf_model`` (a
    training checkpoint), else the first folder under it holding ``config.json``.

    Raises:
        FileNotFoundError: no ``config.json`` under ``root``.
    """
    root = Path(root)
    for candidate in (root, root / "artifacts" / HF_MODEL_DIR, root / HF_MODEL_DIR):
        if is_hf_dir(candidate):
            return candidate
    found = sorted(p.parent for p in root.rglob("config.json"))
    if found:
        return found[0]
    raise FileNotFoundError(f"no Hugging Face checkpoint (config.json) under {root}")


__all__ = ["ACCEPTED_FORMS", "HF_MODEL_DIR", "ModelRef", "RefKind", "find_hf_dir", "is_hf_dir"]
