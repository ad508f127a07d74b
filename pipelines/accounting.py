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
    MISSING_METADATA = "missing_metadata"  # a WebDataset sample with an image but no .json
    MISSING_IMAGE = "missing_image"  # image file not found / unreadable, or `<image>` with no image
    CORRUPT_IMAGE = "corrupt_image"  # bytes that Pillow cannot verify or fully decode (truncated too)
    MISSING_IMAGE_TAG = "missing_image_tag"  # an image but no `<image>` in the first human turn
    BAD_CONVERSATION = "bad_conversation"  # empty or malformed conversation, no answer to learn
    TOO_LONG = "too_long"  # no answer token fits in max_length


BAD_REASONS: tuple[str, ...] = tuple(
    v for k, v in vars(BadReason).items() if not k.startswith("_") and isinstance(v, str)
)


@dataclass
class BadSampleReport:
    """Counts of samples seen and skipped, with a few example ids per reason.

    Args:
        num_samples (`int`): samples seen, good and bad.
        bad_by_reason (`dict[str, int]`): skipped samples per reason (only reasons that occurred).
        examples (`dict[str, list[str]]`): up to ``max_examples`` sample ids per reason.
    """

    num_samples: int = 0
    bad_by_reason: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    @property
    def num_bad(self) -> int:
        return sum(self.bad_by_reason.values())

    @property
    def bad_fraction(self) -> float:
        return self.num_bad / self.num_samples if self.num_samples else 0.0

    def merge(self, other: BadSampleReport) -> BadSampleReport:
        """Add ``other``'s counts to this report (in place) and return it."""
        self.num_samples += other.num_samples
        for reason, count in other.bad_by_reason.items():
            self.bad_by_reason[reason] = self.bad_by_reason.get(reason, 0) + count
        for reason, ids in other.examples.items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(ids[: max(0, self.max_examples - len(kept))])
        return self

    def exceeds(self, max_bad_fraction: float) -> bool:
        return self.bad_fraction > max_bad_fraction

    def check(self, max_bad_fraction: float) -> None:
        """Raise :class:`BadDataError` if the bad fraction exceeds ``max_bad_fraction``."""
        if self.exceeds(max_bad_fraction):
            raise BadDataError(self, max_bad_fraction)

    def summary(self) -> str:
        """One line: totals, then each reason with its count and example ids."""
        parts = [f"{self.num_bad} of {self.num_samples} samples bad ({self.bad_fraction:.2%})"]
        for reason in sorted(self.bad_by_reason):
            ids = ", ".join(self.examples.get(reason, []))
            parts.append(f"{reason}: {self.bad_by_reason[reason]} (e.g. {ids})")
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; the keys `num_samples`, `num_bad`, `bad_by_reason` are a stable interface."""
        return {
            "num_samples": self.num_samples,
            "num_bad": self.num_bad,
            "bad_by_reason": dict(sorted(self.bad_by_reason.items())),
            "bad_fraction": self.bad_fraction,
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BadSampleReport:
        return cls(
            num_samples=int(data["num_samples"]),
            bad_by_reason={k: int(v) for k, v in data["bad_by_reason"].items()},
            examples={k: list(v) for k, v in data.get("examples", {}).items()},
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


def count_rows(ids: Iterable[Any], bad_reasons: Iterable[Any], max_examples: int = 5) -> BadSampleReport:
    """Count one batch: ``ids`` and ``bad_reasons`` are parallel columns (``""`` = good row)."""
    report = BadSampleReport(max_examples=max_examples)
    for sample_id, reason in zip(ids, bad_reasons):
        report.num_samples += 1
        reason = str(reason)
        if reason:
            report.bad_by_reason[reason] = report.bad_by_reason.get(reason, 0) + 1
            kept = report.examples.setdefault(reason, [])
            if len(kept) < max_examples:
                kept.append(str(sample_id))
    return report


def split_bad_rows(batch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], BadSampleReport]:
    """Return (the batch's good rows, the batch's report). ``batch`` is a numpy batch with
    ``id`` and ``bad_reason`` columns."""
    reasons = np.asarray(batch["bad_reason"]).astype(str)
    report = count_rows(batch["id"], reasons)
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
            for sample_id in ids[: max(0, room)]:
                logger.warning("skipping bad sample %r: %s", sample_id, reason)
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

    report = count_rows(batch["id"], np.asarray(batch["bad_reason"]).astype(str))
    return {"report": np.array([json.dumps(report.to_dict())], dtype=object)}


def scan_bad_samples(ds: ray.data.Dataset) -> BadSampleReport:
    """Count a dataset of rows with ``id`` and ``bad_reason`` columns in one streaming pass."""
    import json

    total = BadSampleReport()
    counts = ds.select_columns(["id", "bad_reason"]).map_batches(_report_batch, batch_format="numpy")
    for row in counts.iter_rows():
        total.merge(BadSampleReport.from_dict(json.loads(row["report"])))
    return total
