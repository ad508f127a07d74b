"""MLflow runs of the jobs: where the tracking store is, one run per job, exactly-once step metrics.

- :func:`tracking_uri` / :func:`setup_tracking`: the default store is a local SQLite file
  (``sqlite:///<cwd>/mlflow.db``, artifacts in ``<cwd>/mlartifacts``) unless ``MLFLOW_TRACKING_URI``
  is set (or a URI is given).
- :func:`start_or_resume_run`: one MLflow run per job, found again by its job name so that a
  resubmitted job continues the same run.
- :class:`StepMetricLogger`: step metrics logged exactly once per step, also across restarts.
- :class:`Lease`: a lease held in one MLflow tag (owner, host, pid, expiry), renewed while its holder runs;
  :func:`run_lease` is a run's, which :func:`start_or_resume_run` takes so that two jobs never share one run.

Params and tags are redacted (:func:`dpn_base.redact.redact`) before they reach the store: a tracking URI
or any other config value with a password in it is logged as ``user:***@host``.

Models (logging, resolving references) are in :mod:`tracking.models`, registry aliases in
:mod:`tracking.registry`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from dpn_base.redact import redact

logger = logging.getLogger(__name__)

JOB_TAG = "dpn.job_name"  # tag that finds a job's run again on resubmission
RUN_LEASE_TAG = "dpn.lease"  # the run's lease: JSON of a LeaseHolder
RUN_LEASE_TTL_S = 120.0  # a run whose driver died is resumable this long after its last heartbeat
RUN_LEASE_SETTLE_S = 1.0  # Fischer's delay when taking a free or expired lease (see Lease)


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in effect: ``uri``, else $MLFLOW_TRACKING_URI, else ``sqlite:///<cwd>/mlflow.db``."""
    if uri:
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def setup_tracking(uri: str | None = None, experiment: str | None = None) -> str:
    """Point MLflow at the tracking store (and create/select ``experiment``). Returns the URI.

    With the default SQLite store, new experiments keep their artifacts in ``<db folder>/mlartifacts``
    (not MLflow's relative ``./mlruns``, so a job started from another folder finds them).
    """
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    if experiment:
        client = MlflowClient(uri)
        if client.get_experiment_by_name(experiment) is None:
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
            with contextlib.suppress(mlflow.exceptions.MlflowException):  # created concurrently
                client.create_experiment(experiment, artifact_location=location)
        mlflow.set_experiment(experiment)
    return uri


def system_facts(num_workers: int, use_gpu: bool) -> dict[str, str]:
    """Versions and machine facts worth a run tag."""
    import deepspeed
    import ray
    import torch
    import transformers

    facts = {
        "sys.workers": str(num_workers),
        "sys.device": "cuda" if use_gpu else "cpu",
        "sys.python": platform.python_version(),
        "sys.platform": platform.platform(),
        "sys.torch": torch.__version__,
        "sys.transformers": transformers.__version__,
        "sys.ray": ray.__version__,
        "sys.deepspeed": deepspeed.__version__,
        "sys.mlflow": mlflow.__version__,
        "sys.driver_cpus": str(os.cpu_count()),
    }
    if use_gpu and torch.cuda.is_available():
        facts["sys.gpu"] = torch.cuda.get_device_name(0)
    return facts


def find_job_run(experiment: str, job_name: str, uri: str | None = None) -> Any | None:
    """The newest MLflow run of ``experiment`` tagged with this job name, or None."""
    client = MlflowClient(tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{JOB_TAG}` = '{job_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def start_or_resume_run(
    experiment: str,
    job_name: str,
    *,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    uri: str | None = None,
    lease_ttl_s: float = RUN_LEASE_TTL_S,
    lease_settle_s: float = RUN_LEASE_SETTLE_S,
) -> tuple[str, bool]:
    """Create the job's MLflow run, or find the unfinished run of the same job name to continue.

    Params are logged only for a new run (MLflow params are immutable); tags are (re)set either way; both are
    redacted first. The run is leased to this process (:func:`run_lease`, renewed from a daemon thread until
    :func:`end_run`), so two jobs never share a run: a run whose lease another process holds is refused even
    while its status still says RUNNING or FAILED, and a run whose driver died (status left RUNNING) becomes
    resumable ``lease_ttl_s`` after its last renewal: the crash-resume path.

    Returns:
        ``(run_id, resumed)``.

    Raises:
        ValueError: the job name's run already finished (choose a new ``run.name``).
        LeaseHeld: another live process holds the run (the message names it and when its lease runs out).
    """
    uri = setup_tracking(uri, experiment)
    client = MlflowClient(uri)
    existing = find_job_run(experiment, job_name, uri)
    if existing is not None and existing.info.status == "FINISHED":
        raise ValueError(
            f"the MLflow run of job {job_name!r} ({existing.info.run_id}) already finished; "
            "choose a new run.name to train again (or use model.init to start from its model)"
        )
    if existing is not None:
        run_id = existing.info.run_id
        lease = _take_run(client, existing, job_name, lease_ttl_s, lease_settle_s)
        client.update_run(run_id, status="RUNNING")
        resumed = True
        logger.info("resuming MLflow run %s of job %s", run_id, job_name)
    else:
        exp = client.get_experiment_by_name(experiment)
        first = LeaseHolder.of(LeaseOwner.this_process(), lease_ttl_s)  # leased from its creation on
        run = client.create_run(
            exp.experiment_id, run_name=job_name, tags={JOB_TAG: job_name, RUN_LEASE_TAG: first.to_json()}
        )
        run_id = run.info.run_id
        lease = run_lease(client, run_id, ttl_s=lease_ttl_s, settle_s=lease_settle_s)
        resumed = False
        if params:
            items = [mlflow.entities.Param(k, _param_value(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i : i + 100])
        logger.info("started MLflow run %s for job %s", run_id, job_name)
    _keep_renewing(run_id, lease)
    if tags:
        client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, redact(str(v))) for k, v in tags.items()])
    return run_id, resumed


def _take_run(client: MlflowClient, existing: Any, job_name: str, ttl_s: float, settle_s: float) -> Lease:
    """The lease of an unfinished run this process is about to resume; :class:`LeaseHeld` if another has it."""
    lease = run_lease(client, existing.info.run_id, ttl_s=ttl_s, settle_s=settle_s)
    try:
        lease.acquire()
    except LeaseHeld as held:
        raise LeaseHeld(
            f"the MLflow run {existing.info.run_id} of job {job_name!r} ({existing.info.status}) is in use: "
            f"{held}. Wait for that job to end; if its process died, resubmit after its lease runs out "
            "(the run is then resumed)",
            held.holder,
        ) from None
    return lease


def _keep_renewing(run_id: str, lease: Lease) -> None:
    with _RUN_LEASES_LOCK:
        previous = _RUN_LEASES.pop(run_id, None)
        _RUN_LEASES[run_id] = lease
    if previous is not None:
        previous.stop_renewing()
    lease.start_renewing()


def _param_value(value: Any) -> str:
    text = redact(str(value))
    return text if len(text) <= 6000 else text[:5997] + "..."


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    """Mark the run FINISHED / FAILED / KILLED and end its lease (a FAILED run can be resumed at once)."""
    client = MlflowClient(tracking_uri(uri))
    with _RUN_LEASES_LOCK:
        lease = _RUN_LEASES.pop(run_id, None)
    if lease is not None:
        lease.stop_renewing()  # first, so that no renewal lands after the tag is gone
    client.set_terminated(run_id, status=status)
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # no lease tag (a run of older code)
        client.delete_tag(run_id, RUN_LEASE_TAG)


class StepMetricLogger:
    """Log per-step metrics of one run so that each (key, step) is written exactly once.

    MLflow is the record of what was logged: on creation, the highest step already logged for each
    key is read back, and entries at or below it are dropped. So after a restart from a checkpoint
    at step ``s``, the re-run steps ``s+1 ..`` that were logged before the crash are not logged a
    second time (their first values stay), and steps never logged are logged now: no gaps, no
    duplicates. Metrics are written with one ``log_batch`` call per flush (one transaction).
    """

    def __init__(self, run_id: str, uri: str | None = None, keys: list[str] | None = None):
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri(uri))
        self._last: dict[str, int] = {}
        self._pending: list[mlflow.entities.Metric] = []
        for key in keys or self.client.get_run(run_id).data.metrics.keys():
            history = self.client.get_metric_history(run_id, key)
            if history:
                self._last[key] = max(m.step for m in history)

    def log(self, metrics: Mapping[str, float], step: int, flush: bool = True) -> None:
        """Queue ``metrics`` at ``step`` (dropping keys already logged at this step or later)."""
        import time

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if step <= self._last.get(key, -1):
                continue
            self._pending.append(mlflow.entities.Metric(key, float(value), now, step))
            self._last[key] = step
        if flush:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[i : i + 1000])
        self._pending = []


# ----------------------------------------------------------------------------------------------
# Leases: mutual exclusion between processes through the tracking store
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseOwner:
    """Who holds a lease: an id (what ownership is decided by) and, for the messages, its host and pid."""

    id: str
    host: str
    pid: int

    @classmethod
    def new(cls) -> LeaseOwner:
        """A fresh owner: exclusive even against other holders in this process."""
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid())

    @classmethod
    def this_process(cls) -> LeaseOwner:
        """The owner that stands for this process (the same for every call in it; a forked child gets its own),
        so a process may take again a lease it already holds."""
        pid = os.getpid()
        if _PROCESS_OWNER.get(pid) is None:
            _PROCESS_OWNER.clear()
            _PROCESS_OWNER[pid] = cls(uuid.uuid4().hex, socket.gethostname(), pid)
        return _PROCESS_OWNER[pid]


_PROCESS_OWNER: dict[int, LeaseOwner] = {}


@dataclass(frozen=True)
class LeaseHolder:
    """A lease as stored in its tag (JSON): its owner and its expiry (epoch seconds, wall clock)."""

    owner: str
    host: str
    pid: int
    expires: float

    @classmethod
    def of(cls, owner: LeaseOwner, ttl_s: float) -> LeaseHolder:
        """``owner``'s lease from now for ``ttl_s`` seconds."""
        return cls(owner.id, owner.host, owner.pid, time.time() + ttl_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def live(self, now: float | None = None) -> bool:
        return self.expires > (time.time() if now is None else now)

    def describe(self) -> str:
        """``host h pid p (owner 1a2b3c4d) until 2026-12-08T10:00:00Z (in 95 s)``: what a message names."""
        left = self.expires - time.time()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires))
        state = f"in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        return f"host {self.host} pid {self.pid} (owner {self.owner[:8]}) until {when} ({state})"

    @classmethod
    def parse(cls, text: str | None) -> LeaseHolder | None:
        """The holder in a tag value; None for no tag or one this code cannot read (treated as free)."""
        if not text:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["owner"]), str(data["host"]), int(data["pid"]), float(data["expires"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring an unreadable lease tag: %r", text[:200])
            return None


class LeaseHeld(RuntimeError):
    """Someone else holds the lease (``holder``; None when a concurrent taker won the race and left)."""

    def __init__(self, message: str, holder: LeaseHolder | None):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """This holder's lease expired or was taken over: the work it guarded must not commit."""


class Lease:
    """A lease kept in one MLflow tag (a run's, a registered model's): who holds it and until when.

    MLflow has no compare-and-set on tags, so taking a lease is Fischer's timed mutual exclusion: read the
    tag; if a live lease of another owner is there, refuse; else write ours, wait ``settle_s``, read again
    and hold the lease only if ours is still there. Two takers that both read "free" both write, and the
    later write wins: the earlier one sees it after its wait and backs off. This is exclusive as long as no
    taker takes longer than ``settle_s`` between its read and its write (milliseconds against a second);
    a taker paused for longer than that in between (a stopped VM) is the residual window, accepted because
    the alternative, a lock service beside MLflow, is a second thing to run. Re-taking a live lease of the
    same owner renews it without the wait. Expiry is wall-clock time: hosts' clocks must agree to well within
    ``ttl_s``.

    Args:
        name: what the lease guards, for messages (``retrain of dpn``, ``run 1a2b``).
        read, write, clear: the tag's value (None when absent), set it, delete it.
        ttl_s: how long a lease lasts without renewal: how long a crashed holder blocks others.
        settle_s: Fischer's wait.
        owner: who takes it (default: a new owner, exclusive also within this process).
    """

    def __init__(
        self,
        name: str,
        read: Callable[[], str | None],
        write: Callable[[str], None],
        clear: Callable[[], None],
        *,
        ttl_s: float,
        settle_s: float,
        owner: LeaseOwner | None = None,
    ):
        if ttl_s <= settle_s:
            raise ValueError(f"a lease's ttl_s ({ttl_s}) must exceed its settle_s ({settle_s})")
        self.name, self._read, self._write, self._clear = name, read, write, clear
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.owner = owner or LeaseOwner.new()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> LeaseHolder | None:
        """The lease as stored now, live or expired (None: free)."""
        return LeaseHolder.parse(self._read())

    def held(self) -> bool:
        """Whether this owner holds the lease now (stored, live, ours)."""
        current = self.holder()
        return current is not None and current.owner == self.owner.id and current.live()

    def _put(self) -> None:
        self._write(LeaseHolder.of(self.owner, self.ttl_s).to_json())

    def acquire(self) -> None:
        """Take the lease (see the class docstring).

        Raises:
            LeaseHeld: another owner holds a live lease, or took it concurrently.
        """
        current = self.holder()
        if current is not None and current.owner != self.owner.id and current.live():
            raise LeaseHeld(f"the {self.name} lease is held by {current.describe()}", current)
        renewing = current is not None and current.owner == self.owner.id and current.live()
        try:
            self._put()
        except mlflow.exceptions.MlflowException as err:
            # a SQL store inserts a new tag key under a unique constraint: a concurrent taker's insert won
            current = self.holder()
            if current is None or current.owner == self.owner.id:
                raise
            raise LeaseHeld(
                f"the {self.name} lease was taken concurrently by {current.describe()}", current
            ) from err
        if renewing:
            return
        time.sleep(self.settle_s)
        current = self.holder()
        if current is None or current.owner != self.owner.id:
            who = current.describe() if current is not None else "a concurrent taker"
            raise LeaseHeld(f"the {self.name} lease was taken concurrently by {who}", current)

    def renew(self) -> None:
        """Extend the lease by ``ttl_s`` from now.

        Raises:
            LeaseLost: the lease is no longer ours (expired, taken over or released).
        """
        current = self.holder()
        if current is None or current.owner != self.owner.id or not current.live():
            raise LeaseLost(self._lost_message(current))
        self._put()

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this owner holds the lease: call before committing what it guards."""
        current = self.holder()
        if current is None or current.owner != self.owner.id or not current.live():
            raise LeaseLost(self._lost_message(current))

    def _lost_message(self, current: LeaseHolder | None) -> str:
        now = f"now {current.describe()}" if current is not None else "now free"
        return (
            f"lost the {self.name} lease (owner {self.owner.id[:8]}, {now}): it was not renewed within "
            f"{self.ttl_s:.0f} s; the work it guarded is not committed, run the job again"
        )

    def release(self) -> None:
        """Stop renewing and delete the tag if the lease is still ours (never someone else's)."""
        self.stop_renewing()
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            current = self.holder()
            if current is not None and current.owner == self.owner.id:
                self._clear()

    def start_renewing(self) -> None:
        """Renew every ``ttl_s / 3`` from a daemon thread until :meth:`release` (or the lease is lost)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.name}", daemon=True)
        self._thread.start()

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self._thread = None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as err:
                logger.error("%s", err)
                return
            except Exception as err:  # the store is unreachable: try again; the lease runs out if it stays so
                logger.warning("could not renew the %s lease (will retry): %s", self.name, redact(str(err)))

    @contextlib.contextmanager
    def hold(self) -> Iterator[Lease]:
        """Acquire, renew in the background, release on exit (also on an exception)."""
        self.acquire()
        self.start_renewing()
        try:
            yield self
        finally:
            self.release()


def run_lease(
    client: MlflowClient,
    run_id: str,
    *,
    ttl_s: float = RUN_LEASE_TTL_S,
    settle_s: float = RUN_LEASE_SETTLE_S,
    owner: LeaseOwner | None = None,
) -> Lease:
    """The lease of one run (tag :data:`RUN_LEASE_TAG`); owner default: this process (see :meth:`LeaseOwner.this_process`)."""
    return Lease(
        f"run {run_id}",
        read=lambda: client.get_run(run_id).data.tags.get(RUN_LEASE_TAG),
        write=lambda text: client.set_tag(run_id, RUN_LEASE_TAG, text),
        clear=lambda: client.delete_tag(run_id, RUN_LEASE_TAG),
        ttl_s=ttl_s,
        settle_s=settle_s,
        owner=owner or LeaseOwner.this_process(),
    )


_RUN_LEASES: dict[str, Lease] = {}  # runs this process holds (renewed until end_run)
_RUN_LEASES_LOCK = threading.Lock()

__all__ = [
    "JOB_TAG",
    "RUN_LEASE_TAG",
    "RUN_LEASE_TTL_S",
    "Lease",
    "LeaseHeld",
    "LeaseHolder",
    "LeaseLost",
    "LeaseOwner",
    "StepMetricLogger",
    "end_run",
    "find_job_run",
    "run_lease",
    "setup_tracking",
    "start_or_resume_run",
    "system_facts",
    "tracking_uri",
]
