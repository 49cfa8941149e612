"""Moving a registered model's alias: read it failing closed, move it as a compare-and-set.

The gate reads which version holds the alias (``alias_version``) and hands that version on to
``promote``, which moves the alias only if it still points there: under a lock it reads the alias
again and refuses when it moved since the gate. Two runs gated against the same champion cannot
both win, and a model cannot overwrite a better one promoted in between. ``rollback`` (``topr
promote --rollback``, ``roll_back``) moves the alias back the same way, against the champion it
was asked to replace. Every move is appended to the registered model's history (tags
``topr.alias.<alias>.<n>``, see ``alias_history``).

The lock is a registered model, ``<name>.promotion-lock``, created to take it and deleted to
release it. Creating a registered model is an atomic create-if-absent in every MLflow store (the
name is the table's primary key; a second create fails with RESOURCE_ALREADY_EXISTS), so the lock
lives exactly where the alias lives and is shared by everyone who can move the alias: a cluster
run, a second schedule, and a local ``topr run`` with no artifact store or another bucket, all
with nothing but their MLflow access. An S3 conditional create (``IfNoneMatch="*"``, which
SeaweedFS honours with 412) would lock only runs that share a bucket and need write credentials
in the promote pod; a Postgres advisory lock needs the database that MLflow's clients never
see; a Kubernetes Lease cannot lock a local run.

Every instant of a promotion can be lost (a killed pod, a server that dies, a reply that never
arrives while MLflow's client retries the request), so each step leaves a state the next
promotion finishes or undoes (``promote``):

- The lock names its holder, the pipeline run, and a token of the attempt. A lock that names this
  attempt (a create that succeeded although its reply was lost) or this run (an earlier attempt,
  which Kubeflow retries only after it ended) is this promotion's own. A lock whose holder run has
  ended is stale: it is reclaimed by renaming it to ``<lock>.reclaimed.<holder>.<since>`` (a
  rename succeeds once, so two promotions cannot both reclaim it), which stays in the registry as
  the record. A lock whose holder still runs makes a promotion wait ``LOCK_WAIT_S``, then refuse
  naming it. The lock is released on every path, the create included.
- The move is written to the alias history as "moving" before the alias is set, and marked done
  after. A history that ends with a "moving" entry is settled first, under the lock: done if the
  alias holds that version (and the version is tagged promoted), dropped if not. So the history,
  the alias and the versions' ``topr.promotion`` tags agree after any promotion.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
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


PROMOTE, ROLLBACK = "promote", "rollback"


@dataclass(frozen=True)
class Move:
    """One move of an alias, as kept in the registered model's history: a promotion of the
    version a gate passed, or a rollback (``topr promote --rollback``)."""

    version: str
    previous: str | None
    run_id: str
    time: str
    action: str = PROMOTE

    @classmethod
    def from_entry(cls, entry: dict) -> Move:
        """The move a history entry records (one written before rollbacks existed has no action)."""
        return cls(**{field.name: entry[field.name] for field in fields(cls) if field.name in entry})


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
        settle(client, name, alias, current)
        if current == version != gate_champion:
            return _retried(client, name, alias, Move(version, gate_champion, run_id, _now()))
        if current != gate_champion:
            raise PromotionRefused(
                f"{name}@{alias} is now {_named(current)}; the gate beat {_named(gate_champion)}. "
                f"Version {version} is not promoted: gate it again against the current champion"
            )
        return _move(client, name, alias, Move(version, current, run_id, _now()))


def rollback(client, name: str, alias: str, version: str, expected: str, run_id: str) -> Move:
    """Point ``name@alias`` back at ``version`` if it still holds ``expected``, the champion the
    rollback was asked against: the compare-and-set of ``promote``, under the same lock, so two
    rollbacks at once (or a rollback and a promotion) cannot both move it. Raises
    ``PromotionRefused`` naming the version that holds it now."""
    with promotion_lock(client, name, run_id):
        current = alias_version(client, name, alias)
        settle(client, name, alias, current)
        if current != expected:
            raise PromotionRefused(
                f"{name}@{alias} is now {_named(current)}; the rollback was asked against version {expected}. Nothing moved: look again"
            )
        move = _move(client, name, alias, Move(version, current, run_id, _now(), ROLLBACK))
        client.set_model_version_tag(name, expected, "topr.promotion", f"rolled back: {name}@{alias} moved back to version {version} by run {run_id} at {move.time}")
    return move


def roll_back(tracking_uri: str, name: str, alias: str, experiment: str, to: str | None = None) -> Move:
    """``topr promote --rollback``: move ``name@alias`` back to ``to``, or to the version it held
    before its last move (``previous_version``), by an MLflow run of its own in ``experiment``
    (the lock's holder, and the record of who moved it: ``topr.promoted`` or, refused,
    ``topr.promotion``). Refuses a version whose stage never committed it, or that was trained on
    another task than the champion's."""
    from topr.lineage import committed_model
    from topr.tracking import OWNER_ENV, experiment_id, mlflow_client, owner_environment, owner_tags

    client = mlflow_client(tracking_uri)
    current = alias_version(client, name, alias)
    if current is None:
        raise PromotionRefused(f"{name}@{alias} is not set: there is no champion to roll back")
    version = str(to or previous_version(client, name, alias, current))
    if version == current:
        raise PromotionRefused(f"{name}@{alias} already holds version {version}")
    chosen, champion = _version(client, name, version), _version(client, name, current)
    committed_model(client, chosen)
    tasks = (chosen.tags.get("topr.task"), champion.tags.get("topr.task"))
    if None not in tasks and tasks[0] != tasks[1]:
        raise PromotionRefused(f"{name}/{version} was trained on task {tasks[0]!r}, the champion (version {current}) on {tasks[1]!r}: refusing to roll back across tasks")
    # Owned by this process, so that 'topr gc' ends the run, and frees the lock, if it is killed holding it.
    tags = {"topr.rollback": f"{name}@{alias}: version {current} -> {version}", **owner_tags(owner_environment()[OWNER_ENV])}
    run_id = client.create_run(experiment_id(client, experiment, tracking_uri), run_name=f"rollback {name}@{alias}", tags=tags).info.run_id
    try:
        move = rollback(client, name, alias, version, current, run_id)
    except BaseException as error:
        client.set_tag(run_id, "topr.promotion", f"refused: {error}"[:5000])
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_tag(run_id, "topr.promoted", f"{name}/{version}")
    client.set_terminated(run_id, "FINISHED")
    return move


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise PromotionRefused(f"{name} has no version {version}") from None
        raise


def previous_version(client, name: str, alias: str, current: str) -> str:
    """The version ``name@alias`` held before it moved to ``current``, from its history: a second
    rollback undoes the first."""
    history = alias_history(client, name, alias)
    if not history or history[-1]["version"] != current:
        raise PromotionRefused(
            f"the history of {name}@{alias} does not say which version it held before version {current} "
            "(was the alias moved outside topr?): name one with --to VERSION"
        )
    if history[-1]["previous"] is None:
        raise PromotionRefused(f"{name}@{alias}: version {current} was its first version, there is none before it: name one with --to VERSION")
    return str(history[-1]["previous"])


def _move(client, name: str, alias: str, move: Move) -> Move:
    """Move the alias, recorded "moving" before and done after (see the module's docstring)."""
    key = _record(client, name, alias, move, MOVING)
    client.set_registered_model_alias(name, alias, move.version)
    _mark_promoted(client, name, alias, key, move)
    return move


MOVING = "moving"
"""The state of a history entry written before its alias move, until the move is confirmed."""


def settle(client, name: str, alias: str, current: str | None) -> None:
    """Finish or undo a move an interrupted promotion left "moving" at the end of the history:
    done if the alias holds its version (``current``), dropped if not; a move recorded done whose
    version was never tagged (the server lost in between) is tagged. Called under the lock."""
    entries = _history_entries(client, name, alias)
    if not entries:
        return
    key, entry = entries[-1]
    move = Move.from_entry(entry)
    if entry.get("state") != MOVING:
        tag = client.get_model_version(name, move.version).tags.get("topr.promotion", "")
        if current == move.version and not tag.startswith("promoted"):
            _mark_promoted(client, name, alias, key, move)
        return
    if current == move.version:
        log.warning("%s@%s: finishing the record of run %s's move to version %s, interrupted after the alias moved", name, alias, move.run_id, move.version)
        _mark_promoted(client, name, alias, key, move)
    else:
        log.warning("%s@%s: dropping run %s's move to version %s, interrupted before the alias moved", name, alias, move.run_id, move.version)
        client.delete_registered_model_tag(name, key)


def _mark_promoted(client, name: str, alias: str, key: str, move: Move) -> None:
    """The move happened: its history entry done, its version tagged as promoted."""
    client.set_registered_model_tag(name, key, json.dumps(asdict(move)))
    by = "the rollback run" if move.action == ROLLBACK else "run"
    client.set_model_version_tag(name, move.version, "topr.promotion", f"promoted: {name}@{alias} by {by} {move.run_id} at {move.time}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _retried(client, name: str, alias: str, move: Move) -> Move:
    """The move a retried promotion finds already made: the history's last, if it moved the alias
    to this version; else ``move`` (the first attempt failed before recording it), recorded now."""
    history = alias_history(client, name, alias)
    if history and history[-1]["version"] == move.version:
        log.info("%s@%s already holds version %s (moved by run %s)", name, alias, move.version, history[-1]["run_id"])
        return Move.from_entry(history[-1])
    _mark_promoted(client, name, alias, _record(client, name, alias, move, MOVING), move)
    return move


def _named(version: str | None) -> str:
    return "no champion" if version is None else f"version {version}"


@contextmanager
def promotion_lock(client, name: str, holder: str) -> Iterator[None]:
    """Hold ``<name>.promotion-lock`` (a registered model, see the module's docstring) while the
    block runs; ``holder`` is the pipeline run. Released on every path, its taking included."""
    lock = name + LOCK_SUFFIX
    tags = {"holder": holder, "token": uuid.uuid4().hex, "since": _now()}
    try:
        _acquire(client, lock, tags)
        yield
    finally:
        _release(client, lock, tags)


def _acquire(client, lock: str, tags: dict[str, str]) -> None:
    """Create the lock model, or find it is this promotion's own, or reclaim it from a run that
    ended; poll while another promotion holds it, for up to ``LOCK_WAIT_S``."""
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _created(client, lock, tags):
        held = _lock_tags(client, lock)
        if held is None:
            continue  # released meanwhile
        if held.get("token") == tags["token"] or held.get("holder") == tags["holder"]:
            log.info("%s is this promotion's own (an earlier attempt of run %s)", lock, tags["holder"])
            return
        ended = _ended(client, held.get("holder"))
        if ended:
            _reclaim(client, lock, held, tags["holder"], ended)
            continue
        if time.monotonic() > deadline:
            raise PromotionRefused(
                f"another promotion holds the lock {lock} (run {held.get('holder')} since {held.get('since')}) "
                f"after {LOCK_WAIT_S:g} s; once that run has ended the next promotion reclaims the lock"
            )
        time.sleep(LOCK_POLL_S)


def _release(client, lock: str, tags: dict[str, str]) -> None:
    """Delete the lock if it is this promotion's; best-effort, as a lock left behind is this
    run's own on a retry and stale for everyone else once the run ends."""
    try:
        held = _lock_tags(client, lock)
        if held is not None and held.get("token") == tags["token"]:
            client.delete_registered_model(lock)
    except Exception as error:  # noqa: BLE001 - whatever failed, the promotion's outcome stands
        log.warning("could not release %s (%s); it is reclaimed once run %s has ended", lock, error, tags["holder"])


def _ended(client, run_id: str | None) -> str | None:
    """The status of ``run_id`` if it has ended (FINISHED, FAILED, KILLED); None while it runs or
    when no such run exists (a holder nobody can check is never taken for gone)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        status = client.get_run(run_id).info.status
    except MlflowException:
        return None
    return None if status in ("RUNNING", "SCHEDULED") else status


def _reclaim(client, lock: str, held: dict[str, str], reclaimer: str, status: str) -> None:
    """Move a stale lock aside, keeping it as the record: the rename to a name of its own
    succeeds for exactly one reclaimer, so two cannot both take the lock from the same holder."""
    from mlflow.exceptions import MlflowException

    record = f"{lock}.reclaimed.{held.get('holder')}.{re.sub(r'[^0-9A-Za-z]', '', held.get('since', ''))}"
    try:
        client.rename_registered_model(lock, record)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
            return  # another promotion reclaimed it first
        raise
    client.set_registered_model_tag(record, "reclaimed", f"by run {reclaimer} at {_now()}: holder run {held.get('holder')} is {status}")
    log.warning("reclaimed %s from run %s, which is %s (kept as %s)", lock, held.get("holder"), status, record)


def _created(client, lock: str, tags: dict[str, str]) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(lock, tags=tags, description="Held by topr while it moves an alias; see topr.promotion.")
    except MlflowException as error:
        if error.error_code == "RESOURCE_ALREADY_EXISTS":
            return False
        raise
    return True


def _lock_tags(client, lock: str) -> dict[str, str] | None:
    """The lock's tags (holder, token, since); None when it was released meanwhile."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _record(client, name: str, alias: str, move: Move, state: str | None = None) -> str:
    """Append ``move`` to the alias's history (under the lock, so the sequence number is free);
    returns its tag's key."""
    key = f"{HISTORY_PREFIX}.{alias}.{len(_history_entries(client, name, alias)) + 1}"
    client.set_registered_model_tag(name, key, json.dumps({**asdict(move), **({"state": state} if state else {})}))
    log.info("%s@%s: %s -> %s (tag %s%s)", name, alias, move.previous, move.version, key, f", {state}" if state else "")
    return key


def _history_entries(client, name: str, alias: str) -> list[tuple[str, dict]]:
    """Every entry of the alias's history, oldest first, with its tag's key."""
    prefix = f"{HISTORY_PREFIX}.{alias}."
    tags = client.get_registered_model(name).tags
    keys = sorted((key for key in tags if key.startswith(prefix)), key=lambda key: int(key.removeprefix(prefix)))
    return [(key, json.loads(tags[key])) for key in keys]


def alias_history(client, name: str, alias: str) -> list[dict]:
    """The alias's moves, oldest first: ``{"version", "previous", "run_id", "time", "action"}``
    each (a last move still "moving", interrupted before it was settled, has ``"state": "moving"``)."""
    return [entry for _, entry in _history_entries(client, name, alias)]
