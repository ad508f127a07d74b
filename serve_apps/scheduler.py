"""Per-rate request queues and the engine loop that serves them. No Ray here.

Two engines (`BatchingConfig.engine`). `continuous` (default) batches per iteration: each step first drops the
rows whose client went away, then prefills the waiting requests that fit (oldest first, at most `max_num_seqs`
running in all and `max_prefill_tokens` prompt tokens per step), one prefill per queue (so per rate when
bucketed: never padding one rate to another), delivers their first tokens and merges them into the running batch
(`BatchRun.absorb`, `DPNCache.append_rows`: the rows that finished in the last step leave in the same copy of the
KV cache), then decodes one token for every running request; a finished row frees its slot at once. One running
batch per model: after a reconfigure, running requests finish on their model while new ones decode in a batch on
the new one. When idle, the first request
waits `batch_wait_timeout_s` for company. A failed prefill of several requests is retried one request at a time;
after a failed decode step each unfinished request re-reads what it generated and decodes alone.

`static`, the former engine, is kept to measure what continuous batching buys (benchmarks/serve_load.py):

Each request waits in the queue of the rate it runs at: `auto`, a factor (1, 2, 4), or a schedule, one factor per
pooling layer, keyed by its label (`1-2-4`; serve_apps.compression). A batch is taken from one queue only, so it
never mixes rates. Batches are formed when the model can take them, not on a fixed timer, so under load a batch
holds everything that arrived while the previous work ran:

- when nothing is running, the queue whose oldest request has waited `batch_wait_timeout_s` (or that holds
  `max_batch_size` requests) becomes a batch;
- while batches are running, a queue becomes a new batch only when it is full or its oldest request has waited
  `max_queue_delay_s`, and at most `max_running_batches` run at once.

Running batches share one compute thread and advance one step each in turn (prefill, then one token per step), so
a long generation does not hold back the prefill of another rate's batch until it finishes.

The loop outlives any one request: a row that fails ends alone (serve_apps.generation); a batch whose prefill or
decode step raises is split into one batch per request (a decoding request re-reads its prompt and what it
generated, since the shared KV cache is lost), so only the request at fault fails; a batch that cannot even be
built answers its requests with an error. Every request gets an answer, and later requests are served.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydantic import Field

from dpn_model.configuration import routing_mode
from pipelines.config_models import ConfigModel, validate_config
from serve_apps.compression import Rate, as_rate, densest
from serve_apps.events import ErrorEvent, Event, FinalEvent
from serve_apps.generation import BatchRun, Prepared

logger = logging.getLogger(__name__)

Mode = Literal["bucketed", "mixed", "dense"]
MODES = get_args(Mode)
Engine = Literal["continuous", "static"]
ENGINES = get_args(Engine)


class BatchingConfig(ConfigModel):
    """The `batching` section of the serve config.

    Attributes:
        max_batch_size: Most requests in one batch.
        batch_wait_timeout_s: When the model is idle, how long the oldest request waits for company.
        max_queue_delay_s: While batches run, how long a queue's oldest request waits before its (partial) batch
            is started anyway.
        max_running_batches: Batches advanced together (each holds its KV cache).
        mode: `bucketed` (one queue per rate; with the continuous engine, one prefill per rate inside each step),
            `mixed` (one queue; a prefill batch runs at the densest rate its requests may need) or `dense` (one
            queue, all dense); the last two exist to measure what bucketing buys (benchmarks/serve_load.py).
        engine: `continuous` (iteration-level batching: every step decodes one token for each running request,
            new requests are prefilled and join the running batch at the next step, a finished one leaves at
            once) or `static` (the batch's rows stay until its last one finishes; `max_batch_size`,
            `max_queue_delay_s` and `max_running_batches` apply to it only).
        max_num_seqs: Continuous engine: most requests running (decoding or being prefilled) at once.
        max_prefill_tokens: Continuous engine: prompt tokens (image tokens included) prefilled in one step; a
            longer prompt is prefilled alone. Bounds how long one step holds back the running requests' tokens.
        waiting_served_ratio: Continuous engine, while requests are decoding: waiting requests are prefilled once
            they number at least this fraction of the running ones (as Hugging Face TGI's option of that name),
            or after `max_waiting_steps`, or when they would fill `max_num_seqs`. 0 prefills whatever waits at
            every step (lowest time to first token); higher values make fewer, larger prefill batches, which
            serve more per second where a small batch is inefficient (a CPU, a small model).
        max_waiting_steps: Continuous engine: engine steps (one decoded token each) a waiting request may be held
            back by `waiting_served_ratio` before it is prefilled anyway (TGI's `max_waiting_tokens`).
        history: Batches remembered for `GET /v1/dpn/batches`.
    """

    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_queue_delay_s: float = Field(0.5, ge=0)
    max_running_batches: int = Field(4, ge=1)
    mode: Mode = "bucketed"
    engine: Engine = "continuous"
    max_num_seqs: int = Field(32, ge=1)
    max_prefill_tokens: int = Field(8192, ge=1)
    waiting_served_ratio: float = Field(0.0, ge=0)
    max_waiting_steps: int = Field(20, ge=0)
    history: int = 2048

    @property
    def capacity(self) -> int:
        """Requests one replica generates at once: `max_num_seqs` (continuous), else `max_batch_size` x
        `max_running_batches` (static)."""
        if self.engine == "continuous":
            return self.max_num_seqs
        return self.max_batch_size * self.max_running_batches

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BatchingConfig:
        """Build from the serve config's `batching` mapping; a `pipelines.config_models.ConfigError` (a `ValueError`) names each
        wrong key."""
        return validate_config(cls, values or {}, section="batching")


def mixed_batch_rate(requested: list[Rate]) -> Rate:
    """The rate a one-queue batch runs at: its only rate, else the densest any member may need (per pooling layer,
    the smallest factor any member applies there: `[2, "1-2-4", 4]` runs at `"1-2-2"`)."""
    rates = {as_rate(rate) for rate in requested}
    if len(rates) == 1:
        return next(iter(rates))
    if any(routing_mode(rate) for rate in rates):
        return 1  # the router may pick 1x for an auto request (with or without a cost dial)
    return densest(sorted(rates, key=str))


@dataclass
class _Waiter:
    item: Prepared
    arrived: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # its client went away: its row is dropped at the next step


@dataclass
class _Running:
    run: BatchRun
    waiters: list[_Waiter]
    started: bool = False  # its prefill has run (or been tried)
    isolated: bool = False  # continuous engine: decodes on its own (resumed after a failed decode step)


class Scheduler:
    """Queues requests by rate and runs single-rate batches on one compute thread.

    Args:
        config: batching settings.
        current_model: returns `(model, processor, version)` to use for a new batch (a model swap applies to the
            next batch; running batches finish on the model they started with).
        on_batch: called with each new batch's record (id, queue, rate, requested rates, size, ...).
        on_step: called after each engine step with the requests waiting and running by rate and the rows the
            step decoded (its batch size; 0: idle); the replica passes `serve_apps.metrics.observe_engine_step`.
    """

    def __init__(
        self,
        config: BatchingConfig,
        current_model: Callable[[], tuple[Any, Any, str]],
        on_batch: Callable[[dict[str, Any]], None] = lambda info: None,
        on_step: Callable[[dict[str, int], dict[str, int], int], None] = lambda waiting, running, rows: None,
    ):
        self.config = config
        self.current_model = current_model
        self.on_batch = on_batch
        self.on_step = on_step
        self.queues: dict[str, collections.deque[_Waiter]] = collections.defaultdict(collections.deque)
        self.running: list[_Running] = []
        self._pending: list[_Running] = []
        # continuous engine: steps the waiting requests were held back (waiting_served_ratio)
        self._held_steps = 0
        self._wake = asyncio.Event()
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpn-compute")
        self._task: asyncio.Task | None = None
        # continuous engine: where its time went, cumulative (`engine_stats`)
        self._seconds: collections.Counter[str] = collections.Counter()
        self._steps = 0
        self._since = time.perf_counter()
        self._in_phase: tuple[str, float] | None = None  # the `_timed` phase under way and its start

    def queue_key(self, compression: Rate) -> str:
        return str(compression) if self.config.mode == "bucketed" else self.config.mode

    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values())

    async def submit(self, item: Prepared) -> AsyncIterator[Event]:
        """Queue `item`; yield its events (`DeltaEvent`s, then a `FinalEvent` or an `ErrorEvent`)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())
        waiter = _Waiter(item, time.monotonic())
        queue = self.queues[self.queue_key(item.compression)]
        queue.append(waiter)
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
                    queue.remove(waiter)

    def running_requests(self) -> int:
        """Requests being generated now."""
        return sum(sum(not row.finished for row in entry.run.rows) for entry in self.running)

    def waiting_by_rate(self) -> dict[str, int]:
        """Requests waiting for their prefill, by requested rate (e.g. for metrics)."""
        counts: dict[str, int] = collections.Counter()
        for queue in self.queues.values():
            for waiter in queue:
                counts[str(waiter.item.compression)] += 1
        return dict(counts)

    def running_by_rate(self) -> dict[str, int]:
        """Requests being generated now, by requested rate (e.g. for metrics)."""
        counts: dict[str, int] = collections.Counter()
        for entry in self.running:
            for row, req in zip(entry.run.rows, entry.run.requests):
                if not row.finished:
                    counts[str(req.compression)] += 1
        return dict(counts)

    def engine_stats(self) -> dict[str, Any]:
        """Where the continuous engine's time went since the scheduler was made, in seconds: `prefill` and
        `decode` on the compute thread, `loop_wait` between the compute thread finishing a call and the engine
        going on (the event loop busy with other work: streaming answers, taking requests), `merge` (rows
        leaving and joining the decoding batch), `build` (making the prefill batches), `idle` (nothing to do),
        and `wall` in all; `steps` counts the decode steps."""
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

    # -- the loop ---------------------------------------------------------------------------------------------

    def _ready_queue(self, now: float) -> str | None:
        """The queue to start a batch from now (oldest head first), or None."""
        busy = bool(self.running)
        if busy and len(self.running) >= self.config.max_running_batches:
            return None
        limit = self.config.max_queue_delay_s if busy else self.config.batch_wait_timeout_s
        ready = [
            (q[0].arrived, key)
            for key, q in self.queues.items()
            if q and (len(q) >= self.config.max_batch_size or now - q[0].arrived >= limit)
        ]
        return min(ready)[1] if ready else None

    def _next_deadline(self, now: float) -> float | None:
        limit = self.config.max_queue_delay_s if self.running else self.config.batch_wait_timeout_s
        heads = [q[0].arrived for q in self.queues.values() if q]
        return max(0.0, min(heads) + limit - now) if heads else None

    def _start_batch(self, key: str) -> None:
        queue = self.queues[key]
        waiters = [queue.popleft() for _ in range(min(len(queue), self.config.max_batch_size))]
        requested = [w.item.compression for w in waiters]
        if self.config.mode == "bucketed":
            rate = requested[0]
        elif self.config.mode == "dense":
            rate = 1
        else:
            rate = mixed_batch_rate(requested)
        self._launch(waiters, rate, key)

    def _launch(self, waiters: list[_Waiter], rate: Rate, key: str) -> None:
        """Start a new batch of `waiters` on the current model."""
        self._add(waiters, self._builder(waiters, rate, key))

    def _builder(self, waiters: list[_Waiter], rate: Rate, key: str) -> Callable[[], BatchRun]:
        """What builds (prefill not run yet) the batch of `waiters` at `rate` on the current model."""

        def build() -> BatchRun:
            model, processor, version = self.current_model()
            run = BatchRun(model, processor, [w.item for w in waiters], rate, key)
            run.info["fingerprint"] = version
            return run

        return build

    def _add(self, waiters: list[_Waiter], build: Callable[[], BatchRun]) -> None:
        """Add the batch `build()` makes to the running ones; if it cannot be built, answer its requests."""
        run = self._build(waiters, build)
        if run is not None:
            self.running.append(_Running(run, waiters))

    def _build(self, waiters: list[_Waiter], build: Callable[[], BatchRun], **info: Any) -> BatchRun | None:
        """`build()`, its record (start time, `info`) reported to `on_batch`; None, with its requests answered
        with an error, if it cannot be built."""
        try:
            run = build()
            run.info.update(started=round(time.time(), 3), **info)
            self.on_batch(run.info)
        except Exception as exc:  # noqa: BLE001 - e.g. no model loaded: the requests get an error, the loop goes on
            logger.exception("cannot start a batch of %d requests", len(waiters))
            for waiter in waiters:
                _finish(waiter, ErrorEvent(f"generation failed: {exc}"))
            return None
        return run

    def _fail(self, entry: _Running, exc: Exception, prefill: bool, isolate: bool = True) -> None:
        """A step of `entry` raised. To `isolate` the request at fault, each of several requests left goes on in a
        batch of its own (after a failed `prefill` it starts again; after a failed decode step it re-reads what
        it generated, as its KV cache is lost), so only that request fails; else they end with an error."""
        self.running.remove(entry)
        logger.error("batch %s failed", entry.run.batch_id, exc_info=exc)
        run = entry.run
        run.info["failed"] = f"{type(exc).__name__}: {exc}"
        unfinished = [i for i, row in enumerate(run.rows) if not row.finished]
        if isolate and prefill and len(entry.waiters) > 1:
            for waiter in entry.waiters:  # nothing was sent yet: each request starts afresh
                self._launch([waiter], run.compression, run.info["queue"])
        elif isolate and len(unfinished) > 1:
            for i in unfinished:
                self._add([entry.waiters[i]], functools.partial(run.split_row, i))
        else:
            for i in unfinished:
                run.rows[i].finished = True
                _finish(entry.waiters[i], ErrorEvent(f"generation failed: {exc}"))

    def _deliver(self, entry: _Running, events: list[Event | None]) -> None:
        for waiter, event, info in zip(entry.waiters, events, entry.run.row_info):
            if event is None:
                continue
            if isinstance(event, FinalEvent):
                event = dataclasses.replace(event, fingerprint=info.get("fingerprint"))
            if isinstance(event, FinalEvent | ErrorEvent):
                _finish(waiter, event)
            else:
                waiter.events.put_nowait(event)
        if entry.run.done and entry in self.running:
            self.running.remove(entry)

    async def _advance(self, entry: _Running) -> None:
        """One step of one running batch on the compute thread: its prefill first, then one token per step."""
        prefill = not entry.started
        entry.started = True
        for row, waiter in zip(entry.run.rows, entry.waiters):
            row.finished = row.finished or waiter.cancelled  # its client went away: it stops here
        try:
            events = await asyncio.get_running_loop().run_in_executor(
                self._compute, entry.run.prefill if prefill else entry.run.step
            )
        except Exception as exc:  # noqa: BLE001 - a failed batch answers its members instead of hanging them
            self._fail(entry, exc, prefill)
            return
        self._deliver(entry, events)

    async def _loop(self) -> None:
        tick = self._tick_continuous if self.config.engine == "continuous" else self._tick
        while True:
            try:
                await tick()
            except Exception:  # noqa: BLE001 - last line of defence: a bug here must not stop the replica's serving
                logger.exception("scheduler tick failed; ending the running batches")
                for entry in list(self.running):
                    self._fail(entry, RuntimeError("internal scheduler error"), prefill=False, isolate=False)
                await asyncio.sleep(0.01)

    async def _tick(self) -> None:
        """Start the batches that are due, then advance every running batch by one step."""
        key = self._ready_queue(time.monotonic())
        while key is not None:
            self._start_batch(key)
            key = self._ready_queue(time.monotonic())
        if not self.running:
            self._report_step(0)
            self._wake.clear()
            timeout = self._next_deadline(time.monotonic())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            return
        for entry in list(self.running):
            self._report_step(len(entry.waiters))
            await self._advance(entry)
            # let new arrivals queue (and maybe start) between steps
            await asyncio.sleep(0)
            key = self._ready_queue(time.monotonic())
            if key is not None and len(self.running) < self.config.max_running_batches:
                self._start_batch(key)

    # -- the continuous engine ---------------------------------------------------------------------------------
    # `self.running` holds one decoding batch per model (more than one only while a reconfigure drains the old
    # model); `self._pending` the batches to prefill at the next step (new groups, or rows resumed after a
    # failed decode step).

    def _prefill_now(self) -> bool:
        """Whether this step prefills what waits: always when nothing decodes; while requests decode, once the
        waiting ones reach `waiting_served_ratio` of the running ones, would fill `max_num_seqs`, or were held
        back `max_waiting_steps` steps."""
        waiting, running = self.waiting(), self.running_requests()
        cfg = self.config
        if (
            not waiting
            or not running
            or waiting >= cfg.waiting_served_ratio * running
            or waiting + running >= cfg.max_num_seqs
            or self._held_steps >= cfg.max_waiting_steps
        ):
            self._held_steps = 0
            return bool(waiting)
        self._held_steps += 1
        return False

    def _admit(self) -> list[tuple[str, list[_Waiter]]]:
        """Take the requests to prefill this step, oldest first, within `max_num_seqs` and `max_prefill_tokens`
        (a prompt over the budget is taken alone); grouped by queue (one group per rate when bucketed)."""
        room = self.config.max_num_seqs - self.running_requests() - sum(len(e.waiters) for e in self._pending)
        if room <= 0:
            return []
        heads = sorted((w.arrived, key) for key, q in self.queues.items() for w in list(q)[:room])
        groups: dict[str, list[_Waiter]] = {}
        budget = self.config.max_prefill_tokens
        for taken, (_, key) in enumerate(heads):
            if taken >= room:
                break
            waiter = self.queues[key][0]
            cost = len(waiter.item.input_ids)
            if taken and cost > budget:
                break
            self.queues[key].popleft()
            groups.setdefault(key, []).append(waiter)
            budget -= cost
        return list(groups.items())

    def _group_rate(self, waiters: list[_Waiter]) -> Rate:
        requested = [w.item.compression for w in waiters]
        if self.config.mode == "bucketed":
            return requested[0]
        return 1 if self.config.mode == "dense" else mixed_batch_rate(requested)

    def _drop_cancelled(self) -> None:
        for entry in self.running:
            for row, waiter in zip(entry.run.rows, entry.waiters):
                if waiter.cancelled and not row.finished:
                    row.finished = True

    def _merge(self, joining: list[_Running]) -> None:
        """Before a decode step: each running batch drops its finished rows and takes in the rows just prefilled
        on its model, in one copy of its KV cache (`BatchRun.absorb`); a prefilled batch with no running batch of
        its model (or resumed alone after a failed decode step) becomes one."""
        joins: dict[int, list[_Running]] = collections.defaultdict(list)
        for entry in joining:
            target = None
            if not entry.isolated:  # a row resumed after a failed decode step stays alone, so it fails alone
                target = next(
                    (e for e in self.running if e.run.model is entry.run.model and not e.isolated), None
                )
            if target is None:
                entry.started = True
                self.running.append(entry)
            else:
                joins[id(target)].append(entry)
        for entry in list(self.running):
            others = joins.get(id(entry), [])
            gone = set(entry.run.absorb(*(other.run for other in others)))
            entry.waiters = [w for i, w in enumerate(entry.waiters) if i not in gone]
            entry.waiters += [w for other in others for w in other.waiters]
            if not entry.run.rows:
                self.running.remove(entry)

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

    async def _prefill_group(self, entry: _Running) -> _Running | None:
        """Prefill one batch and deliver its first tokens; the batch, if any of its rows go on decoding (to be
        merged into its model's decoding batch, `_merge`). A failed prefill of several requests is retried one
        request at a time (only the one at fault fails)."""
        try:
            events = await self._compute_call(entry.run.prefill, "prefill")
        except Exception as exc:  # noqa: BLE001 - a failed prefill answers its members instead of hanging them
            logger.error("batch %s: prefill failed", entry.run.batch_id, exc_info=exc)
            entry.run.info["failed"] = f"{type(exc).__name__}: {exc}"
            if len(entry.waiters) > 1:
                for waiter in entry.waiters:
                    self._queue_prefill([waiter], entry.run.compression, entry.run.info["queue"])
            else:
                for row, waiter in zip(entry.run.rows, entry.waiters):
                    if not row.finished:
                        _finish(waiter, ErrorEvent(f"generation failed: {exc}"))
            return None
        self._deliver(entry, events)
        for row, waiter in zip(entry.run.rows, entry.waiters):
            row.finished = row.finished or waiter.cancelled
        with self._timed("merge"):
            gone = set(entry.run.remove_finished())
        entry.waiters = [w for i, w in enumerate(entry.waiters) if i not in gone]
        return entry if entry.run.rows else None

    def _queue_prefill(self, waiters: list[_Waiter], rate: Rate, key: str) -> None:
        self._build_pending(waiters, self._builder(waiters, rate, key))

    def _build_pending(
        self, waiters: list[_Waiter], build: Callable[[], BatchRun], isolated: bool = False
    ) -> None:
        run = self._build(waiters, build, running=self.running_requests())
        if run is not None:
            self._pending.append(_Running(run, waiters, isolated=isolated))

    async def _decode_step(self, entry: _Running) -> None:
        try:
            events = await self._compute_call(entry.run.step, "decode")
        except Exception as exc:  # noqa: BLE001 - each unfinished row goes on alone, re-reading what it generated
            logger.error("decode step of %d requests failed", len(entry.waiters), exc_info=exc)
            self.running.remove(entry)
            run = entry.run
            for info in {id(info): info for info in run.row_info}.values():  # the batches its rows came from
                info["failed"] = f"{type(exc).__name__}: {exc}"
            unfinished = [i for i, row in enumerate(run.rows) if not row.finished]
            if len(unfinished) > 1:
                for i in unfinished:
                    self._build_pending(
                        [entry.waiters[i]], functools.partial(run.split_row, i), isolated=True
                    )
            else:
                for i in unfinished:
                    run.rows[i].finished = True
                    _finish(entry.waiters[i], ErrorEvent(f"generation failed: {exc}"))
            return
        self._deliver(entry, events)

    async def _tick_continuous(self) -> None:
        """One engine step: drop cancelled rows, prefill what may join (one batch per group), then decode one
        token for every running request."""
        self._drop_cancelled()
        if not self.running and not self._pending:
            heads = [q[0].arrived for q in self.queues.values() if q]
            waiting = self.waiting()
            now = time.monotonic()
            if not heads or (
                waiting < self.config.max_num_seqs and now - min(heads) < self.config.batch_wait_timeout_s
            ):
                # idle: wait for a request, and give the first one `batch_wait_timeout_s` to find company
                self._report_step(0)
                self._wake.clear()
                timeout = max(0.0, min(heads) + self.config.batch_wait_timeout_s - now) if heads else None
                with self._timed("idle"), contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
                return
        with self._timed("build"):
            for key, waiters in self._admit() if self._prefill_now() else []:
                self._queue_prefill(waiters, self._group_rate(waiters), key)
        pending, self._pending = self._pending, []
        joining = []
        for entry in pending:
            if (joined := await self._prefill_group(entry)) is not None:
                joining.append(joined)
            await asyncio.sleep(0)
        with self._timed("merge"):
            self._merge(joining)  # finished rows leave and new ones join in one cache copy per batch
        rows = 0
        for entry in list(self.running):
            if entry.started and entry in self.running:
                rows += sum(not row.finished for row in entry.run.rows)
                await self._decode_step(entry)
                self._steps += 1
        self._report_step(rows)
        await asyncio.sleep(0)  # let new arrivals queue between steps

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


__all__ = ["MODES", "BatchingConfig", "Scheduler", "mixed_batch_rate"]
