"""Ray Data integration: every format to model-ready tensors, bad-sample accounting, the threshold,
the evaluation dataset and `dpn data inspect`. One local Ray cluster for the whole module."""

from __future__ import annotations

import json

import pytest
from data_samples import (
    WRITERS,
    conversation,
    good_records,
    png_bytes,
    save_processor,
    truncated_png,
    write_llava,
)

from pipelines.accounting import BadDataError, BadSampleAccountant, find_bad_data_error
from pipelines.datasets import build_dataset, build_eval_dataset
from pipelines.preprocess import IGNORE_INDEX, Collator

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
    with pytest.raises(BadDataError, match=r"6 of 11 samples bad .*corrupt_image: 1 \(e\.g\. corrupt\)"):
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


def test_inspect_json_output(ray_cluster, bad_llava, capsys):
    from jobs.cli import main

    assert main(["data", "inspect", str(bad_llava), "--split", "train", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"num_samples", "num_bad", "bad_by_reason"} <= set(result)
    # Without a processor the text is not tokenised: "long" is not counted as too_long.
    assert (result["num_samples"], result["num_bad"]) == (11, 5)
    assert result["example"]["id"] == "img0" and result["example"]["image_size"] == [40, 24]
    assert main(["data", "inspect", str(bad_llava), "--max-bad-fraction", "0.1"]) == 1
    text = capsys.readouterr().out
    assert "samples: 11" in text and "corrupt_image: 1 (e.g. corrupt)" in text and "answer: 'red'" in text
