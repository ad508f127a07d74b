"""Small datasets written in every supported format, and a tiny saved processor, for the data tests."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE_SIZE = 32  # processor output side
IMAGE_SEQ_LENGTH = 16  # visual tokens per image


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (40, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def truncated_png() -> bytes:
    """A PNG cut in the middle of its pixel data: opens (header fine), fails to load."""
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, "PNG")
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


def conversation(question: str, answer: str, image: bool = True) -> list[dict[str, str]]:
    prefix = "<image>\n" if image else ""
    return [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]


def good_records(n: int = 4, text_only: int = 1) -> list[dict[str, Any]]:
    """``n`` image samples plus ``text_only`` samples without image, LLaVA style (image bytes inline
    under ``_bytes``; writers turn them into files)."""
    colors = ["red", "green", "blue", "yellow"]
    records = []
    for i in range(n):
        color = colors[i % len(colors)]
        rgb = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 230, 20)}[
            color
        ]
        records.append(
            {
                "id": f"img{i}",
                "_bytes": png_bytes(rgb),
                "conversations": conversation("What colour is the large shape?", color),
                "family": "big_color",
                "kind": "coarse",
            }
        )
    for i in range(text_only):
        records.append(
            {"id": f"txt{i}", "conversations": conversation("Is there an answer?", "yes", image=False)}
        )
    return records


def write_llava(root: Path, records: list[dict[str, Any]], name: str = "train.json") -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for record in records:
        row = {k: v for k, v in record.items() if k != "_bytes"}
        if "_bytes" in record:
            row["image"] = f"images/{record['id']}.png"
            (root / row["image"]).write_bytes(record["_bytes"])
        rows.append(row)
    path = root / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset_members(records: list[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` tar members of ``records``: ``KEY.png`` (if any), then ``KEY.json``."""
    members = []
    for record in records:
        key = record["id"]
        if "_bytes" in record:
            members.append((f"{key}.png", record["_bytes"]))
        meta = {k: v for k, v in record.items() if k != "_bytes"}
        members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


def write_tar(root: Path, members: list[tuple[str, bytes]], name: str = "train-000000.tar") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    with tarfile.open(path, "w") as tar:
        for member_name, data in members:
            _member(tar, member_name, data)
    return path


def write_webdataset(root: Path, records: list[dict[str, Any]], name: str = "train-000000.tar") -> Path:
    return write_tar(root, webdataset_members(records), name)


def truncate(path: Path, size: int | None = None) -> Path:
    """Cut ``path`` to ``size`` bytes (default: half of it), as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])
    return path


def member_offset(path: Path, name: str) -> tuple[int, int]:
    """``(offset of the member's data, its size)`` inside the tar ``path``."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def write_parquet(root: Path, records: list[dict[str, Any]], name: str = "train-000000.parquet") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("conversations", pa.list_(turn)),
            ("family", pa.string()),
            ("kind", pa.string()),
        ]
    )
    rows = [
        {
            "id": r["id"],
            "image": {"bytes": r["_bytes"], "path": None} if "_bytes" in r else None,
            "conversations": r["conversations"],
            "family": r.get("family"),
            "kind": r.get("kind"),
        }
        for r in records
    ]
    path = root / name
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


WRITERS = {"llava_json": write_llava, "webdataset": write_webdataset, "parquet": write_parquet}


def save_processor(directory: Path) -> Path:
    """A tiny DPN processor (locally trained tokenizer, 32 px images, 16 image tokens), saved."""
    from dpn_model.image_processing import DPNImageProcessor
    from dpn_model.processing import DPNProcessor
    from dpn_model.tokenization import build_tokenizer

    image_processor = DPNImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = DPNProcessor(image_processor, build_tokenizer(), image_seq_length=IMAGE_SEQ_LENGTH)
    processor.save_pretrained(str(directory))
    return directory
