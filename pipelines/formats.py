"""Readers: every supported on-disk format -> Ray Data rows of one normalised schema.

Supported formats
-----------------
**LLaVA instruction JSON** (``*.json`` holding a list, or ``*.jsonl`` with one object a line)::

    {"id": "000001", "image": "images/000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the big square?"},
                       {"from": "gpt", "value": "red"}],
     "family": "colour", "kind": "coarse"}

``image`` is relative to the image folder (default: the folder of the JSON file; an absolute path
or a URI is used as is). ``<image>`` must appear in the first human turn when there is an image.
Rows without ``image`` are text-only. ``family`` and ``kind`` (question-family labels of the
synthetic benchmark) are optional and carried through. Roles ``user``/``assistant`` are accepted as
aliases of ``human``/``gpt``.

**LLaVA evaluation JSONL** (same files as above, row by row: a row without ``conversations`` but
with ``question`` or ``text`` is read this way)::

    {"question_id": 7, "image": "images/7.png", "question": "How many big shapes?", "answer": "3",
     "family": "count", "kind": "coarse"}

It becomes ``conversations = [human: "<image>\\n" + question, gpt: answer]`` (``<image>`` is
prepended when the row has an image and the question lacks it; the gpt turn is omitted when there
is no ``answer``) and ``id = str(question_id)``.

**WebDataset tar shards** (``*.tar``): per sample key ``KEY.png|jpg|jpeg|webp`` (the image,
optional) and ``KEY.json`` (``{"id", "conversations", "family"?, "kind"?}`` or an evaluation-style
object as above). ``id`` defaults to ``KEY``. Keys contain no dots (WebDataset convention); the
members of a key are adjacent in the tar.

**Parquet** (``*.parquet``): ``image`` column of ``binary`` or ``struct<bytes: binary, ...>``
(Hugging Face datasets style; null = text-only), and either ``conversations``
(``list<struct<from: string, value: string>>`` or a JSON string) or ``question``/``answer`` string
columns; optional ``id``, ``family``, ``kind`` columns.

Paths
-----
A path is a file, a folder of shards, or a glob, local or any URI pyarrow understands (``s3://``,
``gs://``, ``hdfs://``); nothing assumes a local disk. A dataset root may hold splits:
``train.json``/``eval.json`` + ``images/``, ``train-*.tar``/``eval-*.tar``,
``train-*.parquet``/``eval-*.parquet`` or ``train/``/``eval/`` folders; ``split=`` picks one.

Normalised row schema (:data:`ROW_SCHEMA`)
------------------------------------------
======================  ===========================================================================
``id: string``          sample id (made up from file and line when the source has none)
``image: binary``       raw encoded image bytes, decoded later; null for text-only samples
``conversations: str``  JSON list of ``{"from": "human"|"gpt", "value": str}`` (a JSON string keeps
                        the Arrow schema flat and identical across formats)
``family: string``      question family, ``""`` if absent
``kind: string``        question kind, ``""`` if absent
``bad_reason: string``  ``""`` for a good row, else one of ``accounting.BAD_REASONS``
======================  ===========================================================================

Bad rows are never raised mid-stream: they carry their ``bad_reason`` to the accounting stage
(see :mod:`pipelines.accounting`). Only a ``.json`` file that is neither a JSON list nor JSON
lines fails the read, with a message naming the file.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.accounting import BadReason

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
FORMAT_BY_EXTENSION: dict[str, str] = {
    ".json": "llava_json",
    ".jsonl": "llava_json",
    ".tar": "webdataset",
    ".parquet": "parquet",
}
KNOWN_SPLITS: tuple[str, ...] = ("train", "eval", "val", "validation", "test")
ROLE_ALIASES: dict[str, str] = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("conversations", pa.string()),
        ("family", pa.string()),
        ("kind", pa.string()),
        ("bad_reason", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(ROW_SCHEMA.names)


# ----------------------------------------------------------------------------------------------
# Resolving a path to files
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """Files of one format on one filesystem.

    Args:
        format: ``"llava_json"``, ``"webdataset"`` or ``"parquet"``.
        paths: file paths inside ``filesystem`` (no URI scheme).
        filesystem: where the files live.
        image_folder: folder (inside ``filesystem``) that relative image paths of LLaVA JSON rows
            are resolved against; ``None`` = the folder of each JSON file.
    """

    format: str
    paths: tuple[str, ...]
    filesystem: pafs.FileSystem
    image_folder: str | None = None


def _filesystem_and_path(uri: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        if "://" in uri:
            _, path = pafs.FileSystem.from_uri(uri)
            return filesystem, path
        return filesystem, uri
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    return pafs.FileSystem.from_uri(uri)


def _data_files(infos: list[pafs.FileInfo]) -> list[str]:
    return sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File and posixpath.splitext(i.path)[1].lower() in FORMAT_BY_EXTENSION
    )


def _split_of(file_name: str) -> str | None:
    stem = posixpath.basename(file_name).split(".")[0]
    for split in KNOWN_SPLITS:
        if stem == split or stem.startswith((f"{split}-", f"{split}_")):
            return split
    return None


def _expand(fs: pafs.FileSystem, path: str, split: str | None) -> list[str]:
    if any(ch in path for ch in "*?["):
        parts = path.split("/")
        first_glob = next(i for i, p in enumerate(parts) if any(ch in p for ch in "*?["))
        base = "/".join(parts[:first_glob]) or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return [p for p in _data_files(infos) if fnmatch.fnmatch(p, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        return [path]
    if split is not None:
        split_dir = fs.get_file_info(posixpath.join(path, split))
        if split_dir.type == pafs.FileType.Directory:
            return _expand(fs, split_dir.path, None)
    files = _data_files(fs.get_file_info(pafs.FileSelector(path, recursive=False)))
    split_files = [f for f in files if _split_of(f)]
    if split is None:  # a dataset root: its split files, not side files such as a manifest
        return split_files or files
    chosen = [f for f in files if _split_of(f) == split]
    if chosen:
        return chosen
    if split_files:
        raise FileNotFoundError(
            f"{path} has split files {sorted({_split_of(f) for f in split_files})} but none for "
            f"split={split!r}"
        )
    logger.info("%s has no split-named files; reading all %d files as split %r", path, len(files), split)
    return files


def resolve_source(
    path: str,
    split: str | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    image_folder: str | None = None,
) -> DataSource:
    """Find the data files behind ``path`` (file, folder of shards, glob or dataset root).

    Args:
        path: local path or URI (``s3://bucket/data``), optionally with glob characters.
        split: in a dataset root, read only this split (``train.json``, ``train-*.tar``, ``train/``...).
        filesystem: use this pyarrow filesystem instead of the one the URI names.
        image_folder: images of LLaVA JSON rows are relative to this folder (path or URI).

    Raises:
        FileNotFoundError: nothing found; ValueError: several formats mixed.
    """
    fs, fs_path = _filesystem_and_path(path, filesystem)
    files = _expand(fs, fs_path.rstrip("/") or "/", split)
    if not files:
        raise FileNotFoundError(
            f"no data files ({', '.join(FORMAT_BY_EXTENSION)}) under {path}"
            + (f" for split={split!r}" if split else "")
        )
    formats = {FORMAT_BY_EXTENSION.get(posixpath.splitext(f)[1].lower()) for f in files}
    if None in formats:
        raise ValueError(f"unsupported file type in {files}; expected {', '.join(FORMAT_BY_EXTENSION)}")
    if len(formats) > 1:
        raise ValueError(f"{path} mixes formats {sorted(formats)}; point at one format at a time")
    folder = None
    if image_folder is not None:
        _, folder = _filesystem_and_path(image_folder, fs)
    return DataSource(format=formats.pop(), paths=tuple(files), filesystem=fs, image_folder=folder)


# ----------------------------------------------------------------------------------------------
# Normalising one record (pure Python, shared by every format)
# ----------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def normalise_conversations(turns: Any) -> list[dict[str, str]] | None:
    """Validated copy of a conversation, or ``None`` if it is empty or malformed.

    A valid conversation is a non-empty list of ``{"from", "value"}`` turns that alternate
    human, gpt, human, ... starting with human, with string values and non-blank gpt answers.
    """
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except ValueError:
            return None
    if not isinstance(turns, list) or not turns:
        return None
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return None
        role = ROLE_ALIASES.get(str(turn.get("from", "")).lower())
        value = turn.get("value")
        if role is None or not isinstance(value, str):
            return None
        if role != ("human" if i % 2 == 0 else "gpt"):
            return None
        if role == "gpt" and not value.strip():
            return None
        out.append({"from": role, "value": value})
    return out


def normalise_record(record: Any, *, has_image: bool, default_id: str) -> dict[str, Any]:
    """Map one source record (LLaVA instruction or evaluation style) to the normalised fields.

    Args:
        record: the decoded JSON object (or Parquet row as a dict).
        has_image: whether the sample has an image (a path or bytes).
        default_id: id to use when the record has none.

    Returns:
        ``{"id", "conversations" (JSON str), "family", "kind", "bad_reason"}``.
    """
    if not isinstance(record, dict):
        return _bad_row(default_id, BadReason.BAD_JSON)
    raw_id = record.get("id", record.get("question_id"))
    row = {
        "id": default_id if raw_id is None or raw_id == "" else str(raw_id),
        "conversations": "[]",
        "family": _text(record.get("family")),
        "kind": _text(record.get("kind")),
        "bad_reason": "",
    }
    if record.get("conversations") is not None:
        turns = normalise_conversations(record["conversations"])
    else:  # evaluation style: question/text (+ answer)
        question = record.get("question", record.get("text"))
        answer = record.get("answer")
        if not isinstance(question, str):
            turns = None
        else:
            if has_image and IMAGE_TOKEN not in question:
                question = f"{IMAGE_TOKEN}\n{question}"
            raw = [{"from": "human", "value": question}]
            if answer is not None:
                raw.append({"from": "gpt", "value": _text(answer)})
            turns = normalise_conversations(raw)
    if turns is None:
        row["bad_reason"] = BadReason.BAD_CONVERSATION
        return row
    row["conversations"] = json.dumps(turns, ensure_ascii=False)
    tags = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if has_image and IMAGE_TOKEN not in turns[0]["value"]:
        row["bad_reason"] = BadReason.MISSING_IMAGE_TAG
    elif not has_image and tags:
        row["bad_reason"] = BadReason.MISSING_IMAGE
    elif tags > 1:
        row["bad_reason"] = BadReason.BAD_CONVERSATION  # one image per sample
    return row


def _bad_row(sample_id: str, reason: str) -> dict[str, Any]:
    return {"id": sample_id, "conversations": "[]", "family": "", "kind": "", "bad_reason": reason}


def _table(rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    schema = ROW_SCHEMA
    for name, dtype in (extra or {}).items():
        schema = schema.append(pa.field(name, dtype))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


# ----------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL
# ----------------------------------------------------------------------------------------------


def iter_json_records(data: bytes, path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(default_id, record or None)`` from a JSON-list or JSON-lines file; ``None`` marks a
    line that does not parse.

    Raises:
        ValueError: a ``.json`` file that is neither a JSON list/object nor JSON lines.
    """
    name = posixpath.basename(path)
    text = data.decode("utf-8", errors="replace")
    if not path.lower().endswith(".jsonl"):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list):
            for i, record in enumerate(parsed):
                yield f"{name}:{i}", record
            return
        if isinstance(parsed, dict):
            yield f"{name}:0", parsed
            return
        if text.lstrip().startswith("["):
            raise ValueError(f"{path} is not valid JSON (a truncated or corrupt JSON list?)")
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{name}:{lineno}", json.loads(line)
        except ValueError:
            yield f"{name}:{lineno}", None


def _image_ref(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    return image if isinstance(image, str) and image else None


def parse_json_files(table: pa.Table, image_folder: str | None = None) -> Iterator[pa.Table]:
    """``map_batches`` stage over ``read_binary_files(include_paths=True)`` rows (``bytes``, ``path``):
    one output row per record, with an ``image_path`` column (resolved, inside the filesystem)."""
    for data, path in zip(table.column("bytes").to_pylist(), table.column("path").to_pylist()):
        folder = image_folder if image_folder is not None else posixpath.dirname(path)
        rows = []
        for default_id, record in iter_json_records(data, path):
            if record is None:
                rows.append(_bad_row(default_id, BadReason.BAD_JSON))
                continue
            ref = _image_ref(record)
            row = normalise_record(record, has_image=ref is not None, default_id=default_id)
            if ref is not None:
                is_absolute = "://" in ref or ref.startswith("/")
                row["image_path"] = ref if is_absolute else posixpath.join(folder, ref)
            rows.append(row)
            if len(rows) >= 1024:
                yield _table(rows, {"image_path": pa.string()})
                rows = []
        if rows:
            yield _table(rows, {"image_path": pa.string()})


def _read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    if "://" in path:
        fs, path = pafs.FileSystem.from_uri(path)
    with fs.open_input_file(path) as f:
        return f.read()


def load_image_bytes(table: pa.Table, filesystem: pafs.FileSystem) -> pa.Table:
    """``map_batches`` stage: read ``image_path`` into ``image``; ``missing_image`` if unreadable."""
    rows = table.to_pylist()
    for row in rows:
        path = row.pop("image_path")
        if path is None or row["bad_reason"]:
            continue
        try:
            row["image"] = _read_bytes(filesystem, path)
        except (OSError, ValueError) as err:  # not found, permission, bad URI
            logger.debug("cannot read image %s of %s: %s", path, row["id"], err)
            row["bad_reason"] = BadReason.MISSING_IMAGE
    return _table(rows)


# ----------------------------------------------------------------------------------------------
# WebDataset
# ----------------------------------------------------------------------------------------------


def _cell(table: pa.Table, column: str, i: int) -> Any:
    return table.column(column)[i].as_py() if column in table.column_names else None


def normalise_webdataset(table: pa.Table) -> pa.Table:
    """``map_batches`` stage over ``read_webdataset(decoder=None)`` rows (``__key__``, ``json``,
    ``png``/``jpg``/...) -> normalised rows."""
    rows = []
    for i in range(table.num_rows):
        key = str(_cell(table, "__key__", i))
        image = next(
            (b for ext in IMAGE_EXTENSIONS if (b := _cell(table, ext, i)) is not None),
            None,
        )
        meta = _cell(table, "json", i)
        if meta is None:
            rows.append(_bad_row(key, BadReason.MISSING_METADATA))
            continue
        try:
            record = json.loads(meta)
        except ValueError:
            rows.append(_bad_row(key, BadReason.BAD_JSON))
            continue
        row = normalise_record(record, has_image=image is not None, default_id=key)
        row["image"] = image
        rows.append(row)
    return _table(rows)


# ----------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------


def _parquet_image(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) and len(value) else None


def normalise_parquet(table: pa.Table) -> pa.Table:
    """``map_batches`` stage over ``read_parquet`` rows -> normalised rows."""
    rows = []
    for i, record in enumerate(table.to_pylist()):
        image = _parquet_image(record.get("image"))
        row = normalise_record(record, has_image=image is not None, default_id=f"row{i}")
        row["image"] = image
        rows.append(row)
    return _table(rows)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def read_rows(
    path: str | DataSource,
    split: str | None = None,
    *,
    filesystem: pafs.FileSystem | None = None,
    image_folder: str | None = None,
    override_num_blocks: int | None = None,
) -> ray.data.Dataset:
    """Read any supported format into a Ray Dataset of :data:`ROW_SCHEMA` rows (bad rows included).

    Args:
        path: file, folder, glob or dataset root (local path or URI), or a resolved :class:`DataSource`.
        split: split to read from a dataset root (``"train"``, ``"eval"``); ``None`` reads all files.
        filesystem: pyarrow filesystem to use instead of the one the URI names.
        image_folder: folder that relative LLaVA image paths are resolved against.
        override_num_blocks: passed to Ray's reader.
    """
    import ray.data

    source = (
        path
        if isinstance(path, DataSource)
        else resolve_source(path, split, filesystem=filesystem, image_folder=image_folder)
    )
    paths, fs = list(source.paths), source.filesystem
    logger.info("reading %d %s file(s), e.g. %s", len(paths), source.format, paths[0])
    if source.format == "llava_json":
        ds = ray.data.read_binary_files(
            paths, filesystem=fs, include_paths=True, override_num_blocks=override_num_blocks
        )
        ds = ds.map_batches(
            parse_json_files,
            batch_format="pyarrow",
            batch_size=1,
            fn_kwargs={"image_folder": source.image_folder},
        )
        return ds.map_batches(load_image_bytes, batch_format="pyarrow", fn_kwargs={"filesystem": fs})
    if source.format == "webdataset":
        ds = ray.data.read_webdataset(
            paths, filesystem=fs, decoder=None, override_num_blocks=override_num_blocks
        )
        return ds.map_batches(normalise_webdataset, batch_format="pyarrow")
    if source.format == "parquet":
        ds = ray.data.read_parquet(paths, filesystem=fs, override_num_blocks=override_num_blocks)
        return ds.map_batches(normalise_parquet, batch_format="pyarrow")
    raise ValueError(f"unknown format {source.format!r}")
