"""Writing state files so that a reader never sees half of one.

A job that crashes (or is killed) while it writes a marker such as ``mix.json`` must leave the old content or the
new one, never a torn file that every re-run then fails to parse. :func:`atomic_write_text` is the one way jobs
write such files.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Replace the content of ``path`` with ``text`` in one step.

    * A local path is written to a hidden temporary file in the same folder (same filesystem, so the rename is
      atomic), flushed to disk, then renamed over ``path`` with ``os.replace``: a crash at any point leaves the
      old file intact (or no file) and at most a stray ``.NAME.*.tmp``, whose leading dot keeps it out of shard
      discovery. The temporary file is created with the process umask, like ``Path.write_text``.
    * A URI (``s3://``, ``gs://``, ...) has no rename: the object is written with one ``write`` of the complete
      content and published when the stream closes (pyarrow sends an object this small as a single PUT, which S3
      and GCS make visible atomically: readers see the old object or the new one). ``file://`` URIs are local paths.

    Args:
        path: local path or URI of the file.
        text: its new content.
        encoding: text encoding.
    """
    target = os.fspath(path)
    data = text.encode(encoding)
    if "://" in target:
        fs, inner = pafs.FileSystem.from_uri(target)
        if not isinstance(fs, pafs.LocalFileSystem):
            with fs.open_output_stream(inner) as out:
                out.write(data)
            return
        target = inner
    _replace_local(Path(target), data)


def _replace_local(target: Path, data: bytes) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every platform)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


__all__ = ["atomic_write_text"]
