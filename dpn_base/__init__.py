"""The floor under every package: helpers for concerns that cut across the layers, for any layer to use.

It imports nothing of the project, and nothing outside the standard library but pydantic (for
:mod:`dpn_base.config_models`, which this ``__init__`` does not import), so that ``dpn_model``, ``pipelines``
and everything above can depend on it without a cycle and without slowing `dpn --help`.

- :mod:`dpn_base.redact`: credentials out of text (URIs, query strings, secret environment variables) and
  the logging filter that applies it to every record.
- :mod:`dpn_base.model_ref`: a model reference (``preset:``, a directory, ``runs:/``, ``models:/``,
  ``mlflow-artifacts:/``) parsed once into a typed :class:`ModelRef`, for every stage that names a model.
- :mod:`dpn_base.config_models`: :class:`~dpn_base.config_models.ConfigModel`, the pydantic base of every
  config section (the jobs', serving's, the readers'), and its readable
  :class:`~dpn_base.config_models.ConfigError`.
- :mod:`dpn_base.cli_harness`: how a command module runs, as `dpn X` and as `python -m <module>`.
- :mod:`dpn_base.ray_session`: how every command joins Ray (which cluster; the variables its workers get),
  importing Ray only when called.
"""

from dpn_base.model_ref import ModelRef, RefKind
from dpn_base.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_env_name,
    redact,
    redact_value,
)

__all__ = [
    "MASK",
    "ModelRef",
    "RedactingFilter",
    "RefKind",
    "install_log_redaction",
    "is_secret_env_name",
    "redact",
    "redact_value",
]
