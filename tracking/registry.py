"""Champion / challenger bookkeeping in the MLflow model registry (used by :mod:`jobs.retraining.job`).

Registry conventions (registered model ``dpn`` by default):

* alias ``champion``: the version in production (serving loads ``models:/dpn@champion``);
  alias ``previous``: the champion it replaced (roll back with
  ``MlflowClient().set_registered_model_alias("dpn", "champion", <previous version>)``).
* model-version tags written by retraining (:data:`TAGS`): the retrain key, the version it was
  fine-tuned from, the data root, the **new shards** it was trained on (JSON ``{name: samples}``),
  the replayed sample count, and - once the gate ran - the decision, its reason and the
  evaluation numbers.

Aliases only ever point at versions that are ``READY`` and were evaluated: :func:`promote` waits for
``READY`` and is called after the gate. The alias moves are ordered so that a crash between them
leaves a consistent state that :func:`promote` completes on a re-run: ``previous`` is set first
(to the current champion), then ``champion``; when ``champion`` already points at the challenger
nothing moves (no double promotion: ``previous`` never ends up equal to ``champion``).

**No decision races.** MLflow's registry has no compare-and-set, so :func:`Registry.promote` builds one from
a lease (:class:`tracking.runs.Lease`, Fischer's timed mutual exclusion over a registered-model tag,
:data:`ALIAS_LEASE_TAG`): under it, the champion is read again and, when the caller says which champion its
decision was made against (``expected_champion``) and that is no longer the champion, nothing moves and
:class:`ChampionMoved` is raised. Every promoter that goes through :func:`Registry.promote` is serialised by
the lease; an alias moved by hand (the MLflow UI, ``set_registered_model_alias``) takes no lease, and the
window it can still slip into is the few milliseconds between the re-read and the move.
:meth:`Registry.retrain_lease` is the lease a retrain job holds for its whole run (:data:`RETRAIN_LEASE_TAG`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tracking.runs import Lease, LeaseOwner

logger = logging.getLogger(__name__)

# registered-model tags
RETRAIN_LEASE_TAG = "dpn.lease.retrain"  # held by a running retrain job (one per registered model)
ALIAS_LEASE_TAG = "dpn.lease.aliases"  # held while promote() re-reads and moves the aliases
ALIAS_LEASE_TTL_S = 60.0
UNCHECKED = "<unchecked>"  # promote(expected_champion=UNCHECKED): move whatever the champion is now

# model-version tags
KEY_TAG = "dpn.retrain.key"
PARENT_TAG = "dpn.retrain.parent"
RUN_TAG = "dpn.retrain.run_id"  # the retrain run that produced the version
DATA_ROOT_TAG = "dpn.data.root"
SHARDS_TAG = "dpn.data.new_shards"  # JSON {shard name: samples}
NEW_SAMPLES_TAG = "dpn.data.new_samples"
REPLAY_SAMPLES_TAG = "dpn.data.replay_samples"
DECISION_TAG = "dpn.retrain.decision"  # promoted | rejected
REASON_TAG = "dpn.retrain.reason"
REFUSED_TAG = "dpn.retrain.refused"  # why a decision was not applied (the champion moved since it was made)
TAGS = (KEY_TAG, PARENT_TAG, RUN_TAG, DATA_ROOT_TAG, SHARDS_TAG, NEW_SAMPLES_TAG, REPLAY_SAMPLES_TAG,
        DECISION_TAG, REASON_TAG, REFUSED_TAG)  # fmt: skip
PROMOTED, REJECTED = "promoted", "rejected"


class ChampionMoved(RuntimeError):
    """The champion is no longer the version a decision was made against: the decision must not be applied.

    Attributes:
        expected: the champion the decision was made against (None: there was none).
        actual: the champion now (None: there is none).
    """

    def __init__(self, name: str, version: str, expected: str | None, actual: str | None):
        def label(v: str | None) -> str:
            return f"version {v}" if v is not None else "no champion"

        super().__init__(
            f"the champion of {name} moved from {label(expected)} to {label(actual)} since the decision on "
            f"version {version} was made: that decision is not applied (evaluate it again against {label(actual)})"
        )
        self.expected, self.actual = expected, actual


class Registry:
    """One registered model's versions, aliases and retraining tags.

    Args:
        client: MLflow client of the tracking / registry store.
        name: registered model name.
        champion_alias: alias of the production version.
        previous_alias: alias the replaced champion keeps.
    """

    def __init__(self, client: MlflowClient, name: str = "dpn", champion_alias: str = "champion",
                 previous_alias: str = "previous", lease_settle_s: float = 1.0):  # fmt: skip
        if champion_alias == previous_alias:
            raise ValueError(f"the champion and previous aliases must differ, both are {champion_alias!r}")
        self.client, self.name = client, name
        self.champion_alias, self.previous_alias = champion_alias, previous_alias
        self.lease_settle_s = lease_settle_s

    # -- leases ------------------------------------------------------------------------------------

    def ensure_model(self) -> None:
        """Create the registered model if it does not exist yet (its tags hold the leases)."""
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(self.name)
            except MlflowException:  # created concurrently
                self.client.get_registered_model(self.name)

    def lease(self, tag: str, what: str, ttl_s: float, owner: LeaseOwner | None = None) -> Lease:
        """A lease kept in the registered model's tag ``tag`` (the model must exist: :meth:`ensure_model`)."""
        return Lease(
            f"{what} of {self.name}",
            read=lambda: self.client.get_registered_model(self.name).tags.get(tag),
            write=lambda text: self.client.set_registered_model_tag(self.name, tag, text),
            clear=lambda: self.client.delete_registered_model_tag(self.name, tag),
            ttl_s=ttl_s,
            settle_s=self.lease_settle_s,
            owner=owner,
        )

    def retrain_lease(self, ttl_s: float, owner: LeaseOwner | None = None) -> Lease:
        """The lease one retrain job holds on this registered model for its whole run (creates the model)."""
        self.ensure_model()
        return self.lease(RETRAIN_LEASE_TAG, "retrain", ttl_s, owner)

    # -- reading -----------------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        """All versions of the model, oldest first (empty when the model is not registered yet)."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(found, key=lambda v: int(v.version))

    def alias(self, alias: str) -> ModelVersion | None:
        """The version an alias points at, or None (also when the model does not exist)."""
        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def champion(self) -> ModelVersion | None:
        return self.alias(self.champion_alias)

    def champion_version(self) -> str | None:
        """The champion's version number as a string, or None."""
        mv = self.champion()
        return str(mv.version) if mv is not None else None

    def get(self, version: str) -> ModelVersion:
        return self.client.get_model_version(self.name, str(version))

    def versions_of_run(self, run_id: str) -> list[ModelVersion]:
        """Versions registered from a training run, oldest first."""
        found = self.client.search_model_versions(f"name = '{self.name}' and run_id = '{run_id}'")
        return sorted(found, key=lambda v: int(v.version))

    @staticmethod
    def shards_of(version: ModelVersion) -> dict[str, int]:
        """The new shards a version was trained on (``{}`` for versions not made by retraining)."""
        raw = (version.tags or {}).get(SHARDS_TAG)
        if not raw:
            return {}
        try:
            return {str(k): int(v) for k, v in json.loads(raw).items()}
        except (ValueError, AttributeError) as err:
            raise ValueError(
                f"{SHARDS_TAG} of version {version.version} is not a JSON object: {raw[:200]!r}"
            ) from err

    def consumed_shards(self) -> tuple[dict[str, int], dict[str, int]]:
        """``(all, kept)``: shards any version was trained on, and those of versions not rejected
        (the replay pool: data of a rejected challenger is not replayed)."""
        every, kept = {}, {}
        for v in self.versions():
            shards = self.shards_of(v)
            every.update(shards)
            if (v.tags or {}).get(DECISION_TAG) != REJECTED:
                kept.update(shards)
        return every, kept

    # -- writing -----------------------------------------------------------------------------------

    def wait_ready(self, version: str, timeout_s: float = 300.0, poll_s: float = 1.0) -> ModelVersion:
        """Wait until a version is ``READY``.

        Raises:
            RuntimeError: registration failed, or did not finish within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            mv = self.get(version)
            if mv.status == "READY":
                return mv
            if mv.status == "FAILED_REGISTRATION":
                raise RuntimeError(
                    f"{self.name} version {version} failed registration ({mv.status_message}); "
                    "delete it and re-run the retrain job"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} version {version} is still {mv.status} after {timeout_s:.0f} s"
                )
            time.sleep(poll_s)

    def tag(self, version: str, tags: dict[str, Any]) -> None:
        """Set model-version tags (idempotent)."""
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, str(value))

    def promote(
        self,
        version: str,
        timeout_s: float = 300.0,
        between_moves: Callable[[], None] | None = None,
        expected_champion: str | None = UNCHECKED,
    ) -> str | None:
        """Make ``version`` the champion; the old champion becomes ``previous``: a compare-and-set.

        Idempotent: when ``version`` already is the champion nothing moves. The champion is read again and
        the aliases moved under the registry's alias lease (see the module docstring).

        Args:
            version: the challenger (must become ``READY``).
            timeout_s: how long to wait for ``READY``.
            between_moves: called after ``previous`` moved and before ``champion`` moves (tests
                inject a crash there).
            expected_champion: the champion the decision to promote was made against (None: there was
                none); :data:`UNCHECKED` (the default, for a person's command) promotes over any champion.

        Returns:
            The replaced champion's version, or None (first champion, or already promoted).

        Raises:
            ChampionMoved: the champion is not ``expected_champion`` any more; nothing moved.
            LeaseHeld: another promotion holds the alias lease.
        """
        self.wait_ready(version, timeout_s)
        with self.lease(ALIAS_LEASE_TAG, "alias moves", ALIAS_LEASE_TTL_S).hold():
            current = self.champion()
            old = str(current.version) if current is not None else None  # MLflow returns int or str versions
            if old == str(version):
                logger.info("%s version %s already is the %s", self.name, version, self.champion_alias)
                return None
            if expected_champion != UNCHECKED and old != expected_champion:
                raise ChampionMoved(self.name, str(version), expected_champion, old)
            if old is not None:
                self.client.set_registered_model_alias(self.name, self.previous_alias, old)
            if between_moves is not None:
                between_moves()
            self.client.set_registered_model_alias(self.name, self.champion_alias, str(version))
        logger.info(
            "promoted %s version %s to %s%s", self.name, version, self.champion_alias,
            f" ({self.previous_alias}: version {old})" if old is not None else "",
        )  # fmt: skip
        return old


__all__ = [
    "ALIAS_LEASE_TAG",
    "ChampionMoved",
    "DATA_ROOT_TAG",
    "DECISION_TAG",
    "KEY_TAG",
    "NEW_SAMPLES_TAG",
    "PARENT_TAG",
    "PROMOTED",
    "REASON_TAG",
    "REFUSED_TAG",
    "REJECTED",
    "RETRAIN_LEASE_TAG",
    "REPLAY_SAMPLES_TAG",
    "RUN_TAG",
    "Registry",
    "SHARDS_TAG",
    "TAGS",
    "UNCHECKED",
]
