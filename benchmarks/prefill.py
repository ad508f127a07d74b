"""Prefill FLOPs and wall time of dense, forced 2x and 4x, auto and random routing (padded, ragged), side by side.

    python benchmarks/prefill.py [--presets tiny,mid] [--batch 8] [--repeats 5] [--write BENCHMARKS.md]

For each preset a random model (same code as the 7B model, smaller config) prefills one batch of image
questions in every mode; the modes are interleaved repeat by repeat so machine noise hits them alike.
The claim checked: the wall-time ratio to dense stays within 1.10x of the FLOPs ratio in every mode, i.e. the
pooling machinery (routing, grouping, rebuilding the batch) costs almost nothing. `auto (padded)` is the prefill
with `ragged=False` (every sample padded to the batch's longest expert path after each pooling layer),
`auto` the default ragged prefill (each expert-path group at its own length). A random model's routers often
send a whole batch down one path (then padded and ragged do the same work), so `random` (a uniformly drawn
feasible expert per sample and pooling layer, the same seed in every call) measures the same machinery on a batch
whose samples take different paths: the case ragged routing is for. The `paths` column counts the batch's
distinct expert paths.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpn_model.presets import build_model

# (label, compression, ragged)
MODES = [
    ("dense", 1, True),
    ("2x", 2, True),
    ("4x", 4, True),
    ("auto (padded)", "auto", False),
    ("auto", "auto", True),
    ("random (padded)", "random", False),
    ("random", "random", True),
]


def prefill(model, inputs, mode, ragged):
    torch.manual_seed(0)  # `random` draws the same paths in every call, padded or ragged
    return model(**inputs, compression=mode, ragged=ragged, use_cache=False, logits_to_keep=1)


QUESTIONS = [
    "What colour is the large shape?",
    "How many large shapes are there?",
    "Which side is the big shape on?",
    "What colour is the small dot in the corner of the picture?",
]


def make_batch(processor, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    side = processor.image_processor.crop_size["height"]
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(batch)]
    prompts = [
        processor.build_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        )
        for q in (QUESTIONS[i % len(QUESTIONS)] for i in range(batch))
    ]
    return processor(text=prompts, images=images, padding_side="left", return_tensors="pt")


def measure(preset: str, batch: int, repeats: int) -> list[dict]:
    model, processor = build_model(preset, seed=0)
    model.eval()
    inputs = make_batch(processor, batch)
    times: dict = {label: [] for label, *_ in MODES}
    flops, paths = {}, {}
    with torch.inference_mode():
        for label, mode, ragged in MODES:  # warm-up, and the analytic FLOPs and paths of each mode
            out = prefill(model, inputs, mode, ragged)
            flops[label] = float(out.prefill_flops.mean())
            choices = out.expert_choices
            paths[label] = 1 if choices is None else len({tuple(row) for row in choices.tolist()})
        for _ in range(repeats):
            for label, mode, ragged in MODES:
                start = time.perf_counter()
                prefill(model, inputs, mode, ragged)
                times[label].append(time.perf_counter() - start)
    rows = []
    dense_t, dense_f = statistics.median(times["dense"]), flops["dense"]
    for label, *_ in MODES:
        t = statistics.median(times[label])
        rows.append(
            {
                "preset": preset,
                "mode": label,
                "paths": paths[label],
                "gflops": flops[label] / 1e9,
                "flops_ratio": flops[label] / dense_f,
                "ms": t * 1e3,
                "time_ratio": t / dense_t,
                "overhead": (t / dense_t) / (flops[label] / dense_f),
            }
        )
    return rows


def batch_scaling(preset: str, sizes: list[int], repeats: int) -> list[tuple[int, float]]:
    """Median ms per sample of a forced-4x prefill at each batch size: what splitting a batch into groups costs."""
    model, processor = build_model(preset, seed=0)
    model.eval()
    result = []
    with torch.inference_mode():
        for size in sizes:
            inputs = make_batch(processor, size)
            prefill(model, inputs, 4, True)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                prefill(model, inputs, 4, True)
                times.append(time.perf_counter() - start)
            result.append((size, statistics.median(times) * 1e3 / size))
    return result


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | mode | paths | prefill GFLOPs / sample | FLOPs vs dense | wall ms / batch | time vs dense "
        "| time ratio / FLOPs ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['paths']} | {r['gflops']:.3f} | {r['flops_ratio']:.2f} | "
            f"{r['ms']:.1f} | {r['time_ratio']:.2f} | {r['overhead']:.2f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, title: str, body: str) -> None:
    """Replace (or append) the section `## title` of a markdown file."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    header = f"## {title}"
    if header in text:
        start = text.index(header)
        nxt = text.find("\n## ", start + len(header))
        text = text[:start] + body.rstrip() + "\n" + (text[nxt:] if nxt >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="tiny,mid")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", default=None, help="update this markdown file's 'Prefill' section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    presets = args.presets.split(",")
    rows = [r for p in presets for r in measure(p, args.batch, args.repeats)]
    sizes = sorted({1, 2, args.batch})
    scaling = "\n".join(
        [f"| preset | {' | '.join(f'batch {b}' for b in sizes)} |", "|---|" + "---:|" * len(sizes)]
        + [
            f"| {p} | " + " | ".join(f"{ms:.1f}" for _, ms in batch_scaling(p, sizes, args.repeats)) + " |"
            for p in presets
        ]
    )
    result = (
        table(rows)
        + "\n\nForced 4x prefill, ms per sample by batch size (a ragged group is a smaller batch):\n\n"
    )
    result += scaling
    print(result)
    if args.write:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
        body = (
            "## Prefill: FLOPs and wall time per mode\n\n"
            f"Command: `python benchmarks/prefill.py --presets {args.presets} --batch {args.batch} "
            f"--repeats {args.repeats} --write {args.write}`  \n"
            f"Machine: {machine} (no GPU). Random weights; batch of {args.batch} image questions, left padded; "
            "median of the repeats, modes interleaved. Target: time ratio / FLOPs ratio <= 1.10 in every mode.\n"
            "`(padded)` is `ragged=False`: where the samples of one batch choose different experts, every "
            "sample is padded to the batch's longest path after each pooling layer, so it pays for FLOPs it does "
            "not count; without it, the default ragged prefill, each expert-path group runs the rest of the "
            "prefill at its own length. `paths`: the batch's distinct expert paths. The random model's routers "
            "send most of a batch down one path, so `random` (a uniform feasible expert per sample and pooling "
            "layer, one seed for every call) is the mixed-path case.\n\n" + result
        )
        write_section(Path(args.write), "Prefill: FLOPs and wall time per mode", body)


if __name__ == "__main__":
    main()
