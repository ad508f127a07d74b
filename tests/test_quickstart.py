"""`dpn quickstart` end to end at a small size: data, training, evaluation, champion, serving, a request.

Then a second run, which must reuse the trained and evaluated model instead of training again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from serve_cluster import free_port

from dpn_cli import main as cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_stage_and_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = [
        "quickstart",
        "--work-dir",
        str(tmp_path / "work"),
        "--max-steps",
        "4",
        "--eval-samples",
        "8",
        "--port",
        str(free_port()),
    ]

    assert cli(args) == 0
    out = capsys.readouterr().out
    for i in range(1, 7):
        assert f"[{i}/6]" in out
    assert "answer:" in out and "router's compression per pooling layer" in out
    state = json.loads((tmp_path / "work" / "quickstart" / "state.json").read_text())
    assert state["train"]["steps"] == 4
    assert 0.0 <= state["evaluate"]["accuracy_auto"] <= 1.0
    assert 0.0 < state["evaluate"]["flops_ratio_auto"] <= 1.0
    usage = state["ask"]["usage"]
    assert len(usage["visual_tokens_per_layer"]) == 4 and usage["visual_tokens_per_layer"][0] == 256
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("dpn", "champion")
    assert str(champion.version) == state["train"]["version"]
    params = client.get_run(state["train"]["run_id"]).data.params
    assert params["train.max_steps"] == "4" and params["model.dense_warmup_steps"] == "0"
    assert Path(params["model.init"]) == REPO / "checkpoints" / "tiny-dense"  # the shipped dense start

    # second run: nothing is trained or evaluated again
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "reusing dpn version" in out and "reusing the evaluation" in out
    again = json.loads((tmp_path / "work" / "quickstart" / "state.json").read_text())
    assert again["train"]["run_id"] == state["train"]["run_id"]
    assert len(client.search_model_versions("name = 'dpn'")) == 1
