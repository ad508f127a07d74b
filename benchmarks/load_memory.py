"""Host memory of a training worker's model load, before and after loading in the training dtype (issue 27, item 4).

    python benchmarks/load_memory.py [--preset mid] [--repeats 1] [--write]

A worker now loads its weights with ``jobs.training.loop.load_model`` in :func:`jobs.training.loop.training_dtype` (the
dtype DeepSpeed trains in, ``new``); before, it always loaded fp32 and DeepSpeed 0.19 cast every parameter to
bf16 when it wrapped the model (``old``: replayed here with the same per-parameter cast, without the rest of
DeepSpeed). This saves a random model of ``--preset`` (``dpn_model.presets.build_model``) as an fp32
checkpoint (what presets and ``dpn convert`` write) and as a bf16 one (what a bf16 run exports: DeepSpeed's
module is bf16), and loads each through that code path once per case and repeat, each in a fresh subprocess so
that peaks do not mix. Importing torch and transformers peaks above a mid-size load's footprint and
``ru_maxrss`` never goes down, so each child resets its high-water mark just before the load (``5`` into
``/proc/self/clear_refs``, Linux) and reads it after (``VmHWM``, the counter ``ru_maxrss`` reports): the load
peak is that mark minus the RSS before the load.

For the 7B preset the same model class is built on ``torch.device("meta")`` (no memory) and its parameters
counted in each precision's dtype (:func:`jobs.training.loop.precision_dtype`): the host memory a worker needs
for the weights alone, before any load transient.

``--write`` puts the section "Training: load memory" into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runner  # noqa: E402

SECTION = "## Training: load memory"
PRECISIONS = ("fp32", "bf16")  # the 7B weight count's
SEVEN_B = "llava-1.5-7b"
# read from the mid run of 2026-12-07 (transformers 5.25); update with the figures
WHAT_IT_SAYS = (
    "What this says (transformers 5.25, DeepSpeed 0.19): loading in the training dtype lowers a "
    "worker's host memory at load where the checkpoint is already in that dtype (a bf16 run's "
    "export, a retrained champion): the old path upcast it to fp32 for DeepSpeed to cast back. From "
    "an fp32 checkpoint (presets, `dpn convert`) it changes nothing on mid: transformers' "
    "dtype-converting load peaks as high as the old fp32 load plus DeepSpeed's cast and holds as "
    "much after (the memory it holds beyond the bf16 weights is in no live tensor and `malloc_trim` "
    "does not return it), while an fp32 load of an fp32 checkpoint maps the file copy-on-write. The "
    "7B line counts the weights alone; a 7B load's transient is not measured here, and mid's (all "
    "tensors under 3 MiB) need not carry over to 7B's 64-180 MiB matrices. Saving the initial "
    "checkpoint in bf16 once is what lets every worker load at the lower peak. Seconds: a machine "
    "shared with another benchmark."
)
MIB, GB = 2**20, 1e9


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def child(model_dir: str, load: str, cast: str) -> dict[str, Any]:
    """One load in this (fresh) process, in precision ``load``, then (``cast`` not ``-``) DeepSpeed 0.19's cast
    of every parameter to ``cast`` as it wraps the model: RSS before, the peak, RSS after, the weights' bytes."""
    import gc

    import torch

    from jobs.training.loop import load_model, precision_dtype

    gc.collect()
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current RSS
    start = time.perf_counter()
    model = load_model(model_dir, None, precision_dtype(load))
    if cast != "-":  # as DeepSpeedEngine._cast_module_mixed_precision does (buffers stay)
        for p in model.parameters():
            p.data = p.data.to(precision_dtype(cast))
    seconds = time.perf_counter() - start
    gc.collect()
    return {
        "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()}),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "rss_before": before,
        "peak": _status_bytes("VmHWM"),
        "rss_after": _status_bytes("VmRSS"),
        "seconds": seconds,
        "threads": torch.get_num_threads(),
    }


# (checkpoint dtype, training precision, worker path): "old" loads fp32 (then DeepSpeed casts), "new" loads in
# training_dtype; fp32 training is the same either way
CASES = [
    ("fp32", "fp32", "old = new"),
    ("fp32", "bf16", "old"),
    ("fp32", "bf16", "new"),
    ("bf16", "bf16", "old"),
    ("bf16", "bf16", "new"),
]


def child_args(training: str, path: str) -> tuple[str, str]:
    """(load precision, cast precision or ``-``) of a case."""
    if path == "old" and training != "fp32":
        return "fp32", training
    return training, "-"


def save_checkpoints(preset: str, root: str) -> dict[str, str]:
    """The preset's random model saved in fp32 and in bf16; checkpoint dtype -> directory."""
    import torch

    from dpn_model.presets import build_model

    model, _ = build_model(preset, seed=0)
    dirs = {"fp32": os.path.join(root, "fp32"), "bf16": os.path.join(root, "bf16")}
    model.save_pretrained(dirs["fp32"])
    model.to(torch.bfloat16).save_pretrained(dirs["bf16"])
    return dirs


def measure(dirs: dict[str, str], repeats: int) -> list[dict[str, Any]]:
    """Every (repeat, case) in its own subprocess, cases interleaved."""
    rows = []
    for _ in range(repeats):
        for checkpoint, training, path in CASES:
            cmd = [sys.executable, __file__, "--child", dirs[checkpoint], *child_args(training, path)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=runner.REPO)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"case": (checkpoint, training, path), **result})
    return rows


def seven_b_weights() -> dict[str, Any]:
    """The 7B preset's parameter count and weight bytes per precision, built on the meta device."""
    import torch

    from dpn_model.modeling import DPNForConditionalGeneration
    from dpn_model.presets import preset_config
    from jobs.training.loop import precision_dtype

    with torch.device("meta"):
        model = DPNForConditionalGeneration(preset_config(SEVEN_B))
    numel = sum(p.numel() for p in model.parameters())
    return {"params": numel, **{p: numel * precision_dtype(p).itemsize for p in PRECISIONS}}


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """Per case: the largest of its repeats (peaks are what a worker must fit), in MiB."""
    out = {}
    for case in CASES:
        mine = [r for r in rows if r["case"] == case]
        out[case] = {
            "dtypes": ", ".join(mine[0]["dtypes"]),
            "weights": mine[0]["weight_bytes"] / MIB,
            "before": max(r["rss_before"] for r in mine) / MIB,
            "load": max(r["peak"] - r["rss_before"] for r in mine) / MIB,
            "after": max(r["rss_after"] - r["rss_before"] for r in mine) / MIB,
            "seconds": min(r["seconds"] for r in mine),
        }
    return out


def _new_over_old(summary: dict[tuple[str, str, str], dict[str, Any]], checkpoint: str) -> str:
    new, old = summary[(checkpoint, "bf16", "new")], summary[(checkpoint, "bf16", "old")]
    return f"load peak {new['load'] / old['load']:.2f}, held after {new['after'] / old['after']:.2f}"


def table(
    preset: str, summary: dict[tuple[str, str, str], dict[str, Any]], seven: dict[str, Any]
) -> list[str]:
    lines = [
        "| preset | checkpoint | training | worker path | parameters after | weights MiB | RSS before MiB | "
        "load peak MiB (peak - before) | held after MiB (after - before) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (checkpoint, training, path), s in summary.items():
        load, cast = child_args(training, path)
        how = f"{path}: load {load}" + (f", cast to {cast}" if cast != "-" else "")
        lines.append(
            f"| {preset} | {checkpoint} | {training} | {how} | {s['dtypes']} | {s['weights']:.0f} | {s['before']:.0f} "
            f"| {s['load']:.0f} | {s['after']:.0f} | {s['seconds']:.2f} |"
        )
    ratios = "; ".join(f"{c} checkpoint {_new_over_old(summary, c)}" for c in ("fp32", "bf16"))
    fp32_only = summary[("fp32", "fp32", "old = new")]
    lines += [
        "",
        f"bf16 training, new / old: {ratios}. An fp32 load of the fp32 checkpoint peaks at "
        f"{fp32_only['load'] / fp32_only['weights']:.2f}x its weights.",
        "",
        f"{SEVEN_B} (same model class and dtype mapping, built on the meta device): {seven['params'] / 1e9:.2f} B "
        f"parameters, weights alone {seven['fp32'] / GB:.1f} GB in fp32 vs {seven['bf16'] / GB:.1f} GB in bf16 "
        "of host memory per worker.",
    ]
    return lines


def markdown(lines: list[str], command: str, wall_s: float) -> str:
    import psutil

    ram = psutil.virtual_memory().total / 2**30
    return "\n".join(
        [
            SECTION,
            "",
            f"Command: `{command}` ({wall_s:.0f} s in all). Machine: {runner.machine()}, {ram:.0f} GiB RAM.  ",
            "Each case in a fresh subprocess through `jobs.training.loop.load_model` (the worker's path), random "
            "weights saved as safetensors in fp32 (presets, `dpn convert`) and in bf16 (a bf16 run's export). "
            "`old`: the worker loaded fp32 and DeepSpeed cast each parameter to bf16 as it wrapped the model "
            "(replayed with the same cast); `new`: it loads in `training_dtype`. Load peak: the process's "
            "high-water mark during the load (reset just before it) minus the RSS before it; held after: RSS "
            "after the load (and cast) minus RSS before.",
            "",
            *lines,
            "",
            WHAT_IT_SAYS,
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mid")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "LOAD", "CAST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="dpn-load-memory-") as tmp:
        rows = measure(save_checkpoints(args.preset, tmp), args.repeats)
    lines = table(args.preset, summarise(rows), seven_b_weights())
    print("\n".join(lines))
    if args.write:
        from headroom import update_benchmarks_md

        command = "python benchmarks/load_memory.py " + shlex.join(sys.argv[1:])
        update_benchmarks_md(markdown(lines, command, time.time() - start), SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
