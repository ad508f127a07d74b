"""Retraining that keeps running (issue 25): shard discovery on damaged shards, and the state files of
jobs/retraining/shards.

No Ray: discovery counts a cut ``.json``, invalid UTF-8, a cut ``.parquet``, a truncated or compressed tar as the
readers read them (counted, named, never raised), counts a tar from its headers (memory bounded with a 50 MB
member), and the ``mix.json`` marker is written by temp-and-rename and rebuilt when torn.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from data_samples import (
    good_records,
    member_offset,
    truncate,
    webdataset_members,
    write_llava,
    write_parquet,
    write_webdataset,
)

from jobs.retraining.shards import (
    MIX_MARKER,
    build_mix,
    list_shards,
    read_mix,
    shards_from_json,
    shards_to_json,
)
from pipelines.formats import ReadPolicy
from pipelines.storage import atomic_write_text

# ------------------------------------------------------------------------------------------------
# Discovery on damaged shards
# ------------------------------------------------------------------------------------------------


def _damaged_root(root: Path) -> Path:
    write_llava(root, good_records(3, text_only=1), "train-a-good.json")  # 4 rows
    write_parquet(root, good_records(5, text_only=0), "train-b-good.parquet")  # 5 rows
    write_webdataset(root, good_records(2, text_only=1), "train-c-good.tar")  # 3 rows
    cut_json = write_llava(root, good_records(4, text_only=0), "train-d-cut.json")
    data = cut_json.read_bytes()
    cut_json.write_bytes(data[: data.index(b'"img2"') + 3])  # img0, img1, then the cut: 3 rows
    bad_text = write_llava(root, good_records(3, text_only=0), "train-e-utf8.json")
    bad_text.write_bytes(bad_text.read_bytes().replace(b'"green"', b'"gr\xffen"'))  # 3 rows, one bad_encoding
    bad_structure = root / "train-f-utf8.jsonl"
    bad_structure.write_bytes(
        b'{"id": "x", "question": "q"}\n\xff\xfe{not json\n{"id": "y", "question": "q"}\n'
    )
    truncate(write_parquet(root, good_records(4, text_only=0), "train-g-cut.parquet"))  # 1 row
    tar = write_webdataset(root, good_records(4, text_only=0), "train-h-cut.tar")
    offset, size = member_offset(tar, "img2.png")
    truncate(tar, offset + size // 2)  # img0, img1, then the cut: 3 rows
    gz = root / "train-i-gzip.tar"
    with tarfile.open(gz, "w:gz") as out:
        for name, payload in webdataset_members(good_records(2, text_only=0)):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            out.addfile(info, io.BytesIO(payload))  # refused by the default policy: 1 row
    return root


EXPECTED = {
    "train-a-good.json": 4,
    "train-b-good.parquet": 5,
    "train-c-good.tar": 3,
    "train-d-cut.json": 3,
    "train-e-utf8.json": 3,
    "train-f-utf8.jsonl": 3,
    "train-g-cut.parquet": 1,
    "train-h-cut.tar": 3,
    "train-i-gzip.tar": 1,
}
DAMAGED = {
    "train-d-cut.json": "truncated_shard after 2 samples",
    "train-g-cut.parquet": "truncated_shard after 0 samples",
    "train-h-cut.tar": "truncated_shard after 2 samples",
    "train-i-gzip.tar": "unsupported_format",
}


def test_discovery_counts_damaged_shards_as_the_readers_do_names_them_and_never_raises(tmp_path, caplog):
    root = _damaged_root(tmp_path / "root")
    with caplog.at_level(logging.WARNING, logger="jobs.retraining.shards"):
        shards = list_shards(str(root))
    assert {s.name: s.num_samples for s in shards} == EXPECTED
    damaged = {s.name: s.damaged for s in shards if s.damaged}
    assert set(damaged) == set(DAMAGED)
    for name, what in DAMAGED.items():
        (entry,) = damaged[name]
        assert entry.startswith(f"{root / name}: {what}"), entry
        assert any(name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records), name
    # the same shards round-trip through the plan's JSON
    again = shards_from_json(json.loads(json.dumps(shards_to_json(shards))))
    assert again == shards


def test_discovery_counts_an_allowed_compressed_shard(tmp_path):
    root = _damaged_root(tmp_path / "root")
    shards = {s.name: s for s in list_shards(str(root), policy=ReadPolicy(tar_compression=["gzip"]))}
    assert shards["train-i-gzip.tar"].num_samples == 2 and shards["train-i-gzip.tar"].damaged == ()


def test_counts_of_the_synthetic_formats_match_their_sample_numbers(tmp_path):
    from pipelines.synthetic import write_synthetic_dataset

    for fmt in ("llava", "parquet", "webdataset"):
        root = tmp_path / fmt
        write_synthetic_dataset(root, fmt, num_train=13, num_eval=3, seed=0, samples_per_shard=5)
        shards = list_shards(str(root))
        assert sum(s.num_samples for s in shards) == 13 and not any(s.damaged for s in shards), fmt


def test_counting_a_tar_reads_headers_only_with_a_50_mb_member(tmp_path):
    members = webdataset_members(good_records(2, text_only=0))
    path = tmp_path / "root" / "train-000000.tar"
    path.parent.mkdir()
    big = 50 << 20
    with tarfile.open(path, "w") as out:
        for name, payload in [*members[:2], ("big.png", None), ("big.json", b"{}"), *members[2:]]:
            info = tarfile.TarInfo(name)
            info.size = big if payload is None else len(payload)
            out.addfile(info, io.BytesIO(bytes(big) if payload is None else payload))
    tracemalloc.start()
    try:
        shards = list_shards(str(path.parent))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [s.num_samples for s in shards] == [3]
    assert peak < big // 10, f"counting held {peak} bytes for a tar with a {big}-byte member"


# ------------------------------------------------------------------------------------------------
# State files: temp-and-rename, and a torn marker rebuilt
# ------------------------------------------------------------------------------------------------

MARKER = {"path": "/x/data", "num_samples": 3, "new_samples": 3, "replay_samples": 0}


def test_a_crash_between_write_and_rename_leaves_the_old_marker_intact(tmp_path, monkeypatch):
    out = tmp_path / "mix"
    out.mkdir()
    atomic_write_text(out / MIX_MARKER, json.dumps(MARKER))
    assert read_mix(out) == MARKER

    def crash(*args, **kwargs):
        raise OSError("killed between write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed"):
        atomic_write_text(out / MIX_MARKER, json.dumps({**MARKER, "num_samples": 99}))
    monkeypatch.undo()
    assert read_mix(out) == MARKER
    assert sorted(p.name for p in out.iterdir()) == [MIX_MARKER]  # no temporary file left behind


def test_atomic_write_text_replaces_in_one_step_with_the_usual_permissions(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_text(path, "one")
    atomic_write_text(f"file://{path}", "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_torn_marker_is_rebuilt_not_failed_on(tmp_path, caplog):
    out = tmp_path / "mix"
    (out / "data").mkdir(parents=True)
    (out / "data" / "part-0.parquet").write_bytes(b"half a file")
    (out / MIX_MARKER).write_text(json.dumps(MARKER)[:20])  # torn by a crash while written in place
    with caplog.at_level(logging.WARNING, logger="jobs.retraining.shards"):
        assert read_mix(out) is None
    assert any("torn" in r.getMessage() and "rebuilt" in r.getMessage() for r in caplog.records)
    (out / MIX_MARKER).write_text(json.dumps({"path": "/x"}))  # parses, but is no complete marker
    assert read_mix(out) is None
    # build_mix then starts over: the torn mix is removed before anything is read (no new shard: the error)
    with pytest.raises(ValueError, match="at least one new shard"):
        build_mix(out, [], [], 0.0, 0, seed=0)
    assert list(out.iterdir()) == []


def test_a_complete_marker_is_reused(tmp_path):
    out = tmp_path / "mix"
    out.mkdir()
    atomic_write_text(out / MIX_MARKER, json.dumps(MARKER))
    assert build_mix(out, [], [], 0.0, 0, seed=0) == MARKER  # reused as is: nothing is read
