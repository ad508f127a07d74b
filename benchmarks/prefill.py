"""Prefill FLOPs and wall time of dense, forced 2x, forced 4x, auto padded and auto ragged, measured side by side.

    python benchmarks/prefill.py [--presets tiny,mid] [--batch 8] [--repeats 5] [--write BENCHMARKS.md]

For each preset a random model (same code as the 7B model, smaller config) prefills one batch of image
questions in every mode; the modes are interleaved repeat by repeat so machine noise hits them alike.
The claim checked: the wall-time ratio to dense stays within 1.10x of the FLOPs ratio in every mode, i.e. the
pooling machinery (routing, grouping, rebuilding the batch) costs almost nothing. `auto (padded)` is the prefill
with `ragged=False` (every sample padded to the batch's longest expert path after each pooling layer),
`auto` the default ragged prefill (each expert-path group at its own length).
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
]
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
    flops: dict = {}
    with torch.inference_mode():
        for label, mode, ragged in MODES:  # warm-up, and the analytic FLOPs of each mode
            out = model(**inputs, compression=mode, ragged=ragged, use_cache=False, logits_to_keep=1)
            flops[label] = float(out.prefill_flops.mean())
        for _ in range(repeats):
            for label, mode, ragged in MODES:
                start = time.perf_counter()
                model(**inputs, compression=mode, ragged=ragged, use_cache=False, logits_to_keep=1)
                times[label].append(time.perf_counter() - start)
    rows = []
    dense_t, dense_f = statistics.median(times["dense"]), flops["dense"]
    for label, *_ in MODES:
        t = statistics.median(times[label])
        rows.append(
            {
                "preset": preset,
                "mode": label,
                "gflops": flops[label] / 1e9,
                "flops_ratio": flops[label] / dense_f,
                "ms": t * 1e3,
                "time_ratio": t / dense_t,
                "overhead": (t / dense_t) / (flops[label] / dense_f),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| preset | mode | prefill GFLOPs / sample | FLOPs vs dense | wall ms / batch | time vs dense "
        "| time ratio / FLOPs ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['gflops']:.3f} | {r['flops_ratio']:.2f} | {r['ms']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['overhead']:.2f} |"
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
    rows = [r for p in args.presets.split(",") for r in measure(p, args.batch, args.repeats)]
    result = table(rows)
    print(result)
    if args.write:
        machine = f"{platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"
        body = (
            "## Prefill: FLOPs and wall time per mode\n\n"
            f"Command: `python benchmarks/prefill.py --presets {args.presets} --batch {args.batch} "
            f"--repeats {args.repeats} --write {args.write}`  \n"
            f"Machine: {machine} (no GPU). Random weights; batch of {args.batch} image questions, left padded; "
            "median of the repeats, modes interleaved. Target: time ratio / FLOPs ratio <= 1.10 in every mode.\n"
            "`auto (padded)` is `ragged=False`: the samples of one batch choose different experts and every "
            "sample is padded to the batch's longest path after each pooling layer, so it pays for FLOPs it does "
            "not count; `auto` is the default ragged prefill, where each expert-path group runs the rest of the "
            "prefill at its own length.\n\n" + result
        )
        write_section(Path(args.write), "Prefill: FLOPs and wall time per mode", body)


if __name__ == "__main__":
    main()
