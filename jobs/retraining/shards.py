"""Data shards for scheduled retraining: find them under a data root, count their samples, and
build one training mix (new shards + a replay sample of earlier ones).

A **shard** is one top-level entry of the data root - a data file (``.json``, ``.jsonl``, ``.tar``,
``.parquet``) or a folder holding data files - whose name matches the ``include`` globs and none of
the ``exclude`` globs. Names starting with ``.`` or ``_`` are never shards: write a shard under such
a name and rename it when complete (or write a folder and add it in one rename), so the job never
reads a half-written shard. A shard is identified by its name; its size in bytes is recorded so a
shard rewritten under the same name can be noticed (it is logged, not retrained).

Counting gives the rows the readers yield (:func:`pipelines.formats.count_file_rows`) from metadata where the
format allows: Parquet footers, tar member headers (one sample per key, every payload skipped and never held in
memory), the JSON list / JSON lines. A damaged file (a cut ``.json`` or ``.parquet``, invalid UTF-8, a truncated or
compressed tar) counts as the readers count it - the rows before the damage plus one bad row for the rest - and is
named in a warning and in the shard's ``damaged``; it never stops discovery, so one bad file cannot fail every
scheduled run.

The training mix is written once as Parquet (normalised rows of :mod:`pipelines.formats`) under
the retrain work folder, with a ``mix.json`` marker written last, by temp-and-rename
(:func:`pipelines.storage.atomic_write_text`): a re-run after a crash reuses a complete mix and rewrites an
incomplete one, so the challenger always trains on exactly the recorded rows. A marker that does not parse
(written by an older version in place and torn by a crash) is logged and the mix rebuilt.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.formats import FORMAT_BY_EXTENSION, ReadPolicy, count_file_rows
from pipelines.storage import atomic_write_text

if TYPE_CHECKING:
    import pyarrow as pa

    from pipelines.accounting import BadSampleReport

logger = logging.getLogger(__name__)

MIX_MARKER = "mix.json"


@dataclass(frozen=True)
class Shard:
    """One shard of the data root.

    Attributes:
        name: entry name under the root (the shard's identity in the registry).
        uri: full path or URI of the file or folder.
        num_samples: raw rows (bad samples included; they are dropped and counted in training).
        size_bytes: total size of its data files.
        damaged: ``"FILE: what"`` for each damaged data file of the shard (counted as the readers count it).
    """

    name: str
    uri: str
    num_samples: int
    size_bytes: int
    damaged: tuple[str, ...] = ()


def _fs_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())
    return pafs.FileSystem.from_uri(uri)


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _is_data_file(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in FORMAT_BY_EXTENSION


def _count_files(
    fs: pafs.FileSystem, name: str, files: Sequence[pafs.FileInfo], policy: ReadPolicy | None
) -> tuple[int, tuple[str, ...]]:
    """Rows of a shard's files as the readers yield them, and its damaged files (``"FILE: what"``), warned about."""
    total, damaged = 0, []
    for info in files:
        count, damage = count_file_rows(fs, info.path, policy)
        total += count
        if damage:
            logger.warning(
                "shard %s: %s is damaged (%s); it counts as the readers read it: %d row(s), the last one the "
                "unreadable rest. Replace or remove the file to train on all of it",
                name, info.path, damage, count,
            )  # fmt: skip
            damaged.append(f"{info.path}: {damage}")
    return total, tuple(damaged)


def _shard_files(fs: pafs.FileSystem, path: str, info: pafs.FileInfo) -> list[pafs.FileInfo]:
    if info.type == pafs.FileType.File:
        return [info] if _is_data_file(path) else []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path)
         and not posixpath.basename(i.path).startswith((".", "_"))),
        key=lambda i: i.path,
    )  # fmt: skip


def _matches(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if name.startswith((".", "_")):
        return False
    if include and not any(fnmatch.fnmatch(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatch(name, p) for p in exclude)


def list_shards(
    root: str,
    include: Sequence[str] = ("train*",),
    exclude: Sequence[str] = ("eval*",),
    count: bool = True,
    skip: Sequence[str] = (),
    policy: ReadPolicy | None = None,
) -> list[Shard]:
    """The shards directly under ``root`` (local path or URI), sorted by name.

    Args:
        root: data root where new shards land.
        include: glob patterns a shard's name must match (any).
        exclude: glob patterns that exclude a name (e.g. the held-out ``eval*`` files).
        count: count the samples of each shard (metadata reads); False leaves ``num_samples`` = -1.
        skip: names not to count (already known shards); they are listed with ``num_samples`` = -1.
        policy: what the readers may read (tar compression, caps); counting follows it as they do.

    A damaged file never raises: it is counted as the readers count it and named in the shard's ``damaged``
    (and a warning). Only transient storage errors that Ray Data retries are raised.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    fs, base = _fs_and_path(root)
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(
            f"data root {root!r} is not a folder: point data.root at the folder new shards land in, "
            f"create it with `dpn data synth {root}` (the synthetic benchmark), or set data.synthetic "
            "to have the job write it"
        )
    skip_set = set(skip)
    shards = []
    for entry in sorted(fs.get_file_info(pafs.FileSelector(base)), key=lambda i: i.path):
        name = posixpath.basename(entry.path.rstrip("/"))
        if not _matches(name, include, exclude):
            continue
        files = _shard_files(fs, entry.path, entry)
        if not files:
            continue  # a folder without data files yet, or a side file (manifest)
        size = sum(max(f.size or 0, 0) for f in files)
        n, damaged = -1, ()
        if count and name not in skip_set:
            n, damaged = _count_files(fs, name, files, policy)
        shards.append(
            Shard(name=name, uri=_join(root, name), num_samples=n, size_bytes=size, damaged=damaged)
        )
    return shards


def shards_to_json(shards: Sequence[Shard]) -> list[dict[str, Any]]:
    return [{**asdict(s), "damaged": list(s.damaged)} for s in shards]


def shards_from_json(items: Sequence[dict[str, Any]]) -> list[Shard]:
    """The shards of :func:`shards_to_json` (records written before ``damaged`` existed have none)."""
    return [Shard(**{**item, "damaged": tuple(item.get("damaged", ()))}) for item in items]


# ----------------------------------------------------------------------------------------------
# The training mix
# ----------------------------------------------------------------------------------------------


def _read(shards: Sequence[Shard], image_folder: str | None = None, policy: ReadPolicy | None = None):
    """Union of the normalised rows of ``shards`` (each shard read in its own format)."""
    from pipelines.formats import read_rows

    datasets = [read_rows(s.uri, None, image_folder=image_folder, policy=policy) for s in shards]
    ds = datasets[0]
    return ds.union(*datasets[1:]) if len(datasets) > 1 else ds


def read_mix(out_dir: str | Path) -> dict[str, Any] | None:
    """The marker of a complete mix in ``out_dir`` (None when absent or incomplete).

    A marker that does not parse, or lacks the mix's ``path`` and counts, is torn (a crash while an older
    version wrote it in place): it is logged and treated as absent, so the mix is rebuilt instead of failing
    every re-run.
    """
    marker = Path(out_dir) / MIX_MARKER
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        done, why = None, f"does not parse ({err})"
    else:
        why = "lacks path, num_samples or new_samples"
    if isinstance(done, dict) and {"path", "num_samples", "new_samples"} <= done.keys():
        return done
    logger.warning("the training mix marker %s is torn: it %s; the mix in %s will be rebuilt", marker, why,
                   out_dir)  # fmt: skip
    return None


def _count_bad(rows: Any) -> BadSampleReport:
    """Count the rows a mix leaves out (one more read of the new shards; only bad rows are kept)."""
    from pipelines.accounting import count_rows

    columns = ["id", "bad_reason", "source_file"]
    bad = rows.select_columns(columns).filter(expr="bad_reason != ''").take_all()
    report = count_rows(
        [r["id"] for r in bad], [r["bad_reason"] for r in bad], [r["source_file"] for r in bad]
    )
    if report.num_bad:
        logger.warning("the new shards hold %d unusable rows, left out of the mix: %s", report.num_bad,
                       report.summary())  # fmt: skip
    return report


def _reuse_or_clear(out: Path) -> dict[str, Any] | None:
    """The complete mix in ``out`` (its marker), or None after making ``out`` an empty folder.

    A finished mix is reused so a re-run does not reshuffle (and re-read) the data; anything else in ``out``
    is the remains of an interrupted build and is removed, so no stale Parquet file joins the new mix.
    """
    done = read_mix(out)
    if done is not None:
        logger.info("reusing the training mix in %s (%d samples)", done["path"], done["num_samples"])
        return done
    if out.exists():
        logger.info("removing the incomplete training mix in %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return None


def _good_rows(table: pa.Table, source: str) -> pa.Table:
    """The rows of ``table`` that are usable, tagged with ``source`` ("new" or "replay").

    The tag is what lets the mix's counts (new vs replayed samples) be read back from the written Parquet.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table["bad_reason"], "")).drop_columns(["bad_reason"])
    return table.append_column("source", pa.array([source] * table.num_rows, pa.string()))


def _mix_rows(
    new_rows: Any,
    earlier: Sequence[Shard],
    replay_fraction: float,
    replay_max_samples: int,
    seed: int,
    image_folder: str | None,
    policy: ReadPolicy | None,
) -> Any:
    """The new shards' good rows plus a seeded, capped replay sample of the earlier shards' good rows.

    Replay (a fraction of what earlier models saw) is what keeps a retrain from forgetting; no replay pool
    or a zero fraction gives the new rows alone.
    """
    mix = new_rows.map_batches(_good_rows, batch_format="pyarrow", fn_kwargs={"source": "new"})
    if earlier and replay_fraction > 0:
        replay = _read(earlier, image_folder, policy).map_batches(
            _good_rows, batch_format="pyarrow", fn_kwargs={"source": "replay"}
        )
        replay = replay.random_sample(replay_fraction, seed=seed)
        if replay_max_samples > 0:
            replay = replay.limit(replay_max_samples)
        mix = mix.union(replay)
    return mix


def _write_marker(
    out: Path,
    data_dir: Path,
    new: Sequence[Shard],
    earlier: Sequence[Shard],
    left_out: BadSampleReport,
    replay_fraction: float,
    replay_max_samples: int,
    seed: int,
) -> dict[str, Any]:
    """Count the written mix's new and replayed rows, then write its marker (last: it marks the mix complete).

    The counts are read back from the Parquet (not predicted from the sample) so the marker says what the
    mix holds; the replay fraction, cap and seed are recorded as the mix was built with them.
    """
    sources = pq.read_table(str(data_dir), columns=["source"])["source"].to_pylist()
    new_count, replay_count = sources.count("new"), sources.count("replay")
    left_out.num_samples = new_count + left_out.num_bad
    if left_out.num_bad:
        logger.warning("left out of the training mix: %s", left_out.summary())
    marker = {
        "path": str(data_dir),
        "num_samples": new_count + replay_count,
        "new_samples": new_count,
        "replay_samples": replay_count,
        "replay_fraction": replay_fraction,
        "replay_max_samples": replay_max_samples,
        "seed": seed,
        "new_shards": [s.name for s in new],
        "replay_pool": [s.name for s in earlier],
        "bad_by_reason": left_out.bad_by_reason,
    }
    atomic_write_text(out / MIX_MARKER, json.dumps(marker, indent=1) + "\n")  # last: marks the mix complete
    logger.info(
        "training mix: %d new + %d replayed samples (fraction %.3g of %d earlier shards) in %s",
        new_count, replay_count, replay_fraction, len(earlier), data_dir,
    )  # fmt: skip
    return marker


def build_mix(
    out_dir: str | Path,
    new: Sequence[Shard],
    earlier: Sequence[Shard],
    replay_fraction: float,
    replay_max_samples: int,
    seed: int,
    image_folder: str | None = None,
    policy: ReadPolicy | None = None,
) -> dict[str, Any]:
    """Write new shards + a replay sample of earlier shards, shuffled, as Parquet under ``out_dir/data``.

    Bad rows (unreadable records, damaged files) are left out here and counted: the marker's
    ``bad_by_reason`` and a warning naming reasons, example ids and files. Images that fail to decode are
    dropped and counted by the training pipeline. A complete mix (marker present) is reused as is.

    Args:
        out_dir: folder of this retrain's mix (created; an incomplete one is replaced).
        new: the new shards (all their rows).
        earlier: shards earlier models were trained on (the replay pool).
        replay_fraction: fraction of the pool's rows to replay (0 = none).
        replay_max_samples: cap on replayed rows (0 = no cap).
        seed: seed of the replay sample and of the shuffle.
        image_folder: where relative LLaVA image paths resolve (default: next to each JSON file).
        policy: what the readers may open and hold (image roots, tar compression, caps).

    Returns:
        The marker: ``path`` (Parquet folder), ``num_samples``, ``new_samples``, ``replay_samples``,
        ``seed``, the shards used.
    """
    out = Path(out_dir)
    done = _reuse_or_clear(out)
    if done is not None:
        return done
    if not new:
        raise ValueError("build_mix needs at least one new shard")
    new_rows = _read(new, image_folder, policy)
    left_out = _count_bad(new_rows)
    mix = _mix_rows(new_rows, earlier, replay_fraction, replay_max_samples, seed, image_folder, policy)
    data_dir = out / "data"
    mix.random_shuffle(seed=seed).write_parquet(str(data_dir))
    return _write_marker(out, data_dir, new, earlier, left_out, replay_fraction, replay_max_samples, seed)


__all__ = [
    "MIX_MARKER",
    "Shard",
    "build_mix",
    "list_shards",
    "read_mix",
    "shards_from_json",
    "shards_to_json",
]
