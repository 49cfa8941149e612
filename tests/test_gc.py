"""Every run ends. ``topr run`` ends its MLflow runs when a signal (SIGTERM, SIGINT) or an error of
its own stops it; a run whose ``topr run`` was killed outright (SIGKILL) is found and ended by
``topr gc`` and by the next ``topr run``, which also list (``topr gc --delete``: remove) its
training checkpoints. Against a real sqlite MLflow store (one for the module: migrating it is
slow) and moto's S3; tests/integration/test_interrupted_run.py interrupts a real pipeline run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from mlflow import MlflowClient

from topr import gc, storage
from topr.cli import main
from topr.config import load_config
from topr.steps import StageContext, train_checkpoint
from topr.tracking import (
    ENDED_TAG,
    ITERATION_TAG,
    OWNER_ENV,
    STAGE_TAG,
    default_tracking_uri,
    owner_environment,
    stage_run,
    start_pipeline_run,
)

HOST = socket.gethostname()
EXPERIMENT = "gc-tests"


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    return default_tracking_uri(tmp_path_factory.mktemp("store"))


@pytest.fixture
def temporary_folder(tmp_path, monkeypatch):
    """This test's own temporary folder, where the train stage keeps its checkpoints (topr-checkpoints/)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def gone_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def pipeline_run(tracking_uri: str, owner: str | None, name: str, overrides: tuple[str, ...] = ()) -> str:
    """A parent run as the start_run task creates it under a ``topr run`` that is ``owner``
    ("<host> <pid> [<start time>]", as ``owner_environment`` says it), or under none (a cluster run)."""
    config = load_config(None, [f"run.experiment={EXPERIMENT}", *overrides])
    with pytest.MonkeyPatch.context() as patch:
        if owner:
            patch.setenv(OWNER_ENV, owner)
        else:
            patch.delenv(OWNER_ENV, raising=False)
        return start_pipeline_run(tracking_uri, config, name)


def killed_stage(tracking_uri: str, parent_run_id: str, stage: str = "train", iteration: int = 1) -> str:
    """A stage run left RUNNING, as the task of a stage that was killed leaves it."""
    client = MlflowClient(tracking_uri)
    tags = {"mlflow.parentRunId": parent_run_id, STAGE_TAG: stage, ITERATION_TAG: str(iteration)}
    experiment = client.get_run(parent_run_id).info.experiment_id
    return client.create_run(experiment, run_name=f"iter{iteration}/{stage}", tags=tags).info.run_id


def run_of(tracking_uri: str, run_id: str):
    return MlflowClient(tracking_uri).get_run(run_id)


def test_gc_ends_the_runs_whose_topr_run_is_gone_and_no_other(tracking_uri):
    pid = gone_pid()
    abandoned = pipeline_run(tracking_uri, f"{HOST} {pid}", "abandoned")
    with stage_run(tracking_uri, abandoned, "curate", 1) as curated:
        pass
    training = killed_stage(tracking_uri, abandoned)  # its task died with topr run
    live = pipeline_run(tracking_uri, owner_environment()[OWNER_ENV], "live")
    elsewhere = pipeline_run(tracking_uri, f"another-host {gone_pid()}", "elsewhere")
    cluster = pipeline_run(tracking_uri, None, "cluster")

    found = {item.run_id: item for item in gc.collect(tracking_uri, finder="topr gc")}

    assert abandoned in found and not {live, elsewhere, cluster} & set(found)
    assert found[abandoned].abandoned and found[abandoned].ended == ["iter1/train", "abandoned"]
    for run_id in (abandoned, training):
        run = run_of(tracking_uri, run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags[ENDED_TAG] == f"found abandoned by topr gc: its topr run (pid {pid} on {HOST}) is gone"
    assert run_of(tracking_uri, curated.run_id).info.status == "FINISHED"
    # The live process's run, another machine's (whose processes this one cannot see) and a
    # cluster's (no topr run owns it) go on.
    assert {run_of(tracking_uri, run_id).info.status for run_id in (live, elsewhere, cluster)} == {"RUNNING"}
    # Ended, with no checkpoint left: the next look finds nothing.
    assert abandoned not in {item.run_id for item in gc.collect(tracking_uri)}


def test_a_reused_pid_is_not_the_topr_run_that_started_the_run(tracking_uri):
    """This process is alive, but it started after the run's topr run did: that one is gone."""
    reused = pipeline_run(tracking_uri, f"{HOST} {os.getpid()} 1000000.000", "reused-pid")
    assert reused in {item.run_id for item in gc.collect(tracking_uri)}
    assert run_of(tracking_uri, reused).info.status == "KILLED"


def test_gc_lists_the_checkpoints_of_runs_that_never_resume_and_deletes_them_when_asked(tracking_uri, s3, temporary_folder, capsys):
    store = f"{s3}/runs"
    run_id = pipeline_run(tracking_uri, f"{HOST} {gone_pid()}", "with-checkpoint", (f"run.artifact_store={store}", "run.iterations=2"))
    config = load_config(None, [f"run.artifact_store={store}"])
    checkpoint = train_checkpoint(StageContext(config, tracking_uri, run_id, iteration=2))
    checkpoint.save({"next_step": 3})  # on local disk and in the artifact store, as the train stage saves it
    assert checkpoint.path.parent == temporary_folder / "topr-checkpoints" / run_id

    assert main(["gc", "--tracking-uri", tracking_uri]) == 0
    listed = capsys.readouterr().out
    assert f"with-checkpoint (run {run_id}" in listed and "ended KILLED" in listed
    assert f"{checkpoint.path.parent} (kept" in listed and f"{checkpoint.remote} (kept" in listed
    assert checkpoint.path.exists() and storage.exists(checkpoint.remote)
    assert run_of(tracking_uri, run_id).info.status == "KILLED"

    # Ended now, its checkpoints are still listed until they are removed.
    assert main(["gc", "--tracking-uri", tracking_uri, "--delete"]) == 0
    removed = capsys.readouterr().out
    assert f"{checkpoint.path.parent} (removed)" in removed and f"{checkpoint.remote} (removed)" in removed
    assert not checkpoint.path.parent.exists() and not storage.exists(checkpoint.remote)
    assert main(["gc", "--tracking-uri", tracking_uri]) == 0
    assert run_id not in capsys.readouterr().out


def test_gc_looks_where_the_train_stage_keeps_its_checkpoints():
    config = load_config(None, ["run.artifact_store=s3://bucket/runs"])
    local, remote = gc.checkpoint_locations("0123abcd", "s3://bucket/runs", 2)
    stages = [train_checkpoint(StageContext(config, "unused", "0123abcd", iteration)) for iteration in (1, 2)]
    assert [local] == list({stage.path.parent for stage in stages})
    assert remote == [stage.remote for stage in stages]
    assert gc.checkpoint_locations("0123abcd", None, 2)[1] == []


@pytest.fixture
def topr_run(tracking_uri, tmp_path, monkeypatch):
    """``topr run`` in this process, its pipeline replaced by ``pipeline(config, run_name)``: what
    the start_run task and a stage's task would do, then whatever stops the run."""

    def run(pipeline, name: str) -> int:
        def run_local(config, run_dir, tracking_uri, run_name, *args, **kwargs):
            return pipeline(config, run_name)

        monkeypatch.setattr("topr_pipelines.runner.run_local", run_local)
        return main(["run", "--tracking-uri", tracking_uri, f"run.output_dir={tmp_path}", f"run.name={name}", "run.experiment=gc-tests"])

    run.tracking_uri = tracking_uri
    return run


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_topr_runs_tasks_and_ends_its_runs_killed(topr_run, signum, code, capsys):
    handlers = {signal.SIGTERM: signal.getsignal(signal.SIGTERM), signal.SIGINT: signal.getsignal(signal.SIGINT)}
    started = {}

    def pipeline(config, run_name):
        started["parent"] = start_pipeline_run(topr_run.tracking_uri, config, run_name)  # as the start_run task does
        started["stage"] = killed_stage(topr_run.tracking_uri, started["parent"])  # a stage's task, running
        started["task"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        os.kill(os.getpid(), signum)
        time.sleep(60)
        raise AssertionError("the signal did not stop topr run")

    assert topr_run(pipeline, "interrupted") == code

    reason = f"{signal.Signals(signum).name} received by topr run (pid {os.getpid()} on {HOST})"
    for run_id in (started["parent"], started["stage"]):
        run = run_of(topr_run.tracking_uri, run_id)
        assert run.info.status == "KILLED" and run.data.tags[ENDED_TAG] == reason
    assert started["task"].wait(timeout=10) == -signal.SIGTERM  # the run's tasks are stopped first
    assert f"topr run: {reason}: ended MLflow run interrupted ({started['parent']}) and iter1/train as KILLED" in capsys.readouterr().err
    assert OWNER_ENV not in os.environ
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_an_error_of_topr_run_itself_ends_its_runs_failed(topr_run):
    started = {}

    def pipeline(config, run_name):
        started["parent"] = start_pipeline_run(topr_run.tracking_uri, config, run_name)
        started["stage"] = killed_stage(topr_run.tracking_uri, started["parent"])  # a stage's task, running
        raise OSError(28, "No space left on device")

    assert topr_run(pipeline, "disk-full") == 2
    for run_id in (started["parent"], started["stage"]):
        run = run_of(topr_run.tracking_uri, run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags[ENDED_TAG] == "topr run failed: OSError: [Errno 28] No space left on device"


def test_topr_run_ends_abandoned_runs_before_it_starts(topr_run, capsys):
    pid = gone_pid()
    abandoned = pipeline_run(topr_run.tracking_uri, f"{HOST} {pid}", "killed-before")
    seen = {}

    def pipeline(config, run_name):
        seen["status"] = run_of(topr_run.tracking_uri, abandoned).info.status
        raise RuntimeError("stop here")

    assert topr_run(pipeline, "next-run") == 2
    assert seen["status"] == "KILLED"
    assert f"killed-before (run {abandoned}" in capsys.readouterr().out
    tag = run_of(topr_run.tracking_uri, abandoned).data.tags[ENDED_TAG]
    assert tag == f"found abandoned by topr run (pid {os.getpid()}): its topr run (pid {pid} on {HOST}) is gone"
