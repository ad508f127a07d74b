"""Readers, accounting, preprocessing and collation, tested per batch: no Ray cluster needed."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest
from data_samples import (
    IMAGE_SEQ_LENGTH,
    IMAGE_SIZE,
    conversation,
    good_records,
    png_bytes,
    save_processor,
    truncated_png,
    write_llava,
    write_parquet,
    write_webdataset,
)

from dpn_model.processing import IGNORE_INDEX
from pipelines.accounting import BadDataError, BadReason, BadSampleReport, count_rows, split_bad_rows
from pipelines.formats import (
    ROW_SCHEMA,
    iter_json_records,
    load_image_bytes,
    normalise_conversations,
    normalise_parquet,
    normalise_record,
    normalise_webdataset_sample,
    parse_json_files,
    resolve_source,
)
from pipelines.preprocess import (
    collate_batch,
    decode_image,
    decode_images,
    tokenize_batch,
)

# ------------------------------------------------------------------------------------------------
# Resolving paths
# ------------------------------------------------------------------------------------------------


def test_resolve_source_splits_globs_and_formats(tmp_path):
    records = good_records(2)
    write_llava(tmp_path, records, "train.json")
    write_llava(tmp_path, records, "eval.json")
    (tmp_path / "synthetic.json").write_text("{}")  # a manifest, not data
    assert [p.rsplit("/", 1)[1] for p in resolve_source(str(tmp_path), "train").paths] == ["train.json"]
    assert [p.rsplit("/", 1)[1] for p in resolve_source(str(tmp_path)).paths] == ["eval.json", "train.json"]
    with pytest.raises(FileNotFoundError, match="none for split='test'"):
        resolve_source(str(tmp_path), "test")

    shards = tmp_path / "wds"
    for i in range(3):
        write_webdataset(shards, records, f"train-{i:06d}.tar")
    write_webdataset(shards, records, "eval-000000.tar")
    source = resolve_source(str(shards), "train")
    assert source.format == "webdataset" and len(source.paths) == 3
    assert len(resolve_source(f"{shards}/train-00000[01].tar").paths) == 2
    assert resolve_source(f"file://{shards}/eval-000000.tar").format == "webdataset"

    write_parquet(shards, records, "train-000009.parquet")
    with pytest.raises(ValueError, match="mixes formats"):
        resolve_source(str(shards), "train")
    with pytest.raises(FileNotFoundError):
        resolve_source(str(tmp_path / "missing"))


# ------------------------------------------------------------------------------------------------
# Normalising records
# ------------------------------------------------------------------------------------------------


def test_normalise_instruction_record_carries_family_and_kind():
    record = {"id": 7, "conversations": conversation("q?", "red"), "family": "big_color", "kind": "coarse"}
    row = normalise_record(record, has_image=True, default_id="f:0")
    assert row["id"] == "7" and row["bad_reason"] == ""
    assert (row["family"], row["kind"]) == ("big_color", "coarse")
    assert json.loads(row["conversations"])[1] == {"from": "gpt", "value": "red"}


def test_normalise_eval_style_record():
    record = {
        "question_id": 3,
        "image": "a.png",
        "question": "How many?",
        "answer": "two",
        "family": "big_count",
    }
    row = normalise_record(record, has_image=True, default_id="f:0")
    assert row["id"] == "3" and row["bad_reason"] == "" and row["family"] == "big_count"
    assert json.loads(row["conversations"]) == [
        {"from": "human", "value": "<image>\nHow many?"},
        {"from": "gpt", "value": "two"},
    ]
    no_answer = normalise_record({"question_id": 4, "text": "Why?"}, has_image=False, default_id="f:1")
    assert json.loads(no_answer["conversations"]) == [{"from": "human", "value": "Why?"}]


@pytest.mark.parametrize(
    ("turns", "has_image", "reason"),
    [
        (conversation("q", "a", image=False), True, BadReason.MISSING_IMAGE_TAG),
        (conversation("q", "a", image=True), False, BadReason.MISSING_IMAGE),
        ([], True, BadReason.BAD_CONVERSATION),
        ([{"from": "gpt", "value": "a"}], False, BadReason.BAD_CONVERSATION),
        (
            [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "  "}],
            True,
            BadReason.BAD_CONVERSATION,
        ),
        ([{"from": "robot", "value": "x"}], False, BadReason.BAD_CONVERSATION),
        ("not a list", False, BadReason.BAD_CONVERSATION),
    ],
)
def test_normalise_record_flags_bad_conversations(turns, has_image, reason):
    assert (
        normalise_record({"id": "x", "conversations": turns}, has_image=has_image, default_id="")[
            "bad_reason"
        ]
        == reason
    )


def test_role_aliases_are_normalised():
    turns = [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yo"}]
    assert [t["from"] for t in normalise_conversations(turns)] == ["human", "gpt"]


def test_iter_json_records_handles_lists_lines_and_corruption():
    assert [r for _, r in iter_json_records(b'[{"id": 1}, {"id": 2}]', "a.json")] == [{"id": 1}, {"id": 2}]
    lines = list(iter_json_records(b'{"id": 1}\n\n{broken\n{"id": 3}\n', "a.jsonl"))
    assert lines == [("a.jsonl:1", {"id": 1}), ("a.jsonl:3", None), ("a.jsonl:4", {"id": 3})]
    with pytest.raises(ValueError, match="not valid JSON"):
        list(iter_json_records(b'[{"id": 1}, {"id"', "a.json"))


# ------------------------------------------------------------------------------------------------
# Format stages on Arrow batches
# ------------------------------------------------------------------------------------------------


def _run_llava(path, image_folder=None) -> list[dict]:
    import pyarrow.fs as pafs

    table = pa.table({"bytes": [path.read_bytes()], "path": [str(path)]})
    parsed = pa.concat_tables(parse_json_files(table, image_folder))
    return load_image_bytes(parsed, pafs.LocalFileSystem()).to_pylist()


def test_llava_json_rows_and_missing_image(tmp_path):
    records = good_records(2, text_only=1)
    records.append({"id": "gone", "image": "images/gone.png", "conversations": conversation("q", "a")})
    rows = _run_llava(write_llava(tmp_path, records, "train.jsonl"))
    by_id = {r["id"]: r for r in rows}
    assert by_id["img0"]["image"] == records[0]["_bytes"] and by_id["img0"]["family"] == "big_color"
    assert by_id["txt0"]["image"] is None and by_id["txt0"]["bad_reason"] == ""
    assert by_id["gone"]["bad_reason"] == BadReason.MISSING_IMAGE
    assert set(rows[0]) == set(ROW_SCHEMA.names)


def test_llava_image_folder_override(tmp_path):
    write_llava(tmp_path / "data", good_records(1, text_only=0))
    (tmp_path / "meta").mkdir()
    json_path = tmp_path / "meta" / "train.json"
    json_path.write_text((tmp_path / "data" / "train.json").read_text())
    assert _run_llava(json_path)[0]["bad_reason"] == BadReason.MISSING_IMAGE
    assert _run_llava(json_path, str(tmp_path / "data"))[0]["bad_reason"] == ""


def test_webdataset_rows_and_bad_samples():
    meta = json.dumps({"id": "a", "conversations": conversation("q", "red"), "kind": "fine"}).encode()
    samples = {
        "a": {"png": png_bytes(), "json": meta},
        "b": {"png": png_bytes(), "json": b"{oops"},
        "c": {"json": meta},
        "d": {"png": png_bytes()},
    }
    rows = [normalise_webdataset_sample(key, members) for key, members in samples.items()]
    assert rows[0]["id"] == "a" and rows[0]["kind"] == "fine" and rows[0]["bad_reason"] == ""
    assert [r["bad_reason"] for r in rows[1:]] == [
        BadReason.BAD_JSON,
        BadReason.MISSING_IMAGE,  # <image> in the text, no image member
        BadReason.MISSING_METADATA,
    ]


def test_parquet_rows_struct_image_and_question_answer():
    table = pa.table(
        {
            "image": pa.array([{"bytes": png_bytes()}, None], pa.struct([("bytes", pa.binary())])),
            "question": ["<image>\nWhat colour?", "Plain question?"],
            "answer": ["red", "yes"],
            "family": ["big_color", None],
        }
    )
    rows = normalise_parquet(table).to_pylist()
    assert rows[0]["image"] and rows[0]["bad_reason"] == "" and rows[0]["family"] == "big_color"
    assert rows[1]["image"] is None and rows[1]["bad_reason"] == "" and rows[1]["family"] == ""
    assert rows[1]["id"] == "row1"


# ------------------------------------------------------------------------------------------------
# Accounting
# ------------------------------------------------------------------------------------------------


def test_count_rows_merge_and_threshold_message():
    report = count_rows(["a", "b", "c", "d"], ["", "missing_image", "too_long", "missing_image"])
    report.merge(count_rows(["e"] * 96, [""] * 96))
    assert (report.num_samples, report.num_bad) == (100, 3)
    assert report.to_dict()["bad_by_reason"] == {"missing_image": 2, "too_long": 1}
    report.check(0.05)  # 3% is fine
    with pytest.raises(BadDataError) as err:
        report.check(0.01)
    message = str(err.value)
    assert (
        "3 of 100" in message
        and "missing_image: 2 (e.g. b, d)" in message
        and "too_long: 1 (e.g. c)" in message
    )
    restored = pickle.loads(pickle.dumps(err.value))  # crosses Ray process boundaries intact
    assert restored.report.bad_by_reason == report.bad_by_reason


def test_examples_are_capped():
    report = BadSampleReport()
    for i in range(4):
        report.merge(count_rows([f"x{i}{j}" for j in range(3)], ["bad_json"] * 3))
    assert report.bad_by_reason == {"bad_json": 12} and len(report.examples["bad_json"]) == 5


def test_split_bad_rows_keeps_good_rows():
    batch = {
        "id": np.array(["a", "b", "c"]),
        "bad_reason": np.array(["", "corrupt_image", ""]),
        "x": np.arange(3),
    }
    good, report = split_bad_rows(batch)
    assert good["x"].tolist() == [0, 2] and report.bad_by_reason == {"corrupt_image": 1}


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def test_decode_image_rejects_corrupt_and_truncated():
    assert decode_image(png_bytes(size=(5, 3))).size == (5, 3)
    for data in (b"", b"not an image at all", png_bytes()[:40], truncated_png()):
        with pytest.raises(Exception):  # noqa: B017 - Pillow raises OSError, SyntaxError, ValueError...
            decode_image(data)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    from pipelines.preprocess import load_processor

    return load_processor(str(save_processor(tmp_path_factory.mktemp("processor"))))


def test_decode_images_pads_to_square_and_flags_corrupt(processor):
    wide_red = png_bytes((255, 0, 0), size=(60, 20))
    batch = {
        "id": np.array(["ok", "bad", "text", "skipped"]),
        "image": np.array([wide_red, truncated_png(), None, png_bytes()], dtype=object),
        "bad_reason": np.array(["", "", "", "missing_image_tag"]),
    }
    out = decode_images(batch, processor.image_processor)
    assert out["pixel_uint8"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and out["pixel_uint8"].dtype == np.uint8
    assert out["has_image"].tolist() == [True, False, False, False]
    assert out["bad_reason"].tolist() == ["", "corrupt_image", "", "missing_image_tag"]
    assert "image" not in out
    # LLaVA pad-to-square: red in the middle rows, the processor's mean colour above and below.
    pixels = out["pixel_uint8"][0]
    assert tuple(pixels[IMAGE_SIZE // 2, IMAGE_SIZE // 2]) == (255, 0, 0)
    assert tuple(pixels[0, IMAGE_SIZE // 2]) == processor.image_processor.background_color


# ------------------------------------------------------------------------------------------------
# Tokenisation and label masking
# ------------------------------------------------------------------------------------------------


def _text_batch(conversations: list, images: list) -> dict[str, np.ndarray]:
    n = len(conversations)
    return {
        "id": np.array([f"s{i}" for i in range(n)]),
        "image": np.array(images, dtype=object),
        "conversations": np.array([json.dumps(c) for c in conversations], dtype=object),
        "bad_reason": np.array([""] * n),
    }


def test_labels_mask_everything_but_answers(processor):
    batch = _text_batch(
        [
            conversation("What colour is the large shape?", "red"),
            conversation("Is there a dot?", "yes", image=False)
            + [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "three"}],
        ],
        [png_bytes(), None],
    )
    out = tokenize_batch(batch, processor, max_length=256)
    tok = processor.tokenizer
    ids, labels = out["input_ids"][0], out["labels"][0]
    assert len(ids) == len(labels)
    assert (ids == processor.image_token_id).sum() == IMAGE_SEQ_LENGTH
    assert (ids == processor.router_token_id).sum() == 1
    assert (labels[ids == processor.image_token_id] == IGNORE_INDEX).all()
    learned = labels[labels != IGNORE_INDEX]
    assert tok.decode(learned).strip() == "red</s>"
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    # Two rounds: both answers learned, the prompts in between not.
    learned2 = out["labels"][1][out["labels"][1] != IGNORE_INDEX]
    assert tok.decode(learned2).replace(" ", "") == "yes</s>three</s>"
    assert (out["input_ids"][1] == processor.image_token_id).sum() == 0
    assert out["bad_reason"].tolist() == ["", ""] and "conversations" not in out


def test_too_long_and_no_answer_are_flagged(processor):
    batch = _text_batch(
        [conversation("What colour?", "red"), [{"from": "human", "value": "<image>\nno answer"}]],
        [png_bytes(), png_bytes()],
    )
    out = tokenize_batch(batch, processor, max_length=IMAGE_SEQ_LENGTH + 4)
    assert out["bad_reason"].tolist() == [BadReason.TOO_LONG, BadReason.BAD_CONVERSATION]
    assert len(out["input_ids"][0]) == 0


def test_eval_prompt_ends_with_assistant_and_keeps_answer(processor):
    batch = _text_batch([conversation("What colour is the large shape?", "red")], [png_bytes()])
    out = tokenize_batch(batch, processor, max_length=256, mode="eval")
    assert "labels" not in out
    assert out["answer"].tolist() == ["red"] and out["question"].tolist() == [
        "What colour is the large shape?"
    ]
    text = processor.tokenizer.decode(out["input_ids"][0])
    assert text.rstrip().endswith("<router> ASSISTANT:") and "red" not in text
    assert (out["input_ids"][0] == processor.image_token_id).sum() == IMAGE_SEQ_LENGTH


# ------------------------------------------------------------------------------------------------
# Collation
# ------------------------------------------------------------------------------------------------


def _ragged(rows):
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int32) for r in rows]
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_to_longest_and_stacks_present_images(processor, side):
    pixels = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    pixels[0] = 255
    pixels[2] = 0
    batch = {
        "input_ids": _ragged([[1, 5, 6], [1, 7], [1, 8, 9, 10]]),
        "labels": _ragged([[-100, -100, 6], [-100, 7], [-100, -100, 9, 10]]),
        "pixel_uint8": pixels,
        "has_image": np.array([True, False, True]),
    }
    out = collate_batch(batch, pad_token_id=3, padding_side=side, image_processor=processor.image_processor)
    assert out["input_ids"].shape == (3, 4) and out["labels"].shape == (3, 4)
    row = out["input_ids"][1].tolist()
    assert row == ([1, 7, 3, 3] if side == "right" else [3, 3, 1, 7])
    assert out["attention_mask"][1].tolist() == ([1, 1, 0, 0] if side == "right" else [0, 0, 1, 1])
    assert out["labels"][1].tolist().count(IGNORE_INDEX) == 3  # 1 masked prompt token + 2 padding
    assert out["image_mask"].tolist() == [True, False, True]
    assert out["pixel_values"].shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert out["pixel_values"][0].mean() > out["pixel_values"][1].mean()  # white first, then black


def test_collate_without_images_or_labels():
    batch = {
        "input_ids": _ragged([[1, 2], [1]]),
        "pixel_uint8": np.zeros((2, 4, 4, 3), np.uint8),
        "has_image": np.array([False, False]),
    }
    out = collate_batch(batch, pad_token_id=0)
    assert "pixel_values" not in out and "labels" not in out
    assert out["input_ids"].tolist() == [[1, 2], [1, 0]]
