"""Public builders: model-ready Ray Datasets for the training and evaluation jobs, and inspection.

Training (Ray Train worker side)::

    accountant = BadSampleAccountant(max_bad_fraction=0.01)      # driver, before trainer.fit()
    train_ds = build_dataset("s3://bucket/data", processor_dir, split="train", accountant=accountant)
    # worker loop:
    try:
        for batch in ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=8, collate_fn=Collator(processor_dir)
        ):
            image_mask = batch.pop("image_mask")
            loss = model(**batch).loss
    except Exception as err:                                        # mid-stream threshold
        raise (find_bad_data_error(err, accountant) or err) from err
    accountant.check()                                              # end of epoch: exact threshold

Evaluation (batch generation)::

    eval_ds = build_eval_dataset(root, processor_dir, split="eval")
    for batch in eval_ds.iter_batches(batch_size=32, batch_format="numpy"):
        inputs = collate_batch(batch, pad_token_id, padding_side="left")
        ... batch["id"], batch["answer"], batch["family"], batch["kind"] ...

Everything streams: nothing here calls ``materialize()``.

Damaged files never stop a pass: the readers (:mod:`pipelines.formats`) turn a cut or corrupt file
into its ``truncated_shard`` row and keep the samples before the damage, so training, evaluation and
``dpn data inspect`` count it like any bad sample, under the same threshold, with the file named.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from pipelines.accounting import BadReason, BadSampleAccountant, BadSampleReport, count_batch, drop_bad_rows
from pipelines.formats import ReadPolicy, RefusedData, read_rows
from pipelines.preprocess import Preprocessor, decode_data_image, load_processor, tokenize_batch

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)

TRAIN_COLUMNS: tuple[str, ...] = ("input_ids", "labels", "pixel_uint8", "has_image")
EVAL_COLUMNS: tuple[str, ...] = (
    "id",
    "input_ids",
    "pixel_uint8",
    "has_image",
    "question",
    "answer",
    "family",
    "kind",
)


def actor_pool(concurrency: int | tuple[int, int]) -> ray.data.ActorPoolStrategy:
    """The ``compute=`` of a stateful ``map_batches``: a fixed pool of ``concurrency`` actors, or an
    autoscaling one for ``(min, max)`` (Ray 2.51 deprecates ``concurrency=``)."""
    import ray.data

    if isinstance(concurrency, int):
        return ray.data.ActorPoolStrategy(size=concurrency)
    low, high = concurrency
    return ray.data.ActorPoolStrategy(min_size=low, max_size=high)


@dataclass(frozen=True)
class DatasetOptions:
    """The keyword options of :func:`build_dataset` and :func:`build_eval_dataset` (one list for both).

    Attributes:
        max_length: longest token sequence; samples with no answer token inside are ``too_long``.
        max_bad_fraction: fail with ``BadDataError`` past this bad fraction (ignored if ``accountant``
            is given: its own threshold applies).
        accountant: counts bad samples; keep it to call ``accountant.check()`` after each epoch
            (exact check). Without it, only the mid-stream check runs.
        image_folder: folder that relative LLaVA image paths resolve against (default: the JSON's).
        policy: what the readers may open and decode (image roots, tar compression, byte and pixel caps, image
            formats); ``None``: the defaults of :class:`pipelines.formats.ReadPolicy`. A job passes its data
            section's ``read_policy()``.
        filesystem: pyarrow filesystem to read with instead of the one the URI names.
        batch_size: rows per preprocessing batch.
        concurrency: preprocessing actors (int, or ``(min, max)`` to autoscale), handed to Ray Data as
            ``compute=`` (:func:`actor_pool`), never as its ``concurrency=`` (deprecated since Ray 2.51).
        num_cpus: CPUs reserved per preprocessing actor.
    """

    max_length: int = 2048
    max_bad_fraction: float = 0.01
    accountant: BadSampleAccountant | None = None
    image_folder: str | None = None
    policy: ReadPolicy | None = None
    filesystem: pafs.FileSystem | None = None
    batch_size: int = 64
    concurrency: int | tuple[int, int] = 1
    num_cpus: float = 1.0


def _build(
    path: str,
    processor_dir: str,
    split: str | None,
    mode: str,
    columns: tuple[str, ...],
    options: dict[str, Any],
) -> ray.data.Dataset:
    opts = DatasetOptions(**options)  # an unknown keyword is a TypeError, as for any function
    accountant = opts.accountant
    if accountant is None:
        accountant = BadSampleAccountant(max_bad_fraction=opts.max_bad_fraction)
        logger.info("counting bad samples in actor %s", accountant.name)
    ds = read_rows(
        path, split, filesystem=opts.filesystem, image_folder=opts.image_folder, policy=opts.policy
    )
    ds = ds.map_batches(
        Preprocessor,
        fn_constructor_kwargs={
            "processor_dir": processor_dir,
            "max_length": opts.max_length,
            "mode": mode,
            "policy": opts.policy,
        },
        batch_format="numpy",
        batch_size=opts.batch_size,
        compute=actor_pool(opts.concurrency),
        num_cpus=opts.num_cpus,
    )
    ds = ds.map_batches(drop_bad_rows, fn_kwargs={"accountant": accountant}, batch_format="numpy")
    return ds.select_columns(list(columns))


def build_dataset(
    path: str, processor_dir: str, split: str | None = "train", **options: Any
) -> ray.data.Dataset:
    """Streaming dataset of model-ready training rows: ``input_ids``, ``labels`` (int32, ragged),
    ``pixel_uint8`` ``(S, S, 3)`` uint8 and ``has_image``. Bad samples are skipped and counted.

    Args:
        path: file, folder of shards, glob or dataset root; local or URI (``s3://``, ``gs://``).
        processor_dir: local directory of a saved ``DPNProcessor`` (tokenizer + image processor).
        split: split of a dataset root (``None``: all files under ``path``).
        **options: keyword only: the fields of :class:`DatasetOptions` (``max_length``, ``accountant``, ...).

    Returns:
        ``ray.data.Dataset``; iterate with ``iter_torch_batches(collate_fn=Collator(processor_dir))``.
    """
    return _build(path, processor_dir, split, "train", TRAIN_COLUMNS, options)


def build_eval_dataset(
    path: str, processor_dir: str, split: str | None = "eval", **options: Any
) -> ray.data.Dataset:
    """Streaming dataset for batch generation: prompt ``input_ids`` (chat template up to the
    assistant turn, no labels), ``pixel_uint8``, ``has_image``, and ``id``, ``question``, reference
    ``answer``, ``family``, ``kind``. Arguments as :func:`build_dataset` (options: :class:`DatasetOptions`);
    pad prompts on the left (``collate_batch(batch, pad_id, padding_side="left")``)."""
    return _build(path, processor_dir, split, "eval", EVAL_COLUMNS, options)


# ----------------------------------------------------------------------------------------------
# Inspection (`dpn data inspect`)
# ----------------------------------------------------------------------------------------------


class InspectStage:
    """``map_batches`` class: decode images (and tokenise when a processor is given), then reduce
    each batch to one row: its bad-sample report and its first good sample, both as JSON."""

    def __init__(
        self, processor_dir: str | None = None, max_length: int = 2048, policy: ReadPolicy | None = None
    ):
        self.processor = load_processor(processor_dir) if processor_dir else None
        self.max_length = max_length
        self.policy = policy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        reasons = np.asarray(batch["bad_reason"], dtype=object).copy()
        sizes: list[tuple[int, int] | None] = [None] * n
        for i, data in enumerate(batch["image"]):
            if reasons[i] or data is None:
                continue
            try:
                sizes[i] = decode_data_image(bytes(data), self.policy).size
            except RefusedData as err:
                reasons[i] = err.reason
            except Exception:  # noqa: BLE001 - any decoder failure means a bad file
                reasons[i] = BadReason.CORRUPT_IMAGE
        conversations = batch["conversations"]
        batch = {**batch, "bad_reason": reasons.astype(str)}
        if self.processor is not None:
            batch = tokenize_batch({**batch}, self.processor, self.max_length, "train")
        reasons = np.asarray(batch["bad_reason"]).astype(str)
        example = ""
        good = np.flatnonzero(reasons == "")
        if len(good):
            i = int(good[0])
            turns = json.loads(conversations[i])
            example = json.dumps(
                {
                    "id": str(batch["id"][i]),
                    "question": turns[0]["value"] if turns else "",
                    "answer": next((t["value"] for t in turns if t["from"] == "gpt"), ""),
                    "family": str(batch["family"][i]),
                    "kind": str(batch["kind"][i]),
                    "image_size": list(sizes[i]) if sizes[i] else None,
                    "num_tokens": int(len(batch["input_ids"][i])) if "input_ids" in batch else None,
                }
            )
        report = count_batch(batch, reasons)
        return {
            "report": np.array([json.dumps(report.to_dict())], dtype=object),
            "example": np.array([example], dtype=object),
        }


def inspect_dataset(
    path: str,
    split: str | None = None,
    *,
    processor_dir: str | None = None,
    max_length: int = 2048,
    image_folder: str | None = None,
    filesystem: pafs.FileSystem | None = None,
    policy: ReadPolicy | None = None,
) -> dict[str, Any]:
    """Count samples and bad samples by reason in one streaming pass; return one decoded example.

    Without ``processor_dir`` the text is not tokenised, so neither ``too_long`` nor ``reserved_token`` is
    checked. ``policy``: as
    :class:`DatasetOptions`.

    Returns:
        ``{"num_samples", "num_bad", "bad_by_reason", "bad_fraction", "examples", "example"}``;
        ``example`` is ``{"id", "question", "answer", "family", "kind", "image_size", "num_tokens"}``
        or ``None`` when no sample is good. Conversations are kept in the example (the question
        includes ``<image>``).
    """
    ds = read_rows(path, split, filesystem=filesystem, image_folder=image_folder, policy=policy)
    ds = ds.map_batches(
        InspectStage,
        fn_constructor_kwargs={"processor_dir": processor_dir, "max_length": max_length, "policy": policy},
        batch_format="numpy",
        compute=actor_pool(1),
    )
    total, example = BadSampleReport(), None
    for row in ds.iter_rows():
        total.merge(BadSampleReport.from_dict(json.loads(row["report"])))
        if example is None and row["example"]:
            example = json.loads(row["example"])
    return {**total.to_dict(), "example": example}
