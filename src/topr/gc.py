"""Runs that nothing will end: found and ended, and the training checkpoints they leave listed or removed.

``topr run`` ends its own runs when a signal or an error of its own stops it
(``topr_pipelines.commands``). Killed outright (SIGKILL, the OOM killer, the machine going
down), it leaves its parent run and the stage run it was in RUNNING for ever. The parent run
records who runs it (``topr.owner.*`` tags: the host, pid and start time of that ``topr run``),
so ``collect`` finds the RUNNING runs of this host whose ``topr run`` is gone (no such process,
or one that started later: the pid was reused) and ends each, with every stage run still RUNNING
under it, as KILLED, tagged ``topr.ended`` with why. Runs of other hosts (whose processes this
one cannot see) and runs no ``topr run`` owns (a cluster's) are left alone.

Nothing resumes such a run (there is no ``topr run --resume``), so its training checkpoints,
``$TMPDIR/topr-checkpoints/<run id>/`` and ``<run.artifact_store>/<run id>/iter<i>/train.checkpoint.pt``
(``topr.steps.train_checkpoint``), only take space: ``collect`` lists them, for these runs and
for the runs ``topr run`` ended itself, and removes them when asked (``topr gc --delete``). A run
with none left is tagged ``topr.checkpoints`` and not looked at again.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from topr import storage
from topr.tracking import (
    CHECKPOINTS_TAG,
    ENDED_TAG,
    OWNER_PID_TAG,
    OWNER_STARTED_TAG,
    end_pipeline_run,
    mlflow_client,
    owned_runs,
)

log = logging.getLogger(__name__)

KEPT = "kept: topr gc --delete removes it"


@dataclass
class Found:
    """A run ``collect`` found: ended now (``abandoned``) or earlier, and its checkpoints."""

    run_id: str
    name: str
    experiment: str
    why: str
    abandoned: bool
    ended: list[str] = field(default_factory=list)  # the runs ended now: stage runs, then the parent
    checkpoints: dict[str, str] = field(default_factory=dict)  # location: kept, removed, or why it was not checked

    def lines(self) -> list[str]:
        stages = f"; stage runs ended with it: {', '.join(self.ended[:-1])}" if self.ended[:-1] else ""
        state = f"ended KILLED: {self.why}{stages}" if self.abandoned else f"ended earlier: {self.why}"
        head = f"{self.name} (run {self.run_id}, experiment {self.experiment}): {state}"
        return [head, *(f"  checkpoint {location} ({what})" for location, what in self.checkpoints.items())]


def owner_alive(pid: int, started: float | None) -> bool:
    """Whether process ``pid`` of this host runs and, when ``started`` is known, is the process
    that started then (not another that was given the pid later)."""
    if pid <= 0:
        return True  # not a process id: leave the run alone rather than signal a process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it runs
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def _owner(run) -> tuple[int, float | None] | None:
    """The pid and start time a run's owner tags give, or None when they are not numbers."""
    try:
        started = run.data.tags.get(OWNER_STARTED_TAG)
        return int(run.data.tags[OWNER_PID_TAG]), float(started) if started else None
    except (KeyError, ValueError):
        return None


def checkpoint_locations(run_id: str, artifact_store: str | None, iterations: int) -> tuple[Path, list[str]]:
    """Where the train stages of a pipeline run keep their checkpoints: a local folder and, with an
    artifact store, an object per iteration (as ``topr.steps.train_checkpoint`` names them)."""
    local = Path(tempfile.gettempdir(), "topr-checkpoints", run_id)
    if not artifact_store:
        return local, []
    return local, [storage.join(artifact_store, run_id, f"iter{iteration}", "train.checkpoint.pt") for iteration in range(1, iterations + 1)]


def checkpoints(run, delete: bool = False) -> tuple[dict[str, str], bool]:
    """The checkpoints a pipeline run left (each kept or removed, or why it could not be
    checked), and whether every place was checked."""
    params = run.data.params
    store = params.get("run.artifact_store")
    try:
        iterations = int(params.get("run.iterations", "0"))
    except ValueError:
        iterations = 0
    local, remote = checkpoint_locations(run.info.run_id, None if store in (None, "", "None") else store, iterations)
    found, complete = {}, True
    if local.exists():
        if delete:
            shutil.rmtree(local)
        found[str(local)] = "removed" if delete else KEPT
    for uri in remote:
        try:
            if storage.exists(uri):
                if delete:
                    storage.delete(uri)
                found[uri] = "removed" if delete else KEPT
        except (storage.StorageError, OSError) as error:
            found[uri], complete = f"not checked: {error}", False
    return found, complete


def collect(tracking_uri: str, delete: bool = False, finder: str = "topr gc", abandoned_only: bool = False) -> list[Found]:
    """End this host's RUNNING runs whose ``topr run`` is gone (saying that ``finder`` found them),
    and list their checkpoints and, unless ``abandoned_only``, those of the runs ``topr run``
    ended itself; ``delete`` removes them. Returns each run ended now or with checkpoints left."""
    host = socket.gethostname()
    client = mlflow_client(tracking_uri)
    found: dict[str, tuple[Found, object]] = {}
    for run in owned_runs(tracking_uri, host):
        owner = _owner(run)
        if owner is None or owner_alive(*owner):
            continue
        why = f"found abandoned by {finder}: its topr run (pid {owner[0]} on {host}) is gone"
        ended = end_pipeline_run(tracking_uri, run.info.run_id, "KILLED", why)
        item = Found(run.info.run_id, run.info.run_name, _experiment(client, run), why, abandoned=True, ended=ended)
        found[run.info.run_id] = (item, run)
        log.info("ended MLflow run %s (%s) as KILLED: %s", run.info.run_name, run.info.run_id, why)
    if not abandoned_only:
        for run in owned_runs(tracking_uri, host, status=None, tagged=ENDED_TAG):
            if run.info.run_id not in found and CHECKPOINTS_TAG not in run.data.tags and run.info.status != "RUNNING":
                item = Found(run.info.run_id, run.info.run_name, _experiment(client, run), run.data.tags[ENDED_TAG], abandoned=False)
                found[run.info.run_id] = (item, run)
    for item, run in found.values():
        item.checkpoints, complete = checkpoints(run, delete)
        if complete and (delete or not item.checkpoints):
            client.set_tag(item.run_id, CHECKPOINTS_TAG, "none left")
    return [item for item, _ in found.values() if item.abandoned or item.checkpoints]


def _experiment(client, run) -> str:
    return client.get_experiment(run.info.experiment_id).name


def end_runs_of_this_process(tracking_uri: str, run_name: str, status: str, why: str) -> list[tuple[Found, object]]:
    """End what is still RUNNING of the pipeline run ``run_name`` that this process (a ``topr
    run``) started: its stage runs and its parent run, as ``status``, tagged with ``why``. Returns
    each parent run with what was ended of it."""
    client = mlflow_client(tracking_uri)
    ended = []
    for run in owned_runs(tracking_uri, socket.gethostname(), pid=os.getpid(), run_name=run_name, status=None):
        names = end_pipeline_run(tracking_uri, run.info.run_id, status, why)
        if names:
            item = Found(run.info.run_id, run.info.run_name, _experiment(client, run), why, abandoned=False, ended=names)
            ended.append((item, run))
    return ended
