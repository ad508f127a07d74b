"""Training throughput: samples/s of DPN (compression auto) vs dense on the tiny and mid presets.

Runs the real training job (:func:`jobs.training.job.train`: Ray Train, 2 CPU workers, DeepSpeed ZeRO-2 fp32,
Ray Data streaming) for a few steps per (preset, compression) on the synthetic benchmark, all in
one local Ray cluster and a throwaway MLflow store, and reads the per-step metrics back from MLflow:
global samples/s and tokens/s (median over the steps after ``--skip`` warm-up steps) and the fraction
of step time spent waiting for the next batch (mean over the same steps; target < 5%).

    python -m benchmarks.train_throughput --presets tiny mid --steps 10 --markdown BENCHMARKS.md

Results are appended to the "Training throughput" section of the markdown file with the command
and the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

logger = logging.getLogger("train_throughput")


def measure(root: Path, preset: str, compression: str | int, steps: int, micro_batch: int, skip: int) -> dict:
    """Train ``steps`` steps of ``preset`` at ``compression``; per-step metrics from MLflow."""
    from mlflow.tracking import MlflowClient

    from jobs.config import load_config
    from jobs.training.config import TrainConfig
    from jobs.training.job import train

    name = f"{preset}-{compression}"
    cfg = load_config(TrainConfig, data={
        "model": {"init": f"preset:{preset}", "compression": compression, "freeze_vision_tower": False},
        "data": {"path": str(root / "data"), "max_length": 1024},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"micro_batch_size": micro_batch, "epochs": 100, "max_steps": steps, "log_every": 1},
        "checkpoint": {"every_steps": 10**6, "keep": 1, "save_hf_model": False},
        "mlflow": {"experiment": "train-throughput", "registered_model": ""},
        "run": {"name": name, "storage_path": str(root / "runs"), "work_dir": str(root / "work"),
                "num_workers": 2, "max_failures": 0},
    })  # fmt: skip
    start = time.time()
    result = train(cfg)
    client = MlflowClient()

    def series(key: str) -> list[float]:
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        return [m.value for m in history if m.step > skip]

    return {
        "preset": preset,
        "compression": compression,
        "steps": steps,
        "global_batch": 2 * micro_batch,
        "samples_per_s": statistics.median(series("samples_per_s")),
        "tokens_per_s": statistics.median(series("tokens_per_s")),
        "step_time_s": statistics.median(series("step_time_s")),
        "data_wait": statistics.mean(series("data_wait_fraction")),
        "job_s": time.time() - start,
    }


def markdown(rows: list[dict], command: str) -> str:
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), no GPU, {platform.python_version()}"
    )
    lines = [
        f"Command: `{command}`",
        f"Machine: {machine}; 2 Ray Train workers (1 CPU each), DeepSpeed ZeRO-2 fp32 / gloo; {time.strftime('%Y-%m-%d')}",
        "",
        "| preset | compression | global batch | samples/s | tokens/s | step time (s) | data wait | job wall time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['compression']} | {r['global_batch']} | {r['samples_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['step_time_s']:.2f} | {100 * r['data_wait']:.1f}% | {r['job_s']:.0f} |"
        )
    by = {(r["preset"], str(r["compression"])): r for r in rows}
    for preset in dict.fromkeys(r["preset"] for r in rows):
        auto, dense = by.get((preset, "auto")), by.get((preset, "1"))
        if auto and dense:
            lines.append(
                f"\n{preset}: DPN (auto) trains at {auto['samples_per_s'] / dense['samples_per_s']:.2f}x the "
                "samples/s of dense."
            )
    return "\n".join(lines) + "\n"


def append_section(path: Path, body: str, title: str = "## Training throughput") -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if title not in text:
        text = text.rstrip("\n") + f"\n\n{title}\n\n"
    head, _, tail = text.partition(title)
    rest = tail.split("\n## ", 1)
    section = rest[0].rstrip("\n") + "\n\n" + body
    text = head + title + section + ("\n## " + rest[1] if len(rest) > 1 else "")
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--compressions", nargs="+", default=["auto", "1"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the statistics")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=256)
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import ray

    from pipelines.synthetic import write_synthetic_dataset

    rows = []
    with tempfile.TemporaryDirectory(prefix="dpn-train-bench-") as tmp:
        root = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        write_synthetic_dataset(root / "data", "parquet", num_train=args.num_train, num_eval=8, seed=0)
        ray.init(num_cpus=4, include_dashboard=False,
                 runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}})  # fmt: skip
        try:
            for preset in args.presets:
                for comp in args.compressions:
                    compression = int(comp) if comp.isdigit() else comp
                    row = measure(root, preset, compression, args.steps, args.micro_batch, args.skip)
                    logger.info("%s", row)
                    rows.append(row)
        finally:
            ray.shutdown()
    command = "python -m benchmarks.train_throughput " + " ".join(argv if argv is not None else sys.argv[1:])
    body = markdown(rows, command.strip())
    sys.stdout.write(body)
    if args.markdown:
        append_section(args.markdown, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
