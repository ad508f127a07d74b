"""The YAML config loader and the training config schema: clear errors, overrides, shipped configs. No Ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from jobs.config import ConfigError, dump_config, flatten, load_config, parse_overrides
from jobs.train_config import TrainConfig, load_train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("train_*.yaml"))


@dataclass
class Inner:
    size: int = 1
    mode: Literal["a", "b", 4] = "a"
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    maybe: Inner | None = None
    tags: dict[str, str] = field(default_factory=dict)
    items: list[int] = field(default_factory=list)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_file_then_overrides_build_typed_dataclasses(tmp_path):
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
        ("inner.mode=c", r"inner\.mode: 'c' is not valid; choose one of \['a', 'b', 4\]"),
        ("inner.rate=fast", r"inner\.rate: expected a number"),
        ("items=[1, x]", r"items\[1\]: expected an integer"),
        ("inner=3", r"inner: expected a mapping of \['mode', 'rate', 'size'\]"),
        ("name", r"not of the form key=value"),
    ],
)
def test_invalid_values_fail_with_the_dotted_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(Outer, None, [override])


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
    with pytest.raises(ConfigError, match=r"train: micro_batch_size must be >= 1"):
        load_train_config(None, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match=r"model: compression 3: factor\(s\) \[3\] match no pooling expert"):
        load_train_config(None, ["model.compression=3"])
    with pytest.raises(ConfigError, match=r"unknown config key optim\.learning_rate.*'lr'"):
        load_train_config(None, ["optim.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"model: dense_warmup_steps only applies to compression 'auto'"):
        load_train_config(None, ["model.compression=4", "model.dense_warmup_steps=10"])


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
    with pytest.raises(ConfigError, match=r"model: compression 'fast'"):
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


def test_dpn_train_cli_reports_config_errors_and_prints_the_resolved_config(capsys):
    from jobs.cli import main

    tiny = str(ROOT / "configs" / "train_tiny.yaml")
    assert main(["train", "--config", tiny, "optim.lrr=1"]) == 2
    assert main(["train", "--config", tiny, "optim.lr=0.5", "run.name=exp2", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 0.5 and printed["run"]["name"] == "exp2"
