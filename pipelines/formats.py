"""Readers: every supported on-disk format -> Ray Data rows of one normalised schema.

Supported formats
-----------------
**LLaVA instruction JSON** (``*.json`` holding a list, or ``*.jsonl`` with one object a line)::

    {"id": "000001", "image": "images/000001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the big square?"},
                       {"from": "gpt", "value": "red"}],
     "family": "colour", "kind": "coarse"}

``image`` is relative to the image folder (default: the folder of the JSON file) and must stay inside it
(see "Image references" below). ``<image>`` must appear in the first human turn when there is an image.
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
(:func:`iter_webdataset_rows`), so a shard cut in the middle keeps the samples before the cut. Shards are plain
(uncompressed) tar unless ``tar_compression`` allows more (a compressed shard is one ``unsupported_format``
sample, nothing of it inflated); a member past ``max_member_bytes`` is skipped over without being read into memory
and its sample, like one past ``max_sample_bytes``, is ``oversized_member``.

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

Image references
----------------
Data is not trusted to name files (:class:`ReadPolicy`, :func:`resolve_image_ref`): a LLaVA ``image`` ref is read
only inside the image root (``image_folder``, local or a URI such as ``s3://bucket/prefix``). Refs that leave it
(``../x``, ``a/../../x``), absolute paths, any ``scheme:`` (``file://``, ``s3://``, ``http://``, a drive letter
``C:``), NUL bytes and backslashes are the bad sample ``path_outside_root`` and never opened, unless
``allowed_image_roots`` names a root they lie in or ``allowed_image_schemes`` their scheme. Refs are normalised as
strings (``posixpath.normpath``, never the filesystem) and compared with a trailing-separator-safe prefix test;
relative refs are never percent-decoded (``%2e%2e`` is a folder name), URI refs are checked after decoding, as
pyarrow decodes them. On a local filesystem a ref that passes is also resolved through symlinks when it is read,
and one that ends outside the root is ``path_outside_root`` too (the resolved file is the one read). Hard links
and a root an attacker can write to are trusted: whoever writes inside the root chooses its bytes anyway.
WebDataset and Parquet carry image bytes, not refs: there is nothing to resolve.

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

Transient storage errors that Ray Data retries (``DataContext.retried_io_errors``, matched as Ray matches
them: :func:`is_retried_io_error`) are raised so that Ray retries them; every other read error of a file becomes
its ``truncated_shard`` row. :func:`count_file_rows` counts the rows a reader yields for one file (damage
included) from metadata and headers, holding no payload in memory.
"""

from __future__ import annotations

import bz2
import fnmatch
import json
import logging
import lzma
import os
import posixpath
import re
import tarfile
import traceback
import urllib.parse
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import FileBasedDatasource

from dpn_model.processing import LLAVA_ROLES
from dpn_model.processing import ROLE_ALIASES as PROCESSOR_ROLE_ALIASES
from dpn_model.tokenization import IMAGE_TOKEN
from pipelines.accounting import BadReason
from pipelines.policy import MIB, ReadPolicy

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
KNOWN_SPLITS: tuple[str, ...] = ("train", "dev", "eval", "val", "validation", "test")
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
# What the readers may open, and how much of it they may hold
# ----------------------------------------------------------------------------------------------

# a URI scheme as RFC 3986 spells one (which a drive letter, "C:", also is)
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


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


def _detail(error: BaseException) -> str:
    """What went wrong, short and printable (for ids and logs)."""
    return printable_id(str(error) or type(error).__name__)[:200]


def truncated_row(path: str, num_read: int, error: BaseException) -> dict[str, Any]:
    """The one ``truncated_shard`` row that stands for the unreadable rest of ``path``."""
    detail = _detail(error)
    name = posixpath.basename(path)
    logger.warning(
        "%s is damaged after %d samples (%s): the rest of it counts as one %s sample",
        path, num_read, detail, BadReason.TRUNCATED_SHARD,
    )  # fmt: skip
    return _bad_row(f"{name} after {num_read} samples: {detail}", BadReason.TRUNCATED_SHARD, path)


def format_exception(error: BaseException) -> str:
    """``"ClassName: message"``: the form of an error that Ray matches retry patterns against (as
    ``ray._common.retry.format_exception``, which is private: tests/test_data_faults.py checks this copy)."""
    return "".join(traceback.format_exception_only(type(error), error)).rstrip("\n")


def matches_error(pattern: str, text: str) -> bool:
    """Ray's matching rule (``ray._common.retry.matches_error``): ``pattern`` as a substring, else as a regex; an
    invalid regex matches nothing."""
    if pattern in text:
        return True
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def is_retried_io_error(error: BaseException) -> bool:
    """Whether ``error`` is a transient storage error of ``DataContext.retried_io_errors``, so that a reader must
    re-raise it (for Ray Data to retry the read) rather than count the file as damaged.

    Each pattern is matched as Ray matches it (:func:`matches_error`) against Ray's form of the error,
    ``"ClassName: message"`` (:func:`format_exception`), and also against the bare message ``str(error)``: a
    pattern written for either form re-raises. Ray retries only the first form, so a pattern that matches only the
    bare message (anchored, ``^peer reset``) fails the read loudly rather than dropping the rest of the file.
    """
    from ray.data import DataContext

    texts = (format_exception(error), str(error))
    return any(matches_error(p, text) for p in DataContext.get_current().retried_io_errors for text in texts)


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
# Image references: read only inside their root
# ----------------------------------------------------------------------------------------------


class RefusedData(Exception):
    """Data that the :class:`ReadPolicy` refuses to read; ``reason`` is the :class:`BadReason` it counts as.
    Readers turn it into a bad row: it never leaves a reader."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _inside(path: str, root: str) -> bool:
    """Whether normalised ``path`` lies strictly below normalised ``root``; the prefix ends with the separator, so
    ``/data/images2`` is not below ``/data/images``."""
    prefix = root if root.endswith("/") else f"{root}/"
    return len(path) > len(prefix) and path.startswith(prefix)


class _UriParts(NamedTuple):
    scheme: str
    netloc: str
    path: str  # percent-decoded, as pyarrow decodes it, and normalised


def _uri_parts(uri: str, strict: bool) -> _UriParts | None:
    """The parts of a ``scheme://host/path`` URI, or None for anything else: no ``://`` after the scheme
    (``C:x``, ``http:x``), a query, a fragment, credentials, or a NUL or backslash in the decoded path. ``strict``
    (refs): the decoded path must also be in normal form (no ``.``, ``..`` or empty segments), since stores differ
    in what they make of them (S3 keeps ``..`` in a key, a local file system walks up)."""
    try:
        split = urllib.parse.urlsplit(uri)
    except ValueError:  # e.g. a malformed IPv6 host
        return None
    if not split.scheme or not uri[len(split.scheme) :].startswith("://"):
        return None
    if split.query or split.fragment or "@" in split.netloc:
        return None
    path = urllib.parse.unquote(split.path) or "/"
    if "\x00" in path or "\\" in path:
        return None
    normal = posixpath.normpath(path)
    if strict and normal != path:
        return None
    return _UriParts(split.scheme.lower(), split.netloc, normal)


def _resolve_uri(ref: str, policy: ReadPolicy) -> tuple[str, str] | None:
    parts = _uri_parts(ref, strict=True)
    if parts is None:
        return None
    # rebuilt from the checked parts: pyarrow decodes it back to exactly the path checked
    location = f"{parts.scheme}://{parts.netloc}{urllib.parse.quote(parts.path)}"
    if parts.scheme in policy.allowed_image_schemes:
        return location, ""
    for root in policy.allowed_image_roots:
        allowed = _uri_parts(root, strict=False)
        if allowed and allowed[:2] == parts[:2] and _inside(parts.path, allowed.path):
            return location, allowed.path if parts.scheme == "file" else ""
    return None


def resolve_image_ref(ref: str, root: str, policy: ReadPolicy | None = None) -> tuple[str, str] | None:
    """Where the image ref of a data record may be read, or None when the policy refuses it (the bad sample
    ``path_outside_root``). Pure string work: nothing is opened (see the module docstring, "Image references").

    Args:
        ref: the record's ``image`` value.
        root: the image root, a path inside the data filesystem (``/data/images``, ``bucket/prefix``).
        policy: extra roots and schemes a ref may name (default: none).

    Returns:
        ``(location, confining_root)``: a normalised path inside the data filesystem, or a URI when an allowed root
        or scheme admits one; and the local root it was confined to ("" when there is none to check), against
        which :func:`read_image_file` checks symlinks.
    """
    policy = policy or ReadPolicy()
    if not ref or "\x00" in ref or "\\" in ref:
        return None
    if _URI.match(ref) or "://" in ref:
        return _resolve_uri(ref, policy)
    if ref.startswith("/"):
        path = posixpath.normpath(ref)
        roots = [posixpath.normpath(r) for r in policy.allowed_image_roots if r.startswith("/")]
    else:
        base = posixpath.normpath(root)
        path = posixpath.normpath(posixpath.join(base, ref))
        roots = [base]
    return next(((path, r) for r in roots if _inside(path, r)), None)


def read_image_file(fs: pafs.FileSystem, location: str, root: str, max_bytes: int) -> bytes:
    """The bytes of an image resolved by :func:`resolve_image_ref`.

    On a local filesystem the path is resolved through symlinks first and the resolved file is the one read, so a
    link inside the root that points outside it is refused.

    Raises:
        RefusedData: ``path_outside_root`` (a link out of ``root``), ``oversized_member`` (past ``max_bytes``,
            checked before reading).
        OSError, ValueError: a missing or unreadable file.
    """
    if _URI.match(location):
        fs, location = pafs.FileSystem.from_uri(location)
    if root and isinstance(fs, pafs.LocalFileSystem):
        real = os.path.realpath(location)
        if not _inside(real, os.path.realpath(root)):
            raise RefusedData(BadReason.PATH_OUTSIDE_ROOT, f"{location} resolves to {real}, outside {root}")
        location = real
    with fs.open_input_file(location) as f:
        size = f.size()
        if size > max_bytes:
            raise RefusedData(BadReason.OVERSIZED_MEMBER, f"{location} is {size} bytes, over {max_bytes}")
        return f.read()


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


def _json_file_rows(
    data: bytes, path: str, folder: str, policy: ReadPolicy | None = None
) -> Iterator[dict[str, Any]]:
    """Normalised rows of one LLaVA JSON file (with ``image_path`` and ``image_root``: see
    :func:`resolve_image_ref`); a damaged list ends with one ``truncated_shard`` row."""
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
            resolved = resolve_image_ref(ref, folder, policy)
            if resolved is None:
                logger.debug("image ref %r of %s in %s leaves its root %s", ref, row["id"], path, folder)
                row["bad_reason"] = BadReason.PATH_OUTSIDE_ROOT
            else:
                row["image_path"], row["image_root"] = resolved
        yield row


_IMAGE_REF_COLUMNS = {"image_path": pa.string(), "image_root": pa.string()}


def parse_json_files(
    table: pa.Table, image_folder: str | None = None, policy: ReadPolicy | None = None
) -> Iterator[pa.Table]:
    """``map_batches`` stage over ``read_binary_files(include_paths=True)`` rows (``bytes``, ``path``):
    one output row per record, with ``image_path`` and ``image_root`` columns (the ref resolved inside its root
    by :func:`resolve_image_ref`; a ref the ``policy`` refuses is ``path_outside_root``)."""
    for data, path in zip(table.column("bytes").to_pylist(), table.column("path").to_pylist()):
        folder = image_folder if image_folder is not None else posixpath.dirname(path)
        rows = []
        for row in _json_file_rows(data, path, folder, policy):
            rows.append(row)
            if len(rows) >= 1024:
                yield _table(rows, _IMAGE_REF_COLUMNS)
                rows = []
        if rows:
            yield _table(rows, _IMAGE_REF_COLUMNS)


def load_image_bytes(
    table: pa.Table, filesystem: pafs.FileSystem, policy: ReadPolicy | None = None
) -> pa.Table:
    """``map_batches`` stage: read ``image_path`` into ``image`` (see :func:`read_image_file`); ``missing_image``
    if unreadable, ``path_outside_root`` or ``oversized_member`` if the policy refuses it."""
    max_bytes = (policy or ReadPolicy()).max_member_bytes
    rows = table.to_pylist()
    for row in rows:
        path, root = row.pop("image_path"), row.pop("image_root", None)
        if path is None or row["bad_reason"]:
            continue
        try:
            row["image"] = read_image_file(filesystem, path, root or "", max_bytes)
        except RefusedData as err:
            logger.debug("refused image %s of %s: %s", path, row["id"], err)
            row["bad_reason"] = err.reason
        except (OSError, ValueError) as err:  # not found, permission, bad URI
            logger.debug("cannot read image %s of %s: %s", path, row["id"], err)
            row["bad_reason"] = BadReason.MISSING_IMAGE
    return _table(rows)


# ----------------------------------------------------------------------------------------------
# WebDataset
# ----------------------------------------------------------------------------------------------


def normalise_webdataset_sample(key: str, members: dict[str, Any], source_file: str = "") -> dict[str, Any]:
    """One WebDataset sample (``{extension: bytes}``) -> a normalised row.

    A member that is absent or not bytes counts as missing: no ``.json`` is ``missing_metadata``, whatever
    else the sample has.
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


# key = the member's path up to the first dot of its file name, extension = the rest (WebDataset)
_MEMBER_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
_READ_MEMBERS = frozenset((*IMAGE_EXTENSIONS, "json"))
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
# header extensions tarfile reads whole into memory (long names, pax records): no name needs a megabyte
_HEADER_EXTENSIONS = frozenset(
    (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )
)
_MAX_HEADER_EXTENSION = MIB
# the first bytes of each compressed stream (zstd is recognised, to be refused: Python 3.11 cannot inflate it)
_COMPRESSIONS: dict[str, bytes] = {
    "gzip": b"\x1f\x8b",
    "bzip2": b"BZh",
    "xz": b"\xfd7zXZ\x00",
    "zstd": b"\x28\xb5\x2f\xfd",
}
_INFLATE_CHUNK = 64 * 1024  # compressed bytes read at a time
_XZ_MEMLIMIT = 128 * MIB  # an xz header may ask for a 1.5 GB dictionary; xz -9 needs 65 MB


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records why the header loop stopped: ``tarfile`` ends an archive silently at a cut or corrupt
    header, and only the end-of-archive block (all zeros) is a clean end. Also refuses a header extension
    (long name, pax record) past ``_MAX_HEADER_EXTENSION``, which tarfile would read whole into memory."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        if info.type in _HEADER_EXTENSIONS and info.size > _MAX_HEADER_EXTENSION:
            raise tarfile.HeaderError(
                f"a {info.size}-byte header extension (long name or pax record), over {_MAX_HEADER_EXTENSION}"
            )
        return info

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


class CompressedShardError(tarfile.ReadError):
    """A compressed tar shard whose compression the :class:`ReadPolicy` does not accept (``unsupported_format``)."""

    def __init__(self, compression: str):
        super().__init__(
            f"{compression}-compressed tar, not read: tar shards are plain tar unless tar_compression lists "
            f"{compression}"
        )
        self.compression = compression


class _Replay:
    """A stream whose first bytes were read to sniff them, read again from its start."""

    def __init__(self, head: bytes, stream: Any):
        self._head, self._stream = head, stream

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            out, self._head = self._head + self._stream.read(), b""
            return out
        out, self._head = self._head[:size], self._head[size:]
        if len(out) < size:
            out += self._stream.read(size - len(out))
        return out


class _Inflating:
    """A compressed stream read as its inflated bytes, never more than the ``size`` asked for inflated at once, so
    memory stays bounded whatever the compression ratio (tarfile's own ``r|gz`` inflates a whole input block at once:
    a 10 kB block of a gzip bomb is 10 MB, of a bzip2 one far more). A stream that ends before its end marker
    raises ``EOFError`` (a truncated shard)."""

    def __init__(self, stream: Any, compression: str):
        self._stream = stream
        self._zlib = compression == "gzip"
        if self._zlib:
            self._inflater: Any = zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip framing
        else:
            bzip2 = compression == "bzip2"
            self._inflater = bz2.BZ2Decompressor() if bzip2 else lzma.LZMADecompressor(memlimit=_XZ_MEMLIMIT)
        self._tail = b""  # zlib: compressed input read but not inflated yet

    def _next_input(self) -> bytes:
        """Compressed bytes to feed next: zlib's unconsumed tail, nothing while bz2/lzma still hold output, else
        the next chunk of the stream (``b""`` at its end)."""
        if self._zlib and self._tail:
            return self._tail
        if not self._zlib and not self._inflater.needs_input:
            return b""
        return self._stream.read(_INFLATE_CHUNK)

    def read(self, size: int | None = -1) -> bytes:
        unbounded = size is None or size < 0
        out = bytearray()
        while (unbounded or len(out) < size) and not self._inflater.eof:
            limit = (0 if self._zlib else -1) if unbounded else size - len(out)  # zlib: 0 is "no limit"
            data = self._next_input()
            chunk = self._inflater.decompress(data, limit)
            if self._zlib:
                self._tail = self._inflater.unconsumed_tail
            if not chunk and not data and not self._inflater.eof:  # no input left, nothing more inside
                raise EOFError("the compressed stream ends before its end marker")
            out += chunk
        return bytes(out)


def _open_tar_stream(stream: Any, policy: ReadPolicy) -> tarfile.TarFile:
    """The shard as a tar read member by member: plain tar, or a compression the policy accepts (inflated in
    bounded steps, see :class:`_Inflating`).

    Raises:
        CompressedShardError: any other compression, from the first bytes, before anything is inflated.
    """
    head = stream.read(tarfile.BLOCKSIZE)
    compression = None
    if head[257:262] != b"ustar":  # a POSIX tar header is not a compressed stream, whatever its name
        compression = next((name for name, magic in _COMPRESSIONS.items() if head.startswith(magic)), None)
    if compression is not None and compression not in policy.tar_compression:
        raise CompressedShardError(compression)
    replay = _Replay(head, stream)
    plain = replay if compression is None else _Inflating(replay, compression)
    return tarfile.open(fileobj=plain, mode="r|", tarinfo=_EndCheckingTarInfo)


class TarSample(NamedTuple):
    """One sample of a tar shard.

    Attributes:
        key: the WebDataset key.
        members: ``{extension: bytes}``; ``None`` for a member not read (not an image or ``.json``, or oversized).
        oversized: why the sample was not read whole ("" when it was): it counts as ``oversized_member``.
    """

    key: str
    members: dict[str, bytes | None]
    oversized: str = ""


def _over_cap(info: tarfile.TarInfo, sample_bytes: int, policy: ReadPolicy) -> str:
    if info.size > policy.max_member_bytes:
        return f"{info.name} is {info.size} bytes, over max_member_bytes={policy.max_member_bytes}"
    if sample_bytes > policy.max_sample_bytes:
        return f"its members reach {sample_bytes} bytes at {info.name}, over max_sample_bytes={policy.max_sample_bytes}"
    return ""


def _add_member(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    ext: str,
    sample: tuple[TarSample, int],
    policy: ReadPolicy,
    read: bool,
) -> tuple[TarSample, int]:
    """Add one member to ``sample`` (``(sample, bytes read into it)``): read, skipped, or the sample marked oversized;
    returns the sample and its new size."""
    sample, sample_bytes = sample
    if ext not in _READ_MEMBERS or sample.oversized:
        sample.members[ext] = None  # skipped: tar.next() moves over the payload in small blocks
        return sample, sample_bytes
    sample_bytes += info.size
    why = _over_cap(info, sample_bytes, policy)
    if why:  # drop what was read of it: it is one oversized_member sample now
        return TarSample(sample.key, {**dict.fromkeys(sample.members), ext: None}, why), sample_bytes
    member = tar.extractfile(info)
    sample.members[ext] = member.read() if read else _drain(member)
    return sample, sample_bytes


def _drain(member: Any) -> bytes:
    """Read a member through in small chunks, keeping nothing (a stream is read through anyway to reach the next
    header): a cut inside it then shows where it shows when the member is read."""
    while member.read(_INFLATE_CHUNK):
        pass
    return b""


def iter_tar_samples(stream: Any, policy: ReadPolicy | None = None, read: bool = True) -> Iterator[TarSample]:
    """The samples of a tar read as a stream, member by member (see :class:`TarSample`).

    Members other than images and ``.json`` are skipped unread (their extension kept, value ``None``); so are
    members past ``policy.max_member_bytes``, and past ``max_sample_bytes`` for their sample, which is then
    ``oversized`` (what was read of it dropped). Skipping moves through the stream in small blocks: a member is
    held in memory only when it is read. ``read=False`` keeps no payload (a read member is ``b""``, read through
    in small chunks so that damage shows where it shows when reading), for counting.

    Raises:
        CompressedShardError: a compressed shard the policy does not accept, before anything is inflated.
        tarfile.ReadError (or the stream's error): where the tar is damaged, including an archive that ends
            without its end-of-archive block. The sample being read at the damage is yielded first only if its
            ``.json`` and every member before the damage were read whole, or it was already oversized.
    """
    policy = policy or ReadPolicy()
    sample: TarSample | None = None
    sample_bytes, reading = 0, False
    try:
        with _open_tar_stream(stream, policy) as tar:
            while (info := tar.next()) is not None:
                tar.members = []  # a stream has no use for the headers read so far
                match = _MEMBER_NAME.match(info.name) if info.isfile() else None
                if match is None:
                    continue
                key, ext = match.group(1), match.group(2).lower()
                if sample is None or key != sample.key or ext in sample.members:
                    if sample is not None:
                        yield sample
                    sample, sample_bytes = TarSample(key, {}), 0
                reading = True
                sample, sample_bytes = _add_member(tar, info, ext, (sample, sample_bytes), policy, read)
                reading = False
            _check_tar_end(getattr(tar, "dpn_end", None))
    except _TAR_ERRORS:
        whole = sample is not None and (sample.oversized or isinstance(sample.members.get("json"), bytes))
        if whole and not reading:
            yield sample  # read whole before the damage
        raise
    if sample is not None:
        yield sample


class _Damage(NamedTuple):
    """Where a shard stopped: ``reason`` (``truncated_shard``, ``unsupported_format``), after ``num_read`` samples."""

    reason: str
    error: BaseException
    num_read: int


def _shard_items(stream: Any, policy: ReadPolicy | None, read: bool) -> Iterator[TarSample | _Damage]:
    """The samples of one shard, then at most one :class:`_Damage` (the reader's and the counter's one loop)."""
    samples = iter_tar_samples(stream, policy, read)
    num_read = 0
    while True:
        try:
            item = next(samples, None)
        except CompressedShardError as err:
            yield _Damage(BadReason.UNSUPPORTED_FORMAT, err, num_read)
            return
        except _TAR_ERRORS as err:
            if is_retried_io_error(err):
                raise
            yield _Damage(BadReason.TRUNCATED_SHARD, err, num_read)
            return
        if item is None:
            return
        num_read += 1
        yield item


def iter_webdataset_rows(
    stream: Any, path: str, policy: ReadPolicy | None = None
) -> Iterator[dict[str, Any]]:
    """Normalised rows of one WebDataset shard; a damaged shard yields the samples read before the
    damage, then one ``truncated_shard`` row for the rest (see the module docstring); a compressed shard the
    ``policy`` refuses is one ``unsupported_format`` row, and an oversized sample one ``oversized_member`` row."""
    name = posixpath.basename(path)
    for item in _shard_items(stream, policy, read=True):
        if isinstance(item, TarSample) and not item.oversized:
            yield normalise_webdataset_sample(item.key, item.members, path)
        elif isinstance(item, TarSample):
            logger.debug("sample %s of %s is not read: %s", item.key, path, item.oversized)
            yield _bad_row(item.key, BadReason.OVERSIZED_MEMBER, path)
        elif item.reason == BadReason.TRUNCATED_SHARD:
            yield truncated_row(path, item.num_read, item.error)
        else:
            logger.warning("%s: %s; it counts as one %s sample", path, item.error, item.reason)
            yield _bad_row(f"{name}: {_detail(item.error)}", item.reason, path)


def count_webdataset_rows(stream: Any, policy: ReadPolicy | None = None) -> tuple[int, str]:
    """The number of rows :func:`iter_webdataset_rows` yields for a shard, and what damaged it ("" when nothing
    did), keeping no payload in memory: members are grouped into samples from their headers, and the stream is read
    through in small chunks (a stream cannot seek; every header is behind the payloads before it)."""
    count, damage = 0, ""
    for item in _shard_items(stream, policy, read=False):
        count += 1
        if isinstance(item, _Damage):
            damage = f"{item.reason} after {item.num_read} samples: {_detail(item.error)}"
    return count, damage


class WebDatasetShards(FileBasedDatasource):
    """Ray Data source of WebDataset tar shards read member by member (:func:`iter_webdataset_rows`):
    unlike ``read_webdataset``, a damaged shard is counted, not raised, and the ``policy``'s caps apply."""

    _FILE_EXTENSIONS = ["tar"]

    def __init__(self, paths: str | list[str], policy: ReadPolicy | None = None, **kwargs: Any):
        super().__init__(paths, **kwargs)
        self._policy = policy or ReadPolicy()

    def _read_stream(self, f: pa.NativeFile, path: str) -> Iterator[pa.Table]:
        yield from _blocks(iter_webdataset_rows(f, path, self._policy))


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
# Counting rows as the readers read them
# ----------------------------------------------------------------------------------------------


def count_json_rows(data: bytes, path: str) -> tuple[int, str]:
    """The number of rows the LLaVA JSON reader yields for one file's ``data`` (the records before any damage,
    plus one ``truncated_shard`` row for the rest), and what damaged it ("" when nothing did)."""
    count = 0
    try:
        for _ in iter_json_records(data, path):
            count += 1
    except TruncatedFileError as err:
        return count + 1, f"{BadReason.TRUNCATED_SHARD} after {count} samples: {_detail(err)}"
    return count, ""


def count_file_rows(fs: pafs.FileSystem, path: str, policy: ReadPolicy | None = None) -> tuple[int, str]:
    """The number of rows the reader of one data file yields (bad rows included), and what damaged the file (""
    when nothing did). Never raises for a damaged file: it counts as the reader reads it, the rows before the
    damage plus one for the rest. Only transient storage errors that Ray retries are raised.

    Reads metadata only where the format allows: a Parquet footer's row count (a file without a readable footer
    is one row), tar member headers with no payload held in memory (a compressed shard the
    ``policy`` refuses is one row), and the records of a JSON file, parsed as the reader parses them.
    """
    fmt = FORMAT_BY_EXTENSION.get(posixpath.splitext(path)[1].lower())
    try:
        if fmt == "parquet":
            with fs.open_input_file(path) as f:
                return pq.ParquetFile(f).metadata.num_rows, ""
        with fs.open_input_stream(path) as f:
            if fmt == "webdataset":
                return count_webdataset_rows(f, policy)
            return count_json_rows(f.read(), path)
    except (*_PARQUET_ERRORS, *_TAR_ERRORS) as err:  # unreadable file or footer
        if is_retried_io_error(err):
            raise
        return 1, f"{BadReason.TRUNCATED_SHARD} after 0 samples: {_detail(err)}"


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
    policy: ReadPolicy | None = None,
) -> ray.data.Dataset:
    """Read any supported format into a Ray Dataset of :data:`ROW_SCHEMA` rows (bad rows included).

    Args:
        path: file, folder, glob or dataset root (local path or URI), or a resolved :class:`DataSource`.
        split: split to read from a dataset root (``"train"``, ``"eval"``); ``None`` reads all files.
        filesystem: pyarrow filesystem to use instead of the one the URI names.
        image_folder: folder that relative LLaVA image paths are resolved against.
        override_num_blocks: passed to Ray's reader.
        policy: what may be read (image roots, tar compression, byte caps); default :class:`ReadPolicy` ``()``.

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
            fn_kwargs={"image_folder": source.image_folder, "policy": policy},
        )
        return ds.map_batches(
            load_image_bytes, batch_format="pyarrow", fn_kwargs={"filesystem": fs, "policy": policy}
        )
    if source.format == "webdataset":
        return ray.data.read_datasource(
            WebDatasetShards(paths, policy=policy, filesystem=fs), override_num_blocks=override_num_blocks
        )
    if source.format == "parquet":
        return ray.data.read_datasource(
            ParquetFiles(paths, filesystem=fs), override_num_blocks=override_num_blocks
        )
    raise ValueError(f"unknown format {source.format!r}")
