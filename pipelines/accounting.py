"""Bad-sample accounting: count skipped samples by reason, fail the job past a threshold.

How counting works in a distributed stream
------------------------------------------
Readers and preprocessing stages never raise on a bad sample. They set the row's ``bad_reason``
column (``""`` means fine) and the row travels on, so that every bad sample reaches one place where
it is counted. The last stage of every dataset is :func:`drop_bad_rows`, a ``map_batches`` task
that, per batch, counts rows by reason, sends the batch's small :class:`BadSampleReport` to one
:class:`BadSampleCounter` Ray actor (calls to an actor run one at a time, so the totals are exact),
and returns only the good rows. Nothing is materialised; the only extra traffic is one small actor
call per batch.

The threshold is enforced twice:

* mid-stream, as soon as at least ``min_samples_before_check`` samples were counted overall and the
  running bad fraction exceeds ``max_bad_fraction`` (fails a long job early);
* exactly, at the end of a pass: the training and evaluation jobs call
  :meth:`BadSampleAccountant.check` after each epoch / pass, which raises :class:`BadDataError` with
  the counts by reason and example ids.

Counts are cumulative over passes (epochs re-read the data), which leaves the fraction unchanged;
call :meth:`BadSampleAccountant.reset` to start over. A retried task may count its batch twice.

For one-shot statistics (``dpn data inspect``) :func:`scan_bad_samples` counts a dataset in one
streaming pass without an actor.

Reasons (:class:`BadReason`) are the same in every format: invalid UTF-8 in a caption is
``bad_encoding`` whether it sits in a LLaVA JSON file, a WebDataset ``.json`` member or a Parquet
column, and a file that cannot be read to its end (a tar cut in the middle of a member, a Parquet
file without its footer, a JSON list cut short) keeps the samples read before the damage and counts
the rest of the file as one ``truncated_shard`` sample whose id says where it broke. Each report keeps
a few example ids per reason together with the file each came from (``example_files``), so that the
threshold error names what to fix.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)


class BadReason:
    """Why a sample was skipped: the values of the ``bad_reason`` column (``""`` = fine)."""

    BAD_JSON = "bad_json"  # a JSON row (or a WebDataset sample's .json) that does not parse
    BAD_ENCODING = "bad_encoding"  # text that is not valid UTF-8 (or holds a lone surrogate), any format
    MISSING_METADATA = "missing_metadata"  # a WebDataset sample with an image but no .json
    TRUNCATED_SHARD = "truncated_shard"  # the unreadable rest of a cut or corrupt file (one per file)
    MISSING_IMAGE = "missing_image"  # image file not found / unreadable, or `<image>` with no image
    CORRUPT_IMAGE = "corrupt_image"  # bytes that Pillow cannot verify or fully decode (truncated too)
    MISSING_IMAGE_TAG = "missing_image_tag"  # an image but no `<image>` in the first human turn
    BAD_CONVERSATION = "bad_conversation"  # empty or malformed conversation, no answer to learn
    TOO_LONG = "too_long"  # no answer token fits in max_length
    RESERVED_TOKEN = (
        "reserved_token"  # text that would encode to a special or added token (`</s>`, `<router>`, ...)
    )
    PATH_OUTSIDE_ROOT = (
        "path_outside_root"  # an image ref that leaves its root (`..`, absolute, another scheme)
    )
    OVERSIZED_MEMBER = (
        "oversized_member"  # a shard member or sample past its byte cap, or an image past the pixel cap
    )
    UNSUPPORTED_FORMAT = (
        "unsupported_format"  # an image in a format the config does not accept, or a compressed tar
    )


BAD_REASONS: tuple[str, ...] = tuple(
    v for k, v in vars(BadReason).items() if not k.startswith("_") and isinstance(v, str)
)


@dataclass
class BadSampleReport:
    """Counts of samples seen and skipped, with a few example ids (and their files) per reason.

    Small and mergeable: at most ``max_examples`` examples per reason, whatever the data size.

    Args:
        num_samples (`int`): samples seen, good and bad.
        bad_by_reason (`dict[str, int]`): skipped samples per reason (only reasons that occurred).
        examples (`dict[str, list[str]]`): up to ``max_examples`` sample ids per reason.
        example_files (`dict[str, list[str]]`): the file of each example id, parallel to
            ``examples`` (``""`` where unknown).
    """

    num_samples: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    example_files: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_bad(self) -> int:
        return sum(self.bad_by_reason.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_samples if self.num_samples else 0.0

    def add_example(self, reason: str, sample_id: str, file: str = "") -> None:
        """Keep ``sample_id`` (from ``file``) as an example of ``reason`` if there is room."""
        ids = self.examples.setdefault(reason, [])
        files = self._files_of(reason)
        if len(ids) < self.max_examples:
            ids.append(sample_id)
            files.append(file)

    def _files_of(self, reason: str) -> list[str]:
        """``example_files[reason]``, padded to the length of ``examples[reason]``."""
        files = self.example_files.setdefault(reason, [])
        files.extend([""] * (len(self.examples.get(reason, [])) - len(files)))
        return files

    def merge(self, other: BadSampleReport) -> BadSampleReport:
        """Add ``other``'s counts to this report (in place) and return it."""
        self.num_samples += other.num_samples
        for reason, count in other.bad_by_reason.items():
            self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + count
        for reason, ids in other.examples.items():
            for sample_id, file in zip(ids, other._files_of(reason)):
                self.add_example(reason, sample_id, file)
        return self

    def exceeds(self, max_bad_fraction: float) -> bool:
        return self.bad_fraction > max_bad_fraction

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`BadDataError` if the bad fraction exceeds ``max_bad_fraction``."""
        if self.exceeds(max_bad_fraction):
            raise BadDataError(self, max_bad_fraction)

    def example_text(self, reason: str) -> str:
        """``"a, b in /data/train.json; c in /data/eval.json"``: the examples of ``reason`` by file."""
        by_file: dict[str, list[str]] = {}
        for sample_id, file in zip(self.examples.get(reason, []), self._files_of(reason)):
            by_file.setdefault(file, []).append(sample_id)
        return "; ".join(", ".join(ids) + (f" in {file}" if file else "") for file, ids in by_file.items())

    def top_reasons(self) -> list[str]:
        """Reasons that occurred, most frequent first."""
        return sorted(self.bad_by_reason, key=lambda r: (-self.bad_by_reason[r], r))

    def summary(self, max_reasons: int = 5) -> str:
        """One line: totals, then the most frequent reasons with their counts, example ids and files."""
        parts = [f"{self.num_bad} of {self.num_samples} samples bad ({self.bad_fraction:.2%})"]
        reasons = self.top_reasons()
        for reason in reasons[:max_reasons]:
            parts.append(f"{reason}: {self.bad_by_reason[reason]} (e.g. {self.example_text(reason)})")
        if len(reasons) > max_reasons:
            rest = reasons[max_reasons:]
            parts.append(f"{len(rest)} more reasons ({sum(self.bad_by_reason[r] for r in rest)} samples)")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the keys `num_samples`, `num_bad`, `bad_by_reason` are a stable interface."""
        return {
            "num_samples": self.num_samples,
            "num_bad": self.num_bad,
            "bad_by_reason": dict(sorted(self.bad_by_reason.items())),
            "bad_fraction": self.bad_fraction,
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "example_files": {k: list(self._files_of(k)) for k in sorted(self.examples)},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BadSampleReport:
        return cls(
            num_samples=int(data["num_samples"]),
            bad_by_reason={k: int(v) for k, v in data["bad_by_reason"].items()},
            examples={k: list(v) for k, v in data.get("examples", {}).items()},
            example_files={k: list(v) for k, v in data.get("example_files", {}).items()},
        )


class BadDataError(ValueError):
    """Too many bad samples: the message names the counts by reason and example ids."""

    def __init__(self, report: BadSampleReport, max_bad_fraction: float):
        self.report = report
        self.max_bad_fraction = max_bad_fraction
        super().__init__(
            f"bad fraction {report.bad_fraction:.2%} exceeds max_bad_fraction={max_bad_fraction:.2%}: "
            f"{report.summary()}. Fix or remove these samples (see `dpn data inspect PATH`), "
            "or raise max_bad_fraction."
        )

    def __reduce__(self):  # keeps the report when Ray ships the error between processes
        return (type(self), (self.report, self.max_bad_fraction))


def find_bad_data_error(
    error: BaseException, accountant: BadSampleAccountant | None = None
) -> BadDataError | None:
    """The :class:`BadDataError` behind ``error``, if any.

    A mid-stream failure reaches the consumer as Ray's ``RayTaskError(UserCodeException)``, which
    keeps the message but not the original exception; given the ``accountant``, its totals rebuild
    the error. Jobs call this around dataset iteration to report bad data plainly::

        except Exception as err:
            raise (find_bad_data_error(err, accountant) or err) from err
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BadDataError):
            return current
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    if accountant is not None and "exceeds max_bad_fraction" in str(error):
        report = accountant.report()
        if report.exceeds(accountant.max_bad_fraction):
            return BadDataError(report, accountant.max_bad_fraction)
    return None


def count_rows(
    ids: Iterable[Any],
    bad_reasons: Iterable[Any],
    files: Iterable[Any] | None = None,
    max_examples: int = 5,
) -> BadSampleReport:
    """Count one batch: ``ids``, ``bad_reasons`` (``""`` = good row) and optionally ``files`` (the
    ``source_file`` column, so that examples name their file) are parallel columns."""
    report = BadSampleReport(max_examples=max_examples)
    ids = list(ids)
    file_list = [""] * len(ids) if files is None else ["" if f is None else str(f) for f in files]
    for sample_id, reason, file in zip(ids, bad_reasons, file_list):
        report.num_samples += 1
        reason = str(reason)
        if reason:
            report.bad_by_reason[reason] = report.bad_by_reason.get(reason, 0) + 1
            report.add_example(reason, str(sample_id), file)
    return report


def count_batch(batch: dict[str, Any], bad_reasons: Any | None = None) -> BadSampleReport:
    """Count a numpy batch with ``id``, ``bad_reason`` and (when present) ``source_file`` columns;
    ``bad_reasons`` overrides the batch's own column."""
    reasons = np.asarray(batch["bad_reason"] if bad_reasons is None else bad_reasons).astype(str)
    return count_rows(batch["id"], reasons, batch.get("source_file"))


def split_bad_rows(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BadSampleReport]:
    """Return (the batch's good rows, the batch's report). ``batch`` is a numpy batch with
    ``id`` and ``bad_reason`` columns (and ``source_file`` to name files in examples)."""
    reasons = np.asarray(batch["bad_reason"]).astype(str)
    report = count_batch(batch, reasons)
    good = reasons == ""
    return {k: np.asarray(v)[good] for k, v in batch.items()}, report


class BadSampleCounter:
    """Ray actor body: the single place where per-batch reports are summed.

    Use through :class:`BadSampleAccountant`, which starts it as a named Ray actor.
    """

    def __init__(self, max_examples: int = 5):
        self._report = BadSampleReport(max_examples=max_examples)

    def add(self, report: dict[str, Any]) -> dict[str, Any]:
        """Add one batch's report; log the first example ids of each reason; return the totals."""
        incoming = BadSampleReport.from_dict(report)
        for reason, ids in incoming.examples.items():
            room = self._report.max_examples - len(self._report.examples.get(reason, []))
            for sample_id, file in list(zip(ids, incoming._files_of(reason)))[: max(0, room)]:
                logger.warning(
                    "skipping bad sample %r%s: %s", sample_id, f" of {file}" if file else "", reason
                )
        self._report.merge(incoming)
        return self._report.to_dict()

    def report(self) -> dict[str, Any]:
        return self._report.to_dict()

    def reset(self) -> None:
        self._report = BadSampleReport(max_examples=self._report.max_examples)


class BadSampleAccountant:
    """Handle to a :class:`BadSampleCounter` actor plus the threshold; picklable, so it can be
    passed to Ray Data stages and Ray Train workers (or found again by name with :meth:`get`).

    Args:
        name: Ray actor name; created if it does not exist.
        max_bad_fraction: the job fails when more than this fraction of samples is bad.
        min_samples_before_check: mid-stream checks wait until this many samples were counted.
    """

    def __init__(
        self, name: str | None = None, max_bad_fraction: float = 0.01, min_samples_before_check: int = 1000
    ):
        import ray

        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.name = name or f"dpn-bad-samples-{uuid.uuid4().hex[:8]}"
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_before_check = min_samples_before_check
        actor_cls = ray.remote(num_cpus=0)(BadSampleCounter)
        self._actor = actor_cls.options(name=self.name, get_if_exists=True).remote()

    @classmethod
    def get(cls, name: str, max_bad_fraction: float = 0.01) -> BadSampleAccountant:
        """The accountant whose actor is named ``name`` (e.g. from inside a Ray Train worker)."""
        return cls(name=name, max_bad_fraction=max_bad_fraction)

    def add(self, report: BadSampleReport) -> BadSampleReport:
        """Send one batch's counts; return the running totals."""
        import ray

        return BadSampleReport.from_dict(ray.get(self._actor.add.remote(report.to_dict())))

    def report(self) -> BadSampleReport:
        import ray

        return BadSampleReport.from_dict(ray.get(self._actor.report.remote()))

    def check(self) -> BadSampleReport:
        """Exact end-of-pass check: raise :class:`BadDataError` past the threshold, else return totals."""
        report = self.report()
        report.check(self.max_bad_fraction)
        if report.num_bad:
            logger.info("bad samples within threshold: %s", report.summary())
        return report

    def reset(self) -> None:
        import ray

        ray.get(self._actor.reset.remote())


def drop_bad_rows(
    batch: dict[str, np.ndarray], accountant: BadSampleAccountant | None
) -> dict[str, np.ndarray]:
    """``map_batches`` stage (numpy format): count the batch into ``accountant`` and keep good rows.

    Raises :class:`BadDataError` mid-stream once enough samples were counted and the running bad
    fraction is past the accountant's threshold.
    """
    good, report = split_bad_rows(batch)
    if accountant is not None:
        totals = accountant.add(report)
        if totals.num_samples >= accountant.min_samples_before_check:
            totals.check(accountant.max_bad_fraction)
    return good


def _report_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import json

    return {"report": np.array([json.dumps(count_batch(batch).to_dict())], dtype=object)}


def scan_bad_samples(ds: ray.data.Dataset) -> BadSampleReport:
    """Count a dataset of rows with ``id`` and ``bad_reason`` columns (and ``source_file``, if it has
    one) in one streaming pass."""
    import json

    total = BadSampleReport()
    columns = [c for c in ("id", "bad_reason", "source_file") if c in ds.columns()]
    counts = ds.select_columns(columns).map_batches(_report_batch, batch_format="numpy")
    for row in counts.iter_rows():
        total.merge(BadSampleReport.from_dict(json.loads(row["report"])))
    return total
