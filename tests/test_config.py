"""The YAML config loader and the config schemas (train, retrain, eval, serve sections): clear errors naming the
key, overrides, shipped configs. No Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pytest
import yaml
from pydantic import Field

from jobs.config import ConfigError, ConfigModel, dump_config, flatten, load_config, parse_overrides
from jobs.training.config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("train_*.yaml"))


class Inner(ConfigModel):
    size: int = 1
    mode: Literal["a", "b", 4] = "a"
    rate: float = 0.5


class Outer(ConfigModel):
    name: str = "x"
    inner: Inner = Field(default_factory=Inner)
    maybe: Inner | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    items: list[int] = Field(default_factory=list)
    sections: list[Inner] = Field(default_factory=list)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_file_then_overrides_build_typed_models(tmp_path):
    path = write(tmp_path, {"name": "run", "inner": {"size": 3}, "items": [1, 2]})
    cfg = load_config(Outer, path, ["inner.rate=3e-4", "inner.mode=4", "maybe.size=7", "tags.team=vision"])
    assert cfg.name == "run" and cfg.items == [1, 2]
    assert cfg.inner == Inner(size=3, mode=4, rate=3e-4)
    assert isinstance(cfg.inner.rate, float)
    assert cfg.maybe == Inner(size=7)
    assert cfg.tags == {"team": "vision"}
    assert load_config(Outer, path, ["maybe=null"]).maybe is None


def test_unknown_key_names_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(Outer, write(tmp_path, {"inner": {"sise": 3}}))
    message = str(err.value)
    assert "inner.sise" in message and "['mode', 'rate', 'size']" in message
    with pytest.raises(ConfigError, match=r"unknown config key nmae.*valid keys"):
        load_config(Outer, None, ["nmae=y"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("inner.size=abc", r"inner\.size: expected an integer, got 'abc'"),
        ("inner.size=1.5", r"inner\.size: expected an integer"),
        ("inner.mode=c", r"inner\.mode: must be one of 'a', 'b' or 4, got 'c'"),
        ("inner.size=true", r"inner\.size: expected an integer, got true"),
        ("inner.rate=fast", r"inner\.rate: expected a number"),
        ("items=[1, x]", r"items\.1: expected an integer, got 'x'"),
        ("inner=3", r"inner: expected a mapping of \['mode', 'rate', 'size'\]"),
        ("name", r"not of the form key=value"),
    ],
)
def test_invalid_values_fail_with_the_dotted_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(Outer, None, [override])


def test_numeric_override_keys_index_list_items(tmp_path):
    path = write(tmp_path, {"sections": [{"size": 1}, {"size": 2, "mode": "b"}]})
    cfg = load_config(Outer, path, ["sections.1.size=5"])
    assert cfg.sections == [Inner(size=1), Inner(size=5, mode="b")]
    with pytest.raises(ConfigError, match=r"sections\.1\.rate: expected a number, got 'x'"):
        load_config(Outer, path, ["sections.1.rate=x"])
    with pytest.raises(ConfigError, match=r"sections\.2: there is no item 2; sections has 2 item\(s\)"):
        load_config(Outer, path, ["sections.2.size=5"])


def test_every_problem_is_one_line_naming_its_key():
    with pytest.raises(ConfigError) as err:
        load_train_config(None, ["train.epochs=0", "optim.lr=-1", "run.nmae=x"])
    assert str(err.value).splitlines() == [
        "optim.lr: must be > 0, got -1",
        "train.epochs: must be >= 1, got 0",
        "unknown config key run.nmae in section 'run'; valid keys: ['cpus_per_worker', 'export_dir', "
        "'local_num_cpus', 'max_failures', 'name', 'num_workers', 'ray_address', 'resources_per_worker', "
        "'storage_path', 'use_gpu', 'work_dir']",
    ]


def test_missing_file_and_non_mapping_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, bad)


def test_parse_overrides_builds_a_tree():
    assert parse_overrides(["a.b=1", "a.c=[8, 16]", "d=text", "e="]) == {
        "a": {"b": 1, "c": [8, 16]},
        "d": "text",
        "e": "",
    }


def test_train_config_validation_names_the_section():
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size: must be >= 1, got 0"):
        load_train_config(None, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match=r"train\.max_steps: must be >= 0, got -3"):
        load_train_config(None, ["train.max_steps=-3"])
    with pytest.raises(ConfigError, match=r"model: compression 3: factor\(s\) \[3\] match no pooling expert"):
        load_train_config(None, ["model.compression=3"])
    with pytest.raises(ConfigError, match=r"unknown config key optim\.learning_rate.*'lr'"):
        load_train_config(None, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"model: dense_warmup_steps only applies to compression 'auto'"):
        load_train_config(None, ["model.compression=4", "model.dense_warmup_steps=10"])
    with pytest.raises(ConfigError, match=r"model: paths_per_sample only applies to compression 'auto'"):
        load_train_config(None, ["model.compression=1,2,4", "model.paths_per_sample=2"])
    with pytest.raises(ConfigError, match=r"model\.paths_per_sample: must be >= 1, got 0"):
        load_train_config(None, ["model.paths_per_sample=0"])
    with pytest.raises(ConfigError, match=r"paths_per_sample=2 needs router_estimator 'reinforce' .*'scale'"):
        load_train_config(None, ["model.paths_per_sample=2", "model.config_overrides.router_estimator=scale"])


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_train_configs_load_and_open_with_their_launch_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "--config configs/" + path.name in first
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    # the resolved config round-trips through YAML and flattens to MLflow params
    again = load_config(TrainConfig, data=yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert "optim.lr" in flatten(cfg)


def test_model_compression_accepts_schedules_and_random_routing():
    assert load_train_config(None, ["model.compression=[1, 2, 4]"]).model.compression == [1, 2, 4]
    assert load_train_config(None, ["model.compression=1,2,4"]).model.compression == "1,2,4"
    assert load_train_config(None, ["model.compression=random"]).model.compression == "random"
    assert load_train_config(None, ["model.compression=2"]).model.compression == 2
    # the preset pools after 3 layers with the default experts (factors 1, 2, 4)
    with pytest.raises(
        ConfigError, match=r"model: compression .* has 2 factor\(s\) but the model pools after 3"
    ):
        load_train_config(None, ["model.compression=[1, 2]"])
    with pytest.raises(ConfigError, match=r"model: compression .* factor\(s\) \[8\] match no pooling expert"):
        load_train_config(None, ["model.compression=1,2,8"])
    with pytest.raises(
        ConfigError,
        match=r"model\.compression: must be one of auto, random, 1, 2, 4 or a schedule like 1,2,4, got 'fast'",
    ):
        load_train_config(None, ["model.compression=fast"])
    with pytest.raises(ConfigError, match=r"model: dense_warmup_steps only applies to compression 'auto'"):
        load_train_config(None, ["model.compression=random", "model.dense_warmup_steps=10"])
    # overrides change the pyramid the schedule is checked against
    two_layers = load_train_config(
        None, ["model.compression=[1, 4]", "model.config_overrides.pooling_layers=[1, 2]"]
    )
    assert two_layers.model.compression == [1, 4]
    # a checkpoint's pyramid is only known once it is loaded: only the form is checked here
    assert load_train_config(
        None, ["model.init=/some/checkpoint", "model.compression=[1, 2]"]
    ).model.compression


def test_shipped_configs_cover_dpn_and_the_baselines():
    from dpn_model.configuration import compression_label

    compressions = {compression_label(load_train_config(p).model.compression) for p in TRAIN_CONFIGS}
    assert {"auto", "1", "2", "4"} <= compressions
    recipe = load_train_config(ROOT / "configs" / "train_llava7b.yaml")
    assert (
        recipe.train.micro_batch_size == 16 and recipe.optim.lr == 2e-5 and recipe.optim.warmup_ratio == 0.03
    )
    assert recipe.data.max_length == 2048 and recipe.train.epochs == 1 and recipe.run.use_gpu
    assert recipe.model.config_overrides.get("pooling_layers") == [8, 16, 24]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["deepspeed.precision=fp8"], r"deepspeed\.precision: must be one of 'auto', 'bf16', 'fp16' or 'fp32', got 'fp8'"),
        (["data.synthetic.format=csv"], r"data\.synthetic\.format: must be one of 'llava', 'webdataset' or 'parquet', got 'csv'"),
        (["model.compression=[1, x]"], r"model\.compression: must be one of auto, random, 1, 2, 4 or a schedule like 1,2,4, got \[1, 'x'\]"),
        (["train.max_step=5"], r"unknown config key train\.max_step in section 'train'; valid keys: \['epochs', 'grad_accum_steps', 'log_every', 'max_steps', 'micro_batch_size'\]"),
        (["optim.betas=[0.9]"], r"optim\.betas: must have at least 2 item\(s\), got \[0\.9\]"),
        (["run.name=a/b"], r"run\.name: must be a non-empty folder name without '/', got 'a/b'"),
    ],
)  # fmt: skip
def test_train_config_errors_name_the_key_and_the_allowed_values(overrides, expected):
    with pytest.raises(ConfigError, match=expected):
        load_train_config(None, overrides)


def test_compression_choices_come_from_the_model_config_module(monkeypatch):
    import dpn_model.configuration as configuration
    from jobs.config import compression_choices

    assert compression_choices() == "auto, random, 1, 2, 4 or a schedule like 1,2,4"
    monkeypatch.setattr(configuration, "DEFAULT_COMPRESSION_FACTORS", (1, 9))
    assert compression_choices("-") == "auto, random, 1, 9 or a schedule like 1-9"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["eval.compression=auto,1"], r"eval\.compression: must be one mode: one of auto, random, 1, 2, 4 or a schedule like 1-2-4, got 'auto,1'"),
        (["eval.compression=fast"], r"eval\.compression: must be one mode: .*, got 'fast'"),
        (["replay.fraction=1.5"], r"replay\.fraction: must be <= 1, got 1\.5"),
        (["gate.min_accuracy=-0.1"], r"gate\.min_accuracy: must be >= 0, got -0\.1"),
        (["eval.batch_size=0"], r"eval\.batch_size: must be >= 1, got 0"),
        (["gate.tolerance=1"], r"unknown config key gate\.tolerance in section 'gate'; valid keys: \['accuracy_tolerance', 'flops_tolerance', 'min_accuracy'\]"),
    ],
)  # fmt: skip
def test_retrain_config_errors_name_the_key(overrides, expected):
    from jobs.retraining.config import load_retrain_config

    with pytest.raises(ConfigError, match=expected):
        load_retrain_config(ROOT / "configs" / "retrain_tiny.yaml", overrides)


def test_retrain_eval_compression_takes_one_mode_or_schedule():
    from jobs.retraining.config import load_retrain_config

    assert load_retrain_config(None, ["eval.compression=1-2-4"]).eval.compression == "1-2-4"
    assert load_retrain_config(None, ["eval.compression=2"]).eval.compression == "2"  # text, as before


def test_serve_sections_name_the_key_and_the_allowed_values():
    from serve_apps.limits import Limits
    from serve_apps.policy import BatchingConfig

    with pytest.raises(
        ConfigError, match=r"batching\.mode: must be one of 'bucketed', 'mixed' or 'dense', got 'fifo'"
    ):
        BatchingConfig.from_dict({"mode": "fifo"})
    with pytest.raises(ConfigError, match=r"batching\.max_queue_delay_s: must be >= 0, got -1"):
        BatchingConfig.from_dict({"max_queue_delay_s": -1})
    with pytest.raises(
        ConfigError,
        match=r"unknown config key limits\.max_image_byte in section 'limits'; valid keys: \[.*'max_image_bytes'",
    ):
        Limits.from_dict({"max_image_byte": 1})
    with pytest.raises(ConfigError, match=r"limits\.max_tokens: must be >= 1, got 0"):
        Limits.from_dict({"max_tokens": 0})
    with pytest.raises(ConfigError, match=r"limits: default_max_tokens \(64\) exceeds max_tokens \(32\)"):
        Limits.from_dict({"max_tokens": 32})
    limits = Limits.from_dict({"image_formats": ["png", "jpeg"], "max_image_aspect_ratio": 4})
    assert limits.image_formats == ("PNG", "JPEG") and limits.to_dict()["image_formats"] == ["PNG", "JPEG"]
    assert Limits.from_dict(limits.to_dict()) == limits and BatchingConfig.from_dict(None) == BatchingConfig()


def test_dpn_train_cli_reports_config_errors_and_prints_the_resolved_config(capsys):
    from dpn_cli import main

    tiny = str(ROOT / "configs" / "train_tiny.yaml")
    assert main(["train", "--config", tiny, "optim.lrr=1"]) == 2
    assert main(["train", "--config", tiny, "optim.lr=0.5", "run.name=exp2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["run"]["name"] == "exp2"


def test_the_quickstart_config_is_the_benchmarks_dpn():
    # issue 14: the config a user runs must train the same DPN as benchmarks/quality.py's dpn variant; issue 26:
    # the benchmark runs it at one path per sample (the baselines' compute), the only difference allowed
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    tiny = ROOT / "configs" / "train_tiny.yaml"
    plain = load_train_config(tiny, [])
    variant = load_train_config(tiny, list(quality.VARIANTS["dpn"].overrides))
    assert plain.model.paths_per_sample == 2 and variant.model.paths_per_sample == 1
    one_path = plain.model_copy(update={"model": plain.model.model_copy(update={"paths_per_sample": 1})})
    assert variant == one_path
    for name, variant in quality.VARIANTS.items():  # every benchmark variant is a valid job config
        assert load_train_config(tiny, list(variant.overrides)).model.compression is not None, name
    assert plain.model.config_overrides["router_estimator"] == "reinforce"
