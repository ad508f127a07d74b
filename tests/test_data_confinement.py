"""Data confinement (issue 25, "Data confinement"): the readers open only what the data's policy allows.

On hand-made files, no Ray cluster: image refs that leave the image root (``..``, absolute paths, other schemes,
NUL bytes, backslashes, a symlink out of the root) are the bad sample ``path_outside_root`` and never opened; a
property test over arbitrary ref strings; the allowed roots and schemes when configured; tar shards that are
compressed (a gzip bomb among them) or hold an oversized member or sample; images in a format or of a size the
policy does not accept.
"""

from __future__ import annotations

import io
import json
import posixpath
import struct
import tarfile
import tracemalloc
import urllib.parse
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from data_samples import (
    conversation,
    good_records,
    png_bytes,
    webdataset_members,
    write_tar,
    write_webdataset,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.accounting import BadReason
from pipelines.formats import (
    ReadPolicy,
    iter_webdataset_rows,
    load_image_bytes,
    parse_json_files,
    resolve_image_ref,
)
from pipelines.preprocess import decode_images

SECRET = png_bytes((1, 2, 3), size=(7, 7))  # outside the image root: must never be read
GOOD = png_bytes((200, 30, 30))


# ------------------------------------------------------------------------------------------------
# LLaVA JSON image refs
# ------------------------------------------------------------------------------------------------


class _RecordingFileSystem:
    """A local filesystem (fsspec, wrapped for pyarrow) that records every file opened."""

    @staticmethod
    def make() -> tuple[pafs.FileSystem, list[str]]:
        local = pytest.importorskip("fsspec.implementations.local")

        opened: list[str] = []

        class Recording(local.LocalFileSystem):
            cachable = False

            def _open(self, path, mode="rb", **kwargs):
                opened.append(str(path))
                return super()._open(path, mode, **kwargs)

        return pafs.PyFileSystem(pafs.FSSpecHandler(Recording())), opened


def _layout(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp/ds`` (the dataset: ``images/ok.png``), the secret next to it and in a sibling ``ds2``."""
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "images" / "ok.png").write_bytes(GOOD)
    secret = tmp_path / "secret.png"
    secret.write_bytes(SECRET)
    (tmp_path / "ds2").mkdir()
    (tmp_path / "ds2" / "secret.png").write_bytes(SECRET)
    return root, secret


def _rows(root: Path, refs: list[str], fs: pafs.FileSystem | None = None, **policy) -> list[dict]:
    """The rows of ``root/train.jsonl`` holding one record per ref, through both LLaVA stages."""
    records = [
        {"id": f"r{i}", "image": ref, "conversations": conversation("q?", "a")} for i, ref in enumerate(refs)
    ]
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = pa.table({"bytes": [path.read_bytes()], "path": [str(path)]})
    read_policy = ReadPolicy(**policy)
    parsed = pa.concat_tables(parse_json_files(table, None, read_policy))
    return load_image_bytes(parsed, fs or pafs.LocalFileSystem(), read_policy).to_pylist()


def _escapes(tmp_path: Path, secret: Path) -> list[str]:
    return [
        "../secret.png",
        "a/../../secret.png",
        "images/../../secret.png",
        "../ds2/secret.png",  # a sibling whose name extends the root's: the prefix test ends with "/"
        str(secret),
        "/etc/passwd",
        f"file://{secret}",
        "file:///etc/passwd",
        "s3://other-bucket/x.png",
        "gs://other-bucket/x.png",
        "http://169.254.169.254/latest/meta-data/",
        "images/ok.png\x00../../secret.png",
        "..\\secret.png",
        "C:/secret.png",
        "C:\\secret.png",
        ".",
    ]


def test_refs_that_leave_the_root_are_path_outside_root_and_never_opened(tmp_path):
    root, secret = _layout(tmp_path)
    escapes = _escapes(tmp_path, secret)
    fs, opened = _RecordingFileSystem.make()
    rows = _rows(root, ["images/ok.png", "./images//ok.png", *escapes], fs)
    assert [r["bad_reason"] for r in rows[:2]] == ["", ""] and rows[0]["image"] == GOOD
    for ref, row in zip(escapes, rows[2:]):
        assert row["bad_reason"] == BadReason.PATH_OUTSIDE_ROOT, ref
        assert row["image"] is None
    assert opened == [str(root / "images" / "ok.png")] * 2  # nothing else was opened, the secret least of all


def test_a_symlink_out_of_the_root_is_refused_and_one_inside_is_followed(tmp_path):
    root, secret = _layout(tmp_path)
    (root / "images" / "out.png").symlink_to(secret)
    (root / "images" / "dir").symlink_to(tmp_path / "ds2", target_is_directory=True)
    (root / "images" / "alias.png").symlink_to(root / "images" / "ok.png")
    rows = _rows(root, ["images/out.png", "images/dir/secret.png", "images/alias.png"])
    assert [r["bad_reason"] for r in rows] == [BadReason.PATH_OUTSIDE_ROOT, BadReason.PATH_OUTSIDE_ROOT, ""]
    assert rows[0]["image"] is None and rows[2]["image"] == GOOD


def test_allowed_roots_and_schemes_admit_what_they_name_and_nothing_more(tmp_path):
    root, secret = _layout(tmp_path)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "x.png").write_bytes(GOOD)
    refs = [str(extra / "x.png"), f"file://{extra}/x.png", str(secret), f"file://{secret}"]
    by_path = _rows(root, refs, allowed_image_roots=[str(extra)])
    # a plain-path root admits plain paths only, not file:// URIs
    assert [r["bad_reason"] for r in by_path] == ["", *[BadReason.PATH_OUTSIDE_ROOT] * 3]
    assert by_path[0]["image"] == GOOD
    by_uri = _rows(root, refs, allowed_image_roots=[f"file://{extra}"])
    assert [r["bad_reason"] for r in by_uri] == [
        BadReason.PATH_OUTSIDE_ROOT,
        "",
        *[BadReason.PATH_OUTSIDE_ROOT] * 2,
    ]
    assert by_uri[1]["image"] == GOOD
    anywhere = _rows(root, refs, allowed_image_schemes=["file"])
    assert [r["bad_reason"] for r in anywhere] == [
        BadReason.PATH_OUTSIDE_ROOT,
        "",
        BadReason.PATH_OUTSIDE_ROOT,
        "",
    ]


def test_an_image_file_past_the_byte_cap_is_oversized_not_read(tmp_path):
    root, _ = _layout(tmp_path)
    rows = _rows(root, ["images/ok.png"], max_member_bytes=len(GOOD) - 1)
    assert rows[0]["bad_reason"] == BadReason.OVERSIZED_MEMBER and rows[0]["image"] is None


def test_uri_roots_are_matched_by_scheme_host_and_normalised_decoded_path():
    policy = ReadPolicy(allowed_image_roots=["s3://bucket/imgs"])
    assert resolve_image_ref("s3://bucket/imgs/a%20b.png", "bucket/ds", policy) == (
        "s3://bucket/imgs/a%20b.png",
        "",
    )
    for ref in (
        "s3://bucket/imgs/../secret",
        "s3://bucket/imgs/%2e%2e/secret",  # pyarrow decodes %2e%2e into ..
        "s3://bucket/imgs/%2E%2E%2fsecret",
        "s3://bucket/imgsx/a.png",
        "s3://other/imgs/a.png",
        "s3://user:pw@bucket/imgs/a.png",
        "s3://bucket/imgs/a.png?versionId=1",
        "s3://bucket/imgs",
    ):
        assert resolve_image_ref(ref, "bucket/ds", policy) is None, ref
    # relative refs under a URI root (the fs-internal "bucket/ds") stay inside it
    assert resolve_image_ref("coco/x.jpg", "bucket/ds", policy) == ("bucket/ds/coco/x.jpg", "bucket/ds")
    assert resolve_image_ref("../x.jpg", "bucket/ds", policy) is None


ROOT = "/data/ds"
POLICY = ReadPolicy(allowed_image_roots=["/mnt/extra", "s3://bucket/imgs"], allowed_image_schemes=["gs"])
_SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "a",
        "images",
        "ds",
        "ds2",
        "%2e%2e",
        "%2E%2e",
        "%2f",
        "%00",
        "%5c",
        "C:",
        "~",
        "\\",
        "..\\..",
        "x.png",
    ]
)
_PREFIXES = st.sampled_from(
    [
        "",
        "/",
        "//",
        "./",
        "../",
        "/data/ds/",
        "/data/ds2/",
        "/mnt/extra/",
        "/mnt/extra2/",
        "file://",
        "file:///",
        "s3://bucket/imgs/",
        "s3://bucket/",
        "S3://bucket/imgs/",
        "s3://other/",
        "gs://any/",
        "http://169.254.169.254/",
        "C:",
        "c:\\",
        "\\\\server\\share\\",
        "\x00",
    ]  # fmt: skip
)


@st.composite
def _path_strings(draw: st.DrawFn) -> str:
    segments = draw(st.lists(_SEGMENTS, max_size=8))
    return draw(_PREFIXES) + draw(st.sampled_from(["/", "//"])).join(segments)


def _is_below(path: str, root: str) -> bool:
    """Independent of the reader's check: a pure path strictly below ``root``, without dot segments."""
    pure = PurePosixPath(path)
    return pure != PurePosixPath(root) and pure.is_relative_to(root) and not {".", ".."} & set(pure.parts)


@settings(max_examples=600, deadline=None)
@given(st.one_of(st.text(), _path_strings()))
def test_any_path_string_is_refused_or_resolves_inside_an_allowed_root(ref):
    resolved = resolve_image_ref(ref, ROOT, POLICY)
    if resolved is None:
        return
    location, _ = resolved
    assert "\x00" not in location and "\\" not in location
    if "://" not in location:
        assert location == posixpath.normpath(location)
        assert _is_below(location, ROOT) or _is_below(location, "/mnt/extra"), (ref, location)
        return
    parts = urllib.parse.urlsplit(location)
    path = urllib.parse.unquote(parts.path)  # what pyarrow opens
    assert path == posixpath.normpath(path) and "\x00" not in path and "\\" not in path
    assert parts.scheme == "gs" or (
        (parts.scheme, parts.netloc) == ("s3", "bucket") and _is_below(path, "/imgs")
    ), (ref, location)


def test_policy_config_refuses_relative_roots_and_schemes_with_separators():
    with pytest.raises(ValueError, match="not an absolute path or a URI"):
        ReadPolicy(allowed_image_roots=["images"])
    with pytest.raises(ValueError, match="not a URI scheme"):
        ReadPolicy(allowed_image_schemes=["s3://"])
    with pytest.raises(ValueError, match="not an image format PIL reads"):
        ReadPolicy(image_formats=["png", "exe"])
    assert ReadPolicy(image_formats=["png"]).image_formats == ["PNG"]


# ------------------------------------------------------------------------------------------------
# Tar shards: plain tar only, byte caps per member and per sample
# ------------------------------------------------------------------------------------------------


def _rows_of(data: bytes | Path, **policy) -> list[dict]:
    if isinstance(data, Path):
        with open(data, "rb") as f:
            return list(iter_webdataset_rows(f, str(data), ReadPolicy(**policy)))
    return list(iter_webdataset_rows(io.BytesIO(data), "/d/train-000000.tar", ReadPolicy(**policy)))


def _tar(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class _CountingStream(io.BytesIO):
    """Counts the bytes a reader takes from it."""

    taken = 0

    def read(self, size: int | None = -1) -> bytes:
        out = super().read(size)
        self.taken += len(out)
        return out


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_shard_is_one_unsupported_format_sample_unless_configured(mode):
    data = _tar(webdataset_members(good_records(2, text_only=1)), mode)
    rows = _rows_of(data)
    assert [r["bad_reason"] for r in rows] == [BadReason.UNSUPPORTED_FORMAT]
    assert rows[0]["source_file"] == "/d/train-000000.tar" and "tar_compression" in rows[0]["id"]
    compression = {"w:gz": "gzip", "w:bz2": "bzip2", "w:xz": "xz"}[mode]
    assert [r["bad_reason"] for r in _rows_of(data, tar_compression=[compression])] == ["", "", ""]


def _bomb_members(size: int) -> list[tuple[str, bytes]]:
    meta = json.dumps({"conversations": conversation("q", "a", image=False)}).encode()
    return [("a.json", meta), ("b.png", bytes(size)), ("b.json", meta), ("c.json", meta)]


def test_a_gzip_bomb_is_refused_without_inflating_it():
    bomb = _tar(_bomb_members(48 << 20), "w:gz")  # about 50 kB that inflates to 48 MB
    assert len(bomb) < 200_000
    stream = _CountingStream(bomb)
    tracemalloc.start()
    try:
        rows = list(iter_webdataset_rows(stream, "/d/bomb.tar"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r["bad_reason"] for r in rows] == [BadReason.UNSUPPORTED_FORMAT]
    assert (
        stream.taken <= tarfile.BLOCKSIZE and peak < 2 << 20
    )  # the first block was sniffed, nothing inflated


def test_an_allowed_gzip_shard_inflates_in_bounded_steps_and_skips_its_oversized_member():
    bomb = _tar(_bomb_members(48 << 20), "w:gz")
    tracemalloc.start()
    try:
        rows = _rows_of(bomb, tar_compression=["gzip"], max_member_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r["id"], r["bad_reason"]) for r in rows] == [
        ("a", ""),
        ("b", BadReason.OVERSIZED_MEMBER),
        ("c", ""),
    ]
    assert peak < 8 << 20  # tarfile's own r|gz holds about 30 MB of this bomb at once


def test_an_oversized_member_is_skipped_unread_and_the_other_samples_kept(tmp_path):
    member = 50 << 20
    path = tmp_path / "train-000000.tar"
    meta = json.dumps({"conversations": conversation("q", "a")}).encode()
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.png", GOOD), ("a.json", meta)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("big.png")
        info.size = member
        tar.addfile(info, io.BytesIO(bytes(member)))
        for name, data in [("big.json", meta), ("c.png", GOOD), ("c.json", meta)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tracemalloc.start()
    try:
        rows = _rows_of(path, max_member_bytes=8 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(r["id"], r["bad_reason"]) for r in rows] == [
        ("a", ""),
        ("big", BadReason.OVERSIZED_MEMBER),
        ("c", ""),
    ]
    assert rows[0]["image"] == GOOD and rows[1].get("image") is None and rows[1]["source_file"] == str(path)
    assert peak < member // 10, f"the reader held {peak} bytes for a {member}-byte member it skips"


def test_a_sample_past_the_per_sample_cap_is_oversized_member(tmp_path):
    members = webdataset_members(good_records(3, text_only=0))
    cap = len(members[0][1]) + 10  # img0.png fits, with its .json it does not
    rows = _rows_of(write_tar(tmp_path, members), max_sample_bytes=cap, max_member_bytes=cap)
    assert [r["bad_reason"] for r in rows] == [BadReason.OVERSIZED_MEMBER] * 3
    big = ("img1.png", png_bytes(size=(300, 300)))
    members = [m if m[0] != "img1.png" else big for m in webdataset_members(good_records(3, text_only=0))]
    cap = len(big[1])  # every member fits on its own; img1 with its .json does not
    rows = _rows_of(write_tar(tmp_path, members, "b.tar"), max_sample_bytes=cap)
    assert [(r["id"], r["bad_reason"]) for r in rows] == [
        ("img0", ""),
        ("img1", BadReason.OVERSIZED_MEMBER),
        ("img2", ""),
    ]


def test_a_huge_member_name_is_a_damaged_shard_not_read_into_memory(tmp_path):
    members = webdataset_members(good_records(1, text_only=0))
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [*members, ("x" * (2 << 20) + ".json", b"{}")]:  # a 2 MB GNU long-name record
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows = _rows_of(path)
    assert [r["bad_reason"] for r in rows] == ["", BadReason.TRUNCATED_SHARD]
    assert "header extension" in rows[1]["id"]


def test_default_policy_reads_a_plain_shard_as_before(tmp_path):
    rows = _rows_of(write_webdataset(tmp_path, good_records(3, text_only=1)))
    assert [r["bad_reason"] for r in rows] == ["", "", "", ""]


# ------------------------------------------------------------------------------------------------
# Decoding: configured formats only, a pixel cap
# ------------------------------------------------------------------------------------------------


def _encoded(fmt: str, size: tuple[int, int] = (12, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 10)).save(buf, fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG declaring ``width`` x ``height`` with no pixels: a few dozen bytes for any declared size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def _decode(images: list[bytes], **policy) -> list[str]:
    from dpn_model.image_processing import DPNImageProcessor

    processor = DPNImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    batch = {
        "id": np.array([f"s{i}" for i in range(len(images))]),
        "image": np.array(images, dtype=object),
        "bad_reason": np.array([""] * len(images)),
    }
    out = decode_images(batch, processor, policy=ReadPolicy(**policy))
    assert out["has_image"].tolist() == [r == "" for r in out["bad_reason"].tolist()]
    return out["bad_reason"].tolist()


def test_only_the_configured_image_formats_are_decoded():
    images = [_encoded("PNG"), _encoded("JPEG"), _encoded("WEBP"), _encoded("TIFF"), _encoded("PPM"), b"junk"]
    unsupported = BadReason.UNSUPPORTED_FORMAT
    assert _decode(images) == ["", "", "", unsupported, unsupported, BadReason.CORRUPT_IMAGE]
    assert _decode(images, image_formats=["png", "tiff"]) == [
        "", unsupported, unsupported, "", unsupported, BadReason.CORRUPT_IMAGE,
    ]  # fmt: skip


def test_an_image_past_the_pixel_cap_is_oversized_before_it_is_decoded():
    assert _decode([_encoded("PNG", (20, 10)), _encoded("PNG", (10, 10))], max_image_pixels=100) == [
        BadReason.OVERSIZED_MEMBER,
        "",
    ]
    # 40000 x 40000 declared in 60 bytes: PIL's own decompression-bomb guard fires at open, whatever our cap
    assert _decode([_png_header(40000, 40000)], max_image_pixels=10**10) == [BadReason.OVERSIZED_MEMBER]
    assert _decode([_png_header(9000, 9000)]) == [
        BadReason.OVERSIZED_MEMBER
    ]  # 81 Mpx: over the default 64 Mpx
