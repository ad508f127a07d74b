"""Synthetic benchmark datasets: simple scenes with coarse and fine question families.

Two benchmarks, each a :class:`Benchmark` in :data:`BENCHMARKS` (the manifest records which one a root holds):

* ``cells`` (generator version 3, the default): the benchmark on which per-sample routing can win. Every
  64x64 image holds one **large shape** (square, circle or triangle in one of five colours) on a background
  that is grey, white or black, and a fixed 2x2 **block of cells** in the top-left corner: four cells of one
  patch each (4x4 px at 64 px / patch 4), each one of the five colours. The block is exactly one 2x2 pooling
  window, aligned with the 1x2 windows: 1x2 pooling after the first pooling layer merges the asked (top left)
  cell with its right neighbour, 2x2 with all three, and when the question asks for it the three neighbours
  all differ from it, so a merged token holds two to four colours and cannot say which was the top left one;
  the large shape, its side and the background survive any pooling. The mix is realistic: three coarse
  families (70% of the questions) and one fine family (30%). On the stage-1 model (dense only) dev is answered
  at 100% dense, and the cell is lost at the pooled paths it was never trained at (1-4-4 38.6%, 2-4-4 10.8%,
  4-4-4 17.5%); benchmarks/headroom.py measures what models trained with each schedule recover.

  Designs tried and dropped (benchmarks/results/calibration.md): the cell named by row and column in a 4x4
  block, or by position in the 2x2 block ("the top right cell"), or left/right of a 1x2 strip: the tiny model
  learns to read one fixed cell in a few hundred steps but not to let the question choose the cell (it stays
  at the one-fixed-cell rate, 40-60%).

  ==============  ======  ======  ============================================  ===========================
  family          kind    share   question                                      answers
  ==============  ======  ======  ============================================  ===========================
  big_color       coarse  23.3%   colour of the large shape                     red green blue yellow purple
  big_side        coarse  23.3%   which side the large shape is on              left right
  bg_color        coarse  23.3%   colour of the background                      gray white black
  cell_color      fine    30%     colour of the top left cell of the block      red green blue yellow purple
  ==============  ======  ======  ============================================  ===========================

* ``tiles`` (generator version 2, kept for comparison with the earlier figures): described below. On it no
  router can beat the best static schedule: the tile is read through decoder layer 1 only, so one static path
  (1-4-4) answers every fine question (BENCHMARKS_HISTORY.md).

The ``tiles`` benchmark. Every image (default 64x64 RGB, grey background) holds one to three **large shapes** (square,
circle or triangle in one of five colours) and one small black-and-white **tile**. The tile is
the top-left cell of the 8x8 cell grid (``image_size // 8`` pixels, 8 px at 64 px; the large
shapes keep clear of it), split into 2x2 quadrants that are each white or black. It always sits
in the same cell because a tiny model trained from scratch on 2 CPU cores does not learn to
*find* a one-cell tile anywhere in the image within its budget (see
``benchmarks/results/calibration.md``); reading its arrangement is the fine-grained part. With a
16x16 patch grid (64 px, patch 4) one tile quadrant is exactly one patch and the whole tile is exactly one 2x2 pooling window, so
the tile's arrangement is what 2x2 (and 4x4) pooling of the visual tokens merges away, while the
large shapes survive heavy pooling.

Question families (``family`` / ``kind``), answers are single words from a closed set
(:data:`ANSWERS`), so accuracy is exact match:

==============  ======  =============================================  ===========================
family          kind    question                                       answers
==============  ======  =============================================  ===========================
big_color       coarse  colour of the (single) large shape             red green blue yellow purple
big_count       coarse  how many large shapes                          one two three
big_side        coarse  which side the (single) large shape is on      left right
tile_half       fine    which half of the tile is white                top bottom left right
tile_corner     fine    which corner (quadrant) of the tile is white   topleft topright bottomleft
                                                                       bottomright
tile_diagonal   fine    which diagonal of the tile is white            falling rising
==============  ======  =============================================  ===========================

Samples are a pure function of ``(benchmark, seed, tag, index)`` (``tag`` is the split or shard
name), so the same seed gives the same ids and bytes. Ids are ``syn-<tag>-<seed>-<index>``; eval
images are checked against train images (pixel hash) and colliding draws are skipped, dev images
against train and eval, so the splits share neither ids nor images.

Splits: ``train``; ``dev`` (for choosing settings: a family's path, a budget, a hyperparameter;
written when ``num_dev`` > 0); ``eval``, the **test** split, scored once per reported figure.

On-disk formats (split names ``train``, ``dev`` and ``eval`` in every format; a later retraining
shard named ``S`` is written as a train file ``train-S...``):

* ``llava``: ``<out>/train.json`` and ``<out>/eval.json`` (shards: ``train-S.json``), each a JSON
  list of ``{"id", "image": "images/<id>.png", "conversations": [{"from": "human", "value":
  "<image>\\n<question>"}, {"from": "gpt", "value": "<answer>"}], "family", "kind"}``; PNGs
  under ``<out>/images/``.
* ``webdataset``: tar shards ``<out>/train-000000.tar``, ``train-000001.tar``, ...,
  ``eval-000000.tar`` (shards: ``train-S-000000.tar``); per sample key (= id) the members
  ``<key>.png`` and ``<key>.json`` (``{"id", "conversations", "family", "kind"}``).
* ``parquet``: ``<out>/train-000000.parquet``, ..., ``eval-000000.parquet`` (shards:
  ``train-S-000000.parquet``) with columns ``id`` (string), ``image`` (PNG bytes),
  ``conversations`` (list<struct<from: string, value: string>>), ``family``, ``kind``,
  ``question``, ``answer`` (strings).

Every dataset root also gets ``synthetic.json``: the generator settings and the files per split,
which :func:`write_synthetic_shard` reads to keep new shards disjoint from the eval split.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dpn_model.tokenization import IMAGE_TOKEN
from pipelines.storage import atomic_write_text

FORMATS = ("llava", "webdataset", "parquet")
MANIFEST_NAME = "synthetic.json"
GENERATOR_VERSION = 2  # the tiles benchmark's (a manifest without "benchmark" is a tiles root)
DEFAULT_BENCHMARK = "cells"
DEFAULT_IMAGE_SIZE = 64
DEFAULT_SAMPLES_PER_SHARD = 1000

BACKGROUND = (128, 128, 128)
TILE_WHITE = (255, 255, 255)
TILE_BLACK = (0, 0, 0)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 30),
    "purple": (150, 50, 200),
}
SHAPES = ("square", "circle", "triangle")
TILE_CELL = (0, 0)  # (row, col) of the tile in the 8x8 cell grid: the top-left corner
COUNT_WORDS = ("one", "two", "three")

# Tile quadrant masks, True = white; rows are (top, bottom), columns (left, right).
TILE_PATTERNS: dict[str, dict[str, tuple[tuple[bool, bool], tuple[bool, bool]]]] = {
    "tile_half": {
        "top": ((True, True), (False, False)),
        "bottom": ((False, False), (True, True)),
        "left": ((True, False), (True, False)),
        "right": ((False, True), (False, True)),
    },
    "tile_corner": {
        "topleft": ((True, False), (False, False)),
        "topright": ((False, True), (False, False)),
        "bottomleft": ((False, False), (True, False)),
        "bottomright": ((False, False), (False, True)),
    },
    "tile_diagonal": {
        "falling": ((True, False), (False, True)),
        "rising": ((False, True), (True, False)),
    },
}

FAMILY_KIND: dict[str, str] = {
    "big_color": "coarse",
    "big_count": "coarse",
    "big_side": "coarse",
    "tile_half": "fine",
    "tile_corner": "fine",
    "tile_diagonal": "fine",
}
FAMILIES = tuple(FAMILY_KIND)
ANSWERS: dict[str, tuple[str, ...]] = {
    "big_color": tuple(PALETTE),
    "big_count": COUNT_WORDS,
    "big_side": ("left", "right"),
    **{family: tuple(patterns) for family, patterns in TILE_PATTERNS.items()},
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "big_color": ("What colour is the large shape?", "Which colour does the big shape have?"),
    "big_count": ("How many large shapes are there?", "How many big shapes does the image show?"),
    "big_side": (
        "Which side of the image is the large shape on?",
        "Is the big shape on the left or the right?",
    ),
    "tile_half": ("Which half of the small tile is white?", "Which side of the little tile is white?"),
    "tile_corner": (
        "Which corner of the small tile is white?",
        "Which quadrant of the little tile is white?",
    ),
    "tile_diagonal": (
        "Which diagonal of the small tile is white?",
        "Is the white diagonal of the little tile rising or falling?",
    ),
}


@dataclass(frozen=True)
class SyntheticSample:
    """One rendered sample.

    Attributes:
        id: unique id ``syn-<tag>-<seed>-<index>``.
        image: `(H, W, 3)` uint8 pixels.
        question: the question text (no image placeholder).
        answer: single-word answer from ``ANSWERS[family]``.
        family: question family, one of :data:`FAMILIES`.
        kind: ``"coarse"`` or ``"fine"``.
    """

    id: str
    image: np.ndarray
    question: str
    answer: str
    family: str
    kind: str

    def conversations(self) -> list[dict[str, str]]:
        """LLaVA-style two-turn conversation for this sample."""
        return [
            {"from": "human", "value": f"{IMAGE_TOKEN}\n{self.question}"},
            {"from": "gpt", "value": self.answer},
        ]

    def png_bytes(self) -> bytes:
        """The image encoded as PNG (deterministic for equal pixels)."""
        buffer = io.BytesIO()
        Image.fromarray(self.image).save(buffer, format="PNG")
        return buffer.getvalue()

    def record(self) -> dict[str, Any]:
        """Metadata shared by all formats (id, conversations, family, kind)."""
        return {
            "id": self.id,
            "conversations": self.conversations(),
            "family": self.family,
            "kind": self.kind,
        }


# ----------------------------------------------------------------------------- rendering


def _validate(image_size: int, families: Sequence[str], benchmark: Benchmark) -> None:
    if image_size < 32 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")
    unknown = sorted(set(families) - set(benchmark.families))
    if unknown or not families:
        raise ValueError(
            f"families must be a non-empty subset of the {benchmark.name} benchmark's "
            f"{tuple(benchmark.families)}, got {list(families)}"
        )


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """Whether boxes ``(x0, y0, x1, y1)`` (exclusive ends) come closer than ``gap`` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _place_big_shapes(
    rng: np.random.Generator, image_size: int, count: int, side: str | None
) -> list[tuple[int, int, int, int]]:
    """Non-overlapping square boxes for the large shapes; ``side`` confines a box to one half."""
    lo, hi = int(image_size * 0.28), int(image_size * 0.38)
    while True:  # rejection sampling; three boxes of <= 38% side always fit eventually
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            size = int(rng.integers(lo, hi + 1))
            x_lo, x_hi = 0, image_size - size
            if side == "left":
                x_hi = image_size // 2 - size
            elif side == "right":
                x_lo = image_size // 2
            x0 = int(rng.integers(x_lo, x_hi + 1))
            y0 = int(rng.integers(0, image_size - size + 1))
            box = (x0, y0, x0 + size, y0 + size)
            if any(_boxes_overlap(box, other, gap=2) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == count:
            return boxes


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]
) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
    else:
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=color)


def _tile_cell_free(image_size: int, boxes: Iterable[tuple[int, int, int, int]]) -> bool:
    """Whether the tile's cell (:data:`TILE_CELL` of the 8x8 cell grid) keeps a 1 px gap to every large shape."""
    cell = image_size // 8
    row, col = TILE_CELL
    tile_box = (col * cell, row * cell, (col + 1) * cell, (row + 1) * cell)
    return not any(_boxes_overlap(tile_box, b, gap=1) for b in boxes)


def paint_tile(
    image: np.ndarray, row: int, col: int, mask: tuple[tuple[bool, bool], tuple[bool, bool]]
) -> None:
    """Paint the black/white tile into cell ``(row, col)`` of ``image`` in place."""
    cell = image.shape[0] // 8
    quadrants = np.kron(
        np.asarray(mask, dtype=bool), np.ones((cell // 2, cell // 2), dtype=bool)
    )  # (cell, cell)
    colors = np.where(quadrants[..., None], np.array(TILE_WHITE, np.uint8), np.array(TILE_BLACK, np.uint8))
    image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = colors


def _family_answer(
    rng: np.random.Generator, family: str, answers: dict[str, tuple[str, ...]] = ANSWERS
) -> str:
    return str(rng.choice(answers[family]))


def _render_tiles(
    rng: np.random.Generator, family: str, answer: str, image_size: int
) -> tuple[np.ndarray, str]:
    """The tiles scene for one (family, answer): `(H, W, 3)` uint8 pixels and the question."""
    count = (
        COUNT_WORDS.index(answer) + 1
        if family == "big_count"
        else (1 if family in ("big_color", "big_side") else int(rng.integers(1, 4)))
    )
    side = answer if family == "big_side" else None
    while True:
        boxes = _place_big_shapes(rng, image_size, count, side)
        if _tile_cell_free(image_size, boxes):
            break
    colors = [answer] if family == "big_color" else [str(c) for c in rng.choice(list(PALETTE), size=count)]
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for box, color in zip(boxes, colors):
        _draw_shape(draw, str(rng.choice(SHAPES)), box, PALETTE[color])
    image = np.array(canvas)  # (H, W, 3) uint8
    tile_family = family if family in TILE_PATTERNS else str(rng.choice(list(TILE_PATTERNS)))
    tile_answer = answer if family in TILE_PATTERNS else _family_answer(rng, tile_family)
    paint_tile(image, *TILE_CELL, TILE_PATTERNS[tile_family][tile_answer])
    return image, str(rng.choice(QUESTIONS[family]))


# ----------------------------------------------------------------------------- the cells benchmark

CELL_COLORS = tuple(PALETTE)  # a cell is one of the shapes' five colours
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}
CELL_NAMES = ("top left", "top right", "bottom left", "bottom right")  # row-major over the 2x2 block
ASKED_CELL = 0  # the fine family asks for the top left cell (see the module docstring: why one fixed cell)
CELLS_FAMILY_KIND: dict[str, str] = {
    "big_color": "coarse",
    "big_side": "coarse",
    "bg_color": "coarse",
    "cell_color": "fine",
}
CELLS_WEIGHTS: dict[str, float] = {
    "big_color": 0.7 / 3,
    "big_side": 0.7 / 3,
    "bg_color": 0.7 / 3,
    "cell_color": 0.3,
}
CELLS_ANSWERS: dict[str, tuple[str, ...]] = {
    "big_color": tuple(PALETTE),
    "big_side": ("left", "right"),
    "bg_color": tuple(BACKGROUNDS),
    "cell_color": CELL_COLORS,
}
CELLS_QUESTIONS: dict[str, tuple[str, ...]] = {
    "big_color": QUESTIONS["big_color"],
    "big_side": QUESTIONS["big_side"],
    "bg_color": ("What colour is the background?", "Which colour does the background have?"),
    "cell_color": ("What colour is the {cell} cell?", "Which colour has the {cell} cell?"),
}


def cell_block_box(image_size: int) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the 2x2 block of cells: the image's top-left corner, one patch per cell (a
    sixteenth of the side: 4 px at 64 px, the tiny preset's patch)."""
    side = 2 * (image_size // 16)
    return (0, 0, side, side)


def _render_cells(
    rng: np.random.Generator, family: str, answer: str, image_size: int
) -> tuple[np.ndarray, str]:
    """The cells scene for one (family, answer): `(H, W, 3)` uint8 pixels and the question."""
    side = answer if family == "big_side" else str(rng.choice(("left", "right")))
    color = answer if family == "big_color" else str(rng.choice(tuple(PALETTE)))
    background = answer if family == "bg_color" else str(rng.choice(tuple(BACKGROUNDS)))
    block = cell_block_box(image_size)
    while True:
        (box,) = _place_big_shapes(rng, image_size, 1, side)
        if not _boxes_overlap(box, block, gap=2):
            break
    canvas = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    _draw_shape(ImageDraw.Draw(canvas), str(rng.choice(SHAPES)), box, PALETTE[color])
    image = np.array(canvas)  # (H, W, 3) uint8
    cells = [str(c) for c in rng.choice(CELL_COLORS, size=4)]
    question = str(rng.choice(CELLS_QUESTIONS[family]))
    if family == "cell_color":  # the asked cell, and three neighbours that all differ from it
        others = [c for c in CELL_COLORS if c != answer]
        cells = [answer if k == ASKED_CELL else str(rng.choice(others)) for k in range(4)]
        question = question.format(cell=CELL_NAMES[ASKED_CELL])
    cell = image_size // 16
    for k, name in enumerate(cells):
        row, col = divmod(k, 2)
        image[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = PALETTE[name]
    return image, question


@dataclass(frozen=True)
class Benchmark:
    """One synthetic benchmark: its families, their mix and answers, and how a scene is drawn.

    Attributes:
        name: ``"cells"`` or ``"tiles"`` (the manifest's ``benchmark``).
        version: generator version of its scenes (a root written by another version is refused).
        families: family -> kind (``"coarse"`` or ``"fine"``).
        weights: family -> share of the questions (``None``: uniform).
        answers: family -> the closed set of single-word answers.
        render: ``(rng, family, answer, image_size) -> (pixels, question)``.
    """

    name: str
    version: int
    families: dict[str, str]
    weights: dict[str, float] | None
    answers: dict[str, tuple[str, ...]]
    render: Callable[[np.random.Generator, str, str, int], tuple[np.ndarray, str]]

    def draw_family(self, rng: np.random.Generator, families: Sequence[str]) -> str:
        if self.weights is None:
            return str(rng.choice(list(families)))
        weights = np.array([self.weights[f] for f in families], dtype=np.float64)
        return str(rng.choice(list(families), p=weights / weights.sum()))


BENCHMARKS: dict[str, Benchmark] = {
    "cells": Benchmark("cells", 3, CELLS_FAMILY_KIND, CELLS_WEIGHTS, CELLS_ANSWERS, _render_cells),
    "tiles": Benchmark("tiles", GENERATOR_VERSION, FAMILY_KIND, None, ANSWERS, _render_tiles),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown synthetic benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def render_sample(
    seed: int,
    tag: str,
    index: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    families: Sequence[str] | None = None,
    benchmark: str = DEFAULT_BENCHMARK,
) -> SyntheticSample:
    """Render sample ``index`` of stream ``tag`` (split or shard name) for ``seed``.

    Args:
        seed: dataset seed.
        tag: stream name (``"train"``, ``"dev"``, ``"eval"`` or a shard name); streams draw independently.
        index: position in the stream.
        image_size: image side in pixels (multiple of 16).
        families: families to draw the question from, in the benchmark's mix (default: all of them).
        benchmark: ``"cells"`` or ``"tiles"``.
    Returns:
        The sample; a pure function of the arguments.
    """
    spec = get_benchmark(benchmark)
    families = tuple(spec.families) if families is None else tuple(families)
    _validate(image_size, families, spec)
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode()), index])
    family = spec.draw_family(rng, families)
    answer = _family_answer(rng, family, spec.answers)
    image, question = spec.render(rng, family, answer, image_size)
    return SyntheticSample(
        id=f"syn-{tag}-{seed}-{index:07d}",
        image=image,
        question=question,
        answer=answer,
        family=family,
        kind=spec.families[family],
    )


def image_hash(image: np.ndarray) -> str:
    """Content hash of an image's pixels (used to keep splits free of duplicate images)."""
    return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()


def generate_samples(
    num: int,
    seed: int,
    tag: str = "train",
    image_size: int = DEFAULT_IMAGE_SIZE,
    families: Sequence[str] | None = None,
    exclude_hashes: set[str] | frozenset[str] = frozenset(),
    benchmark: str = DEFAULT_BENCHMARK,
) -> Iterator[SyntheticSample]:
    """Yield ``num`` samples of stream ``tag``, skipping draws whose image is in ``exclude_hashes``."""
    index = emitted = 0
    while emitted < num:
        sample = render_sample(seed, tag, index, image_size, families, benchmark)
        index += 1
        if exclude_hashes and image_hash(sample.image) in exclude_hashes:
            continue
        emitted += 1
        yield sample


def data_rows(samples: Sequence[SyntheticSample]) -> dict[str, np.ndarray]:
    """`samples` as one numpy batch of the rows the data pipeline reads (image bytes, conversations as JSON,
    family, kind, no bad reason), ready for `pipelines.preprocess.Preprocessor`."""
    return {
        "id": np.array([s.id for s in samples]),
        "image": np.array([s.png_bytes() for s in samples], dtype=object),
        "conversations": np.array([json.dumps(s.conversations()) for s in samples]),
        "family": np.array([s.family for s in samples]),
        "kind": np.array([s.kind for s in samples]),
        "bad_reason": np.array([""] * len(samples)),
    }


def generate_all_splits(
    num_train: int,
    num_dev: int,
    num_eval: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    families: Sequence[str] | None = None,
    train_tag: str = "train",
    benchmark: str = DEFAULT_BENCHMARK,
) -> dict[str, list[SyntheticSample]]:
    """``{"train", "dev", "eval"}`` samples with disjoint ids and images: eval skips train's images, dev skips
    both (so the eval split is the same whatever ``num_dev`` is)."""
    train = list(generate_samples(num_train, seed, train_tag, image_size, families, benchmark=benchmark))
    seen = {image_hash(s.image) for s in train}
    evals = list(generate_samples(num_eval, seed, "eval", image_size, families, seen, benchmark))
    seen |= {image_hash(s.image) for s in evals}
    dev = list(generate_samples(num_dev, seed, "dev", image_size, families, seen, benchmark))
    return {"train": train, "dev": dev, "eval": evals}


def generate_splits(
    num_train: int,
    num_eval: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    families: Sequence[str] | None = None,
    train_tag: str = "train",
    benchmark: str = DEFAULT_BENCHMARK,
) -> tuple[list[SyntheticSample], list[SyntheticSample]]:
    """Train and eval samples with disjoint ids and no eval image equal to a train image."""
    splits = generate_all_splits(num_train, 0, num_eval, seed, image_size, families, train_tag, benchmark)
    return splits["train"], splits["eval"]


# ----------------------------------------------------------------------------- writers


def _chunks(samples: Sequence[SyntheticSample], size: int) -> Iterator[Sequence[SyntheticSample]]:
    for start in range(0, max(len(samples), 1), size):
        yield samples[start : start + size]


def _write_llava(
    out: Path, stem: str, samples: Sequence[SyntheticSample], samples_per_shard: int
) -> list[str]:
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for sample in samples:
        rel = f"images/{sample.id}.png"
        (out / rel).write_bytes(sample.png_bytes())
        records.append(
            {
                "id": sample.id,
                "image": rel,
                "conversations": sample.conversations(),
                "family": sample.family,
                "kind": sample.kind,
            }
        )
    atomic_write_text(out / f"{stem}.json", json.dumps(records, indent=1) + "\n")  # never seen half-written
    return [f"{stem}.json"]


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _write_webdataset(
    out: Path, stem: str, samples: Sequence[SyntheticSample], samples_per_shard: int
) -> list[str]:
    files = []
    for shard, chunk in enumerate(_chunks(samples, samples_per_shard)):
        name = f"{stem}-{shard:06d}.tar"
        with tarfile.open(out / name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in chunk:
                _tar_member(tar, f"{sample.id}.png", sample.png_bytes())
                _tar_member(tar, f"{sample.id}.json", json.dumps(sample.record()).encode())
        files.append(name)
    return files


def parquet_schema() -> Any:
    """The pyarrow schema of the parquet format."""
    import pyarrow as pa

    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    return pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.binary()),
            ("conversations", pa.list_(turn)),
            ("family", pa.string()),
            ("kind", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
        ]
    )


def _write_parquet(
    out: Path, stem: str, samples: Sequence[SyntheticSample], samples_per_shard: int
) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for shard, chunk in enumerate(_chunks(samples, samples_per_shard)):
        columns = {
            "id": [s.id for s in chunk],
            "image": [s.png_bytes() for s in chunk],
            "conversations": [s.conversations() for s in chunk],
            "family": [s.family for s in chunk],
            "kind": [s.kind for s in chunk],
            "question": [s.question for s in chunk],
            "answer": [s.answer for s in chunk],
        }
        name = f"{stem}-{shard:06d}.parquet"
        pq.write_table(pa.table(columns, schema=parquet_schema()), out / name)
        files.append(name)
    return files


_WRITERS = {"llava": _write_llava, "webdataset": _write_webdataset, "parquet": _write_parquet}


def _write_split(
    out: Path, fmt: str, stem: str, samples: Sequence[SyntheticSample], samples_per_shard: int
) -> list[str]:
    if fmt not in _WRITERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    return _WRITERS[fmt](out, stem, samples, samples_per_shard)


def _summary(samples: Sequence[SyntheticSample]) -> dict[str, int]:
    families, counts = np.unique([s.family for s in samples], return_counts=True)
    return {str(f): int(c) for f, c in zip(families, counts)}


def _check_shard_name(shard_name: str) -> None:
    if not shard_name or not shard_name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(
            f"shard_name must be non-empty and use only letters, digits, '-' and '_', got {shard_name!r}"
        )


def _check_format_and_counts(format: str, num_train: int, num_dev: int, num_eval: int) -> None:
    """Refuse an unknown format or a negative split size before any sample is generated."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if min(num_train, num_eval, num_dev) < 0:
        raise ValueError(
            f"num_train, num_dev and num_eval must be >= 0, got {num_train}, {num_dev}, {num_eval}"
        )


def _train_stem(shard_name: str | None) -> str:
    """The train files' stem: ``train``, or ``train-<shard_name>`` so shards of one root do not collide."""
    if shard_name is None:
        return "train"
    _check_shard_name(shard_name)
    return f"train-{shard_name}"


def _write_splits(
    out: Path,
    fmt: str,
    splits: Mapping[str, Sequence[SyntheticSample]],
    train_stem: str,
    samples_per_shard: int,
) -> dict[str, dict[str, Any]]:
    """Write each split's files; returns the manifest's ``splits`` entry (sizes, files, family counts).

    An empty dev split is skipped (no dev files, no entry): dev is optional; train and eval are always written.
    """
    written = {}
    for name, samples in splits.items():
        if name == "dev" and not samples:
            continue
        stem = train_stem if name == "train" else name
        written[name] = {
            **({"tag": train_stem} if name == "train" else {}),
            "num_samples": len(samples),
            "files": _write_split(out, fmt, stem, samples, samples_per_shard),
            "families": _summary(samples),
        }
    return written


def write_synthetic_dataset(
    out_dir: str | Path,
    format: str = "llava",
    num_train: int = 4000,
    num_eval: int = 500,
    seed: int = 0,
    image_size: int = DEFAULT_IMAGE_SIZE,
    shard_name: str | None = None,
    families: Sequence[str] | None = None,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    benchmark: str = DEFAULT_BENCHMARK,
    num_dev: int = 0,
) -> dict[str, Any]:
    """Generate a synthetic benchmark and write it in one of the real formats.

    Args:
        out_dir: dataset root (created).
        format: ``"llava"``, ``"webdataset"`` or ``"parquet"`` (schemas in the module docstring).
        num_train: number of train samples.
        num_eval: number of eval (test) samples (ids and images disjoint from train).
        seed: generation seed; equal arguments give byte-identical files.
        image_size: image side in pixels (multiple of 16).
        shard_name: if set, the train files are named ``train-<shard_name>...`` instead of ``train...``.
        families: question families to draw from (default all of the benchmark's, in its mix).
        samples_per_shard: samples per tar/parquet file.
        benchmark: ``"cells"`` (default) or ``"tiles"``.
        num_dev: number of dev samples (disjoint from train and eval); 0 writes no dev split.
    Returns:
        Summary: root, benchmark, version, format, seed, image size, and per split the number of samples,
        the files and the per-family counts (also written to ``<out_dir>/synthetic.json``).
    """
    spec = get_benchmark(benchmark)
    families = tuple(spec.families) if families is None else tuple(families)
    _validate(image_size, families, spec)
    _check_format_and_counts(format, num_train, num_dev, num_eval)
    train_stem = _train_stem(shard_name)
    out = Path(out_dir)
    splits = generate_all_splits(
        num_train, num_dev, num_eval, seed, image_size, families, train_stem, benchmark
    )
    written = _write_splits(out, format, splits, train_stem, samples_per_shard)
    manifest = {
        "generator": "pipelines.synthetic",
        "benchmark": benchmark,
        "version": spec.version,
        "root": str(out),
        "format": format,
        "seed": seed,
        "image_size": image_size,
        "families": list(families),
        "samples_per_shard": samples_per_shard,
        "splits": written,
        "shards": [],
    }
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a synthetic dataset root (``benchmark`` filled in: ``"tiles"`` for roots written before
    there were several benchmarks).

    Raises:
        FileNotFoundError: no ``synthetic.json`` under ``root``.
        ValueError: the dataset was written by another generator version of its benchmark (its scenes differ
            from what this code renders, e.g. version 1 placed the tile anywhere), or by an unknown benchmark.
    """
    path = Path(root) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: create the dataset first with write_synthetic_dataset")
    manifest = json.loads(path.read_text())
    manifest.setdefault("benchmark", "tiles")
    spec = get_benchmark(manifest["benchmark"])
    if manifest.get("version") != spec.version:
        raise ValueError(
            f"the synthetic dataset at {root} was written by generator version {manifest.get('version')} of the "
            f"{spec.name} benchmark, this code renders version {spec.version}: delete that folder (it is "
            "regenerated on the next run) or point data.path elsewhere"
        )
    return manifest


def manifest_differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What a root's manifest differs in from the settings a job asks for (``benchmark``, ``format``, ``seed``,
    ``image_size``, ``num_train``, ``num_dev``, ``num_eval``, ``families``; keys absent from ``wanted`` are not
    compared), as
    ``"num_train: 2000 in the root, 20000 asked for"`` lines; empty when the root is the one asked for."""
    splits = manifest.get("splits", {})
    have = {
        "benchmark": manifest.get("benchmark", "tiles"),
        "version": manifest.get("version"),
        "format": manifest.get("format"),
        "seed": manifest.get("seed"),
        "image_size": manifest.get("image_size"),
        "num_train": splits.get("train", {}).get("num_samples"),
        "num_dev": splits.get("dev", {}).get("num_samples", 0),
        "num_eval": splits.get("eval", {}).get("num_samples"),
        "families": manifest.get("families"),
    }
    if "benchmark" in wanted:
        wanted = {**wanted, "version": get_benchmark(wanted["benchmark"]).version}
        if have["benchmark"] != wanted["benchmark"]:  # its version and families differ with it: say it once
            wanted = {k: v for k, v in wanted.items() if k not in ("version", "families")}
    return [
        f"{key}: {have[key]} in the root, {value} asked for"
        for key, value in wanted.items()
        if have[key] != value
    ]


def remove_synthetic_dataset(root: str | Path) -> None:
    """Delete a synthetic dataset written by this module: the files its manifest lists (splits and shards), the
    llava format's image folder, then the manifest. Files the manifest does not name are left alone."""
    out = Path(root)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    if manifest.get("generator") != "pipelines.synthetic":
        raise ValueError(
            f"{out / MANIFEST_NAME} was not written by pipelines.synthetic: not deleting anything"
        )
    files = [f for split in manifest.get("splits", {}).values() for f in split.get("files", [])]
    files += [f for shard in manifest.get("shards", []) for f in shard.get("files", [])]
    for name in files:
        path = out / name
        if (
            manifest.get("format") == "llava" and path.is_file()
        ):  # the images its records name, and only those
            for record in json.loads(path.read_text()):
                (out / record["image"]).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if (out / "images").is_dir() and not any((out / "images").iterdir()):
        (out / "images").rmdir()
    (out / MANIFEST_NAME).unlink()


def write_synthetic_shard(root: str | Path, shard_name: str, num_samples: int, seed: int) -> dict[str, Any]:
    """Add a train shard of fresh samples to an existing synthetic dataset (scheduled retraining).

    The shard uses the root's benchmark, format and image size, its own sample stream (ids
    ``syn-train-<shard_name>-<seed>-...``, disjoint from every other stream) and skips images that
    equal an eval or dev image. Files: ``train-<shard_name>.json`` (llava) or
    ``train-<shard_name>-NNNNNN.tar|.parquet``.

    Args:
        root: dataset root written by :func:`write_synthetic_dataset`.
        shard_name: new shard name (letters, digits, ``-``, ``_``), e.g. a date ``2025-06-01``.
        num_samples: number of samples in the shard.
        seed: seed of the new samples.
    Returns:
        The shard's summary (also appended to the manifest's ``shards``).
    """
    _check_shard_name(shard_name)
    out = Path(root)
    manifest_path = out / MANIFEST_NAME
    manifest = read_manifest(out)
    if any(shard["name"] == shard_name for shard in manifest["shards"]):
        raise ValueError(f"shard {shard_name!r} already exists in {out}; choose a new shard_name")
    image_size, families, benchmark = manifest["image_size"], manifest["families"], manifest["benchmark"]
    train_stem = f"train-{shard_name}"
    split = manifest["splits"]
    held_out = generate_all_splits(
        split["train"]["num_samples"],
        split.get("dev", {}).get("num_samples", 0),
        split["eval"]["num_samples"],
        manifest["seed"],
        image_size,
        families,
        split["train"]["tag"],
        benchmark,
    )
    held_out_hashes = {image_hash(s.image) for name in ("dev", "eval") for s in held_out[name]}
    samples = list(
        generate_samples(num_samples, seed, train_stem, image_size, families, held_out_hashes, benchmark)
    )
    files = _write_split(out, manifest["format"], train_stem, samples, manifest["samples_per_shard"])
    shard = {
        "name": shard_name,
        "seed": seed,
        "num_samples": len(samples),
        "files": files,
        "families": _summary(samples),
    }
    manifest["shards"].append(shard)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
    return shard
