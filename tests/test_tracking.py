"""MLflow helpers: default store, exactly-once step metrics, model logging/registry, resolve_model_dir. No Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

import tracking


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One SQLite store for the module (creating one costs seconds); tests use their own names in it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("DPN_MODEL_CACHE", str(root / "cache"))
        yield uri


def test_default_store_is_a_sqlite_file_in_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking.tracking_uri() == "http://tracking:5000"
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"


def test_job_run_is_found_again_and_a_finished_one_is_refused(mlflow_uri):
    run_id, resumed = tracking.start_or_resume_run("exp", "job-a", params={"optim.lr": 0.1}, tags={"t": "1"})
    assert not resumed
    again, resumed = tracking.start_or_resume_run("exp", "job-a", params={"optim.lr": 0.2})
    assert (again, resumed) == (run_id, True)
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.params["optim.lr"] == "0.1" and run.data.tags["t"] == "1"
    other, _ = tracking.start_or_resume_run("exp", "job-b")
    assert other != run_id
    tracking.end_run(run_id)
    with pytest.raises(ValueError, match="already finished; choose a new run.name"):
        tracking.start_or_resume_run("exp", "job-a")


def test_step_metrics_are_logged_once_across_restarts(mlflow_uri):
    run_id, _ = tracking.start_or_resume_run("exp", "job-metrics")
    first = tracking.StepMetricLogger(run_id)
    for step in range(1, 7):  # crash after step 6; the last checkpoint was step 4
        first.log({"loss": 10.0 - step}, step=step)
    second = tracking.StepMetricLogger(run_id)  # the restarted worker re-runs steps 5.. from the checkpoint
    for step in range(5, 10):
        second.log({"loss": 100.0 + step, "lr": 0.1}, step=step)
    history = MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 10))  # steps 5 and 6 read back, not logged again
    assert {m.step: m.value for m in history}[6] == 4.0  # the first value of a step stays
    assert [m.step for m in MlflowClient(mlflow_uri).get_metric_history(run_id, "lr")] == list(range(5, 10))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    from dpn_model.presets import create_checkpoint

    return create_checkpoint("tiny", str(tmp_path_factory.mktemp("tiny") / "model"), seed=1)


def test_logged_model_resolves_from_runs_and_models_uris(mlflow_uri, tiny_model_dir, tmp_path):
    from dpn_model import DPNForConditionalGeneration

    run_id, _ = tracking.start_or_resume_run("exp", "job-model")
    version = tracking.log_hf_model(run_id, tiny_model_dir, registered_model="dpn-test")
    assert version == "1"
    client = MlflowClient(mlflow_uri)
    client.set_registered_model_alias("dpn-test", "champion", "1")
    reference = DPNForConditionalGeneration.from_pretrained(tiny_model_dir)
    for uri in (f"runs:/{run_id}/model", "models:/dpn-test/1", "models:/dpn-test@champion"):
        path = Path(tracking.resolve_model_dir(uri))
        assert {"config.json", "model.safetensors", "processor_config.json"} <= {
            p.name for p in path.iterdir()
        }
        loaded = DPNForConditionalGeneration.from_pretrained(path)
        for (name, a), b in zip(reference.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
    # the same version downloads once
    assert tracking.resolve_model_dir("models:/dpn-test@champion") == tracking.resolve_model_dir(
        "models:/dpn-test/1"
    )
    assert tracking.resolve_model_dir(tiny_model_dir) == tiny_model_dir


def test_pyfunc_model_is_logged_as_code_without_a_pickle_and_answers(mlflow_uri, tiny_model_dir):
    import mlflow.pyfunc
    import pandas as pd

    run_id, _ = tracking.start_or_resume_run("exp", "job-pyfunc")
    tracking.log_hf_model(run_id, tiny_model_dir, registered_model=None)
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    assert not list(local.rglob("*.pkl")), "the pyfunc model must not be stored as a pickle"
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    answers = model.predict(pd.DataFrame({"prompt": ["What colour is the large shape?"]}),
                            params={"max_new_tokens": 3, "compression": 1})  # fmt: skip
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_resolve_model_dir_errors_say_what_to_give(mlflow_uri, tmp_path):
    with pytest.raises(FileNotFoundError, match="give a checkpoint directory, runs:/<run_id>/model"):
        tracking.resolve_model_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not found in the registry"):
        tracking.resolve_model_dir("models:/nothing@champion")
    with pytest.raises(ValueError, match="unsupported model URI"):
        tracking.resolve_model_dir("hf://org/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no Hugging Face checkpoint"):
        tracking.resolve_model_dir(tmp_path / "empty")


def test_a_recreated_registry_does_not_get_the_old_versions_download(tmp_path, tiny_model_dir, monkeypatch):
    # a registry recreated at the same tracking URI (mlflow.db deleted, or the registered model deleted) numbers
    # its versions from 1 again: "models:/dpn/1" is then another model, and must not come from the old download
    from dpn_model import DPNForConditionalGeneration

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("DPN_MODEL_CACHE", str(tmp_path / "cache"))
    run_id, _ = tracking.start_or_resume_run("exp", "first")
    tracking.log_hf_model(run_id, tiny_model_dir, registered_model="dpn")
    first = Path(tracking.resolve_model_dir("models:/dpn/1"))
    MlflowClient(uri).delete_registered_model("dpn")

    other = DPNForConditionalGeneration.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.lm_head.weight.add_(1.0)
    other_dir = tmp_path / "other"
    other.save_pretrained(other_dir)
    for name in Path(tiny_model_dir).iterdir():  # the processor files
        if name.name not in {"config.json", "model.safetensors"} and name.is_file():
            (other_dir / name.name).write_bytes(name.read_bytes())
    run_id, _ = tracking.start_or_resume_run("exp", "second")
    tracking.log_hf_model(run_id, str(other_dir), registered_model="dpn")
    second = Path(tracking.resolve_model_dir("models:/dpn/1"))
    assert second != first
    loaded = DPNForConditionalGeneration.from_pretrained(second)
    assert torch.equal(loaded.lm_head.weight, other.lm_head.weight)
