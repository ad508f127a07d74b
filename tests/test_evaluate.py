"""The evaluation job: report fields, plots, FLOPs against dpn_model.flops, MLflow, registry references.

One local Ray cluster for the module; a tiny random model and a dozen synthetic eval samples.
A random model answers nothing right, so accuracy itself is checked in the unit tests of the
aggregation, and the job's accuracy is checked for consistency with its own predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from eval_workspace import make_eval_workspace, preprocessed_eval_batch

from jobs.evaluation import report as eval_report
from jobs.evaluation.config import EvalConfig, ModelSpec, parse_compressions, split_modes
from jobs.evaluation.job import evaluate, parse_model_specs

NUM_EVAL = 12
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {
    "label", "model", "compression", "num_samples", "correct", "accuracy", "mean_prefill_flops",
    "mean_dense_flops", "flops_ratio", "mean_llm_flops", "llm_flops_ratio", "visual_tokens_per_layer",
    "routing", "per_family", "per_kind", "latency_ms_per_sample", "expert_factors",
}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Unit tests (no Ray)
# ----------------------------------------------------------------------------------------------


def test_parse_compressions():
    config = SimpleNamespace(expert_strides=[(1, 1), (1, 2), (2, 2)], pooling_layers=[8, 16, 24])
    assert parse_compressions("auto, 1,2,4,2") == ["auto", 1, 2, 4]
    # schedules: bracketed (commas inside stay one mode) or dashed, stored as their label "1-2-4"
    modes = parse_compressions("auto,1,2,4,[1,2,4],1-2-4,random", config)
    assert modes == ["auto", 1, 2, 4, "1-2-4", "random"]
    assert parse_compressions("[1, 4, 4],auto") == ["1-4-4", "auto"]
    assert split_modes("auto,[1,2,4],1-2-4") == ["auto", "[1,2,4]", "1-2-4"]
    with pytest.raises(ValueError, match="match no pooling expert"):
        parse_compressions("auto,3", config)
    with pytest.raises(ValueError, match=r"'1-2' .*has 2 factor\(s\) but the model pools after 3"):
        parse_compressions("auto,1-2", config)
    with pytest.raises(ValueError, match="'dense' is not a compression factor"):
        parse_compressions("dense")
    with pytest.raises(ValueError, match="'\\[' without '\\]'"):
        parse_compressions("auto,[1,2")
    with pytest.raises(ValueError, match="no compression mode"):
        parse_compressions(",")


def test_parse_model_specs_labels_and_per_model_modes():
    specs = parse_model_specs(
        ["dense=/ckpt/dense", "models:/dpn@champion", "runs:/abc/model"], ["1,2", "dense=1"]
    )
    assert [(s.label, s.uri, s.compressions) for s in specs] == [
        ("dense", "/ckpt/dense", [1]),
        ("dpn_champion", "models:/dpn@champion", [1, 2]),
        ("model", "runs:/abc/model", [1, 2]),
    ]
    with pytest.raises(ValueError, match="names no model"):
        parse_model_specs(["a=/x"], ["b=1"])
    with pytest.raises(ValueError, match="^--compression: compression mode '1-x-4'"):
        parse_model_specs(["a=/x"], ["auto,1-x-4"])
    with pytest.raises(ValueError, match="labelled 'x'"):
        parse_model_specs(["x=/a", "x=/b"], None)


def _batch(correct, family, kind, choices, mode="auto"):
    n = len(correct)
    return {
        "correct": np.array(correct),
        "family": np.array(family),
        "kind": np.array(kind),
        "compression": np.array([mode] * n),
        "prefill_flops": np.full(n, 60.0),
        "dense_flops": np.full(n, 100.0),
        "image_flops": np.full(n, 20.0),
        "latency_s": np.full(n, 0.01),
        "visual_tokens": np.array([[16, 8, 4]] * n),
        "expert_choices": np.array(choices),
        "router_probs": np.full((n, 2, 3), 1 / 3),
    }


def test_accumulator_aggregates_accuracy_flops_and_routing():
    acc = eval_report.ModeAccumulator("m", "uri", "auto", [1, 2, 4], num_layers=2)
    acc.add(_batch([True, False], ["a", "a"], ["coarse", "coarse"], [[2, 1], [2, -1]]))
    acc.add(_batch([True, True], ["b", "a"], ["fine", "coarse"], [[0, 0], [2, 1]]))
    row = acc.row()
    assert row["num_samples"] == 4 and row["correct"] == 3 and row["accuracy"] == pytest.approx(0.75)
    assert row["flops_ratio"] == pytest.approx(0.6)
    assert row["llm_flops_ratio"] == pytest.approx(40 / 80)
    assert row["latency_ms_per_sample"] == pytest.approx(10.0)
    assert row["visual_tokens_per_layer"] == [16, 8, 4]
    assert row["routing"]["per_layer"][0] == {"1": 0.25, "2": 0.0, "4": 0.75, "skipped": 0.0}
    assert row["routing"]["per_layer"][1] == {"1": 0.25, "2": 0.5, "4": 0.0, "skipped": 0.25}
    assert row["per_family"]["a"]["accuracy"] == pytest.approx(2 / 3)
    assert row["per_family"]["a"]["kind"] == "coarse"
    assert row["per_family"]["b"]["routing"][0]["1"] == 1.0
    assert row["per_kind"]["fine"]["num_samples"] == 1
    assert "dense_flops_max_rel_error" not in row


def test_table_and_plot_errors():
    acc = eval_report.ModeAccumulator("m", "uri", 2, [1, 2, 4], num_layers=2)
    acc.add(_batch([True], ["a"], ["coarse"], [[1, 1]], mode="2"))
    row = acc.row()
    assert row["routing"] is None
    table = eval_report.format_table([row])
    assert "accuracy %" in table and "100.0" in table and "0.600" in table
    assert eval_report.format_table([row], markdown=True).startswith("| model |")
    with pytest.raises(ValueError, match="auto-mode row"):
        eval_report.plot_routing(row, "/tmp/never.png")


def test_load_rows_rejects_non_reports(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no": "rows"}))
    with pytest.raises(ValueError, match="not an evaluation report"):
        eval_report.load_rows([bad])


# ----------------------------------------------------------------------------------------------
# The job on a local Ray cluster
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_eval_workspace(tmp_path_factory.mktemp("eval"), NUM_EVAL)


@pytest.fixture(scope="module")
def report(ray_cluster, workspace):
    cfg = EvalConfig(
        models=[ModelSpec(label="tiny", uri=workspace["ckpt"], compressions=["auto", 1, 2, 4])],
        data=workspace["data"],
        batch_size=5,  # 12 samples: a ragged last batch
        max_new_tokens=2,
        json_path=str(workspace["root"] / "report.json"),
        output_dir=str(workspace["root"] / "out"),
        tracking_uri=workspace["tracking"],
        run_name="test-eval",
    )
    return evaluate(cfg)


def _predictions(workspace) -> list[dict]:
    lines = (workspace["root"] / "out" / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.ray
def test_report_has_every_field(report, workspace):
    rows = report["rows"]
    assert [r["compression"] for r in rows] == ["auto", 1, 2, 4]
    on_disk = json.loads(Path(workspace["root"] / "report.json").read_text())
    assert [r["compression"] for r in on_disk["rows"]] == ["auto", 1, 2, 4]
    from pipelines.synthetic import CELLS_FAMILY_KIND  # the default benchmark's families

    families = set(CELLS_FAMILY_KIND)
    for row in rows:
        assert set(row) >= ROW_KEYS, ROW_KEYS - set(row)
        assert row["num_samples"] == NUM_EVAL
        assert 0.0 <= row["accuracy"] <= 1.0
        assert (
            set(row["per_family"]) <= families
            and sum(f["num_samples"] for f in row["per_family"].values()) == NUM_EVAL
        )
        assert set(row["per_kind"]) == {"coarse", "fine"}
        assert len(row["visual_tokens_per_layer"]) == 4  # before pooling + 3 pooling layers
        assert row["latency_ms_per_sample"] > 0
    auto = rows[0]
    assert len(auto["routing"]["per_layer"]) == 3
    for dist in auto["routing"]["per_layer"]:
        assert set(dist) == {"1", "2", "4", "skipped"} and sum(dist.values()) == pytest.approx(1.0)
    for fam in auto["per_family"].values():
        assert len(fam["routing"]) == 3
    assert all(r["routing"] is None for r in rows[1:])
    assert rows[1]["visual_tokens_per_layer"] == [256, 256, 256, 256]
    assert rows[3]["visual_tokens_per_layer"] == [256, 64, 16, 4]
    # accuracy is what the written predictions say
    preds = _predictions(workspace)
    assert len(preds) == 4 * NUM_EVAL
    for row in rows:
        mine = [p for p in preds if p["compression"] == str(row["compression"])]
        assert row["correct"] == sum(p["correct"] for p in mine)


@pytest.mark.ray
def test_plots_are_valid_pngs(report, workspace):
    from PIL import Image

    plots = workspace["root"] / "out" / "plots"
    names = sorted(p.name for p in plots.glob("*.png"))
    assert names == ["accuracy_vs_flops.png", "routing_tiny.png"]
    for name in names:
        data = (plots / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
        with Image.open(plots / name) as image:
            image.load()
            assert image.width > 400 and image.height > 300


@pytest.mark.ray
def test_flops_ratios_agree_with_dpn_model_flops(report, workspace):
    from transformers import AutoConfig, AutoProcessor

    import dpn_model  # noqa: F401
    from dpn_model import flops
    from pipelines.synthetic import generate_splits

    config = AutoConfig.from_pretrained(workspace["ckpt"])
    processor = AutoProcessor.from_pretrained(workspace["ckpt"])
    _, samples = generate_splits(0, NUM_EVAL, seed=1)
    expected = {m: [] for m in (1, 2, 4)}
    for s in samples:
        turns = [{"from": "human", "value": f"<image>\n{s.question}"}]
        ids = processor.encode(turns, True, mode="generate")["input_ids"]
        text_len = len(ids) - ids.count(config.image_token_id)
        for m in expected:
            lens = flops.layer_seq_lens_for(config, text_len, m)
            expected[m].append(flops.prefill_flops(config, lens, lm_head_tokens=1, num_routed_layers=0))
    dense = np.mean(expected[1])
    rows = {r["compression"]: r for r in report["rows"]}
    for m in (1, 2, 4):
        assert rows[m]["mean_prefill_flops"] == pytest.approx(np.mean(expected[m]), rel=1e-9)
        assert rows[m]["mean_dense_flops"] == pytest.approx(dense, rel=1e-9)
        assert rows[m]["flops_ratio"] == pytest.approx(np.mean(expected[m]) / dense, rel=1e-9)
    assert rows[1]["flops_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert rows[1]["dense_flops_max_rel_error"] < 1e-12
    # auto pools between the extremes (plus three router calls per sample)
    assert rows[4]["flops_ratio"] < rows["auto"]["flops_ratio"] < 1.0
    assert rows[4]["flops_ratio"] < rows[2]["flops_ratio"] < 1.0


@pytest.mark.ray
def test_everything_is_logged_to_mlflow(report, workspace):
    from mlflow.tracking import MlflowClient

    run_id = report["meta"]["mlflow_run_id"]
    client = MlflowClient(workspace["tracking"])
    run = client.get_run(run_id)
    assert run.data.params["model.tiny"] == workspace["ckpt"]
    assert run.data.params["compression.tiny"] == "auto,1,2,4"
    metrics = run.data.metrics
    assert metrics["tiny/auto/accuracy"] == pytest.approx(report["rows"][0]["accuracy"])
    assert metrics["tiny/4/flops_ratio"] == pytest.approx(report["rows"][3]["flops_ratio"])
    assert "tiny/auto/accuracy/fine" in metrics
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "eval.json",
        "table.txt",
        "predictions.jsonl",
        "accuracy_vs_flops.png",
        "routing_tiny.png",
    } <= artifacts


@pytest.mark.ray
def test_registry_reference_resolves(report, workspace):
    from mlflow.tracking import MlflowClient

    import tracking

    uri = workspace["tracking"]
    tracking.setup_tracking(uri, "test-registry")
    run_id, _ = tracking.start_or_resume_run("test-registry", "register-tiny", uri=uri)
    version = tracking.log_hf_model(run_id, workspace["ckpt"], "tiny-dpn", uri=uri)
    MlflowClient(uri).set_registered_model_alias("tiny-dpn", "champion", version)
    cfg = EvalConfig(
        models=[ModelSpec(label="champion", uri="models:/tiny-dpn@champion", compressions=[1])],
        data=workspace["data"],
        batch_size=6,
        max_new_tokens=2,
        output_dir=str(workspace["root"] / "out_registry"),
        tracking_uri=uri,
        mlflow=False,
    )
    rows = evaluate(cfg)["rows"]
    assert rows[0]["model"] == "models:/tiny-dpn@champion" and rows[0]["num_samples"] == NUM_EVAL
    # the same weights as the directory evaluated above: the same greedy answers
    direct = {p["id"]: p["prediction"] for p in _predictions(workspace) if p["compression"] == "1"}
    lines = (workspace["root"] / "out_registry" / "predictions.jsonl").read_text().splitlines()
    assert {p["id"]: p["prediction"] for p in map(json.loads, lines)} == direct


@pytest.mark.ray
def test_cli_on_a_llava_style_eval_jsonl(ray_cluster, workspace, capsys):
    from dpn_cli import main
    from pipelines.synthetic import generate_samples

    folder = workspace["root"] / "jsonl"
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, s in enumerate(generate_samples(4, seed=5, tag="user")):
        (folder / "images" / f"{i}.png").write_bytes(s.png_bytes())
        key = "question" if i % 2 else "text"  # both LLaVA evaluation spellings
        rows.append({"question_id": i, "image": f"images/{i}.png", key: s.question, "answer": s.answer})
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = workspace["root"] / "user.json"
    code = main([
        "eval", "--model", f"mine={workspace['ckpt']}", "--data", str(folder / "questions.jsonl"), "--split", "none",
        "--compression", "1,4", "--json", str(out), "--no-mlflow", "--max-new-tokens", "2",
        "--output-dir", str(workspace["root"] / "out_user"),
    ])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [(r["label"], r["compression"], r["num_samples"]) for r in report["rows"]] == [
        ("mine", 1, 4),
        ("mine", 4, 4),
    ]
    assert set(report["rows"][0]["per_family"]) == {"unlabelled"} and report["rows"][0]["per_kind"] == {}
    assert "x dense" in capsys.readouterr().out


def test_cli_usage_errors_exit_2(tmp_path):
    from dpn_cli import main

    assert main(["eval", "--model", "x=/nope", "--data", str(tmp_path), "--compression", "y=1"]) == 2
    assert main(["eval", "--model", "/nope", "--data", str(tmp_path), "--batch-size", "0"]) == 2


def _eval_config(argv: list[str]) -> EvalConfig:
    import argparse

    from jobs.evaluation.job import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


EVAL_TINY = str(Path(__file__).resolve().parents[1] / "configs" / "eval_tiny.yaml")


def test_shipped_eval_config_holds_the_flags_defaults():
    first = Path(EVAL_TINY).read_text().splitlines()[0]
    assert first.startswith("# ") and "--config configs/eval_tiny.yaml" in first
    from_file = _eval_config(["--config", EVAL_TINY])
    assert from_file == _eval_config(["--model", "dpn=models:/dpn@champion", "--data", "work/data/synthetic"])
    assert from_file.models == [
        ModelSpec(label="dpn", uri="models:/dpn@champion", compressions=["auto", 1, 2, 4])
    ]


def test_eval_config_file_then_flags_then_overrides():
    cfg = _eval_config([
        "--config", EVAL_TINY, "batch_size=4", "models.0.compressions=[auto, [1, 2, 4]]", "split=null",
        "--max-samples", "50", "--batch-size", "8", "--no-mlflow",
    ])  # fmt: skip
    assert (cfg.batch_size, cfg.max_samples, cfg.split, cfg.mlflow) == (4, 50, None, False)
    assert cfg.models[0].compressions == ["auto", "1-2-4"] and cfg.data == "work/data/synthetic"
    # --compression alone sets the file's models' modes; --model replaces them
    assert _eval_config(["--config", EVAL_TINY, "--compression", "1,4"]).models[0].compressions == [1, 4]
    models = _eval_config(["--config", EVAL_TINY, "--model", "a=/x", "--compression", "a=2"]).models
    assert [(m.label, m.uri, m.compressions) for m in models] == [("a", "/x", [2])]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["batch_sise=4"], r"unknown config key batch_sise; valid keys: \[.*'batch_size'"),
        (["device=tpu"], r"device: must be one of 'auto', 'cpu' or 'cuda', got 'tpu'"),
        (["--batch-size", "0"], r"batch_size: must be >= 1, got 0"),
        (["models.0.compressions=auto,fast"], r"models\.0\.compressions: compression mode 'fast' .*a compression is one of"),
        (["models.1.uri=/x"], r"models\.1: there is no item 1; models has 1 item\(s\)"),
    ],
)  # fmt: skip
def test_eval_config_errors_name_the_key(argv, expected):
    from jobs.config import ConfigError

    with pytest.raises(ConfigError, match=expected):
        _eval_config(["--config", EVAL_TINY, *argv])


def test_dpn_eval_cli_takes_a_config_with_overrides_and_prints_it(capsys):
    import yaml

    from dpn_cli import main

    assert main(["eval", "--config", EVAL_TINY, "max_new_tokens=0"]) == 2
    assert (
        main(["eval", "--config", EVAL_TINY, "max_new_tokens=2", "--max-samples", "5", "--print-config"]) == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["max_new_tokens"] == 2 and printed["max_samples"] == 5 and printed["batch_size"] == 16
    assert printed["models"] == [
        {"label": "dpn", "uri": "models:/dpn@champion", "compressions": ["auto", 1, 2, 4]}
    ]


def test_predictor_resolves_the_uri_where_the_driver_directory_is_missing(workspace):
    """Actors on other nodes do not see the driver's download folder: they resolve the URI."""
    from jobs.evaluation.predictor import Predictor

    batch = preprocessed_eval_batch(workspace["ckpt"])
    predictor = Predictor("/not/on/this/node", ["auto", 1], 2, device="cpu", model_uri=workspace["ckpt"])
    out = predictor(batch)
    assert len(out["id"]) == 6 and list(out["compression"]) == ["auto"] * 3 + ["1"] * 3
    assert np.allclose(out["prefill_flops"][3:], out["dense_flops"][3:], rtol=1e-12)
    assert (out["prefill_flops"][:3] < out["dense_flops"][:3]).all()
    assert out["visual_tokens"].shape == (6, 4) and out["router_probs"].shape == (6, 3, 3)
    assert np.isnan(out["router_probs"][3:]).all() and np.allclose(out["router_probs"][:3].sum(-1), 1.0)


def test_predictor_runs_schedules_and_random_routing_and_generates_shared_paths_once(workspace):
    """`--compression auto,1,1-1-1,1-2-4,random`: each mode is parsed against the model's config; "1" and
    "1-1-1" force the same experts, so they share one generation (the oracle's paths rely on it)."""
    from jobs.evaluation.predictor import Predictor

    batch = preprocessed_eval_batch(workspace["ckpt"])
    modes = ["auto", "1", "1-1-1", "1-2-4", "random"]
    predictor = Predictor(workspace["ckpt"], modes, 2, device="cpu")
    calls = []
    generate = predictor._generate
    predictor._generate = lambda inputs, value, answers: (
        calls.append(value) or generate(inputs, value, answers)
    )
    out = predictor(batch)
    assert calls == ["auto", 1, (1, 2, 4), "random"]
    assert list(out["compression"]) == [m for m in modes for _ in range(3)]
    by_mode = {m: np.flatnonzero(out["compression"] == m) for m in modes}
    assert list(out["prediction"][by_mode["1"]]) == list(out["prediction"][by_mode["1-1-1"]])
    assert out["visual_tokens"][by_mode["1-2-4"]].tolist() == [[256, 256, 128, 32]] * 3
    assert (out["prefill_flops"][by_mode["1-2-4"]] < out["dense_flops"][by_mode["1-2-4"]]).all()
    assert np.isnan(out["router_probs"][by_mode["random"]]).all()  # random routing runs no router
    assert (out["expert_choices"][by_mode["random"]] >= -1).all()
    with pytest.raises(ValueError, match="has 2 factor"):
        Predictor(workspace["ckpt"], ["1-2"], 2, device="cpu")


def test_random_routing_rows_report_the_choice_distribution():
    acc = eval_report.ModeAccumulator("m", "uri", "random", [1, 2, 4], num_layers=2)
    batch = _batch([True, False], ["a", "b"], ["coarse", "fine"], [[2, 1], [0, -1]], mode="random")
    batch["router_probs"] = np.full((2, 2, 3), np.nan)
    acc.add(batch)
    row = acc.row()
    assert row["routing"]["per_layer"][1] == {"1": 0.0, "2": 0.5, "4": 0.0, "skipped": 0.5}
    assert row["routing"]["mean_router_probs"] is None
    assert "0.0/" in eval_report.format_family_table([row])  # routed: accuracy/visual tokens kept


def test_cost_dial_modes_are_logged_under_names_mlflow_accepts(tmp_path):
    """MLflow refuses '=' in a metric name: one dial mode (auto:lambda=-4) used to fail the whole run's logging."""
    from mlflow.tracking import MlflowClient

    from jobs.evaluation.mlflow_log import log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = EvalConfig(
        models=[ModelSpec(label="dpn", uri="runs:/0123abcd/model", compressions=["auto", "auto:lambda=-4"])],
        data=str(tmp_path), tracking_uri=uri, run_name="dial", experiment="dial",
    )  # fmt: skip
    row = {"per_family": {"cell_color": {"accuracy": 0.5}}, "per_kind": {}, "visual_tokens_per_layer": [16]}
    report = {
        "meta": {"device": "cpu"},
        "rows": [
            {**row, "label": "dpn", "compression": "auto", "accuracy": 0.75, "flops_ratio": 0.6},
            {**row, "label": "dpn", "compression": "auto:lambda=-4", "accuracy": 0.9, "flops_ratio": 0.8},
        ],
    }
    metrics = MlflowClient(uri).get_run(log_run(cfg, report, [])).data.metrics
    assert metrics["dpn/auto:lambda_-4/accuracy"] == 0.9
    assert metrics["dpn/auto:lambda_-4/accuracy/cell_color"] == 0.5
    assert metrics["dpn/auto/flops_ratio"] == 0.6
