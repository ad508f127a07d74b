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
members of a key are adjacent in the tar. Shards are read member by member as a stream
(:func:`iter_webdataset_rows`), so a shard cut in the middle keeps the samples before the cut.

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
``source_file: string`` the data file (JSON, tar or Parquet) the row came from, so that bad-sample
                        reports name files
======================  ===========================================================================

Damaged data is counted, never raised
-------------------------------------
Bad rows are never raised mid-stream: they carry their ``bad_reason`` to the accounting stage
(see :mod:`pipelines.accounting`), with the same reason in every format:

* a record that does not parse is ``bad_json``; a WebDataset sample without ``.json``
  ``missing_metadata``;
* text that is not valid UTF-8, or holds a lone surrogate (``"\\udc80"``), is ``bad_encoding``,
  wherever it sits (JSON line, tar member, Parquet column): it is neither repaired with U+FFFD nor
  trained on;
* a file that cannot be read to its end (a tar cut in the middle of a member or missing its
  end-of-archive blocks, a corrupt tar header, a Parquet file without its footer or with an
  unreadable row group, a ``.json`` list cut short) keeps the samples read before the damage and
  yields one ``truncated_shard`` row for the rest, whose id says where it broke and whose
  ``source_file`` is the file. The other files go on.

Transient storage errors that Ray Data retries (``DataContext.retried_io_errors``) are raised so
that Ray retries them; every other read error of a file becomes its ``truncated_shard`` row.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import posixpath
import re
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from dpn_model.processing import LLAVA_ROLES
from dpn_model.processing import ROLE_ALIASES as PROCESSOR_ROLE_ALIASES
from dpn_model.tokenization import IMAGE_TOKEN
from pipelines.accounting import BadReason

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp")
FORMAT_BY_EXTENSION: dict[str, str] = {
    ".json": "llava_json",
    ".jsonl": "llava_json",
    ".tar": "webdataset",
    ".parquet": "parquet",
}
KNOWN_SPLITS: tuple[str, ...] = ("train", "eval", "val", "validation", "test")
# LLaVA's spelling of the processor's one role table (dpn_model.processing.ROLE_ALIASES), system turns excluded
ROLE_ALIASES: dict[str, str] = {
    alias: LLAVA_ROLES[role] for alias, role in PROCESSOR_ROLE_ALIASES.items() if role != "system"
}

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("conversations", pa.string()),
        ("family", pa.string()),
        ("kind", pa.string()),
        ("bad_reason", pa.string()),
        ("source_file", pa.string()),
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
        except (ValueError, RecursionError):
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


def is_unicode(*values: Any) -> bool:
    """Whether every ``str`` in ``values`` is valid Unicode text (encodes to UTF-8).

    Readers decode bytes with ``surrogateescape``, so invalid UTF-8 arrives here as lone surrogates,
    like a ``"\\udc80"`` escape in JSON: one test covers both, in every format.
    """
    try:
        for value in values:
            if isinstance(value, str):
                value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_id(value: Any) -> str:
    """``value`` as a string that Arrow and logs can hold (invalid text shown as ``\\udcXX``)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def decode_text(data: bytes | bytearray | str) -> str:
    """UTF-8 (BOM dropped) with invalid bytes kept as lone surrogates, for :func:`is_unicode`."""
    if isinstance(data, str):
        return data
    return bytes(data).decode("utf-8-sig", errors="surrogateescape")


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
    conversations = "[]" if turns is None else json.dumps(turns, ensure_ascii=False)
    if not is_unicode(row["id"], row["family"], row["kind"], _image_ref(record), conversations):
        return _bad_row(row["id"], BadReason.BAD_ENCODING)
    if turns is None:
        row["bad_reason"] = BadReason.BAD_CONVERSATION
        return row
    row["conversations"] = conversations
    tags = sum(t["value"].count(IMAGE_TOKEN) for t in turns)
    if has_image and IMAGE_TOKEN not in turns[0]["value"]:
        row["bad_reason"] = BadReason.MISSING_IMAGE_TAG
    elif not has_image and tags:
        row["bad_reason"] = BadReason.MISSING_IMAGE
    elif tags > 1:
        row["bad_reason"] = BadReason.BAD_CONVERSATION  # one image per sample
    return row


def _bad_row(sample_id: str, reason: str, source_file: str = "") -> dict[str, Any]:
    return {
        "id": printable_id(sample_id),
        "conversations": "[]",
        "family": "",
        "kind": "",
        "bad_reason": reason,
        "source_file": source_file,
    }


def truncated_row(path: str, num_read: int, error: BaseException) -> dict[str, Any]:
    """The one ``truncated_shard`` row that stands for the unreadable rest of ``path``."""
    detail = printable_id(str(error) or type(error).__name__)[:200]
    name = posixpath.basename(path)
    logger.warning(
        "%s is damaged after %d samples (%s): the rest of it counts as one %s sample",
        path, num_read, detail, BadReason.TRUNCATED_SHARD,
    )  # fmt: skip
    return _bad_row(f"{name} after {num_read} samples: {detail}", BadReason.TRUNCATED_SHARD, path)


def is_retried_io_error(error: BaseException) -> bool:
    """Whether Ray Data retries ``error`` (a transient storage error), so a reader must re-raise it
    rather than count the file as damaged."""
    from ray.data import DataContext

    message = str(error)
    for pattern in DataContext.get_current().retried_io_errors:
        try:
            if pattern in message or re.search(pattern, message):
                return True
        except re.error:
            continue
    return False


def _table(rows: list[dict[str, Any]], extra: dict[str, pa.DataType] | None = None) -> pa.Table:
    schema = ROW_SCHEMA
    for name, dtype in (extra or {}).items():
        schema = schema.append(pa.field(name, dtype))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _blocks(
    rows: Iterable[dict[str, Any]], max_rows: int = 256, max_bytes: int = 64 << 20
) -> Iterator[pa.Table]:
    """Group rows into Arrow tables of at most ``max_rows`` rows / about ``max_bytes`` of images."""
    batch: list[dict[str, Any]] = []
    size = 0
    for row in rows:
        batch.append(row)
        size += len(row.get("image") or b"")
        if len(batch) >= max_rows or size >= max_bytes:
            yield _table(batch)
            batch, size = [], 0
    if batch:
        yield _table(batch)


# ----------------------------------------------------------------------------------------------
# LLaVA JSON / JSONL
# ----------------------------------------------------------------------------------------------


class TruncatedFileError(ValueError):
    """A file that cannot be read to its end; ``num_read`` records were read before the damage."""

    def __init__(self, message: str, num_read: int = 0):
        super().__init__(message)
        self.num_read = num_read


_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _iter_json_list(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """The elements of a JSON list one by one, so that a list cut short still yields the records
    before the cut (then raises :class:`TruncatedFileError`)."""
    decoder = json.JSONDecoder()
    pos = _JSON_WHITESPACE.match(text, text.index("[") + 1).end()
    i = 0
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                record, pos = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError) as err:
                raise TruncatedFileError(f"not valid JSON at char {pos} ({err})", i) from None
            yield f"{name}:{i}", record
            i += 1
            pos = _JSON_WHITESPACE.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _JSON_WHITESPACE.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise TruncatedFileError(f"not valid JSON at char {pos} (expected ',' or ']')", i)
    if text[pos:].strip():
        raise TruncatedFileError(f"not valid JSON at char {pos} (data after the list)", i)


def iter_json_records(data: bytes, path: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(default_id, record or None)`` from a JSON-list or JSON-lines file; ``None`` marks a
    line that does not parse. Invalid UTF-8 is kept as lone surrogates (see :func:`is_unicode`).

    Raises:
        TruncatedFileError: a ``.json`` list that is cut short or corrupt, after the records before
            the damage were yielded; an empty ``.json`` file (an empty ``.jsonl`` has no records).
    """
    name = posixpath.basename(path)
    text = decode_text(data)
    if not path.lower().endswith(".jsonl"):
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, list):
            for i, record in enumerate(parsed):
                yield f"{name}:{i}", record
            return
        if isinstance(parsed, dict):
            yield f"{name}:0", parsed
            return
        if text.lstrip().startswith("["):
            yield from _iter_json_list(text, name)
            return
        if not text.strip():  # a JSON document cannot be empty: a copy cut at 0 bytes
            raise TruncatedFileError("empty file")
    # JSON lines are separated by "\n" only: U+2028 and friends are valid inside JSON strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # deep nesting is a broken line too, not a crash
            record = None
        yield f"{name}:{lineno}", record


def _image_ref(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    image = record.get("image")
    if isinstance(image, list) and len(image) == 1:
        image = image[0]
    return image if isinstance(image, str) and image else None


def _json_file_rows(data: bytes, path: str, folder: str) -> Iterator[dict[str, Any]]:
    """Normalised rows of one LLaVA JSON file (with ``image_path``); a damaged list ends with one
    ``truncated_shard`` row."""
    records = iter_json_records(data, path)
    while True:
        try:
            item = next(records, None)
        except TruncatedFileError as err:
            yield truncated_row(path, err.num_read, err)
            return
        if item is None:
            return
        default_id, record = item
        if record is None:
            yield _bad_row(default_id, BadReason.BAD_JSON, path)
            continue
        ref = _image_ref(record)
        row = normalise_record(record, has_image=ref is not None, default_id=default_id)
        row["source_file"] = path
        if ref is not None and not row["bad_reason"]:
            is_absolute = "://" in ref or ref.startswith("/")
            row["image_path"] = ref if is_absolute else posixpath.join(folder, ref)
        yield row


def parse_json_files(table: pa.Table, image_folder: str | None = None) -> Iterator[pa.Table]:
    """``map_batches`` stage over ``read_binary_files(include_paths=True)`` rows (``bytes``, ``path``):
    one output row per record, with an ``image_path`` column (resolved, inside the filesystem)."""
    for data, path in zip(table.column("bytes").to_pylist(), table.column("path").to_pylist()):
        folder = image_folder if image_folder is not None else posixpath.dirname(path)
        rows = []
        for row in _json_file_rows(data, path, folder):
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


def normalise_webdataset_sample(key: str, members: dict[str, Any], source_file: str = "") -> dict[str, Any]:
    """One WebDataset sample (``{extension: bytes}``) -> a normalised row.

    A member that is absent or not bytes (Ray's ``read_webdataset`` gives NaN cells for a missing
    member) counts as missing: no ``.json`` is ``missing_metadata``, whatever else the sample has.
    """
    image = next(
        (bytes(b) for ext in IMAGE_EXTENSIONS if isinstance(b := members.get(ext), bytes | bytearray)), None
    )
    meta = members.get("json")
    if not isinstance(meta, bytes | bytearray | str):
        return _bad_row(key, BadReason.MISSING_METADATA, source_file)
    try:
        record = json.loads(decode_text(meta))
    except (ValueError, RecursionError):
        return _bad_row(key, BadReason.BAD_JSON, source_file)
    row = normalise_record(record, has_image=image is not None, default_id=key)
    row["image"] = image if not row["bad_reason"] else None
    row["source_file"] = source_file
    return row


def _cell(table: pa.Table, column: str, i: int) -> Any:
    return table.column(column)[i].as_py() if column in table.column_names else None


def normalise_webdataset(table: pa.Table) -> pa.Table:
    """``map_batches`` stage over ``read_webdataset(decoder=None)`` rows (``__key__``, ``json``,
    ``png``/``jpg``/...) -> normalised rows. :func:`read_rows` reads tars with
    :func:`iter_webdataset_rows` instead, which also survives a damaged shard."""
    rows = []
    for i in range(table.num_rows):
        members = {ext: _cell(table, ext, i) for ext in (*IMAGE_EXTENSIONS, "json")}
        rows.append(normalise_webdataset_sample(str(_cell(table, "__key__", i)), members))
    return _table(rows)


# key = the member's path up to the first dot of its file name, extension = the rest (WebDataset)
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_READ_MEMBERS = frozenset((*IMAGE_EXTENSIONS, "json"))
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records why the header loop stopped: ``tarfile`` ends an archive silently at a cut or corrupt
    header, and only the end-of-archive block (all zeros) is a clean end."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as err:
            tar.dpn_end = err  # type: ignore[attr-defined]
            raise


def _check_tar_end(end: tarfile.HeaderError | None) -> None:
    """Raise unless the header loop stopped at the end-of-archive block."""
    if isinstance(end, tarfile.EmptyHeaderError | None):
        raise tarfile.ReadError("the file ends after a member, without the end-of-archive block")
    if not isinstance(end, tarfile.EOFHeaderError):
        raise tarfile.ReadError(f"damaged member header ({end})")


def iter_tar_samples(stream: Any) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """``(key, {extension: bytes})`` per sample of a tar read as a stream, member by member.

    Members other than images and ``.json`` are skipped unread (their extension is kept, value
    ``None``). Raises ``tarfile.ReadError`` (or the stream's error) where the tar is damaged,
    including an archive that ends without its end-of-archive block. The sample being read at the
    damage is yielded first only if its ``.json`` and every member before the damage were read whole.
    """
    key, members, reading = None, {}, False
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # a stream has no use for the headers read so far
                match = _MEMBER_NAME.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                member_key, ext = match.group(1), match.group(2).lower()
                if member_key != key or ext in members:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                reading = True
                members[ext] = tar.extractfile(info).read() if ext in _READ_MEMBERS else None
                reading = False
            _check_tar_end(getattr(tar, "dpn_end", None))
    except _TAR_ERRORS:
        if key is not None and not reading and isinstance(members.get("json"), bytes):
            yield key, members  # read whole before the damage
        raise
    if key is not None:
        yield key, members


def iter_webdataset_rows(stream: Any, path: str) -> Iterator[dict[str, Any]]:
    """Normalised rows of one WebDataset shard; a damaged shard yields the samples read before the
    damage, then one ``truncated_shard`` row for the rest (see the module docstring)."""
    samples = iter_tar_samples(stream)
    num_read = 0
    while True:
        try:
            item = next(samples, None)
        except _TAR_ERRORS as err:
            if is_retried_io_error(err):
                raise
            yield truncated_row(path, num_read, err)
            return
        if item is None:
            return
        num_read += 1
        yield normalise_webdataset_sample(item[0], item[1], path)


class WebDatasetShards(FileBasedDatasource):
    """Ray Data source of WebDataset tar shards read member by member (:func:`iter_webdataset_rows`):
    unlike ``read_webdataset``, a damaged shard is counted, not raised."""

    _FILE_EXTENSIONS = ["tar"]

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from _blocks(iter_webdataset_rows(f, path))


# ----------------------------------------------------------------------------------------------
# Parquet
# ----------------------------------------------------------------------------------------------


def _parquet_image(value: Any) -> bytes | None:
    if isinstance(value, dict):  # Hugging Face datasets: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    return value if isinstance(value, bytes | bytearray) and len(value) else None


def _parquet_records(table: pa.Table) -> list[dict[str, Any] | None]:
    """Rows as dicts; a row whose strings are not valid UTF-8 (Arrow does not check on read) is
    ``None`` instead of failing its whole batch."""
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        records: list[dict[str, Any] | None] = []
        for i in range(table.num_rows):
            try:
                records.append(table.slice(i, 1).to_pylist()[0])
            except UnicodeDecodeError:
                records.append(None)
        return records


def normalise_parquet(table: pa.Table, source_file: str = "", first_row: int = 0) -> pa.Table:
    """``map_batches`` stage over Parquet rows -> normalised rows. Default ids are
    ``FILE:ROW`` (``rowN`` without ``source_file``); ``first_row`` is the batch's offset in the file."""
    name = posixpath.basename(source_file)
    rows = []
    for i, record in enumerate(_parquet_records(table)):
        default_id = f"{name}:{first_row + i}" if name else f"row{first_row + i}"
        if record is None:
            row = _bad_row(default_id, BadReason.BAD_ENCODING)
        else:
            image = _parquet_image(record.get("image"))
            row = normalise_record(record, has_image=image is not None, default_id=default_id)
            row["image"] = image if not row["bad_reason"] else None
        row["source_file"] = source_file
        rows.append(row)
    return _table(rows)


_PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError)


def iter_parquet_tables(file: Any, path: str, batch_size: int = 256) -> Iterator[pa.Table]:
    """Normalised row tables of one Parquet file (random-access ``file``), batch by batch; a file
    that cannot be opened (no footer: cut short) or whose row group does not decode yields the
    batches before the damage, then one ``truncated_shard`` row for the rest."""
    num_read = 0
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=batch_size)
    except _PARQUET_ERRORS as err:
        if is_retried_io_error(err):
            raise
        yield _table([truncated_row(path, 0, err)])
        return
    while True:
        try:
            batch = next(batches, None)
        except _PARQUET_ERRORS as err:
            if is_retried_io_error(err):
                raise
            yield _table([truncated_row(path, num_read, err)])
            return
        if batch is None:
            return
        yield normalise_parquet(pa.Table.from_batches([batch]), path, num_read)
        num_read += batch.num_rows


class ParquetFiles(FileBasedDatasource):
    """Ray Data source of Parquet files read batch by batch (:func:`iter_parquet_tables`): unlike
    ``read_parquet``, which reads every footer while planning, a damaged file is counted, not raised."""

    _FILE_EXTENSIONS = ["parquet"]

    def _open_input_source(self, filesystem: pafs.FileSystem, path: str, **open_args: Any) -> pa.NativeFile:
        return filesystem.open_input_file(path)  # the footer is at the end: random access

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from iter_parquet_tables(f, path)


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

    Every file is read on its own: a damaged one becomes its ``truncated_shard`` row (see the module
    docstring) and the others go on.
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
        return ray.data.read_datasource(
            WebDatasetShards(paths, filesystem=fs), override_num_blocks=override_num_blocks
        )
    if source.format == "parquet":
        return ray.data.read_datasource(
            ParquetFiles(paths, filesystem=fs), override_num_blocks=override_num_blocks
        )
    raise ValueError(f"unknown format {source.format!r}")
