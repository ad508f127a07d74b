"""The replica's engine loop: requests in, a policy's plan run on the executor each step, events out. No Ray here.

The engine is split the way vLLM's v1 engine is: serve_apps.policy decides each step (which waiting requests to
prefill together and at which rate, which rows decode, which leave; pure, tested without a model),
serve_apps.executor runs the plan on the model, and the [`Scheduler`] here is the asyncio loop that ties them:

- it queues each request ([`Scheduler.submit`]) and streams its events back to it as they come;
- each step it marks the rows whose client went away (they stop, and leave when the policy says), shows the
  policy the engine ([`EngineState`]), and runs its [`StepPlan`]: the prefill groups, one forward pass each on the
  compute thread, their first tokens delivered; the merge of the rows that leave and join; one decode step per
  running batch; an idle plan waits for a request;
- it times where the engine's time goes (`engine_stats`) and reports each step to `on_step` (metrics);
- it owns the one failure-isolation rule ([`Scheduler._recover`]).

A failure ends only the request at fault. A failure pinned on a row (its seed, its sampling) ends that row alone
inside the step (serve_apps.generation). A step that raises cannot be pinned on a row, so each of its requests goes
on in a batch of its own, prefilled at the next step: after a failed prefill each starts afresh (nothing was sent
yet); after a failed decode step each unfinished request re-reads its prompt and what it generated (the batch's KV
cache is lost), and never joins another batch; only the request at fault fails again, and a request alone whose
step fails ends with the error. A batch that cannot even be built (no model loaded) answers its requests with an
error, and a fault of the loop itself ends the running requests with one. Every request gets an answer, and later
requests are served.

Production runs `ContinuousPolicy` (serve_apps.policy); the baselines of benchmarks/serve_load.py (the static
batcher, one queue for every rate, all dense) are other policies given in Python, run by this same loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from serve_apps.events import ErrorEvent, Event, FinalEvent
from serve_apps.executor import Batch, Executor
from serve_apps.generation import Prepared
from serve_apps.policy import (
    BatchingConfig,
    ContinuousPolicy,
    EngineState,
    PrefillGroup,
    RunningRow,
    SchedulingPolicy,
    StepPlan,
    WaitingRequest,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiter:
    """A request's handle: its stream of events, and whether its client went away."""

    key: int
    item: Prepared
    arrived: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # its client went away: its row stops at the next step


class Scheduler:
    """The replica's engine: queues requests, runs a scheduling policy's plans on one compute thread.

    Args:
        config: batching settings (the production policy's knobs).
        current_model: returns `(model, processor, version)` to use for a new batch (a model swap applies to the
            next batch; running batches finish on the model they started with).
        on_batch: called with each new batch's record (id, queue, rate, requested rates, size, ...).
        on_step: called after each engine step with the requests waiting and running by rate and the rows the
            step decoded (its batch size; 0: idle); the replica passes `serve_apps.metrics.observe_engine_step`.
        policy: what decides each step; default `ContinuousPolicy(config)`. The baselines of
            benchmarks/serve_load.py pass theirs.
    """

    def __init__(
        self,
        config: BatchingConfig,
        current_model: Callable[[], tuple[Any, Any, str]],
        on_batch: Callable[[dict[str, Any]], None] = lambda info: None,
        on_step: Callable[[dict[str, int], dict[str, int], int], None] = lambda waiting, running, rows: None,
        policy: SchedulingPolicy | None = None,
    ):
        self.config = config
        self.policy = policy if policy is not None else ContinuousPolicy(config)
        self.executor = Executor(current_model, on_batch)
        self.on_step = on_step
        self._waiting: list[_Waiter] = []  # arrival order
        self._queued: list[Batch] = []  # built, prefilled at the next step (requests resumed after a failure)
        # taken out of `_queued` by the step under way and not yet running or answered: if the step itself fails,
        # the loop answers these too (else their streams would wait for ever)
        self._taken: list[Batch] = []
        self._keys = itertools.count()
        self._wake = asyncio.Event()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpn-compute")
        self._task: asyncio.Task | None = None
        # where the engine's time went, cumulative (`engine_stats`)
        self._seconds: collections.Counter[str] = collections.Counter()
        self._steps = 0
        self._since = time.perf_counter()
        self._in_phase: tuple[str, float] | None = None  # the `_timed` phase under way and its start

    @property
    def running(self) -> list[Batch]:
        """The running (prefilled, decoding) batches."""
        return self.executor.running

    def waiting(self) -> int:
        return len(self._waiting)

    async def submit(self, item: Prepared) -> AsyncIterator[Event]:
        """Queue `item`; yield its events (`DeltaEvent`s, then a `FinalEvent` or an `ErrorEvent`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        waiter = _Waiter(next(self._keys), item, time.monotonic())
        self._waiting.append(waiter)
        self._wake.set()
        done = False
        try:
            while True:
                event = await waiter.events.get()
                if event is None:
                    done = True
                    return
                yield event
        finally:
            if not done:  # the caller stopped listening (client disconnect): free its slot
                waiter.cancelled = True
                with contextlib.suppress(ValueError):
                    self._waiting.remove(waiter)

    def running_requests(self) -> int:
        """Requests being generated now."""
        return sum(batch.unfinished for batch in self.running)

    def waiting_by_rate(self) -> dict[str, int]:
        """Requests waiting for their prefill, by requested rate (e.g. for metrics)."""
        return dict(collections.Counter(str(waiter.item.compression) for waiter in self._waiting))

    def running_by_rate(self) -> dict[str, int]:
        """Requests being generated now, by requested rate (e.g. for metrics)."""
        counts: dict[str, int] = collections.Counter()
        for batch in self.running:
            for row in batch.run.rows:
                if not row.finished:
                    counts[str(row.request.compression)] += 1
        return dict(counts)

    def engine_stats(self) -> dict[str, Any]:
        """Where the engine's time went since the scheduler was made, in seconds: `prefill` and `decode` on the
        compute thread, `loop_wait` between the compute thread finishing a call and the engine going on (the event
        loop busy with other work: streaming answers, taking requests), `merge` (rows leaving and joining the
        decoding batch), `build` (making the prefill batches), `idle` (nothing to do), and `wall` in all; `steps`
        counts the decode steps."""
        now = time.perf_counter()
        totals = collections.Counter(self._seconds)
        if self._in_phase is not None:  # e.g. idle now: the wait so far counts
            phase, start = self._in_phase
            totals[phase] += now - start
        seconds = {phase: round(value, 6) for phase, value in sorted(totals.items())}
        return {"steps": self._steps, "wall": round(now - self._since, 6), "seconds": seconds}

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Count the time in the block as `phase` (read while under way too, by `engine_stats`)."""
        start = time.perf_counter()
        self._in_phase = (phase, start)
        try:
            yield
        finally:
            self._in_phase = None
            self._seconds[phase] += time.perf_counter() - start

    async def _compute_call(self, fn: Callable[[], Any], phase: str) -> Any:
        """`fn()` on the compute thread; its time there counted as `phase`, the rest of the wait as `loop_wait`."""
        inside = 0.0

        def timed() -> Any:
            nonlocal inside
            start = time.perf_counter()
            try:
                return fn()
            finally:
                inside = time.perf_counter() - start

        start = time.perf_counter()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._compute, timed)
        finally:
            self._seconds[phase] += inside
            self._seconds["loop_wait"] += time.perf_counter() - start - inside

    # -- the loop ---------------------------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            try:
                await self._step()
            except Exception:  # noqa: BLE001 - last line of defence: a bug here must not stop the replica's serving
                logger.exception("engine step failed; ending the running batches and those it had taken")
                stranded = [batch for batch in self._taken if batch not in self.running]
                self._taken = []
                for batch in [*self.running, *stranded]:
                    self._recover(
                        batch, RuntimeError("internal scheduler error"), prefill=False, isolate=False
                    )
                await asyncio.sleep(0.01)

    async def _step(self) -> None:
        """One engine step: the policy's plan for the engine as it is now, run."""
        self._stop_cancelled(self.running)
        plan = self.policy.plan(self._state())
        if plan.idle:
            await self._idle(plan.wait_s)
            return
        with self._timed("build"):
            for group in plan.prefill:
                self._start(group)
        self._taken, self._queued = self._queued, []
        joining = []
        for batch in list(self._taken):
            if (ready := await self._prefill(batch)) is not None:
                joining.append(ready)
            await asyncio.sleep(0)
        with self._timed("merge"):
            grown = self.executor.merge(joining, set(plan.leave))
        self._taken = []  # each is running now, merged into a running batch, or answered
        await self._decode_all(plan, grown)

    def _state(self) -> EngineState:
        """The engine as the policy sees it."""
        return EngineState(
            now=time.monotonic(),
            waiting=tuple(
                WaitingRequest(w.key, w.item.compression, len(w.item.input_ids), w.arrived)
                for w in self._waiting
            ),
            running=tuple(
                RunningRow(handle.key, i, row.finished, handle.cancelled)
                for i, batch in enumerate(self.running)
                for handle, row in zip(batch.handles, batch.run.rows)
            ),
            resuming=sum(len(batch.handles) for batch in self._queued),
        )

    async def _idle(self, wait_s: float | None) -> None:
        """Wait for a request (at most `wait_s`): the policy gives the first one time to find company."""
        self._report_step(0)
        self._wake.clear()
        with self._timed("idle"), contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), wait_s)

    def _stop_cancelled(self, batches: list[Batch]) -> None:
        """Rows whose client went away stop generating (the policy decides when they leave)."""
        for batch in batches:
            for handle, row in zip(batch.handles, batch.run.rows):
                row.finished = row.finished or handle.cancelled

    def _start(self, group: PrefillGroup) -> None:
        """Take the group's requests out of the waiting ones and build their batch, prefilled at this step."""
        keys = set(group.keys)
        by_key = {waiter.key: waiter for waiter in self._waiting if waiter.key in keys}
        self._waiting = [waiter for waiter in self._waiting if waiter.key not in keys]
        waiters = [by_key[key] for key in group.keys if key in by_key]
        if waiters:
            self._build(waiters, self._starter(waiters, group.rate, group.queue, group.joins))

    def _starter(self, waiters: list[_Waiter], rate: Any, queue: str, joins: bool) -> Callable[[], Batch]:
        """What builds the batch of `waiters` at `rate` on the current model."""
        items = [waiter.item for waiter in waiters]
        return lambda: self.executor.start(
            waiters, items, rate, queue, joins, running=self.running_requests()
        )

    def _build(self, waiters: list[_Waiter], build: Callable[[], Batch]) -> None:
        """Queue the batch `build()` makes for the next prefill; if it cannot be built, answer `waiters` with the
        error."""
        try:
            batch = build()
        except Exception as exc:  # noqa: BLE001 - e.g. no model loaded: the requests get an error, the loop goes on
            logger.exception("cannot start a batch of %d requests", len(waiters))
            for waiter in waiters:
                _finish(waiter, ErrorEvent(f"generation failed: {exc}"))
            return
        self._queued.append(batch)

    async def _prefill(self, batch: Batch) -> Batch | None:
        """Prefill one batch and deliver its first tokens; the batch, if any of its rows go on decoding."""
        try:
            events = await self._compute_call(functools.partial(self.executor.prefill, batch), "prefill")
        except Exception as exc:  # noqa: BLE001 - a failed prefill answers its members instead of hanging them
            self._taken.remove(batch)  # _recover answers or re-queues its requests
            self._recover(batch, exc, prefill=True)
            return None
        self._deliver(batch, events)
        self._stop_cancelled([batch])
        with self._timed("merge"):
            return self.executor.settle(batch)

    async def _decode_all(self, plan: StepPlan, grown: list[Batch]) -> None:
        """One decode step of every running batch that holds a row the plan decodes, or rows that came in now."""
        decode = set(plan.decode)
        rows = 0
        for batch in list(self.running):
            if batch in self.running and (batch in grown or any(h.key in decode for h in batch.handles)):
                rows += batch.unfinished
                try:
                    events = await self._compute_call(
                        functools.partial(self.executor.decode, batch), "decode"
                    )
                except Exception as exc:  # noqa: BLE001 - each unfinished row goes on alone
                    self._recover(batch, exc, prefill=False)
                else:
                    self._deliver(batch, events)
                self._steps += 1
        self._report_step(rows)
        await asyncio.sleep(0)  # let new arrivals queue between steps

    def _deliver(self, batch: Batch, events: list[Event | None]) -> None:
        """Each row's event to its request; a batch whose rows all finished stops running."""
        for waiter, event in zip(batch.handles, events):
            if event is None:
                continue
            if isinstance(event, FinalEvent | ErrorEvent):
                _finish(waiter, event)
            else:
                waiter.events.put_nowait(event)
        self.executor.retire(batch)

    def _recover(self, batch: Batch, exc: Exception, prefill: bool, isolate: bool = True) -> None:
        """The one failure-isolation rule: a compute call on `batch` (its `prefill`, else a decode step) raised.

        The failure cannot be pinned on a row, so to `isolate` the request at fault each of several requests goes
        on in a batch of its own, prefilled at the next step: after a failed prefill it starts afresh (nothing was
        sent yet; it joins others again if the group did), after a failed decode step it re-reads what it
        generated (the KV cache is lost) and stays alone. A request alone, or every one when not `isolate` (the
        loop itself failed), ends with the error.
        """
        self.executor.discard(batch)
        logger.error(
            "batch %s: %s failed", batch.run.batch_id, "prefill" if prefill else "decode step", exc_info=exc
        )
        run = batch.run
        run.mark_failed(exc)
        unfinished = [i for i, row in enumerate(run.rows) if not row.finished]
        if isolate and prefill and len(batch.handles) > 1:
            for waiter in batch.handles:
                self._build(
                    [waiter], self._starter([waiter], run.compression, run.info["queue"], batch.joins)
                )
        elif isolate and len(unfinished) > 1:
            for i in unfinished:
                resume = functools.partial(self.executor.resume, batch, i, running=self.running_requests())
                self._build([batch.handles[i]], resume)
        else:
            for i in range(len(run.rows)) if prefill else unfinished:  # nothing of a failed prefill was sent
                run.rows[i].finished = True
                _finish(batch.handles[i], ErrorEvent(f"generation failed: {exc}"))

    def _report_step(self, rows: int) -> None:
        """`on_step` with the queues as they are now; a failing observer is logged, never fails the step."""
        try:
            self.on_step(self.waiting_by_rate(), self.running_by_rate(), rows)
        except Exception:  # noqa: BLE001 - metrics must not stop serving
            logger.exception("on_step observer failed")


def _finish(waiter: _Waiter, event: FinalEvent | ErrorEvent) -> None:
    """Send a request its last event (a `FinalEvent` or an `ErrorEvent`) and close its stream."""
    waiter.events.put_nowait(event)
    waiter.events.put_nowait(None)


__all__ = ["Scheduler"]
