"""The oracle router (jobs/evaluation/oracle.py): every static path, the frontier, budgets and regret.

Unit tests on hand-made tables check each definition against numbers worked out by hand, and random
tables check the properties that must hold for any data (the oracle is never worse than a path, the
frontier is non-dominated, a router choosing static paths has non-negative regret). One short Ray test
runs ``dpn eval --oracle`` on a tiny random model: every path once, on every sample, in the same pass as
the requested modes.
"""

from __future__ import annotations

import contextlib
import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
from eval_workspace import make_eval_workspace

from jobs.evaluation import oracle
from jobs.evaluation.oracle import PathCollector, PathTable

NUM_EVAL = 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_CONFIG = SimpleNamespace(expert_strides=[(1, 1), (1, 2), (2, 2)], pooling_layers=[8, 16, 24])


def _table(correct, flops, dense, family=None, kind=None, paths=None) -> PathTable:
    correct = np.asarray(correct, dtype=bool)
    n, p = correct.shape
    return PathTable(
        paths=paths or [f"p{i}" for i in range(p)],
        correct=correct,
        flops=np.asarray(flops, dtype=np.float64),
        dense=np.asarray(dense, dtype=np.float64),
        family=np.asarray(family if family is not None else ["f"] * n),
        kind=np.asarray(kind if kind is not None else ["coarse"] * n),
        ids=np.asarray([f"s{i}" for i in range(n)]),
    )


def _worked_table() -> PathTable:
    """Four samples of dense cost 10 on three paths costing 10, 6 and 3.

    s0 every path right (free), s1 right on the two dearer paths (3 more than the cheapest), s2 right on the
    dense path only (7 more), s3 never right. Oracle: 3 + 6 + 10 + 3 = 22 FLOPs of 40 (0.55), 3 of 4 right.
    """
    correct = [[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]]
    return _table(correct, [[10, 6, 3]] * 4, [10] * 4, family=["a", "a", "b", "b"], kind=["coarse"] * 2 + ["fine"] * 2,
                  paths=["1-1", "1-2", "2-2"])  # fmt: skip


def _random_table(seed: int, n: int = 40) -> PathTable:
    """Nine paths (three experts, two pooling layers) of random cost and skill; per-sample costs vary."""
    rng = np.random.default_rng(seed)
    labels = oracle.path_labels(
        SimpleNamespace(expert_strides=[(1, 1), (1, 2), (2, 2)], pooling_layers=[1, 2])
    )
    cost = rng.uniform(0.2, 1.0, size=len(labels))
    flops = cost[None] * rng.uniform(0.8, 1.2, size=(n, 1)) * 100
    skill = rng.uniform(0.1, 0.9, size=len(labels))
    correct = rng.uniform(size=(n, len(labels))) < skill[None]
    return _table(correct, flops, np.full(n, 110.0), paths=labels)


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------


def test_static_paths_enumerate_one_factor_per_pooling_layer():
    from dpn_model.configuration import compression_label, parse_compression

    labels = oracle.path_labels(DEFAULT_CONFIG)
    assert len(labels) == 27 == len(set(labels))
    assert labels[0] == "1-1-1" and labels[-1] == "4-4-4" and "1-2-4" in labels
    for label in labels:  # each is a schedule the model's parser accepts, and labels back to itself
        assert compression_label(parse_compression(label, DEFAULT_CONFIG)) == label
    two = SimpleNamespace(expert_strides=[(1, 1), (2, 2)], pooling_layers=[1, 2])
    assert oracle.path_labels(two) == ["1-1", "1-4", "4-1", "4-4"]
    assert oracle.dense_path(labels) == "1-1-1" and oracle.dense_path(["2-2", "2-4"]) is None


# ----------------------------------------------------------------------------------------------
# Oracle, frontier, budgets on hand-made tables
# ----------------------------------------------------------------------------------------------


def test_oracle_takes_the_cheapest_correct_path_else_the_cheapest():
    correct = [[1, 1, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0], [1, 1, 1]]
    flops = [[3, 2, 1], [3, 2, 1], [3, 2, 1], [3, 2, 1], [2, 1, 1]]  # last: a tie goes to the first
    choice, right = oracle.oracle_choice(np.array(correct, bool), np.array(flops, float))
    assert choice.tolist() == [1, 2, 2, 0, 1]
    assert right.tolist() == [True, True, False, True, True]


def test_pareto_frontier_drops_dominated_points():
    flops = [1.0, 0.5, 0.5, 0.25, 0.75, 0.9, 0.25]
    accuracy = [0.9, 0.6, 0.7, 0.3, 0.7, 0.95, 0.3]
    # 1 (same FLOPs as 2, less accurate), 4 (as accurate as 2 at more FLOPs), 0 (beaten by 5 at less FLOPs)
    # and 6 (a copy of 3) are dominated.
    assert oracle.pareto_frontier(flops, accuracy) == [3, 2, 5]
    assert oracle.pareto_frontier([], []) == []


def test_frontier_interpolation_and_its_inverse():
    points = [(0.25, 0.3), (0.5, 0.7), (0.9, 0.95)]
    assert oracle.frontier_accuracy_at(points, 0.2) is None  # no static path is that cheap
    assert oracle.frontier_accuracy_at(points, 0.25) == pytest.approx(0.3)
    assert oracle.frontier_accuracy_at(points, 0.375) == pytest.approx(0.5)
    assert oracle.frontier_accuracy_at(points, 0.7) == pytest.approx(0.825)
    assert oracle.frontier_accuracy_at(points, 1.0) == pytest.approx(0.95)  # more FLOPs buy nothing
    assert oracle.frontier_flops_at(points, 0.1) == pytest.approx(0.25)
    assert oracle.frontier_flops_at(points, 0.5) == pytest.approx(0.375)
    assert oracle.frontier_flops_at(points, 0.95) == pytest.approx(0.9)
    assert oracle.frontier_flops_at(points, 0.96) is None  # no static path is that accurate


def test_oracle_budget_curve_is_the_fractional_knapsack():
    table = _worked_table()
    assert oracle.oracle_accuracy_at(table, 0.25) is None  # below the cheapest path of every sample
    assert oracle.oracle_accuracy_at(table, 0.3) == pytest.approx(0.25)  # s0 is right for free
    assert oracle.oracle_accuracy_at(table, 0.375) == pytest.approx(0.5)  # + s1 (3 FLOPs)
    assert oracle.oracle_accuracy_at(table, 0.4625) == pytest.approx(0.625)  # + half of s2 (3.5 of 7)
    assert oracle.oracle_accuracy_at(table, 0.55) == pytest.approx(0.75)  # the oracle itself
    assert oracle.oracle_accuracy_at(table, 1.0) == pytest.approx(0.75)  # s3 is never right
    assert oracle.oracle_flops_at(table, 0.1) == pytest.approx(0.3)
    assert oracle.oracle_flops_at(table, 0.5) == pytest.approx(0.375)
    assert oracle.oracle_flops_at(table, 0.625) == pytest.approx(0.4625)
    assert oracle.oracle_flops_at(table, 0.75) == pytest.approx(0.55)
    assert oracle.oracle_flops_at(table, 0.8) is None


def test_analyse_worked_example():
    table = _worked_table()
    rows = [
        {"compression": "auto", "accuracy": 0.7, "flops_ratio": 0.6},  # above the static frontier
        {"compression": 4, "accuracy": 0.25, "flops_ratio": 0.3},  # the cheapest path itself
    ]
    section = oracle.analyse(table, rows)
    paths = {p["path"]: p for p in section["paths"]}
    assert [paths[k]["accuracy"] for k in ("1-1", "1-2", "2-2")] == pytest.approx([0.75, 0.5, 0.25])
    assert [paths[k]["flops_ratio"] for k in ("1-1", "1-2", "2-2")] == pytest.approx([1.0, 0.6, 0.3])
    assert all(p["num_samples"] == 4 for p in section["paths"])
    assert section["frontier"] == ["2-2", "1-2", "1-1"] and section["dense_path"] == "1-1"
    o = section["oracle"]
    assert (o["accuracy"], o["correct"], o["flops_ratio"]) == (pytest.approx(0.75), 3, pytest.approx(0.55))
    assert o["path_counts"] == {"2-2": 2, "1-2": 1, "1-1": 1}
    assert o["dense_accuracy"] == pytest.approx(0.75) and o["flops_ratio_at_dense_accuracy"] == pytest.approx(
        0.55
    )
    assert o["best_path"] == "1-1" and o["best_path_accuracy"] == pytest.approx(0.75)
    # the oracle's choice per layer over the 3 samples it gets right: 2-2, 1-2, 1-1
    assert o["choice_per_layer"][0] == pytest.approx({"1": 2 / 3, "2": 1 / 3})
    auto = section["regret"]["auto"]
    assert auto["routed"] is True
    assert auto["frontier_accuracy"] == pytest.approx(0.5) and auto["oracle_accuracy"] == pytest.approx(0.75)
    assert auto["accuracy_lost_vs_frontier"] == pytest.approx(-0.2)  # beats every static mix at its FLOPs
    assert auto["accuracy_lost_vs_oracle"] == pytest.approx(0.05)
    # frontier FLOPs for 70% accuracy: between 1-2 (0.6, 50%) and 1-1 (1.0, 75%) -> 0.6 + 0.4 * 0.8 = 0.92
    assert auto["frontier_flops_ratio"] == pytest.approx(0.92) and auto[
        "flops_wasted_vs_frontier"
    ] == pytest.approx(-0.32)
    # oracle FLOPs for 2.8 of 4 right: s0, s1 and 0.8 of s2 -> (12 + 3 + 5.6) / 40 = 0.515
    assert auto["oracle_flops_ratio"] == pytest.approx(0.515) and auto[
        "flops_wasted_vs_oracle"
    ] == pytest.approx(0.085)
    assert auto["gap_closed"] == pytest.approx(0.8)  # (0.7 - 0.5) / (0.75 - 0.5)
    fixed = section["regret"]["4"]
    assert fixed["routed"] is False and fixed["accuracy_lost_vs_frontier"] == pytest.approx(0.0)
    assert fixed["accuracy_lost_vs_oracle"] == pytest.approx(0.0) and fixed["gap_closed"] is None
    a, b = section["per_family"]["a"], section["per_family"]["b"]
    assert (a["accuracy"], a["flops_ratio"], a["kind"]) == (1.0, pytest.approx(9 / 20), "coarse")
    assert (b["accuracy"], b["flops_ratio"]) == (0.5, pytest.approx(13 / 20))
    assert a["flops_ratio_at_dense_accuracy"] == pytest.approx(9 / 20)  # coarse: dense accuracy at 45%
    assert set(section["per_kind"]) == {"coarse", "fine"}
    # family router: family a -> its best path 1-2 (both right, cost 6 each); b -> 1-1 (s2 right, cost 10 each)
    fam = section["family_router"]
    assert fam["paths"] == {"a": "1-2", "b": "1-1"}
    assert (fam["accuracy"], fam["flops_ratio"]) == (pytest.approx(0.75), pytest.approx(32 / 40))
    text = oracle.format_section("m", section)
    assert "family router" in text
    assert "* 2-2" in text and "oracle" in text and "gap closed" in text and "75.0" in text
    metrics = oracle.mlflow_metrics("m", section)
    assert metrics["m/oracle/accuracy"] == pytest.approx(0.75)
    assert metrics["m/path/1-2/flops_ratio"] == pytest.approx(0.6)
    assert metrics["m/auto/regret/gap_closed"] == pytest.approx(0.8)
    assert "m/4/regret/gap_closed" not in metrics  # undefined values are left out


def test_plot_and_sample_records(tmp_path):
    from PIL import Image

    table = _worked_table()
    section = oracle.analyse(table, [{"compression": "auto", "accuracy": 0.7, "flops_ratio": 0.6}])
    path = oracle.plot_section("m", section, tmp_path / "oracle.png", oracle.budget_curve(table))
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    with Image.open(path) as image:
        assert image.width > 400 and image.height > 300
    records = oracle.sample_records(table, "m")
    assert [r["oracle_path"] for r in records] == ["2-2", "1-2", "1-1", "2-2"]
    assert [r["correct"] for r in records] == [True, True, True, False]
    assert records[1]["correct_paths"] == ["1-1", "1-2"] and records[1]["flops_ratio"] == pytest.approx(0.6)


# ----------------------------------------------------------------------------------------------
# Properties on random tables
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_oracle_properties_on_random_tables(seed):
    table = _random_table(seed)
    section = oracle.analyse(table)
    paths = section["paths"]
    o = section["oracle"]
    accuracy = np.array([p["accuracy"] for p in paths])
    flops = np.array([p["flops_ratio"] for p in paths])
    assert o["accuracy"] >= accuracy.max() - 1e-12  # never worse than the best single path
    for p in paths:
        # the oracle reaches any path's accuracy at no more than that path's FLOPs
        assert oracle.oracle_flops_at(table, p["accuracy"]) <= p["flops_ratio"] + 1e-12
        if p["accuracy"] == o["accuracy"]:
            assert o["flops_ratio"] <= p["flops_ratio"] + 1e-12
    # the frontier: no frontier path is dominated, every other path is (or is a copy of a frontier point)
    front = [i for i, p in enumerate(paths) if p["on_frontier"]]
    assert sorted(paths[i]["path"] for i in front) == sorted(section["frontier"])
    for i, p in enumerate(paths):
        dominated = any(
            flops[j] <= flops[i]
            and accuracy[j] >= accuracy[i]
            and (flops[j] < flops[i] or accuracy[j] > accuracy[i])
            for j in range(len(paths))
        )
        if p["on_frontier"]:
            assert not dominated, p
        else:
            assert dominated or any(flops[j] == flops[i] and accuracy[j] == accuracy[i] for j in front), p
    points = [(paths[i]["flops_ratio"], paths[i]["accuracy"]) for i in
              sorted(front, key=lambda i: paths[i]["flops_ratio"])]  # fmt: skip
    assert all(b[1] > a[1] and b[0] > a[0] for a, b in zip(points, points[1:]))
    # the family router (one family here): the best single path, never above the oracle
    fam = section["family_router"]
    assert fam["accuracy"] == pytest.approx(accuracy.max()) and fam["accuracy"] <= o["accuracy"] + 1e-12
    assert (
        oracle.family_router(_table([[1, 0]], [[2, 1]], [2], family=[""])) is None
    )  # no families: undefined
    # the oracle's budget curve lies on or above the frontier everywhere
    for x in np.linspace(flops.min(), 1.2, 25):
        assert oracle.oracle_accuracy_at(table, x) >= oracle.frontier_accuracy_at(points, x) - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_a_router_of_static_paths_has_non_negative_regret(seed):
    table = _random_table(seed)
    rng = np.random.default_rng(100 + seed)
    pick = rng.integers(0, len(table.paths), size=table.num_samples)  # any per-sample routing
    rows = np.arange(table.num_samples)
    accuracy = float(table.correct[rows, pick].mean())
    ratio = float(table.flops[rows, pick].sum() / table.dense.sum())
    r = oracle.analyse(table, [{"compression": "auto", "accuracy": accuracy, "flops_ratio": ratio}])[
        "regret"
    ]["auto"]
    assert r["accuracy_lost_vs_oracle"] >= -1e-12
    assert r["flops_wasted_vs_oracle"] >= -1e-12
    if r["frontier_accuracy"] is not None:  # the oracle at a budget bounds the frontier
        assert r["oracle_accuracy"] >= r["frontier_accuracy"] - 1e-12


# ----------------------------------------------------------------------------------------------
# Collecting the evaluation's rows
# ----------------------------------------------------------------------------------------------


def _rows(ids, modes, correct, flops):
    n = len(ids)
    return {
        "id": np.array(ids), "compression": np.array(modes), "correct": np.array(correct, bool),
        "prefill_flops": np.array(flops, float), "dense_flops": np.full(n, 10.0),
        "family": np.array(["f"] * n), "kind": np.array(["fine"] * n), "visual_tokens": np.array([[16, 4]] * n),
    }  # fmt: skip


def test_collector_matches_rows_by_sample_id_across_blocks():
    collector = PathCollector(["1", "4"])
    collector.add(_rows(["a", "b", "a"], ["1", "1", "auto"], [1, 0, 1], [10, 10, 7]))  # auto is ignored
    collector.add(_rows(["b", "a"], ["4", "4"], [1, 0], [4, 3]))
    table = collector.table()
    assert table.ids.tolist() == ["a", "b"]
    assert table.correct.tolist() == [[True, False], [False, True]]
    assert table.flops.tolist() == [[10.0, 3.0], [10.0, 4.0]]
    assert table.visual.shape == (2, 2, 2)
    with pytest.raises(ValueError, match="appears twice"):
        collector.add(_rows(["a"], ["1"], [1], [10]))
    incomplete = PathCollector(["1", "4"])
    incomplete.add(_rows(["a"], ["1"], [1], [10]))
    with pytest.raises(ValueError, match="missing, e.g. sample 'a' on path 4"):
        incomplete.table()


# ----------------------------------------------------------------------------------------------
# dpn eval --oracle on a tiny random model (one local Ray cluster for the module)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_eval_workspace(tmp_path_factory.mktemp("oracle"), NUM_EVAL)


@pytest.fixture(scope="module")
def run(ray_cluster, workspace):
    from dpn_cli import main

    out = workspace["root"] / "report.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([
            "eval", "--model", f"tiny={workspace['ckpt']}", "--data", workspace["data"], "--oracle",
            "--compression", "auto,2,[1,2,4]", "--batch-size", "4", "--max-new-tokens", "1", "--json", str(out),
            "--output-dir", str(workspace["root"] / "out"), "--tracking-uri", workspace["tracking"],
        ])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text()), stdout.getvalue()


@pytest.mark.ray
def test_every_path_is_evaluated_once_on_every_sample(run, workspace):
    from transformers import AutoConfig

    import dpn_model  # noqa: F401 - Auto registration

    report, _ = run
    config = AutoConfig.from_pretrained(workspace["ckpt"])
    section = report["oracle"]["tiny"]
    labels = [p["path"] for p in section["paths"]]
    assert sorted(labels) == sorted(oracle.path_labels(config)) and len(set(labels)) == 27
    assert all(p["num_samples"] == NUM_EVAL for p in section["paths"]) and section["num_samples"] == NUM_EVAL
    # the requested modes are rows as usual; the paths are not (they are in the oracle section)
    rows = {str(r["compression"]): r for r in report["rows"]}
    assert list(rows) == ["auto", "2", "1-2-4"] and all(r["num_samples"] == NUM_EVAL for r in rows.values())
    paths = {p["path"]: p for p in section["paths"]}
    for mode, path in (("2", "2-2-2"), ("1-2-4", "1-2-4")):  # the same generation, reported twice
        assert rows[mode]["accuracy"] == paths[path]["accuracy"]
        assert rows[mode]["flops_ratio"] == pytest.approx(paths[path]["flops_ratio"], rel=1e-12)
    assert paths["1-1-1"]["flops_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert paths["1-2-4"]["visual_tokens_per_layer"] == [256, 256, 128, 32]
    assert paths["4-4-4"]["visual_tokens_per_layer"] == [256, 64, 16, 4]
    assert min(paths.values(), key=lambda p: p["flops_ratio"])["path"] == "4-4-4"
    samples = (workspace["root"] / "out" / "oracle_samples.jsonl").read_text().splitlines()
    assert len(samples) == NUM_EVAL and json.loads(samples[0])["oracle_path"] in labels
    predictions = (workspace["root"] / "out" / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 3 * NUM_EVAL  # requested modes only


@pytest.mark.ray
def test_oracle_bounds_the_paths_and_the_router(run):
    report, stdout = run
    section = report["oracle"]["tiny"]
    o = section["oracle"]
    paths = section["paths"]
    assert o["accuracy"] >= max(p["accuracy"] for p in paths)
    for p in paths:
        if p["accuracy"] == o["accuracy"]:
            assert o["flops_ratio"] <= p["flops_ratio"] + 1e-12
    front = [p for p in paths if p["path"] in section["frontier"]]
    for f in front:
        assert not any(
            q["flops_ratio"] <= f["flops_ratio"] and q["accuracy"] >= f["accuracy"]
            and (q["flops_ratio"] < f["flops_ratio"] or q["accuracy"] > f["accuracy"]) for q in paths
        )  # fmt: skip
    assert set(section["regret"]) == {"auto", "2", "1-2-4"}
    for r in section["regret"].values():
        assert r["accuracy_lost_vs_oracle"] >= 0.0
        assert r["flops_wasted_vs_oracle"] is None or r["flops_wasted_vs_oracle"] >= -1e-12
    for mode in ("2", "1-2-4"):  # static paths: on or below the frontier
        assert section["regret"][mode]["accuracy_lost_vs_frontier"] >= -1e-12
    assert section["regret"]["auto"]["routed"] and section["regret"]["auto"]["flops_ratio"] < 1.0
    assert set(section["per_kind"]) == {"coarse", "fine"}
    assert sum(f["num_samples"] for f in section["per_family"].values()) == NUM_EVAL
    assert "static paths (* Pareto frontier) and the oracle" in stdout and "gap closed" in stdout


@pytest.mark.ray
def test_oracle_plot_and_metrics_are_logged_to_mlflow(run, workspace):
    from mlflow.tracking import MlflowClient
    from PIL import Image

    report, _ = run
    plot = workspace["root"] / "out" / "plots" / "oracle_tiny.png"
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(plot) as image:
        assert image.width > 400
    client = MlflowClient(workspace["tracking"])
    run_id = report["meta"]["mlflow_run_id"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"eval.json", "oracle_tiny.png", "oracle_samples.jsonl", "table.txt"} <= artifacts
    metrics = client.get_run(run_id).data.metrics
    assert metrics["tiny/oracle/accuracy"] == pytest.approx(report["oracle"]["tiny"]["oracle"]["accuracy"])
    assert "tiny/path/1-2-4/flops_ratio" in metrics and "tiny/1-2-4/flops_ratio" in metrics
    assert "tiny/auto/regret/accuracy_lost_vs_oracle" in metrics
    assert client.get_run(run_id).data.params["compression.tiny"] == "auto,2,1-2-4"


@pytest.mark.ray
def test_a_schedule_that_does_not_fit_the_model_exits_2(ray_cluster, workspace, caplog):
    from dpn_cli import main

    args = ["eval", "--model", workspace["ckpt"], "--data", workspace["data"], "--no-mlflow",
            "--output-dir", str(workspace["root"] / "bad")]  # fmt: skip
    assert main([*args, "--compression", "auto,1-2"]) == 2
    assert "--compression for model 'ckpt'" in caplog.text and "has 2 factor(s)" in caplog.text
    assert main([*args, "--compression", "[1,2,3]"]) == 2
    assert "match no pooling expert" in caplog.text
    assert main([*args, "--compression", "auto,[1,2"]) == 2  # a form error: before any model is read
    assert "'[' without ']'" in caplog.text
