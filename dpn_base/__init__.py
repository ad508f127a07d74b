"""The floor under every package: small standard-library helpers that any layer may use.

It imports nothing of the project (and nothing outside the standard library), so that ``dpn_model``,
``pipelines`` (the command harness included) and everything above can depend on it without a cycle and
without slowing `dpn --help`.

- :mod:`dpn_base.redact`: credentials out of text (URIs, query strings, secret environment variables) and
  the logging filter that applies it to every record.
- :mod:`dpn_base.model_ref`: a model reference (``preset:``, a directory, ``runs:/``, ``models:/``,
  ``mlflow-artifacts:/``) parsed once into a typed :class:`ModelRef`, for every stage that names a model.
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
