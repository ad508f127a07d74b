"""Data throughput: preprocessed samples/s per format and peak memory at 1x and 4x dataset size.

Writes the synthetic benchmark in each format, then streams it through the full training pipeline
(read -> normalise -> tokenise -> decode -> skip/count bad -> collate to tensors) with
``build_dataset`` + ``iter_torch_batches(collate_fn=Collator(...))``, timing the pass. Peak memory
is the largest sum of resident memory of this process and all its descendants (the local Ray
cluster's raylet, workers and object store pages), sampled every 0.2 s.

    python -m benchmarks.data_throughput --num-samples 1000 --scales 1 4 --markdown BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import platform
import tempfile
import threading
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

FORMATS = ("llava", "webdataset", "parquet")


class PeakMemory:
    """Samples the resident memory of this process tree in a background thread."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        me = psutil.Process()
        total = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # a worker may exit while we look
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def save_processor(directory: Path, image_size: int) -> str:
    """A tiny DPN processor matching the synthetic images (patch 4 -> (image_size/4)^2 visual tokens)."""
    from dpn_model.image_processing import DPNImageProcessor
    from dpn_model.processing import DPNProcessor
    from dpn_model.tokenization import build_tokenizer

    image_processor = DPNImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = DPNProcessor(image_processor, build_tokenizer(), image_seq_length=(image_size // 4) ** 2)
    processor.save_pretrained(str(directory))
    return str(directory)


def measure(root: str, processor_dir: str, batch_size: int) -> tuple[int, float, int, float, int]:
    """(samples, whole-pass seconds, samples after the first batch, their seconds, peak bytes)."""
    from pipelines.accounting import BadSampleAccountant
    from pipelines.datasets import build_dataset
    from pipelines.preprocess import Collator

    accountant = BadSampleAccountant(max_bad_fraction=0.0)
    ds = build_dataset(root, processor_dir, split="train", max_length=512, accountant=accountant)
    count, first, start = 0, 0, time.perf_counter()
    begin = start
    with PeakMemory() as memory:
        for batch in ds.iter_torch_batches(batch_size=batch_size, collate_fn=Collator(processor_dir)):
            if not count:  # steady state: time from the first batch on (actor start-up excluded)
                first, start = len(batch["input_ids"]), time.perf_counter()
            count += len(batch["input_ids"])
        seconds = time.perf_counter() - start
    accountant.check()
    return count, time.perf_counter() - begin, count - first, seconds, memory.peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=1000, help="train samples at scale 1")
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="append the results table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray

    from pipelines.synthetic import write_synthetic_dataset

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        processor_dir = save_processor(Path(tmp) / "processor", image_size=64)
        for fmt in args.formats:
            for scale in args.scales:
                root = Path(tmp) / f"{fmt}-{scale}"
                write_synthetic_dataset(
                    root, format=fmt, num_train=args.num_samples * scale, num_eval=0, seed=0
                )
                count, total, timed, seconds, peak = measure(str(root), processor_dir, args.batch_size)
                rows.append((fmt, scale, count, total, count / total, timed / seconds, peak / 2**20))
                print(f"{fmt:10s} x{scale}: {count} samples, {count / total:.0f}/s whole pass, "
                      f"{timed / seconds:.0f}/s after the first batch, "
                      f"peak RSS {peak / 2**20:.0f} MiB", flush=True)  # fmt: skip
    ray.shutdown()

    table = [
        "| format | scale | samples | seconds (whole pass) | samples/s (whole pass) "
        "| samples/s (after 1st batch) | peak RSS (MiB) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        *(f"| {f} | {s}x | {n} | {t:.1f} | {r:.0f} | {r2:.0f} | {m:.0f} |" for f, s, n, t, r, r2, m in rows),
    ]
    print("\n".join(table))
    if args.markdown:
        command = "python -m benchmarks.data_throughput " + " ".join(argv if argv is not None else _argv())
        machine = f"{psutil.cpu_count()}-core CPU ({platform.processor() or platform.machine()}), no GPU"
        section = [
            "",
            "## Data throughput",
            "",
            f"Command: `{command.strip()}`",
            "",
            f"Machine: {machine}, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; Ray local cluster with "
            f"{args.num_cpus} CPUs. Full training pipeline (read, normalise, tokenise, decode + pad-to-square "
            "64 px, skip/count bad, collate to tensors), one streaming pass, synthetic benchmark data. Peak "
            "RSS sums this process and the local Ray cluster's processes.",
            "",
            *table,
            "",
        ]
        with open(args.markdown, "a") as f:
            f.write("\n".join(section))
    return 0


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


if __name__ == "__main__":
    raise SystemExit(main())
