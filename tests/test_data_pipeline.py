"""Ray Data integration: every format to model-ready tensors, bad-sample accounting, the threshold,
the evaluation dataset and `dpn data inspect`. One local Ray cluster for the whole module."""

from __future__ import annotations

import json

import pytest
from data_samples import (
    WRITERS,
    conversation,
    good_records,
    member_offset,
    png_bytes,
    save_processor,
    truncate,
    truncated_png,
    webdataset_members,
    write_llava,
    write_parquet,
    write_tar,
    write_webdataset,
)

from dpn_model.processing import IGNORE_INDEX
from pipelines.accounting import BadDataError, BadReason, BadSampleAccountant, find_bad_data_error
from pipelines.datasets import build_dataset, build_eval_dataset
from pipelines.preprocess import Collator

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> str:
    return str(save_processor(tmp_path_factory.mktemp("processor")))


def _bad_records() -> list[dict]:
    """One sample of each kind of bad data that a LLaVA JSONL file can hold (bad_json is a broken line)."""
    return [
        {"id": "gone", "image": "images/gone.png", "conversations": conversation("q?", "red")},
        {"id": "corrupt", "_bytes": truncated_png(), "conversations": conversation("q?", "red")},
        {"id": "notag", "_bytes": png_bytes(), "conversations": conversation("q?", "red", image=False)},
        {"id": "empty", "conversations": []},
        {"id": "long", "_bytes": png_bytes(), "conversations": conversation("very " * 300 + "long?", "red")},
    ]


def _collect(ds, processor_dir: str) -> list[dict]:
    return list(ds.iter_torch_batches(batch_size=8, collate_fn=Collator(processor_dir)))


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_each_format_round_trips_to_model_tensors(ray_cluster, processor_dir, tmp_path, fmt):
    WRITERS[fmt](tmp_path, good_records(4, text_only=1))
    accountant = BadSampleAccountant(max_bad_fraction=0.0)
    ds = build_dataset(str(tmp_path), processor_dir, split="train", max_length=128, accountant=accountant)
    batches = _collect(ds, processor_dir)
    num_rows = sum(len(b["input_ids"]) for b in batches)
    num_images = sum(int(b["image_mask"].sum()) for b in batches)
    assert (num_rows, num_images) == (5, 4)
    assert sum(len(b["pixel_values"]) for b in batches if "pixel_values" in b) == 4
    from pipelines.preprocess import load_processor

    tokenizer = load_processor(processor_dir).tokenizer
    answers = sorted(
        tokenizer.decode(row[row != IGNORE_INDEX]).replace("</s>", "").strip()
        for b in batches
        for row in b["labels"]
    )
    assert answers == ["blue", "green", "red", "yellow", "yes"]
    for b in batches:
        assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    report = accountant.check()
    assert (report.num_samples, report.num_bad) == (5, 0)


@pytest.fixture
def bad_llava(tmp_path):
    path = write_llava(tmp_path, good_records(4, text_only=1) + _bad_records(), "train.jsonl")
    with path.open("a") as f:
        f.write("{this is not json\n")
    return tmp_path


def test_bad_samples_are_skipped_and_counted_by_reason(ray_cluster, processor_dir, bad_llava):
    accountant = BadSampleAccountant(max_bad_fraction=0.01, min_samples_before_check=10**9)
    ds = build_dataset(str(bad_llava), processor_dir, split="train", max_length=128, accountant=accountant)
    assert sum(len(b["input_ids"]) for b in _collect(ds, processor_dir)) == 5
    report = accountant.report()
    assert report.num_samples == 11
    assert report.bad_by_reason == {
        "bad_json": 1,
        "bad_conversation": 1,
        "corrupt_image": 1,
        "missing_image": 1,
        "missing_image_tag": 1,
        "too_long": 1,
    }
    assert report.examples["corrupt_image"] == ["corrupt"] and report.examples["too_long"] == ["long"]
    assert report.example_files["corrupt_image"] == [str(bad_llava / "train.jsonl")]
    with pytest.raises(
        BadDataError, match=r"6 of 11 samples bad .*corrupt_image: 1 \(e\.g\. corrupt in \S*train\.jsonl\)"
    ):
        accountant.check()  # the exact end-of-epoch check


def test_threshold_fails_mid_stream_with_clear_message(ray_cluster, processor_dir, bad_llava):
    accountant = BadSampleAccountant(max_bad_fraction=0.01, min_samples_before_check=1)
    ds = build_dataset(str(bad_llava), processor_dir, split="train", max_length=128, accountant=accountant)
    with pytest.raises(Exception, match="exceeds max_bad_fraction=1.00%") as err:
        _collect(ds, processor_dir)
    cause = find_bad_data_error(err.value, accountant)
    assert isinstance(cause, BadDataError) and cause.report.num_bad >= 1


def test_eval_dataset_has_prompts_answers_and_families(ray_cluster, processor_dir, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "q1.png").write_bytes(png_bytes())
    rows = [
        {"question_id": "q1", "image": "images/q1.png", "question": "What colour?", "answer": "red",
         "family": "big_color", "kind": "coarse"},
        {"question_id": "q2", "text": "Is it text only?", "answer": "yes"},
    ]  # fmt: skip
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = build_eval_dataset(str(tmp_path), processor_dir, split="eval", max_length=128)
    out = {r["id"]: r for r in ds.take_all()}
    assert set(out) == {"q1", "q2"}
    assert (out["q1"]["answer"], out["q1"]["family"], out["q1"]["kind"]) == ("red", "big_color", "coarse")
    assert out["q1"]["has_image"] and not out["q2"]["has_image"]
    assert "labels" not in out["q1"] and out["q2"]["question"] == "Is it text only?"


def test_both_builders_take_the_one_option_list(tmp_path):
    """``build_dataset`` and ``build_eval_dataset`` share their keyword options (``DatasetOptions``): a misspelt
    one fails at once, before anything is read."""
    from pipelines.datasets import DatasetOptions

    for build in (build_dataset, build_eval_dataset):
        with pytest.raises(TypeError, match="max_lenght"):
            build(str(tmp_path), str(tmp_path), max_lenght=128)
        with pytest.raises(TypeError):
            build(str(tmp_path), str(tmp_path), "train", 128)  # options are keyword only
    assert DatasetOptions().max_length == 2048 and DatasetOptions().concurrency == 1


def test_inspect_json_output(ray_cluster, bad_llava, capsys):
    from dpn_cli import main

    assert main(["data", "inspect", str(bad_llava), "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"num_samples", "num_bad", "bad_by_reason"} <= set(result)
    # Without a processor the text is not tokenised: "long" is not counted as too_long.
    assert (result["num_samples"], result["num_bad"]) == (11, 5)
    assert result["example"]["id"] == "img0" and result["example"]["image_size"] == [40, 24]
    assert main(["data", "inspect", str(bad_llava), "--max-bad-fraction", "0.1"]) == 1
    text = capsys.readouterr().out
    assert "samples: 11" in text and "answer: 'red'" in text
    assert f"corrupt_image: 1 (e.g. corrupt in {bad_llava / 'train.jsonl'})" in text


# ------------------------------------------------------------------------------------------------
# Damaged files: counted by the training dataset and `dpn data inspect`, never a crash
# ------------------------------------------------------------------------------------------------


def _damaged_root(root, fmt: str):
    """Two train shards of 5 samples (4 with an image); the second one damaged. Returns
    (damaged shard path, good samples left)."""
    WRITERS[fmt](
        root, good_records(4, text_only=1), f"train-000000.{'tar' if fmt == 'webdataset' else 'parquet'}"
    )
    if fmt == "webdataset":
        path = write_webdataset(root, good_records(4, text_only=1), "train-000001.tar")
        offset, size = member_offset(path, "img2.png")
        truncate(path, offset + size // 2)  # tarfile.ReadError: unexpected end of data, mid-member
        return path, 5 + 2
    path = truncate(write_parquet(root, good_records(4, text_only=1), "train-000001.parquet"))
    return path, 5  # ArrowInvalid: Parquet magic bytes not found


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_damaged_shard_below_threshold_does_not_stop_training(ray_cluster, processor_dir, tmp_path, fmt):
    damaged, num_good = _damaged_root(tmp_path, fmt)
    accountant = BadSampleAccountant(max_bad_fraction=0.2)
    # the dataset the training job builds (jobs.training.driver.build_train_dataset), iterated as its loop does
    ds = build_dataset(str(tmp_path), processor_dir, split="train", max_length=128, accountant=accountant)
    assert sum(len(b["input_ids"]) for b in _collect(ds, processor_dir)) == num_good
    report = accountant.check()  # the end-of-epoch check passes: 1 bad of num_good + 1
    assert (report.num_samples, report.bad_by_reason) == (num_good + 1, {BadReason.TRUNCATED_SHARD: 1})
    assert report.example_files[BadReason.TRUNCATED_SHARD] == [str(damaged)]
    # a stricter run fails, naming the damaged file
    with pytest.raises(
        BadDataError, match=rf"truncated_shard: 1 \(e\.g\. train-000001\.\w+ after .* in {damaged}\)"
    ):
        report.check(0.01)


def _inspect_root(root, fmt: str) -> dict[str, int]:
    """A root with the faults of ``fmt`` next to good samples; returns the expected counts by reason."""
    bad_caption = [{"id": "enc", "_bytes": png_bytes(), "conversations": conversation("q?", "gr\udcffen")}]
    if fmt == "webdataset":
        members = webdataset_members(good_records(2, text_only=1) + bad_caption)
        members = [(n, d.replace(b"gr\\udcffen", b"gr\xffen")) for n, d in members]  # raw invalid UTF-8
        members.insert(2, ("lonely.png", png_bytes()))  # an image without its .json
        write_tar(root, members, "train-000000.tar")
        path = write_webdataset(root, good_records(4, text_only=1), "train-000001.tar")
        truncate(path, member_offset(path, "img1.png")[0] + 10)
        return {"bad_encoding": 1, "missing_metadata": 1, "truncated_shard": 1}
    if fmt == "parquet":
        write_parquet(root, good_records(2, text_only=1), "train-000000.parquet")
        truncate(write_parquet(root, good_records(4, text_only=1), "train-000001.parquet"))
        return {"truncated_shard": 1}
    path = write_llava(root, good_records(2, text_only=1) + bad_caption, "train.jsonl")
    path.write_bytes(path.read_bytes().replace(b"gr\\udcffen", b"gr\xffen") + b'{"id": "cut", "conv')
    return {"bad_encoding": 1, "bad_json": 1}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "llava_json"])
def test_inspect_counts_damaged_files_and_names_them(ray_cluster, tmp_path, capsys, fmt):
    from dpn_cli import main

    expected = _inspect_root(tmp_path, fmt)
    assert main(["data", "inspect", str(tmp_path), "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bad_by_reason"] == expected
    good = 3 + (1 if fmt == "webdataset" else 0)  # the cut shard keeps img0 (before the cut)
    assert result["num_samples"] == good + sum(expected.values())
    files = {f for fs in result["example_files"].values() for f in fs}
    assert files <= {str(p) for p in tmp_path.iterdir()} and all(files)
    assert main(["data", "inspect", str(tmp_path), "--split", "train", "--max-bad-fraction", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "exceeds 5.00%" in err and all(f"{reason}: 1 (e.g. " in err for reason in expected)
    if "truncated_shard" in expected:
        assert f"in {tmp_path}/train-000001." in err
