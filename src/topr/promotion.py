"""Moving a registered model's alias: read it failing closed, move it as a compare-and-set.

The gate reads which version holds the alias (``alias_version``) and hands that version on to
``promote``, which moves the alias only if it still points there: under a lock it reads the alias
again and refuses when it moved since the gate. Two runs gated against the same champion cannot
both win, and a model cannot overwrite a better one promoted in between. Every move is appended
to the registered model's history (tags ``topr.alias.<alias>.<n>``, see ``alias_history``).

The lock is a registered model, ``<name>.promotion-lock``, created to take it and deleted to
release it. Creating a registered model is an atomic create-if-absent in every MLflow store (the
name is the table's primary key; a second create fails with RESOURCE_ALREADY_EXISTS), so the lock
lives exactly where the alias lives and is shared by everyone who can move the alias: a cluster
run, a second schedule, and a local ``topr run`` with no artifact store or another bucket, all
with nothing but their MLflow access. An S3 conditional create (``IfNoneMatch="*"``, which
SeaweedFS honours with 412) would lock only runs that share a bucket and need write credentials
in the promote pod; a Postgres advisory lock needs the database that MLflow's clients never
see; a Kubernetes Lease cannot lock a local run.

A promotion killed while holding the lock leaves it behind: the next promotion waits
``LOCK_WAIT_S``, then refuses naming the holder. Delete the lock model by hand only when that
run is gone (promotion holds the lock for a few registry calls).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 120.0
LOCK_POLL_S = 0.2
HISTORY_PREFIX = "topr.alias"


class RegistryError(RuntimeError):
    """The model registry could not say which version holds an alias (unreachable, refusing, failing)."""


class PromotionRefused(RuntimeError):
    """The alias moved since the gate, or another promotion held the lock for too long."""


@dataclass(frozen=True)
class Move:
    """One move of an alias, as kept in the registered model's history."""

    version: str
    previous: str | None
    run_id: str
    time: str


def alias_version(client, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at; None only when the model or the alias does not exist.

    MLflow (3.17) answers a missing model with RESOURCE_DOES_NOT_EXIST but a missing alias
    (``get_model_version_by_alias``) with INVALID_PARAMETER_VALUE, the code of any malformed
    request, so the alias is looked up in the model's alias map and only RESOURCE_DOES_NOT_EXIST
    means absent. Anything else (a timeout, a 5xx, 401/403, a proxy's bare 404) raises
    ``RegistryError``: a registry that cannot be read has not said "no champion".
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise RegistryError(
            f"cannot read alias '{alias}' of registered model '{name}' ({error.error_code}: {error.message}); "
            "failing rather than taking it for no champion"
        ) from error
    version = model.aliases.get(alias)
    return None if version is None else str(version)  # an int from a database store, a string over REST


def promote(client, name: str, alias: str, version: str, gate_champion: str | None, run_id: str) -> Move:
    """Point ``name@alias`` at ``version`` if it still points at ``gate_champion`` (None: unset).

    Raises ``PromotionRefused`` saying which version holds the alias now and which the gate beat.
    A retry whose first attempt already moved the alias to ``version`` succeeds without a second
    move (its move is recorded if the first attempt failed before recording it).
    """
    with promotion_lock(client, name, run_id):
        current = alias_version(client, name, alias)
        if current == version != gate_champion:
            return _retried(client, name, alias, Move(version, gate_champion, run_id, _now()))
        if current != gate_champion:
            raise PromotionRefused(
                f"{name}@{alias} is now {_named(current)}; the gate beat {_named(gate_champion)}. "
                f"Version {version} is not promoted: gate it again against the current champion"
            )
        client.set_registered_model_alias(name, alias, version)
        move = Move(version, current, run_id, _now())
        _record(client, name, alias, move)
    return move


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _retried(client, name: str, alias: str, move: Move) -> Move:
    """The move a retried promotion finds already made: the history's last, if it moved the alias
    to this version; else ``move`` (the first attempt failed before recording it), recorded now."""
    history = alias_history(client, name, alias)
    if history and history[-1]["version"] == move.version:
        log.info("%s@%s already holds version %s (moved by run %s)", name, alias, move.version, history[-1]["run_id"])
        return Move(**history[-1])
    _record(client, name, alias, move)
    return move


def _named(version: str | None) -> str:
    return "no champion" if version is None else f"version {version}"


@contextmanager
def promotion_lock(client, name: str, holder: str) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` (a registered model, see the module's docstring) while the block runs."""
    lock = name + LOCK_SUFFIX
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    _acquire(client, lock, {"holder": holder, "since": since})
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _acquire(client, lock: str, tags: dict[str, str]) -> None:
    """Create the lock model, polling while another promotion holds it, for up to ``LOCK_WAIT_S``."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _created(client, lock, tags):
        holder = _holder(client, lock) if time.monotonic() > deadline else None
        if holder is not None:
            raise PromotionRefused(
                f"another promotion holds the lock {lock} ({holder}) after {LOCK_WAIT_S:g} s; "
                f"if that run is no longer running, delete the registered model '{lock}' and promote again"
            )
        time.sleep(LOCK_POLL_S)


def _created(client, lock: str, tags: dict[str, str]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(lock, tags=tags, description="Held by topr while it moves an alias; see topr.promotion.")
    except MlflowException as error:
        if error.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _holder(client, lock: str) -> str | None:
    """Who holds the lock and since when; None when it was released meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client.get_registered_model(lock).tags
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return f"run {tags.get('holder')} since {tags.get('since')}"


def _record(client, name: str, alias: str, move: Move) -> None:
    """Append ``move`` to the alias's history (under the lock, so the sequence number is free)."""
    key = f"{HISTORY_PREFIX}.{alias}.{len(alias_history(client, name, alias)) + 1}"
    client.set_registered_model_tag(name, key, json.dumps(asdict(move)))
    log.info("%s@%s: %s -> %s (tag %s)", name, alias, move.previous, move.version, key)


def alias_history(client, name: str, alias: str) -> list[dict]:
    """The alias's moves, oldest first: ``{"version", "previous", "run_id", "time"}`` each."""
    prefix = f"{HISTORY_PREFIX}.{alias}."
    tags = client.get_registered_model(name).tags
    keys = sorted((key for key in tags if key.startswith(prefix)), key=lambda key: int(key.removeprefix(prefix)))
    return [json.loads(tags[key]) for key in keys]
