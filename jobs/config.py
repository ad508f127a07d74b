"""YAML configs -> typed config models, with ``key=value`` dotted overrides. Shared by every job.

A job declares its config as nested :class:`ConfigModel` s (pydantic models, see :mod:`dpn_base.config_models`:
fields with type hints, defaults and constraints; unknown keys are errors). :func:`load_config` reads a YAML file,
merges a mapping and command-line overrides over it, and validates the result::

    cfg = load_config(TrainConfig, "configs/train_tiny.yaml", ["optim.lr=3e-4", "run.name=exp2"])

Anything that does not fit is one :class:`ConfigError`, one line per problem, each naming the dotted key::

    train.micro_batch_size: must be >= 1, got 0
    model.compression: must be one of auto, random, 1, 2, 4 or a schedule like 1,2,4, got 'fast'
    unknown config key optim.learning_rate in section 'optim'; valid keys: ['betas', 'eps', ..., 'lr', ...]

Override values are parsed as YAML scalars / flow collections (``lr=3e-4`` -> a number, ``layers=[8,16]`` -> a
list, ``name=null`` -> None); a numeric key part indexes a list (``models.0.uri=...``). A config's compression is
checked by the model's own parser (:data:`Compression`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator

from dpn_base.config_models import ConfigError, ConfigModel, format_errors, validate_config

M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------------------
# compression: one check, by the model's own parser
# ----------------------------------------------------------------------------------------------


def compression_choices(separator: str = ",") -> str:
    """``"auto, random, 1, 2, 4 or a schedule like 1,2,4"``: the compressions
    ``dpn_model.configuration.parse_compression`` accepts, with the factors of the default experts (a model's
    own experts and pooling layers are checked where its config is known)."""
    from dpn_model.configuration import DEFAULT_COMPRESSION_FACTORS, ROUTING_MODES

    factors = [str(f) for f in DEFAULT_COMPRESSION_FACTORS]
    return f"{', '.join([*ROUTING_MODES, *factors])} or a schedule like {separator.join(factors)}"


def check_compression(value: Any) -> Any:
    """A config's ``compression``, checked for form by ``dpn_model.configuration.parse_compression`` and returned as
    given (``"auto"``, ``"random"``, a factor, or a schedule as a list or ``"1,2,4"``).

    Raises:
        ValueError: naming the accepted forms and the value.
    """
    from dpn_model.configuration import parse_compression

    try:
        parse_compression(value)
    except ValueError:
        raise ValueError(f"must be one of {compression_choices()}, got {value!r}") from None
    return value


Compression = Annotated[str | int | list[int], BeforeValidator(check_compression)]
"""A config field holding a compression (see :func:`check_compression`)."""


# ----------------------------------------------------------------------------------------------
# Files and overrides
# ----------------------------------------------------------------------------------------------


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[1, 2]"]`` -> ``{"a": {"b": 1}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``extra`` merged over ``base``: mappings merge key by key, and so do list items under a numeric key
    (``models.0.uri=...``); anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        current, dotted = out.get(key), f"{prefix}{key}"
        indexed = isinstance(value, Mapping) and all(str(k).isdigit() for k in value)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            out[key] = _merge(current, value, f"{dotted}.")
        elif indexed and isinstance(current, list):
            out[key] = _merge_items(current, value, dotted)
        else:
            out[key] = value
    return out


def _merge_items(items: list[Any], extra: Mapping[str, Any], key: str) -> list[Any]:
    out = list(items)
    for index, value in extra.items():
        i = int(index)
        if i >= len(out):
            raise ConfigError(f"{key}.{index}: there is no item {i}; {key} has {len(out)} item(s)")
        both = isinstance(value, Mapping) and isinstance(out[i], Mapping)
        out[i] = _merge(out[i], value, f"{key}.{index}.") if both else value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping at the top level of a YAML file (empty for an empty file).

    Raises:
        ConfigError: missing file, invalid YAML, or not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return dict(loaded)


def load_config(
    cls: type[M],
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
) -> M:
    """Build the config model ``cls`` from a YAML file, a mapping and ``key=value`` overrides (in that order).

    Args:
        cls: the job's top-level config model.
        path: YAML file (a mapping at the top level); optional.
        overrides: dotted ``key=value`` strings, applied last.
        data: extra mapping merged over the file (e.g. built by a caller, or command-line flags).

    Raises:
        ConfigError: unreadable file, unknown key (names the valid ones), wrong type, failed validation.
    """
    merged = read_yaml(path) if path is not None else {}
    if data:
        merged = _merge(merged, data)
    merged = _merge(merged, parse_overrides(overrides))
    return validate_config(cls, merged)


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    """Nested plain dict of a config (for YAML dumps and checkpoints)."""
    return cfg.model_dump()


def flatten(cfg: BaseModel | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 2e-5, ...}``: a config as flat dotted keys (e.g. MLflow params)."""
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def dump_config(cfg: BaseModel) -> str:
    """YAML text of a config (round-trips through :func:`load_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = [
    "Compression",
    "ConfigError",
    "ConfigModel",
    "check_compression",
    "compression_choices",
    "dump_config",
    "flatten",
    "format_errors",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "to_dict",
    "validate_config",
]
