"""Typed config sections: the pydantic base every section of every config derives from, and readable errors.

Shared by the jobs' configs (``jobs.config`` loads them from YAML with ``key=value`` overrides) and by serving's
sections (``serve_apps.limits.Limits``, ``serve_apps.policy.BatchingConfig``) and the readers'
(``pipelines.policy.ReadPolicy``). It lives in ``dpn_base``, below every layer, so that each package takes its
config base from the floor rather than from a package beside it; it imports only pydantic (and
``dpn_base/__init__`` does not import it).

A section is a :class:`ConfigModel`: fields with type hints, defaults and constraints (``Field(ge=1)``,
``Literal[...]``, validators for relations between fields); unknown keys are errors. :func:`validate_config` builds
one from a mapping; anything that does not fit is one :class:`ConfigError`, one line per problem, each naming the
dotted key (the way a ``key=value`` override names it)::

    train.micro_batch_size: must be >= 1, got 0
    deepspeed.precision: must be one of 'auto', 'bf16', 'fp16' or 'fp32', got 'fp8'
    unknown config key optim.learning_rate in section 'optim'; valid keys: ['betas', 'eps', ..., 'lr', ...]

Values are read as YAML writes them: a number given for a text field becomes text (``run.name=2``), text that
YAML 1.1 leaves unparsed (``3e-4``) is read as a number for a number field, and ``true``/``false`` are never numbers.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config file, mapping or override that does not match its config schema."""


# ----------------------------------------------------------------------------------------------
# The base of every config section
# ----------------------------------------------------------------------------------------------

_NUMBERS = ((int, "an integer"), (int | None, "an integer"), (float, "a number"), (float | None, "a number"))


class ConfigModel(BaseModel):
    """A config section: unknown keys are errors; numbers are accepted for text fields, booleans never for numbers."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1; under a number key it is a mistake (`micro_batch_size: true`)
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            for number, what in _NUMBERS:
                if annotation == number:
                    raise ValueError(f"expected {what}, got {str(value).lower()}")
        return value


# ----------------------------------------------------------------------------------------------
# Validation errors -> one readable line each
# ----------------------------------------------------------------------------------------------

_MESSAGES = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "tuple_type": "expected a list",
    "literal_error": "must be one of {expected}",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
}


def _dotted(loc: Iterable[Any]) -> str:
    """``("models", 0, "uri")`` -> ``"models.0.uri"``, the key as an override names it."""
    return ".".join(str(part) for part in loc)


def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _section_at(cls: type[BaseModel], loc: Iterable[Any]) -> type[BaseModel] | None:
    """The config model at ``loc`` (field names and list indices) inside ``cls``, or None if it is no model."""
    tp: Any = cls
    for part in loc:
        if isinstance(tp, type) and issubclass(tp, BaseModel) and part in tp.model_fields:
            tp = tp.model_fields[part].annotation
        elif isinstance(part, int) and get_origin(tp) in (list, tuple):
            tp = get_args(tp)[0]
        else:
            return None
        tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _describe(error: Mapping[str, Any], cls: type[BaseModel], section: str) -> str:
    """One pydantic error as ``key: what was wrong, got VALUE`` (unknown keys: with the valid ones)."""
    loc = (section, *error["loc"]) if section else tuple(error["loc"])
    key, kind, value = _dotted(loc) or "config", error["type"], error.get("input")
    # a bound of a float field is a float: `must be > 0`, not `> 0.0`
    ctx = {
        k: int(v) if isinstance(v, float) and v.is_integer() else v
        for k, v in (error.get("ctx") or {}).items()
    }
    if kind == "extra_forbidden":
        parent = _section_at(cls, error["loc"][:-1])
        where = f" in section {_dotted(loc[:-1])!r}" if loc[:-1] else ""
        known = sorted(parent.model_fields) if parent else []
        return f"unknown config key {key}{where}; valid keys: {known}"
    if kind == "missing":
        return f"missing required config key {key}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        model = _section_at(cls, error["loc"])
        return (
            f"{key}: expected a mapping{f' of {sorted(model.model_fields)}' if model else ''}, got {value!r}"
        )
    if kind in ("value_error", "assertion_error"):
        return f"{key}: {ctx.get('error', error['msg'])}"
    template = _MESSAGES.get(kind)
    return f"{key}: {template.format(**ctx) if template else error['msg']}, got {value!r}"


def format_errors(err: ValidationError, cls: type[BaseModel], section: str = "") -> str:
    """The errors of validating ``cls`` as text, one line each, keys dotted (prefixed with ``section``)."""
    lines: list[str] = []
    for error in err.errors():
        line = _describe(error, cls, section)
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def validate_config(cls: type[M], data: Any, section: str = "") -> M:
    """Build ``cls`` from a mapping.

    Args:
        cls: the config model.
        data: its keys and values.
        section: where ``data`` sits in a larger config (e.g. ``"limits"``), to name keys in errors.

    Raises:
        ConfigError: one line per wrong key (unknown, wrong type, out of range, failed check).
    """
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{section or 'config'}: expected a mapping of {sorted(cls.model_fields)}, got {data!r}"
        )
    try:
        return cls.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(format_errors(err, cls, section)) from None


def merge_dicts(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged over ``base``, nested: dicts merge key by key, anything else in ``extra`` replaces.
    Returns a new dict; neither argument changes. (Config files and overrides: ``jobs.config.load_config``,
    which also merges list items under numeric keys.)"""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


__all__ = ["ConfigError", "ConfigModel", "format_errors", "merge_dicts", "validate_config"]
