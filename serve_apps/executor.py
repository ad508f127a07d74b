"""The serving engine's executor: runs what the policy planned (serve_apps.policy) on the model.

No Ray, no asyncio. The executor builds the batch of each prefill group on the current model, prefills it, merges
the prefilled rows into the decoding batch of their model while the rows that leave drop out (one copy of the KV
cache does both: `BatchRun.absorb`), decodes one token per running batch, and splits a batch into one per row when
a decode step raised. The generation itself (KV cache, sampling, stop strings, usage) is serve_apps.generation's
`BatchRun`. `prefill` and `decode` run the model: the engine loop (serve_apps.scheduler) calls them on its compute
thread, the rest on its event loop.

Each row of a [`Batch`] is tied to a handle of the engine loop's (its request: whom its events go to), kept aligned
with the rows as they leave and join. There is one decoding batch per model: after a reconfigure, running requests
finish on their model while new ones decode in a batch on the new one.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

from serve_apps.compression import Rate
from serve_apps.events import Event, FinalEvent
from serve_apps.generation import BatchRun, Prepared


class Handle(Protocol):
    """What the executor needs of the engine loop's handle of a request: the key plans name it by."""

    key: int


@dataclass(eq=False)
class Batch:
    """A batch on the model and the request handle of each of its rows (`handles[i]` answers row `i`).

    Attributes:
        run: Its generation state.
        handles: One per row, aligned with `run.rows`.
        joins: Rows of other batches may join it and it may join another (continuous batching); False: it
            decodes on its own until its last row finishes (the static baseline; a row resumed after a failed
            decode step, so that it fails alone if it fails again).
    """

    run: BatchRun
    handles: list[Any]
    joins: bool = True

    @property
    def unfinished(self) -> int:
        return sum(not row.finished for row in self.run.rows)


class Executor:
    """Runs plans on the current model; holds the running (decoding) batches.

    Args:
        current_model: returns `(model, processor, version)` for a new batch (a model swap applies to the next
            batch; running batches finish on the model they started with).
        on_batch: called with each new batch's record (id, queue, rate, requested rates, size, started, running,
            fingerprint; `prefill_s` once prefilled, `failed` if a step of it raised, `resumed_from`).
    """

    def __init__(
        self,
        current_model: Callable[[], tuple[Any, Any, str]],
        on_batch: Callable[[dict[str, Any]], None] = lambda info: None,
    ):
        self.current_model = current_model
        self.on_batch = on_batch
        self.running: list[Batch] = []

    # -- building --------------------------------------------------------------------------------------------

    def start(
        self, handles: list[Handle], items: list[Prepared], rate: Rate, queue: str, joins: bool, running: int
    ) -> Batch:
        """The batch of a prefill group on the current model (its prefill not run yet), recorded with the
        requests `running` now. Raises what building raises (e.g. no model loaded)."""
        model, processor, version = self.current_model()
        run = BatchRun(model, processor, items, rate, queue)
        run.info["fingerprint"] = version
        return self._recorded(Batch(run, list(handles), joins), running)

    def resume(self, batch: Batch, i: int, running: int) -> Batch:
        """Row `i` of `batch`, whose decode step raised, as a batch of its own that goes on from what it generated
        (`BatchRun.split_row`) and never joins another."""
        return self._recorded(Batch(batch.run.split_row(i), [batch.handles[i]], joins=False), running)

    def _recorded(self, batch: Batch, running: int) -> Batch:
        batch.run.info.update(started=round(time.time(), 3), running=running)
        self.on_batch(batch.run.info)
        return batch

    # -- running (compute thread) ------------------------------------------------------------------------------

    def prefill(self, batch: Batch) -> list[Event | None]:
        """Prefill `batch`: each row's first event (or None)."""
        return _fingerprinted(batch, batch.run.prefill())

    def decode(self, batch: Batch) -> list[Event | None]:
        """One decode step of running `batch`: each row's event (or None)."""
        return _fingerprinted(batch, batch.run.step())

    # -- rows leaving and joining ------------------------------------------------------------------------------

    def settle(self, batch: Batch) -> Batch | None:
        """`batch` just prefilled, ready to run: a batch that joins others first drops the rows that finished at
        their first token; None when nothing of it goes on decoding."""
        if batch.joins:
            _drop(batch, batch.run.remove_finished())
        return None if not batch.run.rows or batch.run.done else batch

    def merge(self, joining: list[Batch], leave: Collection[int]) -> list[Batch]:
        """Before a decode step: the finished rows whose handle's key is in `leave` drop out of the running
        batches (their KV cache freed), and the batches just prefilled come in: one that joins merges into the
        running batch of its model that takes joiners, in the same copy of its KV cache; any other runs as a
        batch of its own. A batch left with no rows is gone.

        Returns:
            The running batches that took in rows or came in now (they decode at this step).
        """
        joins: dict[int, list[Batch]] = defaultdict(list)
        grown = []
        for batch in joining:
            target = next((b for b in self.running if _may_join(batch, b)), None) if batch.joins else None
            if target is None:
                self.running.append(batch)
                grown.append(batch)
            else:
                joins[id(target)].append(batch)
        for batch in list(self.running):
            others = joins.get(id(batch), [])
            drop = [
                i
                for i, (h, row) in enumerate(zip(batch.handles, batch.run.rows))
                if row.finished and h.key in leave
            ]
            if others or drop:
                _drop(batch, batch.run.absorb(*(other.run for other in others), drop=drop))
                batch.handles += [handle for other in others for handle in other.handles]
            if others:
                grown.append(batch)
            if not batch.run.rows:
                self.running.remove(batch)
        return grown

    def retire(self, batch: Batch) -> None:
        """A running `batch` whose rows all finished stops running (the static baseline's batches end so)."""
        if batch.run.done and batch in self.running:
            self.running.remove(batch)

    def discard(self, batch: Batch) -> None:
        """`batch` stops running (a step of it raised)."""
        if batch in self.running:
            self.running.remove(batch)


def _may_join(batch: Batch, target: Batch) -> bool:
    return target.joins and target.run.model is batch.run.model


def _drop(batch: Batch, gone: list[int]) -> None:
    """Keep `batch.handles` aligned with its rows after the rows at indices `gone` left."""
    left = set(gone)
    batch.handles = [handle for i, handle in enumerate(batch.handles) if i not in left]


def _fingerprinted(batch: Batch, events: list[Event | None]) -> list[Event | None]:
    """A final event names the model version its row was prefilled on."""
    return [
        dataclasses.replace(event, fingerprint=row.info.get("fingerprint"))
        if isinstance(event, FinalEvent)
        else event
        for row, event in zip(batch.run.rows, events)
    ]


__all__ = ["Batch", "Executor", "Handle"]
