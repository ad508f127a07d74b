"""Synthetic benchmarks (``cells``, the default, and ``tiles``): every answer checked from pixels, pinned scenes,
the cells family mix, determinism, split disjointness, on-disk schemas, manifests and their removal."""

from __future__ import annotations

import colorsys
import io
import json
import re
import tarfile
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import synthetic
from pipelines.synthetic import (
    ANSWERS,
    BACKGROUNDS,
    BENCHMARKS,
    CELL_NAMES,
    CELLS_ANSWERS,
    CELLS_FAMILY_KIND,
    FAMILIES,
    FAMILY_KIND,
    GENERATOR_VERSION,
    MANIFEST_NAME,
    cell_block_box,
    generate_all_splits,
    generate_samples,
    generate_splits,
    get_benchmark,
    image_hash,
    manifest_differences,
    read_manifest,
    remove_synthetic_dataset,
    render_sample,
    write_synthetic_dataset,
    write_synthetic_shard,
)

SIZE = 64
PATCH = 4  # the tiny preset's patch at 64 px: one cell of the cells benchmark
BENCHMARK_NAMES = ("cells", "tiles")

# Shard names whose train stream "train-<name>" has the crc32 of "eval" / "dev", so their samples are drawn from
# the same random stream as that split's (same seed): the only way to make a collision happen on purpose. Found
# by solving crc32's linearity over the bits of letters H-O/h-o; test_twin_tags_draw_the_same_scenes checks them.
EVAL_TWIN, DEV_TWIN = "MknmLKkLHH", "IjoKlhiMHH"

# ----------------------------------------------------------------------------- pixel oracle: shared helpers
# The oracles derive every answer from the rendered pixels alone: they know each benchmark's scene grammar
# (backgrounds, where the tile or the block sits, saturated shapes) but not the labels or the pattern tables.


def _flood(mask: np.ndarray, start: tuple[int, int], seen: np.ndarray) -> np.ndarray:
    """The 4-connected component of ``mask`` holding ``start``, as an `(N, 2)` array of (y, x); marks ``seen``."""
    seen[start] = True
    queue, part = deque([start]), []
    while queue:
        y, x = queue.popleft()
        part.append((y, x))
        for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
            if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return np.array(part)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an `(N, 2)` array of (y, x)."""
    seen = np.zeros_like(mask)
    return [_flood(mask, start, seen) for start in zip(*np.nonzero(mask)) if not seen[start]]


def _hue_name(rgb: np.ndarray) -> str:
    hue, saturation, _ = colorsys.rgb_to_hsv(*(rgb / 255.0))
    assert saturation > 0.5, f"{rgb} is not one of the saturated shape colours"
    for name, upper in (("red", 20), ("yellow", 75), ("green", 170), ("blue", 255), ("purple", 330)):
        if hue * 360 < upper:
            return name
    return "red"


# ----------------------------------------------------------------------------- pixel oracle: tiles


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


def tiles_answer(image: np.ndarray, family: str) -> str:
    """The answer to a tiles ``family`` question computed from the pixels only."""
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


# ----------------------------------------------------------------------------- pixel oracle: cells

CELL_QUESTION = re.compile(r"\bthe (top|bottom) (left|right) cell\b")


@dataclass(frozen=True)
class CellsScene:
    """What a cells image shows, read from its pixels: colour names, the shape's side, ``cells[row][col]``."""

    background: str
    shape_colour: str
    side: str
    cells: tuple[tuple[str, str], tuple[str, str]]


def _grey_name(rgb: np.ndarray) -> str:
    assert int(rgb.max()) - int(rgb.min()) <= 8, f"background {rgb} is not a grey"
    level = int(rgb.mean())
    return "black" if level < 64 else "white" if level > 192 else "gray"


def _read_block(image: np.ndarray, foreground: np.ndarray) -> tuple[tuple[str, str], tuple[str, str]]:
    """The 2x2 block: the foreground component at the top-left pixel, exactly four uniform one-patch cells."""
    assert foreground[0, 0], "the block of cells must start at the top-left pixel"
    ys, xs = _flood(foreground, (0, 0), np.zeros_like(foreground)).T
    side = 2 * PATCH
    assert (ys.max() + 1, xs.max() + 1, len(ys)) == (side, side, side * side), (
        "the block must be exactly 2x2 patches in the top-left corner, clear of the shape"
    )
    rows = []
    for row in range(2):
        names = []
        for col in range(2):
            y, x = row * PATCH, col * PATCH
            cell = image[y : y + PATCH, x : x + PATCH]  # (PATCH, PATCH, 3)
            assert (cell == cell[0, 0]).all(), f"cell ({row}, {col}) must be one uniform patch"
            names.append(_hue_name(cell[0, 0].astype(float)))
        rows.append((names[0], names[1]))
    return rows[0], rows[1]


def _packed(image: np.ndarray) -> np.ndarray:
    """`(H, W)` int32 with one value per RGB colour (1-D uniques are much faster than row uniques)."""
    return image.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], dtype=np.int32)


def _unpack(colour: int) -> np.ndarray:
    return np.array([(colour >> 16) & 255, (colour >> 8) & 255, colour & 255], dtype=float)


def read_cells_scene(image: np.ndarray) -> CellsScene:
    """Background (the commonest colour), the 2x2 block, and the one large shape (every other pixel)."""
    packed = _packed(image)
    colours, counts = np.unique(packed, return_counts=True)
    background = int(colours[counts.argmax()])
    foreground = packed != background  # (H, W)
    cells = _read_block(image, foreground)
    foreground[: 2 * PATCH, : 2 * PATCH] = False
    ys, xs = np.nonzero(foreground)
    assert len(ys) >= 30, f"one large shape expected, found {len(ys)} foreground pixels outside the block"
    shape_colours = np.unique(packed[ys, xs])
    assert len(shape_colours) == 1, (
        f"one large shape of one colour expected, found {len(shape_colours)} colours"
    )
    assert xs.max() < SIZE // 2 or xs.min() >= SIZE // 2, "the large shape must lie in one half of the image"
    side = "left" if xs.max() < SIZE // 2 else "right"
    return CellsScene(_grey_name(_unpack(background)), _hue_name(_unpack(int(shape_colours[0]))), side, cells)


def scene_answer(scene: CellsScene, family: str, question: str) -> str:
    """The answer to a cells ``family`` question about ``scene`` (a cell_color question names its cell)."""
    asked = CELL_QUESTION.findall(question)
    if family != "cell_color":
        assert not asked, f"a {family} question names a cell: {question!r}"
        return {"big_color": scene.shape_colour, "big_side": scene.side, "bg_color": scene.background}[family]
    assert len(asked) == 1, f"a cell_color question must name one cell: {question!r}"
    ((row, col),) = asked
    return scene.cells[int(row == "bottom")][int(col == "right")]


def cells_answer(image: np.ndarray, family: str, question: str) -> str:
    """The answer to a cells ``family`` question computed from the pixels and the cell the question names."""
    return scene_answer(read_cells_scene(image), family, question)


def oracle_answer(benchmark: str, image: np.ndarray, family: str, question: str) -> str:
    return cells_answer(image, family, question) if benchmark == "cells" else tiles_answer(image, family)


# ----------------------------------------------------------------------------- samples; tiles from pixels


@pytest.fixture(scope="module")
def tiles_samples() -> list[synthetic.SyntheticSample]:
    return list(generate_samples(360, seed=3, benchmark="tiles"))


@pytest.fixture(scope="module")
def cells_samples() -> list[synthetic.SyntheticSample]:
    return list(generate_samples(2000, seed=3))  # the default benchmark


def test_tiles_answers_match_pixels(tiles_samples):
    for sample in tiles_samples:
        assert sample.answer in ANSWERS[sample.family] and sample.kind == FAMILY_KIND[sample.family]
        assert tiles_answer(sample.image, sample.family) == sample.answer, sample.id


def test_tiles_oracle_catches_a_wrong_label(tiles_samples):
    sample = next(s for s in tiles_samples if s.family == "tile_diagonal")
    wrong = "rising" if sample.answer == "falling" else "falling"
    assert tiles_answer(sample.image, sample.family) != wrong
    flipped = sample.image[:, ::-1]  # mirroring swaps the diagonal (and keeps the tile aligned)
    assert tiles_answer(np.ascontiguousarray(flipped), "tile_diagonal") == wrong


def test_tiles_every_family_and_kind_is_drawn(tiles_samples):
    assert {s.family for s in tiles_samples} == set(FAMILIES)
    assert {s.kind for s in tiles_samples} == {"coarse", "fine"}
    assert all(s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8 for s in tiles_samples)


# ----------------------------------------------------------------------------- cells from pixels


def test_cells_is_the_default_benchmark(cells_samples):
    assert {s.family for s in cells_samples} == set(CELLS_FAMILY_KIND)
    assert render_sample(0, "train", 3).id == render_sample(0, "train", 3, benchmark="cells").id
    assert np.array_equal(
        render_sample(0, "train", 3).image, render_sample(0, "train", 3, benchmark="cells").image
    )
    assert cell_block_box(SIZE) == (0, 0, 2 * PATCH, 2 * PATCH)


def test_cells_answers_match_pixels(cells_samples):
    seen = Counter()
    for sample in cells_samples:
        assert (
            sample.answer in CELLS_ANSWERS[sample.family] and sample.kind == CELLS_FAMILY_KIND[sample.family]
        )
        assert sample.image.shape == (SIZE, SIZE, 3) and sample.image.dtype == np.uint8
        scene = read_cells_scene(sample.image)
        assert scene_answer(scene, sample.family, sample.question) == sample.answer, sample.id
        seen.update([("background", scene.background), ("side", scene.side), ("colour", scene.shape_colour)])
        seen.update(("cell", name) for row in scene.cells for name in row)
    assert {v for k, v in seen if k == "background"} == set(BACKGROUNDS)
    assert {v for k, v in seen if k == "side"} == {"left", "right"}
    assert (
        {v for k, v in seen if k == "colour"}
        == {v for k, v in seen if k == "cell"}
        == set(CELLS_ANSWERS["cell_color"])
    )


def _cell_sample(samples, *, differing: bool) -> synthetic.SyntheticSample:
    """A cell_color sample whose top row (left and right cell) differs or not."""
    for s in samples:
        top = read_cells_scene(s.image).cells[0]
        if s.family == "cell_color" and (top[0] != top[1]) == differing and "top" in s.question:
            return s
    raise AssertionError("no such sample")


def test_cells_oracle_reads_the_asked_cell(cells_samples):
    sample = _cell_sample(cells_samples, differing=True)
    ((row, col),) = CELL_QUESTION.findall(sample.question)
    r, c = int(row == "bottom"), int(col == "right")
    other = next(name for name in CELLS_ANSWERS["cell_color"] if name != sample.answer)
    repainted = sample.image.copy()
    repainted[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = synthetic.PALETTE[other]
    assert cells_answer(repainted, "cell_color", sample.question) == other != sample.answer
    neighbour = sample.image.copy()  # the cell beside the asked one: the answer stays
    neighbour[r * PATCH : (r + 1) * PATCH, (1 - c) * PATCH : (2 - c) * PATCH] = synthetic.PALETTE[other]
    assert cells_answer(neighbour, "cell_color", sample.question) == sample.answer
    for name in CELL_NAMES:  # every cell name of the benchmark is one the oracle understands
        assert CELL_QUESTION.findall(f"What colour is the {name} cell?")


def _mirror_scene(image: np.ndarray) -> np.ndarray:
    """The image mirrored left-right with the (mirrored) block moved back to the top-left corner."""
    side = 2 * PATCH
    mirrored = image[:, ::-1].copy()
    background = image[side + 1, side + 1]  # inside the 2 px gap the shape keeps from the block
    mirrored[:side, :side] = mirrored[:side, -side:]
    mirrored[:side, -side:] = background
    return mirrored


def test_cells_oracle_catches_a_mirrored_image(cells_samples):
    clear = [
        s for s in cells_samples if (s.image[: 2 * PATCH + 2, -(2 * PATCH + 2) :] == s.image[9, 9]).all()
    ]
    for sample in (_cell_sample(clear, differing=True), next(s for s in clear if s.family == "big_side")):
        scene, mirrored = read_cells_scene(sample.image), read_cells_scene(_mirror_scene(sample.image))
        assert mirrored.cells == tuple(row[::-1] for row in scene.cells), "left and right cells swap"
        assert {mirrored.side, scene.side} == {"left", "right"}
        assert (mirrored.background, mirrored.shape_colour) == (scene.background, scene.shape_colour)
        assert (
            oracle_answer("cells", _mirror_scene(sample.image), sample.family, sample.question)
            != sample.answer
        )
    with pytest.raises(AssertionError, match="top-left"):  # a plain mirror moves the block to the top-right
        read_cells_scene(np.ascontiguousarray(sample.image[:, ::-1]))
    shifted = np.roll(sample.image, 1, axis=1)  # the block one pixel off the patch grid
    with pytest.raises(AssertionError, match="top-left"):
        read_cells_scene(shifted)


def test_cells_family_mix_follows_the_weights(cells_samples):
    spec = get_benchmark("cells")
    assert spec.weights == pytest.approx({"big_color": 0.7 / 3, "big_side": 0.7 / 3, "bg_color": 0.7 / 3,
                                          "cell_color": 0.3})  # fmt: skip
    n = len(cells_samples)
    families = Counter(s.family for s in cells_samples)
    for family, weight in spec.weights.items():
        assert abs(families[family] / n - weight) < 0.04, (family, families[family] / n)
    assert abs(sum(s.kind == "fine" for s in cells_samples) / n - 0.3) < 0.04
    asked = Counter(CELL_QUESTION.findall(s.question)[0] for s in cells_samples if s.family == "cell_color")
    # one fixed cell: the tiny model does not learn to let the question choose the cell
    assert set(asked) == {("top", "left")}


def test_the_asked_cell_differs_from_its_three_neighbours(cells_samples):
    """So a 1x2 or 2x2 pooled token of the block always holds a colour other than the answer."""
    for sample in (s for s in cells_samples if s.family == "cell_color"):
        scene = read_cells_scene(sample.image)
        (top_left, top_right), (bottom_left, bottom_right) = scene.cells
        assert top_left == sample.answer
        assert sample.answer not in (top_right, bottom_left, bottom_right), sample.id


def test_a_family_subset_draws_only_those_families():
    drawn = {render_sample(0, "train", i, families=("bg_color", "cell_color")).family for i in range(40)}
    assert drawn == {"bg_color", "cell_color"}
    with pytest.raises(ValueError, match="cells benchmark"):
        render_sample(0, "train", 0, families=("tile_half",))  # a tiles family
    with pytest.raises(ValueError, match="unknown synthetic benchmark"):
        render_sample(0, "train", 0, benchmark="stripes")


# ----------------------------------------------------------------------------- pinned scenes

# Image hashes of the tiles generator, equal to the code before the cells benchmark existed (checked against
# that code's render_sample): tiles datasets written before must stay readable as they are.
TILES_PINS = {
    (0, "train", 0): ("11429c001de40a7d3ef28d98c25717ef", "big_side", "left"),
    (0, "train", 1): ("3df5cb55cbe6d580aade9300ba12c666", "tile_diagonal", "rising"),
    (0, "train", 3): ("1d12e72739dbea91e511dff4b59d370b", "tile_corner", "bottomright"),
    (0, "train", 5): ("e9c900a5e0ce9e2a2dd6e5828e2bf3ca", "tile_half", "left"),
    (0, "train", 7): ("8d01b2396d8a9c119252722ed17c244e", "big_count", "two"),
    (0, "train", 17): ("2e67ebfa6cb6506a9943c0f951e4572b", "big_color", "red"),
    (0, "eval", 0): ("d11f6b2a0b831b2ff7363598986a848b", "big_color", "yellow"),
    (0, "train-2025-06-01", 2): ("1917f5e35a235223474ded74df1542ab", "tile_corner", "bottomright"),
}
CELLS_PINS = {  # generator version 3
    (0, "train", 0): ("28ca7be145f7c4b9aa059e739d785c9b", "big_color", "blue"),
    (0, "train", 1): ("4f19ece3219236aea99b59bb11b8ad1d", "cell_color", "blue"),
    (0, "train", 4): ("bfe6ea2870e4dc4d108a694f47ab7557", "bg_color", "black"),
    (0, "train", 7): ("55905d78ff69dcb61503c2bb4ab4f5c6", "big_side", "left"),
}


@pytest.mark.parametrize(("bench", "pins"), [("tiles", TILES_PINS), ("cells", CELLS_PINS)])
def test_scenes_are_pinned(bench, pins):
    """A change to a benchmark's scenes must come with a new generator version (old roots are then refused)."""
    for (seed, tag, index), pinned in pins.items():
        sample = render_sample(seed, tag, index, benchmark=bench)
        assert (image_hash(sample.image), sample.family, sample.answer) == pinned, (
            f"{bench} scene {(seed, tag, index)} changed: bump {bench}'s version in BENCHMARKS and re-pin"
        )
    small = render_sample(0, "eval", 2, image_size=32, benchmark="tiles")
    assert image_hash(small.image) == "fc232eb1f5397d63d3e1724a22ef5f4a"


# ----------------------------------------------------------------------------- determinism and splits


@pytest.mark.parametrize("bench", BENCHMARK_NAMES)
def test_render_is_deterministic_and_seed_dependent(bench):
    a, b = (
        render_sample(7, "train", 5, benchmark=bench),
        render_sample(7, "train", 5, benchmark=bench),
    )
    assert a.id == b.id and a.question == b.question and np.array_equal(a.image, b.image)
    assert a.png_bytes() == b.png_bytes()
    assert not np.array_equal(a.image, render_sample(8, "train", 5, benchmark=bench).image)


@pytest.mark.parametrize("bench", BENCHMARK_NAMES)
def test_splits_are_disjoint_in_ids_and_images(bench):
    splits = generate_all_splits(200, 60, 80, seed=1, benchmark=bench)
    assert {name: len(s) for name, s in splits.items()} == {"train": 200, "dev": 60, "eval": 80}
    ids = [s.id for split in splits.values() for s in split]
    assert len(set(ids)) == 340
    hashes = {name: {image_hash(s.image) for s in split} for name, split in splits.items()}
    assert not hashes["train"] & hashes["dev"] and not hashes["train"] & hashes["eval"]
    assert not hashes["dev"] & hashes["eval"]
    assert all(s.id.startswith(f"syn-{name}-1-") for name, split in splits.items() for s in split)
    train, evals = generate_splits(200, 80, seed=1, benchmark=bench)
    assert [s.id for s in train] == [s.id for s in splits["train"]] and [s.id for s in evals] == [
        s.id for s in splits["eval"]
    ]


@pytest.mark.parametrize("bench", BENCHMARK_NAMES)
def test_eval_is_the_same_with_and_without_dev(bench):
    without = generate_all_splits(50, 0, 30, seed=2, benchmark=bench)
    with_dev = generate_all_splits(50, 40, 30, seed=2, benchmark=bench)
    assert without["dev"] == [] and len(with_dev["dev"]) == 40
    for name in ("train", "eval"):
        assert [(s.id, image_hash(s.image)) for s in without[name]] == [
            (s.id, image_hash(s.image)) for s in with_dev[name]
        ]


def test_twin_tags_draw_the_same_scenes():
    for twin, split in ((EVAL_TWIN, "eval"), (DEV_TWIN, "dev")):
        assert zlib.crc32(f"train-{twin}".encode()) == zlib.crc32(split.encode())
        twin_sample, split_sample = render_sample(0, f"train-{twin}", 3), render_sample(0, split, 3)
        assert np.array_equal(twin_sample.image, split_sample.image) and twin_sample.id != split_sample.id


def test_colliding_draws_are_skipped_across_splits():
    """A train stream that draws eval's (or dev's) scenes: the held-out split skips every one of them."""
    for twin, split in ((EVAL_TWIN, "eval"), (DEV_TWIN, "dev")):
        splits = generate_all_splits(5, 4, 4, seed=0, train_tag=f"train-{twin}")
        assert [s.id for s in splits[split]] == [f"syn-{split}-0-{i:07d}" for i in range(5, 9)]
        assert not {image_hash(s.image) for s in splits["train"]} & {
            image_hash(s.image) for s in splits[split]
        }


def test_excluded_images_are_skipped():
    first = render_sample(0, "eval", 0)
    drawn = list(generate_samples(2, seed=0, tag="eval", exclude_hashes={image_hash(first.image)}))
    assert [s.id for s in drawn] == [render_sample(0, "eval", 1).id, render_sample(0, "eval", 2).id]


# ----------------------------------------------------------------------------- on-disk formats


def _read_all(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("fmt", "bench"), [("llava", "cells"), ("webdataset", "cells"), ("llava", "tiles")])
def test_same_seed_same_bytes(tmp_path, fmt, bench):
    for name in ("a", "b"):
        write_synthetic_dataset(tmp_path / name, fmt, 12, 4, seed=2, benchmark=bench, num_dev=3)
    a, b = _read_all(tmp_path / "a"), _read_all(tmp_path / "b")
    a.pop(MANIFEST_NAME), b.pop(MANIFEST_NAME)  # holds the root path
    assert a == b


def _check_record(record: dict, image: bytes, benchmark: str) -> None:
    spec = get_benchmark(benchmark)
    assert set(record) >= {"id", "conversations", "family", "kind"}
    human, gpt = record["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert gpt["from"] == "gpt" and gpt["value"] in spec.answers[record["family"]]
    assert record["kind"] == spec.families[record["family"]]
    pixels = np.array(Image.open(io.BytesIO(image)))
    assert pixels.shape == (SIZE, SIZE, 3)
    question = human["value"].removeprefix("<image>\n")
    assert oracle_answer(benchmark, pixels, record["family"], question) == gpt["value"]


@pytest.mark.parametrize("bench", BENCHMARK_NAMES)
def test_llava_format(tmp_path, bench):
    summary = write_synthetic_dataset(tmp_path, "llava", 10, 5, seed=0, benchmark=bench, num_dev=3)
    assert {name: split["files"] for name, split in summary["splits"].items()} == {
        "train": ["train.json"],
        "dev": ["dev.json"],
        "eval": ["eval.json"],
    }
    for split, n in (("train", 10), ("dev", 3), ("eval", 5)):
        records = json.loads((tmp_path / f"{split}.json").read_text())
        assert isinstance(records, list) and len(records) == n
        for record in records:
            assert record["image"] == f"images/{record['id']}.png" and record["id"].startswith(
                f"syn-{split}-"
            )
            _check_record(record, (tmp_path / record["image"]).read_bytes(), bench)


def test_webdataset_format(tmp_path):
    write_synthetic_dataset(tmp_path, "webdataset", 10, 3, seed=0, samples_per_shard=4, num_dev=2)
    shards = sorted(p.name for p in tmp_path.glob("*.tar"))
    assert shards == [
        "dev-000000.tar",
        "eval-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    keys = []
    for shard in shards:
        with tarfile.open(tmp_path / shard) as tar:
            names = tar.getnames()
            assert names[0::2] == [n[: -len(".json")] + ".png" for n in names[1::2]]  # png, json per key
            for png_name in names[0::2]:
                key = png_name[: -len(".png")]
                record = json.loads(tar.extractfile(f"{key}.json").read())
                assert record["id"] == key and "." not in key
                _check_record(record, tar.extractfile(png_name).read(), "cells")
                keys.append(key)
    assert len(keys) == len(set(keys)) == 15


@pytest.mark.parametrize("bench", BENCHMARK_NAMES)
def test_parquet_format(tmp_path, bench):
    write_synthetic_dataset(tmp_path, "parquet", 6, 3, seed=0, benchmark=bench, num_dev=2)
    for split, n in (("train", 6), ("dev", 2), ("eval", 3)):
        table = pq.read_table(tmp_path / f"{split}-000000.parquet")
        assert table.schema.equals(synthetic.parquet_schema()) and table.num_rows == n
        for row in table.to_pylist():
            _check_record(row, row["image"], bench)
            assert row["conversations"][0]["value"] == "<image>\n" + row["question"]
            assert row["conversations"][1]["value"] == row["answer"]


DEV_FILES = {"llava": "dev.json", "webdataset": "dev-000000.tar", "parquet": "dev-000000.parquet"}


@pytest.mark.parametrize("fmt", sorted(DEV_FILES))
def test_dev_split_is_written_only_when_asked(tmp_path, fmt):
    without = write_synthetic_dataset(tmp_path / "without", fmt, 4, 2, seed=0)
    assert set(without["splits"]) == {"train", "eval"}
    assert not [p for p in (tmp_path / "without").iterdir() if p.name.startswith("dev")]
    assert set(read_manifest(tmp_path / "without")["splits"]) == {"train", "eval"}
    written = write_synthetic_dataset(tmp_path / "with", fmt, 4, 2, seed=0, num_dev=3)
    manifest = read_manifest(tmp_path / "with")
    assert manifest["splits"]["dev"] == written["splits"]["dev"]
    assert (
        manifest["splits"]["dev"]["files"] == [DEV_FILES[fmt]]
        and manifest["splits"]["dev"]["num_samples"] == 3
    )
    assert sum(manifest["splits"]["dev"]["families"].values()) == 3
    assert (tmp_path / "with" / DEV_FILES[fmt]).is_file()


@pytest.mark.parametrize("fmt", ["llava", "parquet"])
def test_new_shard_is_fresh_and_recorded(tmp_path, fmt):
    write_synthetic_dataset(tmp_path, fmt, num_train=8, num_eval=4, seed=0, num_dev=2)
    shard = write_synthetic_shard(tmp_path, "2025-06-01", num_samples=5, seed=11)
    expected = ["train-2025-06-01.json"] if fmt == "llava" else ["train-2025-06-01-000000.parquet"]
    assert shard["files"] == expected and shard["num_samples"] == 5
    manifest = read_manifest(tmp_path)
    assert manifest["shards"][0]["name"] == "2025-06-01" and manifest["benchmark"] == "cells"
    if fmt == "llava":
        ids = [
            r["id"]
            for f in ("train.json", "dev.json", "eval.json", "train-2025-06-01.json")
            for r in json.loads((tmp_path / f).read_text())
        ]
    else:
        ids = [i for f in sorted(tmp_path.glob("*.parquet")) for i in pq.read_table(f)["id"].to_pylist()]
    assert len(ids) == len(set(ids)) == 19
    with pytest.raises(ValueError, match="already exists"):
        write_synthetic_shard(tmp_path, "2025-06-01", num_samples=5, seed=12)


def test_new_shards_skip_dev_and_eval_images(tmp_path):
    """The twin shards draw the dev/eval scenes first: the shard must skip every one of them."""
    write_synthetic_dataset(tmp_path, "llava", num_train=6, num_eval=4, seed=0, num_dev=3)
    held_out = {
        split: [image_hash(np.array(Image.open(tmp_path / r["image"]))) for r in json.loads(f.read_text())]
        for split, f in (("dev", tmp_path / "dev.json"), ("eval", tmp_path / "eval.json"))
    }
    for twin, split in ((EVAL_TWIN, "eval"), (DEV_TWIN, "dev")):
        write_synthetic_shard(tmp_path, twin, num_samples=2, seed=0)
        records = json.loads((tmp_path / f"train-{twin}.json").read_text())
        first = len(held_out[split])
        assert [r["id"] for r in records] == [f"syn-train-{twin}-0-{i:07d}" for i in (first, first + 1)]
        shard_hashes = {image_hash(np.array(Image.open(tmp_path / r["image"]))) for r in records}
        assert not shard_hashes & (set(held_out["dev"]) | set(held_out["eval"]))


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        write_synthetic_dataset(tmp_path, "csv", num_train=1, num_eval=1)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, image_size=50)
    with pytest.raises(ValueError, match="families"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, families=["nope"])
    with pytest.raises(ValueError, match="num_dev"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, num_dev=-1)
    with pytest.raises(ValueError, match="unknown synthetic benchmark"):
        write_synthetic_dataset(tmp_path, "llava", num_train=1, num_eval=1, benchmark="stripes")
    with pytest.raises(FileNotFoundError, match="write_synthetic_dataset"):
        write_synthetic_shard(tmp_path / "missing", "s1", num_samples=1, seed=0)


# ----------------------------------------------------------------------------- manifests


def _edit_manifest(root: Path, **changes) -> None:
    """Set (or, with value ``None``, drop) top-level keys of a root's manifest."""
    path = root / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("bench", [None, *BENCHMARK_NAMES])
def test_manifest_records_the_benchmark(tmp_path, bench):
    extra = {} if bench is None else {"benchmark": bench}
    write_synthetic_dataset(tmp_path, "llava", num_train=2, num_eval=1, seed=0, **extra)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())  # as written, nothing filled in
    expected = bench or "cells"
    assert (manifest["benchmark"], manifest["version"]) == (expected, BENCHMARKS[expected].version)
    assert manifest["generator"] == "pipelines.synthetic"
    assert (BENCHMARKS["cells"].version, BENCHMARKS["tiles"].version, GENERATOR_VERSION) == (3, 2, 2)


def test_a_tiles_root_from_before_reads_as_tiles(tmp_path):
    write_synthetic_dataset(tmp_path, "llava", num_train=4, num_eval=2, seed=0, benchmark="tiles")
    _edit_manifest(tmp_path, benchmark=None)  # what the generator wrote before there were two benchmarks
    manifest = read_manifest(tmp_path)
    assert manifest["benchmark"] == "tiles" and manifest["version"] == 2
    on_disk = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest_differences(on_disk, {"benchmark": "tiles", "num_train": 4}) == []
    assert manifest_differences(on_disk, {"benchmark": "cells"}) == [
        "benchmark: tiles in the root, cells asked for",  # its version and families follow: said once
    ]
    write_synthetic_shard(tmp_path, "day2", num_samples=12, seed=1)
    records = json.loads((tmp_path / "train-day2.json").read_text())
    assert {r["family"] for r in records} <= set(FAMILIES) and len(records) == 12
    for record in records:
        _check_record(record, (tmp_path / record["image"]).read_bytes(), "tiles")


@pytest.mark.parametrize(("bench", "other_version"), [("cells", 2), ("tiles", 1), ("tiles", 3)])
def test_a_dataset_from_another_generator_version_is_refused(tmp_path, bench, other_version):
    """Scenes changed between generator versions: an old dataset must not be reused silently."""
    write_synthetic_dataset(tmp_path, "llava", num_train=4, num_eval=2, seed=0, benchmark=bench)
    assert read_manifest(tmp_path)["splits"]["train"]["num_samples"] == 4
    _edit_manifest(tmp_path, version=other_version)
    match = f"generator version {other_version} of the {bench} benchmark"
    with pytest.raises(ValueError, match=match):
        read_manifest(tmp_path)
    with pytest.raises(ValueError, match=match):
        write_synthetic_shard(tmp_path, "day2", num_samples=2, seed=1)


def test_a_manifest_of_an_unknown_benchmark_is_refused(tmp_path):
    write_synthetic_dataset(tmp_path, "llava", num_train=2, num_eval=1, seed=0)
    _edit_manifest(tmp_path, benchmark="stripes")
    with pytest.raises(ValueError, match="unknown synthetic benchmark 'stripes'"):
        read_manifest(tmp_path)


def test_manifest_differences_lists_exactly_the_differing_keys(tmp_path):
    manifest = write_synthetic_dataset(tmp_path, "llava", num_train=6, num_eval=3, seed=0, num_dev=2)
    same = {
        "benchmark": "cells",
        "format": "llava",
        "seed": 0,
        "image_size": 64,
        "num_train": 6,
        "num_dev": 2,
    }
    same["num_eval"] = 3
    assert manifest_differences(manifest, same) == [] and manifest_differences(manifest, {}) == []
    assert manifest_differences(read_manifest(tmp_path), same) == []
    changed = {"format": "parquet", "seed": 1, "image_size": 32, "num_train": 20, "num_dev": 0, "num_eval": 4}
    for key, value in changed.items():
        assert manifest_differences(manifest, {**same, key: value}) == [
            f"{key}: {same[key]} in the root, {value} asked for"
        ]
    assert manifest_differences(manifest, {**same, "num_train": 20, "seed": 5}) == [
        "seed: 0 in the root, 5 asked for",
        "num_train: 6 in the root, 20 asked for",
    ]
    assert manifest_differences(manifest, {**same, "benchmark": "tiles"}) == [
        "benchmark: cells in the root, tiles asked for",
    ]
    without_dev = write_synthetic_dataset(tmp_path / "no-dev", "llava", num_train=6, num_eval=3, seed=0)
    assert manifest_differences(without_dev, {**same, "num_dev": 0}) == []


# ----------------------------------------------------------------------------- removing a root


@pytest.mark.parametrize("fmt", ["llava", "webdataset", "parquet"])
def test_remove_deletes_exactly_the_generators_files(tmp_path, fmt):
    root = tmp_path / "root"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    if fmt == "llava":
        (root / "images").mkdir()
        (root / "images" / "mine.png").write_bytes(b"not the generator's")
    write_synthetic_dataset(root, fmt, num_train=5, num_eval=2, seed=0, samples_per_shard=3, num_dev=2)
    write_synthetic_shard(root, "day2", num_samples=2, seed=1)
    assert len(_read_all(root)) > 4
    remove_synthetic_dataset(root)
    expected = {"notes.txt", "images/mine.png"} if fmt == "llava" else {"notes.txt"}
    assert set(_read_all(root)) == expected


def test_remove_drops_an_emptied_image_folder(tmp_path):
    write_synthetic_dataset(tmp_path, "llava", num_train=3, num_eval=1, seed=0)
    remove_synthetic_dataset(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_remove_refuses_a_manifest_not_written_by_the_generator(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    foreign = {"generator": "someone-else", "format": "llava", "splits": {"train": {"files": ["train.json"]}}}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(foreign))
    with pytest.raises(ValueError, match="not written by pipelines.synthetic"):
        remove_synthetic_dataset(tmp_path)
    assert set(_read_all(tmp_path)) == {"train.json", MANIFEST_NAME}
