"""The eval task/metric registry (jobs/evaluation/tasks.py): a new benchmark metric is one registered entry.

A task registered here (a numeric-tolerance metric for the rows whose reference is a number) is used by the
evaluation's scoring without any edit of it: by :func:`score_answers`, by the ``Predictor`` actor on a tiny
random model, and by ``predict`` (``--task`` / ``task:`` reaches every actor). An unknown name is a clear error,
from the registry and from the config. No Ray.
"""

from __future__ import annotations

import math

import pytest
from eval_workspace import preprocessed_eval_batch

from jobs.evaluation import tasks
from jobs.evaluation.config import EvalConfig, ModelSpec, load_eval_config
from jobs.evaluation.tasks import DEFAULT_TASK, EvalTask, get_task, register_task, score_answers


def _number(text: str) -> float | None:
    try:
        return float(str(text).strip().rstrip("."))
    except ValueError:
        return None


def within_five_percent(prediction: str, reference: str) -> bool:
    """Numeric tolerance: within 5% of the reference (a ChartQA-style 'relaxed accuracy')."""
    value, target = _number(prediction), _number(reference)
    return value is not None and target is not None and math.isclose(value, target, rel_tol=0.05)


def _scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register this test's tasks in a copy of the registry, put back at teardown (there is no unregister)."""
    monkeypatch.setattr(tasks, "_TASKS", dict(tasks._TASKS))


@pytest.fixture
def numeric_task(monkeypatch):
    _scratch_registry(monkeypatch)
    task = register_task(
        EvalTask(
            "numeric_5pct",
            score=within_five_percent,
            applies_to=lambda row: _number(row["answer"]) is not None,
            description="numbers within 5%; other rows by exact match",
        )
    )
    return task


@pytest.fixture
def recording_task(monkeypatch):
    """A task that says every answer is right and records what it was asked to score."""
    _scratch_registry(monkeypatch)
    calls: list[tuple[str, str]] = []
    task = register_task(EvalTask("everything_right", score=lambda p, r: calls.append((p, r)) or True))
    return task, calls


def test_the_default_task_is_exact_match():
    assert DEFAULT_TASK == "exact_match" and tasks.task_names()[0] == DEFAULT_TASK
    rows = [{"answer": "two"}, {"answer": "red"}]
    assert score_answers(DEFAULT_TASK, ["2", "The Red."], rows) == [True, True]
    assert score_answers(DEFAULT_TASK, ["3", "blue"], rows) == [False, False]
    assert EvalConfig(models=[ModelSpec(label="m", uri="/x")], data="d").task == DEFAULT_TASK


def test_a_registered_task_scores_the_rows_it_applies_to(numeric_task):
    rows = [{"answer": "3.0"}, {"answer": "7"}, {"answer": "red"}, {"answer": "100"}]
    predictions = ["3.1", "blue", "Red", "104"]
    # exact match: only "Red" == "red"; the numeric task: 3.1 ~ 3.0 and 104 ~ 100, "red" by exact match
    assert score_answers(DEFAULT_TASK, predictions, rows) == [False, False, True, False]
    assert score_answers("numeric_5pct", predictions, rows) == [True, False, True, True]
    assert score_answers(numeric_task, ["3.5"], [{"answer": "3"}]) == [False]
    assert "numeric_5pct" in tasks.task_names()
    with pytest.raises(ValueError, match="registered already"):
        register_task(EvalTask("numeric_5pct", score=within_five_percent))


def test_an_unknown_task_name_is_a_clear_error(numeric_task):
    with pytest.raises(
        ValueError, match=r"unknown eval task 'nope'; known tasks: exact_match, numeric_5pct$"
    ):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown eval task 'nope'"):
        score_answers("nope", ["a"], [{"answer": "a"}])
    from jobs.config import ConfigError

    data = {"models": [{"label": "m", "uri": "/x"}], "data": "d"}
    with pytest.raises(ConfigError, match=r"task: .*unknown eval task 'nope'; known tasks: exact_match"):
        load_eval_config(None, ["task=nope"], data)
    assert load_eval_config(None, ["task=numeric_5pct"], data).task == "numeric_5pct"


def test_dpn_eval_takes_task_and_rejects_an_unknown_one(numeric_task, capsys):
    import yaml

    from dpn_cli import main

    argv = ["eval", "--model", "/x", "--data", "d", "--print-config"]
    assert main([*argv, "--task", "numeric_5pct"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["task"] == "numeric_5pct"
    assert main([*argv, "--task", "nope"]) == 2


# ----------------------------------------------------------------------------------------------
# The evaluation's scoring uses the registered task (a tiny random model, no Ray)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from dpn_model.presets import create_checkpoint

    return create_checkpoint("tiny", str(tmp_path_factory.mktemp("tasks") / "ckpt"), seed=0)


def test_the_predictor_scores_with_the_registered_task(ckpt, recording_task):
    from jobs.evaluation.predictor import Predictor

    task, calls = recording_task
    batch = preprocessed_eval_batch(ckpt)
    exact = Predictor(ckpt, [1], 2, device="cpu")(batch)  # a random model: (almost) nothing right
    out = Predictor(ckpt, [1, 4], 2, device="cpu", task="everything_right")(batch)
    assert out["correct"].all() and len(out["correct"]) == 6
    assert list(out["prediction"][:3]) == list(exact["prediction"])  # the same answers, scored otherwise
    assert calls == [(str(p), str(a)) for p, a in zip(out["prediction"], out["answer"])]
    expected = score_answers(
        DEFAULT_TASK, list(exact["prediction"]), [{"answer": a} for a in exact["answer"]]
    )
    assert exact["correct"].tolist() == expected  # without a task: exact match, as always


def test_predict_hands_the_configs_task_to_every_actor(monkeypatch, numeric_task):
    """``task:`` / ``--task`` reaches every actor as the task itself (``fn_constructor_kwargs``)."""
    import pipelines.accounting
    import pipelines.datasets
    from jobs.evaluation import predictor

    seen = {}

    class FakeDataset:
        def limit(self, n):
            return self

        def map_batches(self, fn, **kwargs):
            seen.update(fn=fn, **kwargs)
            return self

    monkeypatch.setattr(pipelines.accounting, "BadSampleAccountant", lambda **k: None)  # a Ray actor
    monkeypatch.setattr(pipelines.datasets, "build_eval_dataset", lambda *a, **k: FakeDataset())
    monkeypatch.setattr(predictor, "use_gpus", lambda device: False)
    monkeypatch.setattr(predictor, "cpu_budget", lambda cfg, gpus: (1.0, 1.0))
    spec = ModelSpec(label="m", uri="/x", compressions=[1])
    cfg = EvalConfig(models=[spec], data="d", task="numeric_5pct")
    predictor.predict(spec, "/x", cfg)
    assert seen["fn"] is predictor.Predictor and seen["fn_constructor_kwargs"]["task"] is numeric_task
    predictor.predict(spec, "/x", EvalConfig(models=[spec], data="d"))
    assert seen["fn_constructor_kwargs"]["task"] is get_task(DEFAULT_TASK)
