"""What the continuous engine's bookkeeping costs beside a decode step, in-process (no Ray, no HTTP).

    python benchmarks/engine_ops.py [--preset mid] [--rows 12] [--repeats 10] [--threads 1]

A random model of `--preset` prefills `--rows` image questions at the four rates of the serving mix (1, 2, 4,
auto, in turn; they run at rate 1 so the cache is as long as a dense one) and decodes 8 tokens. Then, median ms
of `--repeats`:

- one decode step of all the rows (`BatchRun.step`);
- a request joining (`BatchRun.absorb` of a one-row batch prefilled at 4x: every layer's keys and values are
  copied into new tensors);
- a request leaving (`BatchRun.absorb` of nothing, i.e. `remove_finished`, of one finished row: every layer's keys
  and values are gathered anew);
- one leaving and one joining in the same step, as the engine merges them (one `absorb` does both).

Then a decode step of `--rows` rows prefilled one by one and merged, all at rate 1, at the serving mix (2/3 auto,
then 1, 2, 4 in turn) and all at 4x, with the per-segment KV-cache widths they decode against and the share of
those positions that are real tokens (the rest is padding every row's attention still runs over).

Last, what padding alone costs a decode step: the dense batch again, with the leading share of every segment after
the first pooling layer masked out as padding (same tensor shapes, only the mask differs).

The replica runs with one CPU, hence one thread by default. Compare with the prefill ms per request of
benchmarks/serve_load.py.
"""

from __future__ import annotations

import argparse
import copy
import functools
import io
import statistics
import time

import numpy as np
import PIL.Image
import torch

from dpn_model.presets import build_model
from serve_apps.batch_cache import BatchCache
from serve_apps.generation import BatchRun, prepare

RATES = [1, 2, 4, "auto"]  # the serving mix's rates, in turn


def _request(processor, seed: int, compression):
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "Colour?"},
                ],
            }
        ],
        "images": [buf.getvalue()],
        "max_tokens": 1000,
        "temperature": 0.0,
        "compression": compression,
        "ignore_eos": True,
    }
    return prepare(processor, body, max_prompt_tokens=1 << 16)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        times.append(fn())
    return statistics.median(times) * 1e3


def _timer(run: BatchRun):
    """One decode step of `run`, timed: seconds."""

    def step() -> float:
        start = time.perf_counter()
        run.step()
        return time.perf_counter() - start

    return step


def _merge_table(run: BatchRun, joining: BatchRun, repeats: int) -> None:
    """A decode step of `run` beside one `absorb` on a copy of it: a row joins, one leaves, both."""

    def fresh() -> BatchRun:
        other = copy.copy(run)
        other.cache = BatchCache(copy.deepcopy(run.cache.kv), run.cache.mask)
        other.rows = [copy.copy(row) for row in run.rows]
        return other

    def merge(leaves: bool, joins: bool) -> float:
        """Seconds of one `absorb` on a copy of the batch: its first row finished (`leaves`), `joining` taken in."""
        other = fresh()
        other.rows[0].finished = leaves
        start = time.perf_counter()
        other.absorb(*([joining] if joins else []))
        return time.perf_counter() - start

    print(
        "| decode step | a request joins (absorb) | a request leaves (remove_finished) | one leaves, one joins |"
    )
    print("|---:|---:|---:|---:|")
    cells = [_median_ms(_timer(run), repeats)] + [
        _median_ms(functools.partial(merge, leaves, joins), repeats)
        for leaves, joins in ((False, True), (True, False), (True, True))
    ]
    print("| " + " | ".join(f"{ms:.1f}" for ms in cells) + " |")


def _mix_table(model, processor, rows: int, repeats: int) -> BatchRun:
    """A decode step of `rows` rows prefilled one by one and merged, at three mixes of rates; the all-dense batch."""
    print("\n| rows' rates | decode step (ms) | KV-cache width per segment | real tokens per segment |")
    print("|---|---:|---|---|")
    mix = ["auto" if i % 3 else RATES[(i // 3) % 3] for i in range(rows)]
    dense = None
    for name, row_rates in (("all 1", [1] * rows), ("serving mix", mix), ("all 4", [4] * rows)):
        merged = [
            BatchRun(model, processor, [_request(processor, i, r)], r, "row") for i, r in enumerate(row_rates)
        ]
        for one in merged:
            one.prefill()
        merged[0].absorb(*merged[1:])
        for _ in range(3):
            merged[0].step()
        run = merged[0]
        dense = dense or run
        widths = [mask.shape[1] for mask in run.cache.kv.segment_masks]
        real = [f"{float(mask.float().mean()):.0%}" for mask in run.cache.kv.segment_masks]
        print(f"| {name} | {_median_ms(_timer(run), repeats):.1f} | {widths} | {', '.join(real)} |")
    return dense


def _padding_table(dense: BatchRun, repeats: int) -> None:
    """A decode step of the dense batch with a rising share of each segment after the first pooling layer masked
    out as padding (same shapes, only the mask differs)."""
    print(
        "\n| padding in the segments after the first pooling layer (all 1, same shapes) | decode step (ms) |"
    )
    print("|---|---:|")
    for share in (0.0, 0.3, 0.6, 0.9):  # rising: each share pads the leading positions of the current masks
        for s, mask in enumerate(dense.cache.kv.segment_masks[1:], start=1):
            padded = mask.clone()
            padded[:, : int(share * mask.shape[1])] = 0
            dense.cache.kv.segment_masks[s] = padded
        print(f"| {share:.0%} | {_median_ms(_timer(dense), repeats):.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor = build_model(args.preset, seed=0)
    model.eval()
    run = BatchRun(
        model, processor, [_request(processor, i, RATES[i % 4]) for i in range(args.rows)], 1, "bench"
    )
    run.prefill()
    for _ in range(8):
        run.step()
    joining = BatchRun(model, processor, [_request(processor, 999, 4)], 4, "join")
    joining.prefill()
    cache_mib = sum(layer.keys.numel() + layer.values.numel() for layer in run.cache.kv.layers) * 4 / 2**20
    print(
        f"{args.preset}, {args.rows} rows, KV cache {cache_mib:.0f} MiB, {args.threads} thread(s), median ms:"
    )
    _merge_table(run, joining, args.repeats)
    _padding_table(_mix_table(model, processor, args.rows, args.repeats), args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
