"""Redaction (dpn_base.redact): credentials never reach MLflow params, logs or error messages. No Ray.

Hypothesis builds URIs with a random user, password and query secrets among ordinary parameters: the output is
the URI with exactly the secrets masked (so no secret survives and nothing else changed).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

from dpn_base.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_env_name,
    is_secret_param,
    redact,
    secret_env_values,
)

REPO = Path(__file__).resolve().parents[1]

_ENCODED = st.text(min_size=1, max_size=16).map(lambda s: quote(s, safe=""))  # any text, as a URI writes it
_NAME = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10)
_SECRET_PARAMS = st.sampled_from(["token", "X-Amz-Signature", "sig", "access_key", "secret", "password",
                                  "X-Amz-Security-Token", "api_key", "AccountKey", "client_secret"])  # fmt: skip
_PLAIN_PARAMS = st.one_of(
    st.sampled_from(["X-Amz-Date", "X-Amz-Expires", "page", "region", "versionId", "max_tokens", "sv"]),
    _NAME.filter(lambda n: not is_secret_param(n)),
)


@st.composite
def uris_with_secrets(draw) -> tuple[str, str, list[str]]:
    """``(uri, the uri with its secrets masked, the secrets)``."""
    scheme = draw(st.sampled_from(["postgresql", "mysql+pymysql", "https", "http", "s3", "databricks"]))
    host = draw(st.sampled_from(["db.internal", "10.0.0.7:5432", "[::1]:8080", "bucket.s3.amazonaws.com"]))
    user, password = draw(_ENCODED), draw(_ENCODED)
    path = "/" + "/".join(draw(st.lists(_NAME, max_size=3)))
    params = draw(st.lists(st.tuples(st.booleans(), _ENCODED), max_size=5))
    query, masked_query, secrets = [], [], [password]
    for secret, value in params:
        name = draw(_SECRET_PARAMS if secret else _PLAIN_PARAMS)
        query.append(f"{name}={value}")
        masked_query.append(f"{name}={MASK if secret else value}")
        if secret:
            secrets.append(value)
    tail = ("?" + "&".join(query)) if query else ""
    masked_tail = ("?" + "&".join(masked_query)) if query else ""
    return (
        f"{scheme}://{user}:{password}@{host}{path}{tail}",
        f"{scheme}://{user}:{MASK}@{host}{path}{masked_tail}",
        secrets,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(uris_with_secrets())
@example(("postgresql://u:p@ss:w0rd@h/db", "postgresql://u:***@h/db", ["p@ss:w0rd"]))  # unencoded @ and :
def test_a_uri_keeps_everything_but_its_secrets(case):
    uri, expected, secrets = case
    out = redact(uri, env={})
    assert out == expected
    for secret in secrets:
        if secret not in expected:  # a short secret may also be part of the host or a name: that part stays
            assert secret not in out


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("host=db user=mlflow password=hunter2 dbname=x", "host=db user=mlflow password=*** dbname=x"),
        ("{'api_key': 'k-123', 'user': 'u'}", "{'api_key': '***', 'user': 'u'}"),
        ('{"client_secret": "abc", "max_tokens": 8}', '{"client_secret": "***", "max_tokens": 8}'),
        ("Authorization: Bearer eyJhbGciOi.J9", "Authorization: Bearer ***"),
        ("AWS_SECRET_ACCESS_KEY=wJalr DPN_API_KEY=sk-1", "AWS_SECRET_ACCESS_KEY=*** DPN_API_KEY=***"),
        ("http://host:8080/v1?page=2 max_new_tokens=8 tokenizer=llama", None),  # nothing secret: unchanged
        ("ssh://git@github.com/org/repo", None),  # a user without a password is no secret
    ],
)
def test_free_text_secrets_are_masked_and_the_rest_kept(text, expected):
    assert redact(text, env={}) == (text if expected is None else expected)


def test_secret_env_names():
    for name in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "DPN_API_KEY", "HF_TOKEN", "X_SECRET"):
        assert is_secret_env_name(name), name
    for name in ("PATH", "HOME", "PWD", "TOKENIZERS_PARALLELISM", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_URI"):
        assert not is_secret_env_name(name), name


def test_env_secret_values_are_masked_in_log_records(monkeypatch, caplog):
    monkeypatch.setenv("DPN_API_KEY", "sk-live-0123456789")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t/pw")  # also found percent-encoded
    monkeypatch.setenv("SOME_TOKEN", "abc")  # shorter than MIN_SECRET_LENGTH: not searched for
    logger = logging.getLogger("tests.redact")
    handler = logging.Handler()
    records: list[str] = []
    handler.emit = lambda record: records.append(logging.Formatter().format(record))
    install_log_redaction([handler])
    install_log_redaction([handler])  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        logger.info(
            "calling with key %s and %s", "sk-live-0123456789", "https://u:s3cr3t%2Fpw@mlflow.example"
        )
        try:
            raise RuntimeError("connect failed: Authorization: Bearer sk-live-0123456789")
        except RuntimeError:
            logger.exception("tracking store at %s", "postgresql://u:s3cr3t/pw@db/x")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert "sk-live-0123456789" not in text and "s3cr3t" not in text
    assert "calling with key *** and https://u:***@mlflow.example" in records[0]
    assert "RuntimeError: connect failed" in records[1]  # the traceback is kept, masked


def test_the_command_harness_installs_the_filter(monkeypatch, capsys):
    """`dpn <command>` / `python -m <module>` set logging up in one place: its handlers redact."""
    from dpn_base.cli_harness import run_parsed

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-pw")
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # as in a fresh process, so that basicConfig installs its handler

    def command(args) -> int:
        logging.getLogger("jobs.x").warning("store postgresql://u:hunter2-pw@db/mlflow")
        return 0

    import argparse

    try:
        assert run_parsed(argparse.Namespace(log_level="INFO", _run=command)) == 0
        assert all(any(isinstance(f, RedactingFilter) for f in h.filters) for h in root.handlers)
    finally:
        for handler in root.handlers:
            handler.flush()
        root.handlers = saved
    err = capsys.readouterr().err
    assert "postgresql://u:***@db/mlflow" in err and "hunter2" not in err


def test_training_params_hold_no_tracking_password(tmp_path, monkeypatch):
    """The MLflow params of a training config (``flatten(cfg)``, as jobs.training.job logs them) hold no password."""
    import tracking
    from jobs.config import flatten
    from jobs.training.config import load_train_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = load_train_config(
        REPO / "configs" / "train_tiny.yaml", ["mlflow.tracking_uri=postgresql://u:pw@h/db"]
    )
    run_id, _ = tracking.start_or_resume_run(
        "exp", "job-redact", params=flatten(cfg), tags={"store": cfg.mlflow.tracking_uri}, uri=uri
    )
    tracking.end_run(run_id, uri=uri)
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == "postgresql://u:***@h/db"
    assert run.data.tags["store"] == "postgresql://u:***@h/db"
    assert not [(k, v) for k, v in run.data.params.items() if "pw" in v]


def test_model_reference_errors_hold_no_tracking_password(tmp_path):
    import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FileNotFoundError) as err:
        tracking.resolve_model_dir("models:/nothing@champion", tracking=uri)
    assert "not found in the registry" in str(err.value)
    with pytest.raises(ValueError, match="unsupported model URI") as err:
        tracking.resolve_model_dir("hf://user:pw-123@host/org/model")
    assert "pw-123" not in str(err.value)


class _VanishingEnv(Mapping[str, str]):
    """An environment another thread edits while it is read: ``gone`` is listed, then deleted before its value
    is read (what MLflow's telemetry thread does to ``_MLFLOW_TELEMETRY_SESSION_ID`` in ``os.environ``)."""

    def __init__(self, values: dict[str, str], gone: str) -> None:
        self.values, self.gone = values, gone

    def __iter__(self) -> Iterator[str]:
        return iter([*self.values, self.gone])

    def __len__(self) -> int:
        return len(self.values) + 1

    def __getitem__(self, name: str) -> str:
        return self.values[name]  # KeyError for ``gone``: it was deleted after it was listed


def test_secret_values_are_read_from_an_environment_that_changes_meanwhile():
    # issue 26's benchmark died of this: a training job's params are redacted against os.environ while MLflow's
    # telemetry thread deletes a variable; reading it must skip the deleted name, not raise KeyError
    env = _VanishingEnv({"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-1234", "HOME": "/root"}, gone="DPN_API_KEY")
    assert secret_env_values(env)[0] == "s3cr3t-value-1234"


@pytest.mark.parametrize("name", ["secretkey", "private_key", "accessKey", "apikey"])
def test_a_query_parameter_free_text_masks_is_masked_in_a_uri_too(name):
    """One rule per name: a parameter the free-text pass masks (``secretkey=``) is a secret parameter."""
    assert is_secret_param(name)
    assert redact(f"postgresql://u:pw@db.internal/?{name}=0&page=2", env={}) == (
        f"postgresql://u:***@db.internal/?{name}=***&page=2"
    )
