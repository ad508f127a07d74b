"""Credentials out of text: one function for MLflow params, log records and error messages.

A tracking URI such as ``postgresql://mlflow:hunter2@db/mlflow`` or a presigned ``s3`` URL is configuration
like any other, so it reaches MLflow params (``flatten(cfg)``), INFO lines and exception messages unless
every one of those paths removes the secret. :func:`redact` is that one place. It masks, with :data:`MASK`:

* the password of a URI's userinfo: ``scheme://user:password@host`` -> ``scheme://user:***@host`` (the user
  name stays: it says which account, and is no secret);
* the value of secret query or fragment parameters (``?token=``, ``X-Amz-Signature=``, ``sig=``,
  ``access_key=``, ``secret=``, ``password=``, ...): :func:`is_secret_param`; the rest of the URI stays;
* ``name=value`` and quoted ``"name": "value"`` pairs in free text whose name says secret
  (``password=``, ``api_key=``, ``AWS_SECRET_ACCESS_KEY=``; libpq's ``host=h password=pw`` style);
* ``Bearer <token>`` / ``Basic <token>``;
* the value of every secret environment variable (:func:`is_secret_env_name`: names ending in ``_KEY``,
  ``_TOKEN``, ``_SECRET``, ``_PASSWORD``, plus :data:`SECRET_ENV_NAMES`) wherever it appears, also
  percent-encoded. Values shorter than :data:`MIN_SECRET_LENGTH` are not searched for: masking every
  ``"ab"`` in a log would make it unreadable and protect nothing.

:class:`RedactingFilter` applies it to log records (message, traceback, stack); :func:`install_log_redaction`
puts it on the handlers that exist, which the command harness calls once logging is set up.

What it does not do: recognise a secret by its shape alone (a bare token pasted into a message with no
name, scheme or variable to say what it is), or reach streams that bypass logging (``print`` to stdout).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

MASK = "***"
MIN_SECRET_LENGTH = 4

SECRET_ENV_NAMES = frozenset({
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "DPN_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "PGPASSWORD",
    "DATABRICKS_TOKEN", "GITHUB_TOKEN",
})  # fmt: skip
SECRET_ENV_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD", "_PASSWD")

# last word of a parameter name that makes its value secret (inside a query string or fragment)
_QUERY_SECRET_WORDS = frozenset({
    "password", "passwd", "pwd", "pass", "secret", "token", "signature", "sig", "credential", "credentials",
    "key", "apikey", "accesskey", "auth", "authorization",
})  # fmt: skip
# in free text, fewer names count: "key=" or "sig=" in a log line is usually not a credential
_TEXT_SECRET_WORDS = frozenset({"password", "passwd", "secret", "token", "apikey", "accesskey", "secretkey"})
_KEY_QUALIFIERS = frozenset({"api", "access", "secret", "private", "account", "session", "signing", "master"})

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@\[\]]*):(?P<secret>[^\s/?#]*)@")
_QUERY_PAIR = re.compile(r"(?P<head>[?&;#](?P<name>[^=&#;?\s]+)=)(?P<secret>[^&#;\s]*)")
_TEXT_PAIR = re.compile(
    r"(?<![\w.\-])(?P<head>(?P<name>[A-Za-z][\w.\-]*)=)(?P<secret>\"[^\"]*\"|'[^']*'|[^\s&;,'\"]+)"
)
_QUOTED_PAIR = re.compile(
    r"(?P<head>(?P<q>[\"'])(?P<name>[A-Za-z][\w.\-]*)(?P=q)\s*:\s*(?P<v>[\"']))(?P<secret>(?:(?!(?P=v)).)*)(?P=v)"
)
_AUTH_SCHEME = re.compile(r"\b(?P<head>(?:Bearer|Basic)\s+)(?P<secret>[A-Za-z0-9._~+/\-]+=*)", re.IGNORECASE)


def _words(name: str) -> list[str]:
    """``"X-Amz-Signature"`` -> ``["x", "amz", "signature"]``; ``"AccountKey"`` -> ``["account", "key"]``."""
    return [w.lower() for w in _WORD.findall(name)]


def is_secret_param(name: str) -> bool:
    """Whether a query-string parameter named ``name`` carries a credential (its last word says so)."""
    words = _words(name)
    if not words:
        return False
    # a name free text masks (``secretkey=``, ``private_key=``) is masked in a query string too: one rule per name
    return (
        words[-1] in _QUERY_SECRET_WORDS
        or "".join(words[-2:]) in _QUERY_SECRET_WORDS
        or _is_secret_text_name(name)
    )


def _is_secret_text_name(name: str) -> bool:
    words = _words(name)
    if not words:
        return False
    if words[-1] in _TEXT_SECRET_WORDS:
        return True
    return words[-1] == "key" and len(words) > 1 and words[-2] in _KEY_QUALIFIERS


def is_secret_env_name(name: str) -> bool:
    """Whether an environment variable holds a secret: :data:`SECRET_ENV_NAMES` or a secret suffix."""
    upper = name.upper()
    return upper in SECRET_ENV_NAMES or upper.endswith(SECRET_ENV_SUFFIXES)


def secret_env_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of the secret variables in ``env`` (default ``os.environ``), their percent-encoded forms too,
    longest first (so that a secret containing another is masked whole)."""
    env = os.environ if env is None else env
    found: set[str] = set()
    # names first, then each value by get: another thread (MLflow's telemetry does) may delete a variable
    # while we read, and os.environ.items() then raises KeyError mid-iteration
    for name in [n for n in list(env) if is_secret_env_name(n)]:
        value = env.get(name)
        if value and len(value) >= MIN_SECRET_LENGTH:
            found.update((value, quote(value, safe="")))
    return sorted(found, key=len, reverse=True)


def _mask_when(pattern: re.Pattern[str], text: str, secret_name: Any = None) -> str:
    """Replace the ``secret`` group of each match by :data:`MASK` (when ``secret_name(name)`` says so)."""

    def replace(match: re.Match[str]) -> str:
        if secret_name is not None and not secret_name(match.group("name")):
            return match.group(0)
        secret, whole = match.group("secret"), match.group(0)
        quoted = len(secret) >= 2 and secret[0] == secret[-1] and secret[0] in "\"'"
        value = f"{secret[0]}{MASK}{secret[0]}" if quoted else MASK
        start, end = match.start("secret") - match.start(), match.end("secret") - match.start()
        return whole[:start] + value + whole[end:]

    return pattern.sub(replace, text)


def redact(text: str, env: Mapping[str, str] | None = None) -> str:
    """``text`` with every credential this module knows how to find replaced by :data:`MASK`.

    Args:
        text: any text: a URI, a log message, a traceback, a config value.
        env: environment whose secret variables are masked too (default ``os.environ``; ``{}``: none).
    """
    if not text:
        return text
    for value in secret_env_values(env):
        text = text.replace(value, MASK)
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    text = _mask_when(_QUERY_PAIR, text, is_secret_param)
    text = _mask_when(_TEXT_PAIR, text, _is_secret_text_name)
    text = _mask_when(_QUOTED_PAIR, text, _is_secret_text_name)
    return _mask_when(_AUTH_SCHEME, text)


def redact_value(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """:func:`redact` through strings, mappings, lists and tuples (other values as they are)."""
    if isinstance(value, str):
        return redact(value, env)
    if isinstance(value, Mapping):
        return {k: redact_value(v, env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(v, env) for v in value)
    return value


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record's message, traceback and stack before any handler formats it.

    The record is changed in place (message formatted once, ``args`` dropped) only when something was
    masked, so a record without secrets reaches the handlers untouched. It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: let the handler report it as usual
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_FILTER = RedactingFilter()


def _all_handlers() -> Iterable[logging.Handler]:
    yield from logging.getLogger().handlers
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):  # placeholders have no handlers
            yield from logger.handlers
    if logging.lastResort is not None:
        yield logging.lastResort


def install_log_redaction(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Put the :class:`RedactingFilter` on ``handlers`` (default: every handler that exists now: the root
    logger's, those of loggers with their own such as MLflow's, and logging's last resort). Idempotent.

    Handlers are filtered rather than loggers because a logger's filter does not see the records its
    children propagate to it. A handler created later needs its own call.
    """
    for handler in _all_handlers() if handlers is None else handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


__all__ = [
    "MASK",
    "MIN_SECRET_LENGTH",
    "RedactingFilter",
    "SECRET_ENV_NAMES",
    "SECRET_ENV_SUFFIXES",
    "install_log_redaction",
    "is_secret_env_name",
    "is_secret_param",
    "redact",
    "redact_value",
    "secret_env_values",
]
