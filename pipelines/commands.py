"""`dpn data`: dataset subcommands.

* ``dpn data inspect PATH [--split S] [--processor-dir D] [--json]``: number of samples, bad samples
  by reason (with example ids) and one decoded example. ``--json`` prints one JSON object with the
  stable keys ``num_samples``, ``num_bad``, ``bad_by_reason`` (plus ``bad_fraction``, ``examples``,
  ``example_files``, ``example``). With ``--max-bad-fraction F`` the exit status is 1 when the bad fraction exceeds F,
  and stderr names the top reasons with example ids and their files. A damaged file (a cut tar or
  Parquet file) is one ``truncated_shard`` sample named by its path, never a crash.
* ``dpn data synth OUT [--format llava|webdataset|parquet] [--num-train N] [--num-eval N] [--seed S]``:
  write the synthetic benchmark (``pipelines.synthetic.write_synthetic_dataset``);
  ``dpn data synth OUT --new-shard NAME --num-train N --seed S`` adds a train shard of fresh samples
  to it (``pipelines.synthetic.write_synthetic_shard``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pipelines.accounting import BadSampleReport

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``inspect`` and ``synth`` sub-subcommands on the ``data`` parser."""
    sub = parser.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    sub.required = True
    _add_inspect_parser(sub)
    _add_synth_parser(sub)


def _add_inspect_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dpn data inspect``: its flags mirror the training config's data options (image roots, tar
    compression), so a dataset is inspected under the same policy it will be trained under."""
    inspect = sub.add_parser(
        "inspect",
        help="count samples and bad samples, show one decoded example",
        description="Count samples and bad samples by reason in one streaming pass; show one example.",
    )
    inspect.add_argument("path", help="file, folder of shards, glob or dataset root (local path or URI)")
    inspect.add_argument("--split", default=None, help="split of a dataset root (default: all split files)")
    inspect.add_argument(
        "--processor-dir",
        default=None,
        help="saved DPNProcessor: also tokenise, so over-long samples (too_long) and text holding special tokens "
        "(reserved_token) are counted",
    )
    inspect.add_argument("--max-length", type=int, default=2048, help="token limit with --processor-dir")
    inspect.add_argument(
        "--image-folder", default=None, help="folder of LLaVA JSON images (default: the JSON's)"
    )
    inspect.add_argument(
        "--allow-image-root",
        action="append",
        default=[],
        metavar="ROOT",
        help="a root image refs may name absolutely (data.allowed_image_roots; repeat for several)",
    )
    inspect.add_argument(
        "--tar-compression",
        action="append",
        default=[],
        choices=["gzip", "bzip2", "xz"],
        help="accept tar shards compressed this way (data.tar_compression; default: plain tar only)",
    )
    inspect.add_argument(
        "--max-bad-fraction", type=float, default=None, help="exit with status 1 above this bad fraction"
    )
    inspect.add_argument(
        "--address", default=None, help="Ray cluster address (default: local or RAY_ADDRESS)"
    )
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(_data_run=run_inspect)


def _add_synth_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``dpn data synth``: write the synthetic benchmark, or (``--new-shard``) add a train shard to one."""
    synth = sub.add_parser(
        "synth",
        help="write the synthetic benchmark dataset",
        description="Write a synthetic benchmark (train, dev and eval splits) in one of the real formats.",
    )
    synth.add_argument("out_dir", nargs="?", default=None, help="dataset root to write (or --out)")
    synth.add_argument("--out", dest="out_flag", default=None, metavar="DIR", help="dataset root to write")
    synth.add_argument("--format", default="llava", choices=("llava", "webdataset", "parquet"))
    synth.add_argument(
        "--benchmark",
        default="cells",
        choices=("cells", "tiles"),
        help="cells (default) or the earlier tiles",
    )
    synth.add_argument("--num-train", type=int, default=4000)
    synth.add_argument(
        "--num-dev", type=int, default=0, help="dev samples, for choosing settings (default 0)"
    )
    synth.add_argument("--num-eval", type=int, default=500, help="eval (test) samples")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--new-shard",
        metavar="NAME",
        default=None,
        help="add a train shard NAME of --num-train fresh samples to the existing dataset OUT "
        "(scheduled retraining demos; format and image size come from OUT/synthetic.json)",
    )
    synth.set_defaults(_data_run=run_synth)


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``dpn data`` sub-subcommand; returns the exit status."""
    return int(args._data_run(args) or 0)


def format_inspection(path: str, result: dict[str, Any]) -> str:
    """Human-readable report of :func:`pipelines.datasets.inspect_dataset`'s result."""
    lines = [
        f"dataset: {path}",
        f"samples: {result['num_samples']}",
        f"bad samples: {result['num_bad']} ({result['bad_fraction']:.2%})",
    ]
    report = BadSampleReport.from_dict(result)
    for reason in report.top_reasons():
        lines.append(f"  {reason}: {report.bad_by_reason[reason]} (e.g. {report.example_text(reason)})")
    example = result.get("example")
    if example is None:
        lines.append("example: none (no good sample)")
    else:
        size = example.get("image_size")
        lines += [
            "example:",
            f"  id: {example['id']}",
            f"  question: {example['question']!r}",
            f"  answer: {example['answer']!r}",
            f"  image size: {f'{size[0]}x{size[1]}' if size else 'no image'}",
        ]
        if example.get("family"):
            lines.append(f"  family/kind: {example['family']}/{example['kind']}")
        if example.get("num_tokens") is not None:
            lines.append(f"  tokens: {example['num_tokens']}")
    return "\n".join(lines)


def run_inspect(args: argparse.Namespace) -> int:
    from dpn_base.ray_session import connect_ray
    from pipelines.datasets import inspect_dataset
    from pipelines.policy import ReadPolicy

    connect_ray(args.address, log_to_driver=False)  # dpn_base.ray_session: the rule every job follows
    policy = ReadPolicy(allowed_image_roots=args.allow_image_root, tar_compression=args.tar_compression)
    result = inspect_dataset(
        args.path,
        args.split,
        processor_dir=args.processor_dir,
        max_length=args.max_length,
        image_folder=args.image_folder,
        policy=policy,
    )
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        sys.stdout.write(format_inspection(args.path, result) + "\n")
    if args.max_bad_fraction is not None and result["bad_fraction"] > args.max_bad_fraction:
        report = BadSampleReport.from_dict(result)
        sys.stderr.write(
            f"dpn data inspect: bad fraction {report.bad_fraction:.2%} exceeds {args.max_bad_fraction:.2%}: "
            f"{report.summary()}\n"
        )
        return 1
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from pipelines.synthetic import write_synthetic_dataset, write_synthetic_shard

    if (args.out_dir is None) == (args.out_flag is None):
        raise SystemExit("dpn data synth: give the dataset root once, as OUT or --out DIR")
    args.out_dir = args.out_dir or args.out_flag
    if "://" in args.out_dir:
        return _synth_to_uri(args)
    if args.new_shard is not None:
        shard = write_synthetic_shard(
            args.out_dir, args.new_shard, num_samples=args.num_train, seed=args.seed
        )
        sys.stdout.write(
            f"wrote shard {shard['name']} ({shard['num_samples']} samples: {', '.join(shard['files'])}) to {args.out_dir}\n"
        )
        return 0

    manifest = write_synthetic_dataset(
        args.out_dir,
        format=args.format,
        num_train=args.num_train,
        num_eval=args.num_eval,
        seed=args.seed,
        benchmark=args.benchmark,
        num_dev=args.num_dev,
    )
    splits = manifest.get("splits", {}) if isinstance(manifest, dict) else {}
    counts = ", ".join(f"{name}: {info.get('num_samples')}" for name, info in splits.items())
    sys.stdout.write(f"wrote {args.format} dataset to {args.out_dir} ({counts})\n")
    return 0


def _synth_to_uri(args: argparse.Namespace) -> int:
    """``dpn data synth s3://bucket/prefix ...``: write the dataset (or the new shard) in a temporary folder,
    then copy its files to the URI, the manifest last, so that a reader that sees the manifest finds every file
    it lists. A new shard first fetches the root's manifest (it names the format and the held-out images)."""
    import tempfile
    from pathlib import Path

    import pyarrow.fs as pafs

    from pipelines.synthetic import MANIFEST_NAME

    root = args.out_dir.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="dpn-synth-") as tmp:
        if args.new_shard is not None:
            manifest = f"{root}/{MANIFEST_NAME}"
            fs, path = pafs.FileSystem.from_uri(manifest)
            if fs.get_file_info(path).type != pafs.FileType.File:
                raise SystemExit(f"dpn data synth: {manifest} not found: write the dataset to {root} first")
            pafs.copy_files(manifest, str(Path(tmp) / MANIFEST_NAME))
        status = run_synth(argparse.Namespace(**{**vars(args), "out_dir": tmp, "out_flag": None}))
        files = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == MANIFEST_NAME)  # the manifest last
        fs, base = pafs.FileSystem.from_uri(root)
        for file in files:
            target = f"{base}/{file.relative_to(tmp).as_posix()}"
            if isinstance(fs, pafs.LocalFileSystem):  # object stores have no folders to make
                fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(str(file), target, destination_filesystem=fs)
    sys.stdout.write(f"copied {len(files)} files to {root}\n")
    return status
