"""A synthetic root is reused only when its manifest matches the config: ``jobs.training.driver.ensure_synthetic_data``
(training and retraining) and the quickstart's data stage, which says what it did."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from jobs.quickstart import stage_data
from jobs.training.config import SyntheticConfig, TrainConfig, load_train_config
from jobs.training.driver import ensure_synthetic_data
from pipelines.synthetic import MANIFEST_NAME, manifest_differences, read_manifest, write_synthetic_shard

REPO = Path(__file__).resolve().parents[1]
SMALL = {"format": "llava", "num_train": 20, "num_eval": 5, "seed": 0}


def _config(**changes) -> SyntheticConfig:
    return SyntheticConfig(**{**SMALL, **changes})


def _stat(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root``: its mtime (ns) and bytes."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
    }


def _train_ids(root: Path) -> list[str]:
    return [r["id"] for r in json.loads((root / "train.json").read_text())]


def test_a_fresh_root_is_written_as_configured(tmp_path):
    cfg = _config(num_dev=3)
    assert ensure_synthetic_data(cfg, str(tmp_path / "data")) == "written"
    manifest = read_manifest(tmp_path / "data")
    assert manifest_differences(manifest, cfg.manifest_settings()) == []
    assert set(manifest["splits"]) == {"train", "dev", "eval"} and manifest["benchmark"] == "cells"


@pytest.mark.parametrize("fmt", ["llava", "parquet", "webdataset"])
def test_each_split_written_is_the_split_the_readers_find(tmp_path, fmt):
    # the headroom benchmark's dev evaluation failed on this: the dev files were written but the readers did
    # not know "dev" as a split name ("has split files ['eval', 'train'] but none for split='dev'")
    from pipelines.formats import resolve_source

    root = tmp_path / "data"
    ensure_synthetic_data(_config(format=fmt, num_dev=3), str(root))
    splits = read_manifest(root)["splits"]
    for split, entry in splits.items():
        found = [Path(f).name for f in resolve_source(str(root), split).paths]
        assert found == entry["files"], split


def test_the_same_config_reuses_the_root_untouched(tmp_path):
    ensure_synthetic_data(_config(), str(tmp_path))
    before = _stat(tmp_path)
    assert ensure_synthetic_data(_config(), str(tmp_path)) == "reused"
    assert ensure_synthetic_data(_config(), str(tmp_path), replace=False) == "reused"
    assert _stat(tmp_path) == before


def test_a_root_of_another_size_is_replaced(tmp_path):
    ensure_synthetic_data(_config(), str(tmp_path))
    first = _train_ids(tmp_path)
    action = ensure_synthetic_data(_config(num_train=40), str(tmp_path))
    assert action == "replaced: num_train: 20 in the root, 40 asked for"
    assert read_manifest(tmp_path)["splits"]["train"]["num_samples"] == 40
    ids = _train_ids(tmp_path)
    assert len(ids) == 40 and ids[:20] == first  # the same stream, now 40 long
    assert len(list((tmp_path / "images").glob("*.png"))) == 45
    assert ensure_synthetic_data(_config(num_train=40), str(tmp_path)) == "reused"


def test_a_root_of_another_format_and_benchmark_is_replaced_without_leftovers(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    ensure_synthetic_data(_config(), str(tmp_path))
    action = ensure_synthetic_data(_config(format="parquet", benchmark="tiles"), str(tmp_path))
    assert action == (
        "replaced: benchmark: cells in the root, tiles asked for; format: llava in the root, parquet asked for"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "eval-000000.parquet",
        "notes.txt",
        MANIFEST_NAME,
        "train-000000.parquet",
    ]
    assert read_manifest(tmp_path)["benchmark"] == "tiles"


def test_a_root_of_another_generator_version_is_replaced(tmp_path):
    ensure_synthetic_data(_config(), str(tmp_path))
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**manifest, "version": 1}))
    assert ensure_synthetic_data(_config(), str(tmp_path)) == "replaced: version: 1 in the root, 3 asked for"
    assert read_manifest(tmp_path)["version"] == 3


def test_without_replace_a_mismatch_is_an_error_naming_the_difference(tmp_path):
    ensure_synthetic_data(_config(), str(tmp_path))
    before = _stat(tmp_path)
    with pytest.raises(ValueError, match="num_train: 20 in the root, 40 asked for"):
        ensure_synthetic_data(_config(num_train=40), str(tmp_path), replace=False)
    assert _stat(tmp_path) == before


def test_a_root_with_retraining_shards_is_never_replaced(tmp_path):
    ensure_synthetic_data(_config(), str(tmp_path))
    write_synthetic_shard(tmp_path, "day2", num_samples=4, seed=1)
    before = _stat(tmp_path)
    with pytest.raises(ValueError, match="num_eval: 5 in the root, 6 asked for.*must not delete"):
        ensure_synthetic_data(_config(num_eval=6), str(tmp_path))
    assert _stat(tmp_path) == before
    assert (
        ensure_synthetic_data(_config(), str(tmp_path)) == "reused"
    )  # the shards do not count as a difference


def test_nothing_to_do_without_a_synthetic_section_or_for_a_remote_root(tmp_path):
    assert ensure_synthetic_data(None, str(tmp_path / "data")) == ""
    assert ensure_synthetic_data(_config(), "s3://bucket/data") == ""
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------- the quickstart's data stage


def _train_config(root: Path, *overrides: str) -> TrainConfig:
    return load_train_config(
        REPO / "configs" / "train_tiny.yaml",
        [
            f"data.path={root}",
            "data.synthetic.format=llava",
            "data.synthetic.num_train=20",
            "data.synthetic.num_eval=5",
            "data.synthetic.num_dev=0",
            *overrides,
        ],
    )


def _stage(cfg: TrainConfig) -> str:
    out = io.StringIO()
    assert stage_data(out, cfg) == Path(cfg.data.path)
    return out.getvalue()


def _says_reusing(out: str) -> bool:
    return any(
        line.lstrip().startswith("reusing") for line in out.splitlines()
    )  # (tmp_path names hold "reusing")


def test_stage_data_says_reusing_only_for_a_matching_root(tmp_path):
    root = tmp_path / "synthetic"
    first = _stage(_train_config(root))
    assert not _says_reusing(first)
    assert f"wrote the cells benchmark, 20 train / 0 dev / 5 test samples to {root}" in first
    again = _stage(_train_config(root))
    assert _says_reusing(again)
    assert f"reusing {root} (the cells benchmark, 20 train / 0 dev / 5 test: its manifest matches)" in again
    bigger = _stage(_train_config(root, "data.synthetic.num_train=40", "data.synthetic.num_dev=2"))
    assert not _says_reusing(bigger)
    assert (
        f"{root} held another dataset (num_train: 20 in the root, 40 asked for; num_dev: 0 in the root, 2"
        in bigger
    )
    assert "wrote the cells benchmark, 40 train / 2 dev / 5 test samples" in bigger
    tiles = _stage(_train_config(root, "data.synthetic.benchmark=tiles"))
    assert not _says_reusing(tiles) and "benchmark: cells in the root, tiles asked for" in tiles
    assert read_manifest(root)["benchmark"] == "tiles"
