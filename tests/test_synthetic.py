"""Synthetic benchmark: determinism, split disjointness, on-disk schemas, and answers checked from pixels."""

from __future__ import annotations

import colorsys
import io
import json
import tarfile
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import synthetic
from pipelines.synthetic import (
    ANSWERS,
    FAMILIES,
    FAMILY_KIND,
    GENERATOR_VERSION,
    generate_samples,
    generate_splits,
    image_hash,
    render_sample,
    write_synthetic_dataset,
    write_synthetic_shard,
)

SIZE = 64

# ----------------------------------------------------------------------------- pixel oracle
# Derives every answer from the rendered pixels alone: it knows the scene grammar (grey
# background, pure black/white tile, saturated shapes) but not the labels or the pattern tables.


def _tile_mask(image: np.ndarray) -> np.ndarray:
    """Pixels that are pure white or pure black (only the tile uses them)."""
    return (image.min(-1) == 255) | (image.max(-1) == 0)


def _tile_answer(image: np.ndarray) -> tuple[str, str]:
    """(family, answer) read off the tile's 2x2 quadrants."""
    ys, xs = np.nonzero(_tile_mask(image))
    y0, x0 = ys.min(), xs.min()
    cell = SIZE // 8
    assert (ys.max() - y0 + 1, xs.max() - x0 + 1) == (cell, cell), "tile must fill exactly one cell"
    assert y0 % cell == 0 and x0 % cell == 0, "tile must be aligned to the cell grid"
    tile = image[y0 : y0 + cell, x0 : x0 + cell].min(-1) == 255  # (cell, cell) white?
    quads = tile.reshape(2, cell // 2, 2, cell // 2).mean(axis=(1, 3))  # (2, 2) white fraction
    assert set(np.unique(quads)) <= {0.0, 1.0}, "each quadrant must be entirely white or black"
    white = [(int(r), int(c)) for r, c in zip(*np.nonzero(quads))]
    if len(white) == 1:
        ((r, c),) = white
        return "tile_corner", ("top" if r == 0 else "bottom") + ("left" if c == 0 else "right")
    (r0, c0), (r1, c1) = white
    if r0 == r1:
        return "tile_half", "top" if r0 == 0 else "bottom"
    if c0 == c1:
        return "tile_half", "left" if c0 == 0 else "right"
    return "tile_diagonal", "falling" if (r0, c0) == (0, 0) else "rising"


def _shape_mask(image: np.ndarray) -> np.ndarray:
    background = (image == 128).all(-1)  # the grey background
    return ~background & ~_tile_mask(image)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an `(N, 2)` array of (y, x)."""
    seen = np.zeros_like(mask)
    parts = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, part = deque([start]), []
        while queue:
            y, x = queue.popleft()
            part.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        parts.append(np.array(part))
    return parts


def _hue_name(rgb: np.ndarray) -> str:
    hue = colorsys.rgb_to_hsv(*(rgb / 255.0))[0] * 360
    for name, upper in (("red", 20), ("yellow", 75), ("green", 170), ("blue", 255), ("purple", 330)):
        if hue < upper:
            return name
    return "red"


def oracle_answer(image: np.ndarray, family: str) -> str:
    """The answer to ``family``'s question computed from the pixels only."""
    if FAMILY_KIND[family] == "fine":
        tile_family, answer = _tile_answer(image)
        assert tile_family == family, f"tile shows a {tile_family} pattern for a {family} question"
        return answer
    parts = [p for p in _components(_shape_mask(image)) if len(p) >= 30]  # large shapes only
    if family == "big_count":
        return ("one", "two", "three")[len(parts) - 1]
    assert len(parts) == 1, f"{family} needs exactly one large shape, found {len(parts)}"
    ys, xs = parts[0].T
    if family == "big_side":
        return "left" if xs.mean() < SIZE / 2 else "right"
    colours, counts = np.unique(image[ys, xs], axis=0, return_counts=True)
    return _hue_name(colours[counts.argmax()].astype(float))


@pytest.fixture(scope="module")
def samples() -> list[synthetic.SyntheticSample]:
    return list(generate_samples(360, seed=3))


def test_answers_match_pixels(samples):
    for sample in samples:
        assert sample.answer in ANSWERS[sample.family]
        assert oracle_answer(sample.image, sample.family) == sample.answer, sample.id


def test_oracle_catches_a_wrong_label(samples):
    sample = next(s for s in samples if s.family == "tile_diagonal")
    wrong = "rising" if sample.answer == "falling" else "falling"
    assert oracle_answer(sample.image, sample.family) != wrong
    flipped = sample.image[:, ::-1]  # mirroring swaps the diagonal (and keeps the tile aligned)
    assert oracle_answer(np.ascontiguousarray(flipped), "tile_diagonal") == wrong


def test_every_family_and_kind_is_drawn(samples):
    assert {s.family for s in samples} == set(FAMILIES)
    assert {s.kind for s in samples} == {"coarse", "fine"}
    assert all(s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8 for s in samples)


def test_render_is_deterministic_and_seed_dependent():
    a, b = render_sample(7, "train", 5), render_sample(7, "train", 5)
    assert a.id == b.id and a.question == b.question and np.array_equal(a.image, b.image)
    assert a.png_bytes() == b.png_bytes()
    assert not np.array_equal(a.image, render_sample(8, "train", 5).image)


def test_eval_disjoint_from_train():
    train, evals = generate_splits(300, 100, seed=1)
    assert len({s.id for s in train} | {s.id for s in evals}) == 400
    assert not {image_hash(s.image) for s in train} & {image_hash(s.image) for s in evals}


def test_excluded_images_are_skipped():
    first = render_sample(0, "eval", 0)
    drawn = list(generate_samples(2, seed=0, tag="eval", exclude_hashes={image_hash(first.image)}))
    assert [s.id for s in drawn] == [render_sample(0, "eval", 1).id, render_sample(0, "eval", 2).id]


def _read_all(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fmt", ["llava", "webdataset"])
def test_same_seed_same_bytes(tmp_path, fmt):
    write_synthetic_dataset(tmp_path / "a", fmt, num_train=12, num_eval=4, seed=2)
    write_synthetic_dataset(tmp_path / "b", fmt, num_train=12, num_eval=4, seed=2)
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    a.pop("synthetic.json"), b.pop("synthetic.json")  # holds the root path
    assert a == b


def _check_record(record: dict, image: bytes) -> None:
    assert set(record) >= {"id", "conversations", "family", "kind"}
    human, gpt = record["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert gpt["from"] == "gpt" and gpt["value"] in ANSWERS[record["family"]]
    assert record["kind"] == FAMILY_KIND[record["family"]]
    pixels = np.array(Image.open(io.BytesIO(image)))
    assert pixels.shape == (SIZE, SIZE, 3)
    assert oracle_answer(pixels, record["family"]) == gpt["value"]


def test_llava_format(tmp_path):
    summary = write_synthetic_dataset(tmp_path, "llava", num_train=10, num_eval=5, seed=0)
    assert summary["splits"]["train"]["files"] == ["train.json"] and summary["splits"]["eval"]["files"] == [
        "eval.json"
    ]
    for split, n in (("train", 10), ("eval", 5)):
        records = json.loads((tmp_path / f"{split}.json").read_text())
        assert isinstance(records, list) and len(records) == n
        for record in records:
            assert record["image"] == f"images/{record['id']}.png"
            _check_record(record, (tmp_path / record["image"]).read_bytes())


def test_webdataset_format(tmp_path):
    write_synthetic_dataset(tmp_path, "webdataset", num_train=10, num_eval=3, seed=0, samples_per_shard=4)
    shards = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert shards == ["eval-000000.tar", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    keys = []
    for shard in shards:
        with tarfile.open(tmp_path / shard) as tar:
            names = tar.getnames()
            assert names[0::2] == [n[: -len(".json")] + ".png" for n in names[1::2]]  # png, json per key
            for png_name in names[0::2]:
                key = png_name[: -len(".png")]
                record = json.loads(tar.extractfile(f"{key}.json").read())
                assert record["id"] == key and "." not in key
                _check_record(record, tar.extractfile(png_name).read())
                keys.append(key)
    assert len(keys) == len(set(keys)) == 13


def test_parquet_format(tmp_path):
    write_synthetic_dataset(tmp_path, "parquet", num_train=6, num_eval=3, seed=0)
    table = pq.read_table(tmp_path / "train-000000.parquet")
    assert table.schema.equals(synthetic.parquet_schema())
    assert table.num_rows == 6 and pq.read_table(tmp_path / "eval-000000.parquet").num_rows == 3
    for row in table.to_pylist():
        _check_record(row, row["image"])
        assert row["conversations"][0]["value"] == "<image>\n" + row["question"]
        assert row["conversations"][1]["value"] == row["answer"]


@pytest.mark.parametrize("fmt", ["llava", "parquet"])
def test_new_shard_is_fresh_and_recorded(tmp_path, fmt):
    write_synthetic_dataset(tmp_path, fmt, num_train=8, num_eval=4, seed=0)
    shard = write_synthetic_shard(tmp_path, "2025-06-01", num_samples=5, seed=11)
    expected = ["train-2025-06-01.json"] if fmt == "llava" else ["train-2025-06-01-000000.parquet"]
    assert shard["files"] == expected and shard["num_samples"] == 5
    manifest = json.loads((tmp_path / "synthetic.json").read_text())
    assert manifest["shards"][0]["name"] == "2025-06-01"
    if fmt == "llava":
        ids = [
            r["id"]
            for f in ("train.json", "eval.json", "train-2025-06-01.json")
            for r in json.loads((tmp_path / f).read_text())
        ]
    else:
        ids = [i for f in sorted(tmp_path.glob("*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 17
    with pytest.raises(ValueError, match="already exists"):
        write_synthetic_shard(tmp_path, "2025-06-01", num_samples=5, seed=12)


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_synthetic_dataset(tmp_path, "csv", num_train=1, num_eval=1)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, image_size=50)
    with pytest.raises(ValueError, match="families"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, families=["nope"])
    with pytest.raises(FileNotFoundError, match="write_synthetic_dataset"):
        write_synthetic_shard(tmp_path / "missing", "s1", num_samples=1, seed=0)


def test_a_dataset_from_another_generator_version_is_refused(tmp_path):
    """Scenes changed between generator versions: an old dataset must not be reused silently."""
    from pipelines.synthetic import MANIFEST_NAME, read_manifest

    write_synthetic_dataset(tmp_path, "llava", num_train=4, num_eval=2, seed=0)
    assert read_manifest(tmp_path)["splits"]["train"]["num_samples"] == 4
    path = tmp_path / MANIFEST_NAME
    path.write_text(path.read_text().replace(f'"version": {GENERATOR_VERSION}', '"version": 1'))
    with pytest.raises(ValueError, match="generator version 1"):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match="generator version 1"):
        write_synthetic_shard(tmp_path, "day2", num_samples=2, seed=1)
