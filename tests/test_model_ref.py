"""Model references (dpn_base.model_ref.ModelRef): parsed once, one error vocabulary, and every entry point (training's
model.init, evaluation's --model, serving's loader, tracking's resolver) reading them alike. No Ray, no network."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_tracking import mlflow_uri, tiny_model_dir  # noqa: F401 - the tracking tests' fixtures

import tracking
from dpn_base.model_ref import ACCEPTED_FORMS, ModelRef, RefKind, find_hf_dir
from jobs.config import ConfigError
from jobs.evaluation.config import ModelSpec
from jobs.training.config import load_train_config
from serve_apps.loading import resolve_model_ref

GOOD = [
    # text, kind, fields, canonical text
    ("preset:tiny", RefKind.PRESET, {"name": "tiny"}, "preset:tiny"),
    ("checkpoints/tiny-dense", RefKind.LOCAL, {"path": "checkpoints/tiny-dense"}, "checkpoints/tiny-dense"),
    ("~/models/dpn", RefKind.LOCAL, {"path": "~/models/dpn"}, "~/models/dpn"),
    ("file:///abs/dir", RefKind.LOCAL, {"path": "/abs/dir"}, "/abs/dir"),
    ("C:/models/dpn", RefKind.LOCAL, {"path": "C:/models/dpn"}, "C:/models/dpn"),  # a drive, not a scheme
    ("runs:/0a1b2c/model", RefKind.RUN, {"run_id": "0a1b2c", "path": "model"}, "runs:/0a1b2c/model"),
    ("runs:/0a1b2c/ckpt/hf_model/", RefKind.RUN, {"run_id": "0a1b2c", "path": "ckpt/hf_model"},
     "runs:/0a1b2c/ckpt/hf_model"),
    ("models:/dpn@champion", RefKind.REGISTRY_ALIAS, {"name": "dpn", "alias": "champion"}, "models:/dpn@champion"),
    ("models:/dpn/3", RefKind.REGISTRY_VERSION, {"name": "dpn", "version": "3"}, "models:/dpn/3"),
    ("models:/dpn/007/", RefKind.REGISTRY_VERSION, {"name": "dpn", "version": "7"}, "models:/dpn/7"),
    ("mlflow-artifacts:/1/abc/artifacts/model", RefKind.MLFLOW_ARTIFACTS, {"path": "/1/abc/artifacts/model"},
     "mlflow-artifacts:/1/abc/artifacts/model"),
    ("mlflow-artifacts://mlflow:5000/1/abc", RefKind.MLFLOW_ARTIFACTS, {"path": "//mlflow:5000/1/abc"},
     "mlflow-artifacts://mlflow:5000/1/abc"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "kind", "fields", "canonical"), GOOD)
def test_every_form_parses_to_its_kind_and_back(text, kind, fields, canonical):
    ref = ModelRef.parse(text)
    assert ref == ModelRef(kind, **fields)
    assert str(ref) == canonical
    assert ModelRef.parse(str(ref)) == ref  # the round trip
    assert ModelRef.parse(f" \t{text}\n") == ref  # surrounding whitespace is no part of it
    assert ModelRef.parse(ref) is ref


def test_helpers_say_what_a_reference_is():
    preset, local = ModelRef.parse("preset:mid"), ModelRef.parse("~/ckpt")
    run, alias = ModelRef.parse("runs:/r1/model"), ModelRef.parse("models:/dpn@champion")
    artifacts = ModelRef.parse("mlflow-artifacts:/0/r1/artifacts/model")
    assert preset.is_preset and preset.preset_name == "mid" and not preset.is_mlflow
    assert local.is_local and local.preset_name is None and local.local_path == Path.home() / "ckpt"
    assert run.is_mlflow and not run.is_registry and run.local_path is None
    assert alias.is_mlflow and alias.is_registry and artifacts.is_mlflow and not artifacts.is_registry
    assert preset.check_preset({"mid"}) is preset and local.check_preset(set()) is local
    with pytest.raises(ValueError, match=r"unknown preset 'mid' in 'preset:mid'; choose one of \['tiny'\]"):
        preset.check_preset({"tiny"})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "it is empty"),
        ("   ", "it is empty"),
        ("preset:", "preset:<name>"),
        ("preset:../x", "preset:<name>"),
        ("runs:/", "runs:/<run_id>/<path>"),
        ("runs:/0a1b2c", "runs:/<run_id>/<path>"),
        ("runs:/0a1b2c/", "runs:/<run_id>/<path>"),
        ("models:/", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/@champion", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/dpn", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/dpn@", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/dpn/Production", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/dpn/1/2", "models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:dpn@champion", "a models reference starts with models:/"),
        ("mlflow-artifacts:/", "mlflow-artifacts:/ needs an artifact path"),
        ("file://", "file:// needs a directory"),
        ("file://models:/dpn/1", "file:// needs a directory"),
        ("s3://bucket/model", "unsupported model URI 's3://bucket/model': s3 is no store"),
        ("hf://org/model", "unsupported model URI 'hf://org/model': hf is no store"),
        ("ckpt\x00/x", "it holds a control character"),
    ],
)
def test_bad_references_say_what_is_wrong_and_list_the_forms(text, problem):
    with pytest.raises(ValueError) as err:
        ModelRef.parse(text)
    message = str(err.value)
    assert problem in message and repr(text.strip()) in message
    assert message.endswith(f"a model reference is one of: {ACCEPTED_FORMS}")


def test_credentials_in_a_bad_reference_are_masked():
    for text, secret in [
        ("s3://admin:hunter2-pw@minio:9000/models/dpn", "hunter2-pw"),
        ("https://host/model?token=abcdef123456", "abcdef123456"),
        ("models:/dpn@champion?password=pw-12345", "pw-12345"),
    ]:
        with pytest.raises(ValueError) as err:
            ModelRef.parse(text)
        assert secret not in str(err.value) and "***" in str(err.value)


PREFIXES = [
    "",
    "preset:",
    "file://",
    "runs:/",
    "models:/",
    "mlflow-artifacts:/",
    "mlflow-artifacts:",
    "s3://",
]


@given(st.one_of(st.text(), st.tuples(st.sampled_from(PREFIXES), st.text()).map("".join)))
def test_parse_raises_nothing_but_value_error_and_round_trips(text):
    try:
        ref = ModelRef.parse(text)
    except ValueError as err:
        assert str(err).endswith(ACCEPTED_FORMS)
        return
    assert ModelRef.parse(str(ref)) == ref


# ----------------------------------------------------------------------------------------------
# Resolution: one resolver (tracking.resolve_model_dir), the serving loader agreeing with it
# ----------------------------------------------------------------------------------------------


def test_a_local_checkpoint_resolves_to_itself_everywhere(tiny_model_dir):  # noqa: F811
    assert ModelRef.parse(tiny_model_dir).hf_dir() == tiny_model_dir
    assert tracking.resolve_model_dir(tiny_model_dir) == tiny_model_dir
    assert tracking.resolve_model_dir(f"file://{tiny_model_dir}") == tiny_model_dir
    assert resolve_model_ref(tiny_model_dir) == tiny_model_dir


@pytest.mark.parametrize(
    "inside", ["hf_model", "artifacts/hf_model"]
)  # a training checkpoint, an MLflow model
def test_a_folder_holding_a_checkpoint_resolves_to_the_checkpoint(tiny_model_dir, tmp_path, inside):  # noqa: F811
    shutil.copytree(tiny_model_dir, tmp_path / "outer" / inside)
    expected = str(tmp_path / "outer" / inside)
    assert str(find_hf_dir(tmp_path / "outer")) == expected
    assert tracking.resolve_model_dir(tmp_path / "outer") == expected
    assert resolve_model_ref(str(tmp_path / "outer")) == expected


def test_a_missing_or_empty_folder_says_what_to_give(tmp_path):
    for resolve in (tracking.resolve_model_dir, resolve_model_ref):
        with pytest.raises(
            FileNotFoundError, match="not found: give a checkpoint directory, runs:/<run_id>/model"
        ):
            resolve(str(tmp_path / "missing"))
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(FileNotFoundError, match="no Hugging Face checkpoint"):
            resolve(str(tmp_path / "empty"))


def test_a_preset_resolves_to_a_seeded_model_in_the_preset_dir(tiny_model_dir, tmp_path):  # noqa: F811
    from dpn_model import DPNForConditionalGeneration

    out = tmp_path / "preset"
    path = tracking.resolve_model_dir("preset:tiny", preset_dir=out, preset_seed=1)  # tiny_model_dir: seed 1
    assert path == str(out) and (out / "model.safetensors").is_file()
    made, reference = (DPNForConditionalGeneration.from_pretrained(p) for p in (path, tiny_model_dir))
    for (name, a), b in zip(reference.state_dict().items(), made.state_dict().values()):
        assert torch.equal(a, b), name
    written = (out / "model.safetensors").stat().st_mtime_ns
    assert tracking.resolve_model_dir("preset:tiny", preset_dir=out, preset_seed=1) == path
    assert (out / "model.safetensors").stat().st_mtime_ns == written  # reused, not written again
    with pytest.raises(ValueError, match=r"unknown preset 'huge' in 'preset:huge'; choose one of \["):
        tracking.resolve_model_dir("preset:huge", preset_dir=tmp_path / "huge")
    assert not (tmp_path / "huge").exists()


def test_serving_a_preset_builds_it_in_its_own_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where gettempdir() points for this test
    path = Path(resolve_model_ref("preset:tiny"))
    assert path.parent == tmp_path and path.name.startswith("dpn-serve-preset-tiny-")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_mlflow_artifacts_uris_are_accepted_by_serving_and_tracking_alike(mlflow_uri):  # noqa: F811
    # MLflow serves mlflow-artifacts:/ URIs only through an http(s) tracking server: against the SQLite store
    # both loaders get as far as MLflow's download, whose error says so (a parse error would say "unsupported")
    ref = "mlflow-artifacts:/0/0a1b2c/artifacts/model"
    for resolve in (tracking.resolve_model_dir, resolve_model_ref):
        with pytest.raises(FileNotFoundError, match="could not download 'mlflow-artifacts:/0/0a1b2c") as err:
            resolve(ref)
        assert "must be a valid http or https URI" in str(err.value)
    assert tracking.model_cache_dir(ref) == tracking.model_cache_dir(f" {ref} ")
    with pytest.raises(
        ValueError, match="only runs:/, models:/ and mlflow-artifacts:/ references are downloaded"
    ):
        tracking.model_cache_dir("preset:tiny")


# ----------------------------------------------------------------------------------------------
# The config boundaries: training's model.init, evaluation's models
# ----------------------------------------------------------------------------------------------


def test_training_parses_model_init_when_the_config_loads():
    cfg = load_train_config(None, ["model.init= models:/dpn/04 "])
    assert cfg.model.init == "models:/dpn/4" and cfg.model.init_ref.kind is RefKind.REGISTRY_VERSION
    assert load_train_config(
        None, ["model.init=mlflow-artifacts:/0/r/artifacts/model"]
    ).model.init_ref.is_mlflow
    with pytest.raises(ConfigError, match=r"model\.init: bad model reference 'models:/dpn'"):
        load_train_config(None, ["model.init=models:/dpn"])
    with pytest.raises(ConfigError, match=r"model\.init: unsupported model URI 's3://b/m'"):
        load_train_config(None, ["model.init=s3://b/m"])
    with pytest.raises(
        ConfigError, match=r"model\.init: unknown preset 'huge' in 'preset:huge'; choose one of"
    ):
        load_train_config(None, ["model.init=preset:huge"])
    # a preset's pyramid is known from the reference, a checkpoint's only once it is loaded
    assert load_train_config(None, ["model.init=preset:tiny"]).model.known_pyramid().pooling_layers == [
        1,
        2,
        3,
    ]
    assert load_train_config(None, ["model.init=/some/checkpoint"]).model.known_pyramid() is None


def test_evaluation_parses_each_models_reference():
    spec = ModelSpec(label="champion", uri=" models:/dpn@champion")
    assert spec.uri == "models:/dpn@champion" and spec.ref == ModelRef(
        RefKind.REGISTRY_ALIAS, "dpn", alias="champion"
    )
    assert ModelSpec(label="a", uri="mlflow-artifacts:/0/r/artifacts/model").ref.is_mlflow
    with pytest.raises(ValueError, match="a run reference is runs:/<run_id>/<path>"):
        ModelSpec(label="bad", uri="runs:/0a1b2c")
