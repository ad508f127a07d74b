"""The serving engine's scheduling policy: from a snapshot of the engine, the plan of its next step. Pure: no torch,
no Ray, no asyncio; a policy reads an [`EngineState`] and returns a [`StepPlan`], so it is tested on hand-made
states (tests/test_serve_policy.py).

The engine is split the way vLLM's v1 engine is:

- this module decides (vLLM's scheduler): which waiting requests are prefilled together and at which rate, which
  running rows decode, which leave, or that the engine waits;
- serve_apps.executor runs a plan on the model (vLLM's model runner): prefill a group, decode a step, merge rows
  into the decoding batch (serve_apps.generation's `BatchRun`: KV-cache surgery, sampling, stop handling, usage);
- serve_apps.scheduler's `Scheduler` is the asyncio loop that ties them: requests in, events out to each
  request's queue, cancellation, timing (`engine_stats`), and the one failure-isolation rule.

Production serves [`ContinuousPolicy`]: iteration-level batching keyed by rate. The baselines that measure what it
buys (the former static batcher, one queue for every rate, everything dense) are policies of
benchmarks/serve_load.py, given to the app in Python (`serve_apps.app.build_app(args, policy=...)`); no config can
select them. A new serving policy is a class with `capacity` and `plan` ([`SchedulingPolicy`]).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, model_validator

from dpn_base.config_models import ConfigModel, validate_config

if TYPE_CHECKING:
    from serve_apps.compression import Rate

logger = logging.getLogger(__name__)

RETIRED_KEYS = ("engine", "mode", "max_batch_size", "max_queue_delay_s", "max_running_batches")
"""Keys of the former static engine and of the `mixed` / `dense` modes, baselines of benchmarks/serve_load.py now.
A config that sets them still loads when it asked for what production serves (`engine: continuous`, `mode:
bucketed`, and the static engine's sizes, which never applied to the continuous engine), with a warning that names
what to use instead; one that asks for a retired engine is refused, saying where it went."""


class BatchingConfig(ConfigModel):
    """The `batching` section of the serve config: the knobs of [`ContinuousPolicy`].

    Attributes:
        batch_wait_timeout_s: When the engine is idle, how long the first request waits for company.
        max_num_seqs: Most requests running (decoding or being prefilled) at once; each holds its KV cache.
        max_prefill_tokens: Prompt tokens (image tokens included) prefilled in one step; a longer prompt is
            prefilled alone. Bounds how long one step holds back the running requests' tokens.
        waiting_served_ratio: While requests are decoding, waiting requests are prefilled once they number at
            least this fraction of the running ones (as Hugging Face TGI's option of that name), or after
            `max_waiting_steps`, or when they would fill `max_num_seqs`. 0 prefills whatever waits at every step
            (lowest time to first token); higher values make fewer, larger prefill batches, which serve more per
            second where a small batch is inefficient (a CPU, a small model).
        max_waiting_steps: Engine steps (one decoded token each) a waiting request may be held back by
            `waiting_served_ratio` before it is prefilled anyway (TGI's `max_waiting_tokens`).
        history: Batches remembered for `GET /v1/dpn/batches`.
        engine, mode, max_batch_size, max_queue_delay_s, max_running_batches: retired ([`RETIRED_KEYS`]): read,
            checked as before and warned about, never used.
    """

    batch_wait_timeout_s: float = Field(0.02, ge=0)
    max_num_seqs: int = Field(32, ge=1)
    max_prefill_tokens: int = Field(8192, ge=1)
    waiting_served_ratio: float = Field(0.0, ge=0)
    max_waiting_steps: int = Field(20, ge=0)
    history: int = 2048
    # retired: the values they took before, so that an old config's typo still gets the message it got
    engine: Literal["continuous", "static"] | None = None
    mode: Literal["bucketed", "mixed", "dense"] | None = None
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_s: float | None = Field(None, ge=0)
    max_running_batches: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _retired(self) -> BatchingConfig:
        """Refuse a retired engine, saying where it went; warn about retired keys that asked for what is served."""
        if self.engine == "static" or self.mode in ("mixed", "dense"):
            asked = "engine: static" if self.engine == "static" else f"mode: {self.mode}"
            raise ValueError(
                f"{asked} is no longer served: the static engine and the mixed and dense modes are baselines of "
                "benchmarks/serve_load.py now (--variants static-bucketed, continuous-mixed, continuous-dense); "
                "remove engine and mode: the engine batches continuously, one prefill per rate, sized by "
                "max_num_seqs and max_prefill_tokens (to serve every request dense, set default_compression: 1)"
            )
        given = [key for key in RETIRED_KEYS if getattr(self, key) is not None]
        if given:
            logger.warning(
                "batching: retired keys %s are ignored (they configured the static engine, which is gone; the "
                "engine batches continuously by rate): remove them, and size the engine with max_num_seqs and "
                "max_prefill_tokens",
                ", ".join(given),
            )
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> BatchingConfig:
        """Build from the serve config's `batching` mapping; a `dpn_base.config_models.ConfigError` (a
        `ValueError`) names each wrong key."""
        return validate_config(cls, values or {}, section="batching")


# -- what a policy reads --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WaitingRequest:
    """A request waiting for its prefill.

    Attributes:
        key: The engine's handle of the request (what a plan names it by).
        rate: The compression it asked for (serve_apps.compression's `Rate`: `"auto"`, `2`, `"1-2-4"`, ...).
        prompt_tokens: Its prompt's length, image tokens included.
        arrived: When it arrived (monotonic seconds, the clock of `EngineState.now`).
    """

    key: int
    rate: Rate
    prompt_tokens: int
    arrived: float


@dataclass(frozen=True)
class RunningRow:
    """A request in a running (prefilled) batch.

    Attributes:
        key: The engine's handle of the request.
        batch: Which running batch it decodes in (rows of one batch decode together).
        finished: It generated its last token (or failed): its answer is sent.
        cancelled: Its client went away.
    """

    key: int
    batch: int
    finished: bool = False
    cancelled: bool = False

    @property
    def gone(self) -> bool:
        """Nothing more to generate for it: finished or cancelled."""
        return self.finished or self.cancelled


@dataclass(frozen=True)
class EngineState:
    """The engine before a step.

    Attributes:
        now: Monotonic seconds.
        waiting: The requests waiting for their prefill (in any order; a policy orders them by `arrived`).
        running: The rows of the running batches.
        resuming: Requests already queued to be prefilled alone at this step after a failed one (they take
            slots: serve_apps.scheduler's failure isolation).
    """

    now: float
    waiting: tuple[WaitingRequest, ...] = ()
    running: tuple[RunningRow, ...] = ()
    resuming: int = 0

    @property
    def live(self) -> int:
        """Running requests still generating."""
        return sum(not row.gone for row in self.running)

    def by_arrival(self) -> list[WaitingRequest]:
        """The waiting requests oldest first (ties in the order given)."""
        return sorted(self.waiting, key=lambda request: request.arrived)


# -- what a policy returns ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillGroup:
    """Waiting requests prefilled together in one forward pass, at one rate.

    Attributes:
        queue: The name of the queue they came from (recorded in the batch record).
        rate: The rate the whole group runs at.
        keys: The requests, in the order their rows take.
        joins: After its prefill the group's rows join the decoding batch of their model (continuous batching);
            False: the group decodes as a batch of its own until its last row finishes (the static baseline).
    """

    queue: str
    rate: Rate
    keys: tuple[int, ...]
    joins: bool = True


@dataclass(frozen=True)
class StepPlan:
    """What the engine does in one step.

    Attributes:
        prefill: Groups to prefill now (each delivers its first tokens in this step).
        decode: Running rows that decode one token; the executor decodes whole batches, so a batch decodes when
            it holds one of them (and a batch that rows prefilled in this step joined or formed decodes too).
        leave: Running rows that leave their batch before it decodes, their KV cache freed (finished or
            cancelled rows only: a row still generating is never dropped).
        idle: Nothing to do: wait for a request to arrive, at most `wait_s` seconds (None: until one does).
        wait_s: See `idle`.
    """

    prefill: tuple[PrefillGroup, ...] = ()
    decode: tuple[int, ...] = ()
    leave: tuple[int, ...] = ()
    idle: bool = False
    wait_s: float | None = None

    @classmethod
    def wait(cls, seconds: float | None) -> StepPlan:
        """An idle step: wait for a request, at most `seconds` (None: until one arrives)."""
        return cls(idle=True, wait_s=seconds)


class SchedulingPolicy(Protocol):
    """What the engine loop (serve_apps.scheduler) asks of a policy."""

    @property
    def capacity(self) -> int:
        """Requests the policy runs at once at most (the replica's `max_ongoing_requests` leaves room for it)."""
        ...

    def plan(self, state: EngineState) -> StepPlan:
        """The next step for the engine in `state`; called once per step (a policy may count steps)."""
        ...


# -- production -----------------------------------------------------------------------------------------------


class RateQueues:
    """The one rule from a request's compression to its queue and to the rate its prefill group runs at: one queue
    per rate, and a group, taken from one queue, runs at that queue's rate. A policy groups waiting requests only
    through [`RateQueues.groups`]; the one-queue baselines of benchmarks/serve_load.py override `queue` and
    `group_rate`."""

    def queue(self, rate: Rate) -> str:
        """The queue a request of `rate` waits in: its rate's label."""
        return str(rate)

    def group_rate(self, requested: list[Rate]) -> Rate:
        """The rate a group of one queue runs at: the queue's rate (each queue holds one)."""
        return requested[0]

    def groups(self, requests: list[WaitingRequest], joins: bool = True) -> tuple[PrefillGroup, ...]:
        """`requests` (in the order given) as one prefill group per queue, queues in the order of their first
        request, each at its `group_rate`."""
        by_queue: dict[str, list[WaitingRequest]] = {}
        for request in requests:
            by_queue.setdefault(self.queue(request.rate), []).append(request)
        return tuple(
            PrefillGroup(
                queue, self.group_rate([r.rate for r in members]), tuple(r.key for r in members), joins
            )
            for queue, members in by_queue.items()
        )


class ContinuousPolicy(RateQueues):
    """Iteration-level batching keyed by compression rate: the policy production serves.

    Every step decodes one token for every running request (rows of every rate in one batch: after its prefill a
    row's rate only shows in its per-segment cache lengths), and prefills the waiting requests that may join,
    oldest first, within `max_num_seqs` running and `max_prefill_tokens` prompt tokens (a longer prompt is taken
    alone), one group per queue: one queue per rate, so a prefill never pads one rate's visual tokens to another's.
    While requests decode, `waiting_served_ratio` and `max_waiting_steps` may hold the waiting ones back for a
    larger prefill. A finished or cancelled row leaves at once. When idle, the first request waits
    `batch_wait_timeout_s` for company (or less, once `max_num_seqs` wait).
    """

    def __init__(self, config: BatchingConfig):
        self.config = config
        self._held_steps = 0  # steps the waiting requests were held back (waiting_served_ratio)

    @property
    def capacity(self) -> int:
        return self.config.max_num_seqs

    def plan(self, state: EngineState) -> StepPlan:
        wait = self._idle_wait(state)
        if wait is not None:
            return wait
        return StepPlan(
            prefill=self._admit(state) if self._prefill_now(state) else (),
            decode=tuple(row.key for row in state.running if not row.gone),
            leave=tuple(row.key for row in state.running if row.gone),
        )

    def _idle_wait(self, state: EngineState) -> StepPlan | None:
        """The idle plan when nothing runs and what waits may wait for company; None to go on."""
        if state.running or state.resuming:
            return None
        if not state.waiting:
            return StepPlan.wait(None)
        oldest = min(request.arrived for request in state.waiting)
        timeout = self.config.batch_wait_timeout_s
        if len(state.waiting) < self.config.max_num_seqs and state.now - oldest < timeout:
            return StepPlan.wait(max(0.0, oldest + timeout - state.now))
        return None

    def _prefill_now(self, state: EngineState) -> bool:
        """Whether this step prefills what waits: always when nothing decodes; while requests decode, once the
        waiting ones reach `waiting_served_ratio` of the running ones, would fill `max_num_seqs`, or were held
        back `max_waiting_steps` steps."""
        waiting, running = len(state.waiting), state.live
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

    def _admit(self, state: EngineState) -> tuple[PrefillGroup, ...]:
        """The requests to prefill this step, oldest first, within `max_num_seqs` and `max_prefill_tokens` (a
        prompt over the budget is taken alone, and only first: no request overtakes an older one), grouped by
        queue."""
        room = self.config.max_num_seqs - state.live - state.resuming  # a resumed request holds its slot
        taken: list[WaitingRequest] = []
        budget = self.config.max_prefill_tokens
        for request in state.by_arrival():
            if len(taken) >= room or (taken and request.prompt_tokens > budget):
                break
            taken.append(request)
            budget -= request.prompt_tokens
        return self.groups(taken)


__all__ = [
    "RETIRED_KEYS",
    "BatchingConfig",
    "ContinuousPolicy",
    "RateQueues",
    "EngineState",
    "PrefillGroup",
    "RunningRow",
    "SchedulingPolicy",
    "StepPlan",
    "WaitingRequest",
]
