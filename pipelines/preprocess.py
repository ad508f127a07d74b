"""Preprocessing stages (Ray Data ``map_batches``, numpy batches) and collation for Ray Train.

Stages, applied to rows of :data:`pipelines.formats.ROW_SCHEMA`:

1. :func:`tokenize_batch`: chat template with ``<image>`` and ``<router>`` placed by the processor
   (``<router>`` after every user turn of a sample with an image, as the authors train; never a
   label), everything but assistant answers masked with -100, truncated to ``max_length`` (trailing rounds
   dropped, the last answer cut); a sample whose first prompt plus one answer token does not fit is
   flagged ``too_long``. (Run before decoding so that over-long samples cost no image work.)
2. :func:`decode_images`: :func:`decode_data_image` (only the policy's ``image_formats`` and at most its
   ``max_image_pixels``, both read from the header first; then ``dpn_model.image_processing.decode_image``: Pillow
   ``verify()`` then a full ``load()``, which catches corrupt and truncated files), RGB, LLaVA pad-to-square with the mean colour and resize by
   ``DPNImageProcessor.to_uint8`` -> ``pixel_uint8`` ``(S, S, 3)`` uint8 per row (zeros for rows
   without an image, with ``has_image=False``). Images stay uint8 until collation.

:class:`Preprocessor` runs both in one callable class so Ray actors load the processor once
(``map_batches(Preprocessor, fn_constructor_kwargs={...}, compute=actor_pool(n))``). Bad rows are kept,
flagged in ``bad_reason``, for :func:`pipelines.accounting.drop_bad_rows`.

:func:`collate_batch` pads to the batch's longest sample and turns uint8 images into normalised
``pixel_values`` at the last moment; :class:`Collator` wraps it for
``Dataset.iter_torch_batches(collate_fn=Collator(processor_dir))``.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import PIL.Image
from ray.data.collate_fn import NumpyBatchCollateFn

from dpn_model.image_processing import decode_image, open_image
from dpn_model.processing import IGNORE_INDEX
from dpn_model.tokenization import IMAGE_TOKEN
from pipelines.accounting import BadReason
from pipelines.formats import ReadPolicy, RefusedData

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Mode = Literal["train", "eval"]


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------


def image_shape(image_processor: Any) -> tuple[int, int, int]:
    """``(S, S, 3)``: the shape ``image_processor.to_uint8`` gives every image."""
    return tuple(image_processor.to_uint8([PIL.Image.new("RGB", (8, 8))]).shape[1:])


def _other_format(data: bytes) -> str | None:
    """The format of an image PIL reads but the policy does not accept, from its header alone (never decoded);
    None for data that is no image PIL knows."""
    try:
        with open_image(data) as probe:
            return probe.format
    except PIL.Image.DecompressionBombError:
        return "huge"  # identified (as some other format) before PIL's size guard refused it
    except Exception:  # noqa: BLE001 - any parser failure: not an image
        return None


def decode_data_image(data: bytes, policy: ReadPolicy | None = None) -> PIL.Image.Image:
    """Decode one image of a data sample to RGB, only if the ``policy`` accepts it: one of its ``image_formats``,
    at most ``max_image_pixels``, both checked from the header before any pixel is decoded (a hostile file costs a
    header parse, not a decompression bomb).

    Raises:
        RefusedData: ``unsupported_format`` (an image of another format), ``oversized_member`` (past the pixel
            cap, or past PIL's own decompression-bomb guard).
        Exception: PIL's errors for data that is no image, or a corrupt or truncated one (``corrupt_image``).
    """
    policy = policy or ReadPolicy()
    formats = policy.image_formats
    try:
        with open_image(data, formats) as probe:
            width, height = probe.size
    except PIL.Image.DecompressionBombError as err:
        raise RefusedData(BadReason.OVERSIZED_MEMBER, str(err)) from err
    except PIL.UnidentifiedImageError:
        found = _other_format(data)  # only to tell "not allowed" from "not an image": header only
        if found is None:
            raise
        accepted = ", ".join(formats)
        raise RefusedData(
            BadReason.UNSUPPORTED_FORMAT, f"a {found} image; image_formats: {accepted}"
        ) from None
    if width * height > policy.max_image_pixels:
        raise RefusedData(
            BadReason.OVERSIZED_MEMBER,
            f"{width}x{height} pixels, over max_image_pixels={policy.max_image_pixels}",
        )
    return decode_image(data, formats)


def decode_images(
    batch: dict[str, np.ndarray],
    image_processor: Any,
    shape: tuple[int, int, int] | None = None,
    policy: ReadPolicy | None = None,
) -> dict[str, np.ndarray]:
    """Replace the ``image`` bytes column by ``pixel_uint8`` ``(N, S, S, 3)`` and ``has_image`` ``(N,)``.

    Rows whose bytes do not decode get ``bad_reason = "corrupt_image"``; images the ``policy`` refuses (see
    :func:`decode_data_image`) ``unsupported_format`` or ``oversized_member``. Rows already bad, and rows
    without an image, get zeros and ``has_image = False``.
    """
    shape = shape or image_shape(image_processor)
    n = len(batch["id"])
    reasons = np.asarray(batch["bad_reason"], dtype=object).copy()
    pixels = np.zeros((n, *shape), dtype=np.uint8)
    has_image = np.zeros(n, dtype=bool)
    images = batch.get("image", np.full(n, None, dtype=object))
    for i in range(n):
        data = images[i]
        if reasons[i] or data is None:
            continue
        try:
            pixels[i] = image_processor.to_uint8([decode_data_image(bytes(data), policy)])[0]
            has_image[i] = True
        except RefusedData as err:
            logger.debug("refused image in %s: %s", batch["id"][i], err)
            reasons[i] = err.reason
        except Exception as err:  # noqa: BLE001 - any decoder failure means a bad file
            logger.debug("corrupt image in %s: %s", batch["id"][i], err)
            reasons[i] = BadReason.CORRUPT_IMAGE
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(pixel_uint8=pixels, has_image=has_image, bad_reason=reasons.astype(str))
    return out


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def split_prompt(turns: list[dict[str, str]]) -> tuple[list[dict[str, str]], str]:
    """Evaluation: (turns up to the last human turn, reference answer or ``""``)."""
    if turns and turns[-1]["from"] == "gpt":
        return turns[:-1], turns[-1]["value"]
    return turns, ""


def _ragged(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _tokenize_row(
    processor: Any, row_id: Any, conversations: str, image: bool, mode: Mode, max_length: int
) -> tuple[np.ndarray, np.ndarray, str, str, str]:
    """``(input_ids, labels, answer, question, bad reason)`` of one good row (see :func:`tokenize_batch`).

    A row the processor refuses gets a reason and empty ids and labels (its answer and question, if already
    read, are kept), so one bad sample is counted and skipped instead of failing the whole batch.
    """
    from dpn_model.processing import PromptTooLongError, ReservedTokenError

    empty = np.zeros(0, dtype=np.int32)
    ids, labs, answer, question, reason = empty, empty, "", "", ""
    turns = json.loads(conversations)
    try:
        if mode == "eval":
            prompt, answer = split_prompt(turns)
            processor.check_text(answer)  # never tokenized, but data text like every other turn
            question = prompt[-1]["value"].replace(IMAGE_TOKEN, "").strip() if prompt else ""
            encoded = processor.encode(prompt, image, mode="generate", max_length=max_length)
            ids = np.asarray(encoded["input_ids"], dtype=np.int32)
        else:
            encoded = processor.encode(turns, image, mode="train", max_length=max_length)
            ids = np.asarray(encoded["input_ids"], dtype=np.int32)
            labs = np.asarray(encoded["labels"], dtype=np.int32)
    except PromptTooLongError:
        reason = BadReason.TOO_LONG
    except ReservedTokenError as err:
        logger.debug("reserved token in %s: %s", row_id, err)
        reason = BadReason.RESERVED_TOKEN
    except ValueError as err:
        logger.debug("bad conversation in %s: %s", row_id, err)
        reason = BadReason.BAD_CONVERSATION
    if reason:
        ids, labs = empty, empty
    return ids, labs, answer, question, reason


def tokenize_batch(
    batch: dict[str, np.ndarray], processor: Any, max_length: int, mode: Mode = "train"
) -> dict[str, np.ndarray]:
    """Tokenise the ``conversations`` column (JSON strings) with the DPN processor.

    ``mode="train"`` adds ``input_ids`` and ``labels`` (int32, ragged: one array per row) from
    ``processor.encode(mode="train")``: only answers are learned, trailing rounds that do not fit are
    dropped. A sample whose first prompt plus one answer token does not fit is flagged ``too_long``;
    one whose text holds a special or added token of the tokenizer (``</s>``, ``<router>``, or ``<image>``
    anywhere but a user turn of a sample with an image: ``DPNProcessor.check_text``) ``reserved_token``;
    one the processor rejects otherwise (no answer, several images) ``bad_conversation``.

    ``mode="eval"`` adds the prompt's ``input_ids`` (``processor.encode(mode="generate")``: up to the
    generation prompt, no labels) and the
    reference ``answer`` and ``question`` strings; a prompt longer than ``max_length`` is ``too_long``.
    The ``conversations`` column is dropped.
    """
    n = len(batch["id"])
    reasons = np.asarray(batch["bad_reason"], dtype=object).copy()
    has_image = np.array([x is not None for x in batch.get("image", [None] * n)], dtype=bool)
    input_ids: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    answers: list[str] = []
    questions: list[str] = []
    empty = np.zeros(0, dtype=np.int32)
    for i in range(n):
        ids, labs, answer, question = empty, empty, "", ""
        if not reasons[i]:
            image = bool(has_image[i])  # encode reads only whether the sample has an image
            ids, labs, answer, question, reason = _tokenize_row(
                processor, batch["id"][i], batch["conversations"][i], image, mode, max_length
            )
            if reason:
                reasons[i] = reason
        input_ids.append(ids)
        labels.append(labs)
        answers.append(answer)
        questions.append(question)
    out = {k: v for k, v in batch.items() if k != "conversations"}
    out["input_ids"] = _ragged(input_ids)
    if mode == "eval":
        out["answer"] = np.array(answers, dtype=object).astype(str)
        out["question"] = np.array(questions, dtype=object).astype(str)
    else:
        out["labels"] = _ragged(labels)
    out["bad_reason"] = reasons.astype(str)
    return out


# ----------------------------------------------------------------------------------------------
# The map_batches stage
# ----------------------------------------------------------------------------------------------


def load_processor(processor_dir: str) -> Any:
    """``DPNProcessor.from_pretrained(processor_dir)`` (imported here: only workers pay for it)."""
    from dpn_model.processing import DPNProcessor, register

    register()  # the Auto classes must know DPN's image processor to load a saved processor
    return DPNProcessor.from_pretrained(processor_dir)


class Preprocessor:
    """Callable class for ``Dataset.map_batches``: tokenise, then decode images, per batch.

    Args:
        processor_dir: local directory of a saved ``DPNProcessor`` (on every node, or shared).
        max_length: longest token sequence (image tokens included).
        mode: ``"train"`` (input_ids + labels) or ``"eval"`` (prompt ids + answer).
        policy: the image formats and pixel cap images are decoded under (default ``ReadPolicy()``).
    """

    def __init__(
        self, processor_dir: str, max_length: int, mode: Mode = "train", policy: ReadPolicy | None = None
    ):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.processor = load_processor(processor_dir)
        self.max_length = max_length
        self.mode = mode
        self.shape = image_shape(self.processor.image_processor)
        self.policy = policy

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = tokenize_batch(batch, self.processor, self.max_length, self.mode)
        return decode_images(batch, self.processor.image_processor, self.shape, self.policy)


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------


def collate_batch(
    batch: dict[str, np.ndarray],
    pad_token_id: int,
    padding_side: Literal["right", "left"] = "right",
    image_processor: Any = None,
) -> dict[str, torch.Tensor]:
    """Pad a preprocessed numpy batch to its own longest sample and build model inputs.

    Args:
        batch: rows from :class:`Preprocessor` (``input_ids``, optional ``labels``, ``pixel_uint8``,
            ``has_image``).
        pad_token_id: id written into padding positions of ``input_ids``.
        padding_side: ``"right"`` for training, ``"left"`` for batched generation.
        image_processor: its ``normalize`` turns uint8 into ``pixel_values``; default
            ``DPNImageProcessor()`` (CLIP mean/std).

    Returns:
        ``input_ids`` `(B, L)` long, ``attention_mask`` `(B, L)` long, ``labels`` `(B, L)` long with
        -100 on padding (when the batch has labels), ``image_mask`` `(B,)` bool (which samples have an
        image), and ``pixel_values`` `(n_images, 3, S, S)` float for exactly those samples, in batch
        order (omitted when no sample has an image).
    """
    import torch

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    sequences = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
    size, length = len(sequences), max((len(s) for s in sequences), default=0)
    input_ids = np.full((size, length), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((size, length), dtype=np.int64)
    has_labels = "labels" in batch
    labels = np.full((size, length), IGNORE_INDEX, dtype=np.int64)
    for i, seq in enumerate(sequences):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[i, span] = seq
        attention_mask[i, span] = 1
        if has_labels:
            labels[i, span] = np.asarray(batch["labels"][i], dtype=np.int64)
    out = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    if has_labels:
        out["labels"] = torch.from_numpy(labels)
    image_mask = np.asarray(batch.get("has_image", np.zeros(size, dtype=bool)), dtype=bool)
    out["image_mask"] = torch.from_numpy(image_mask.copy())
    if image_mask.any():
        if image_processor is None:
            from dpn_model.image_processing import DPNImageProcessor

            image_processor = DPNImageProcessor()
        out["pixel_values"] = image_processor.normalize(np.asarray(batch["pixel_uint8"])[image_mask])
    return out


class Collator(NumpyBatchCollateFn):
    """Picklable ``collate_fn`` for ``iter_torch_batches``: loads the processor lazily, once per worker.

    Args:
        processor_dir: directory of the saved ``DPNProcessor`` (pad id and image normalisation).
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
    """

    def __init__(self, processor_dir: str, padding_side: Literal["right", "left"] = "right"):
        self.processor_dir = processor_dir
        self.padding_side = padding_side
        self._processor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_processor": None}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        if self._processor is None:
            self._processor = load_processor(self.processor_dir)
        return collate_batch(
            batch,
            pad_token_id=self._processor.tokenizer.pad_token_id,
            padding_side=self.padding_side,
            image_processor=self._processor.image_processor,
        )
