"""A real ``topr run`` (tiny model, warm tasks through kfp.local) stopped by SIGTERM while it trains,
tracked by the real MLflow server of the stack: it stops its tasks, ends its MLflow runs KILLED
with the reason, and exits with 128 + 15; ``topr run --resume`` then goes on in the same MLflow
run from the stages that finished."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import mlflow
import psutil
import pytest

from test_pipeline import TINY_RUN
from topr.tracking import ENDED_TAG, RESUMED_TAG

EXPERIMENT = "interrupted-run"


def running_train_stage(
    client: mlflow.MlflowClient, process: subprocess.Popen, log_path, experiment_name: str = EXPERIMENT, timeout_s: float = 900
):
    """The run's ``iter1/train`` stage run once it is RUNNING (the test fails if ``topr run`` ends first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"topr run ended ({process.returncode}) before it trained:\n{log_path.read_text()[-4000:]}"
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'iter1/train' and attributes.status = 'RUNNING'")
            if runs:
                return runs[0]
        time.sleep(0.2)
    raise AssertionError(f"no RUNNING iter1/train stage run after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


@dataclass
class Stopped:
    """A ``topr run`` sent SIGTERM while it trained."""

    process: subprocess.Popen
    train: object  # its iter1/train stage run, as it ran
    output: str


def stop_while_training(command: list[str], client: mlflow.MlflowClient, log_path, experiment: str = EXPERIMENT, training=None) -> Stopped:
    """Start ``command`` (a ``topr run``), send it SIGTERM once its ``iter1/train`` stage runs
    (calling ``training()`` first), and wait for it to end; nothing of it is left if the test fails."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        train = running_train_stage(client, process, log_path, experiment)
        if training:
            training()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return Stopped(process, train, log_path.read_text())


def left_in_session(session: int) -> list[psutil.Process]:
    """The processes of ``session`` still running (zombies, which only wait to be reaped, are not)."""
    left = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process)
        except (OSError, psutil.Error):
            pass
    return left


@pytest.mark.slow
def test_sigterm_while_training_ends_the_run_and_its_stage_runs_killed(stack, tmp_path, tiny_model_dir):
    client = mlflow.MlflowClient(stack.tracking_uri)
    log_path = tmp_path / "topr-run.out"
    command = [
        sys.executable, "-m", "topr.cli", "run", "--tracking-uri", stack.tracking_uri,
        f"run.output_dir={tmp_path}", "run.name=interrupted", f"run.experiment={EXPERIMENT}",
        f"model.path={tiny_model_dir}", "run.iterations=1", *TINY_RUN,
        "train.epochs=1000",  # training outlasts the test's look at it: the signal comes while it runs
    ]  # fmt: skip
    stopped = stop_while_training(command, client, log_path)
    process, train, output = stopped.process, stopped.train, stopped.output

    assert process.returncode == 128 + signal.SIGTERM, output[-4000:]
    reason = f"SIGTERM received by topr run (pid {process.pid} on {socket.gethostname()})"
    parent_id = train.data.tags["mlflow.parentRunId"]
    for run_id in (parent_id, train.info.run_id):
        run = client.get_run(run_id)
        assert (run.info.run_name, run.info.status, run.data.tags.get(ENDED_TAG)) == (run.info.run_name, "KILLED", reason)
    stage_runs = client.search_runs([train.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert "RUNNING" not in {run.info.status for run in stage_runs}
    assert f"topr run: {reason}: ended MLflow run interrupted ({parent_id}) and iter1/train as KILLED" in output
    # Its tasks were stopped with it: nothing of its session goes on training.
    deadline = time.monotonic() + 10
    while left_in_session(process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left_in_session(process.pid) == []


@pytest.mark.slow
def test_a_run_stopped_while_training_resumes_from_its_finished_stages(stack, tmp_path, tiny_model_dir):
    client = mlflow.MlflowClient(stack.tracking_uri)
    experiment = "resumed-run"
    command = [sys.executable, "-m", "topr.cli", "run"]
    log_path = tmp_path / "topr-run.out"
    first = [
        "--tracking-uri", stack.tracking_uri, f"run.output_dir={tmp_path}", "run.name=resumed", f"run.experiment={experiment}",
        f"model.path={tiny_model_dir}", "run.iterations=1", *TINY_RUN, "train.epochs=40",
    ]  # fmt: skip
    stopped = stop_while_training(command + first, client, log_path, experiment)
    assert stopped.process.returncode == 128 + signal.SIGTERM, stopped.output[-4000:]
    train = stopped.train
    parent_id = train.data.tags["mlflow.parentRunId"]
    assert f"topr run --resume {tmp_path / 'resumed'}" in stopped.output
    stages = client.search_runs([train.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    finished_before = {run.info.run_name: run.info.run_id for run in stages if run.info.status == "FINISHED"}
    assert {"iter0/prompts", "iter0/prepare_model", "iter1/verify", "iter1/curate"} <= set(finished_before), finished_before

    # Nothing but the run's folder may be given: its configuration is the run's own.
    refused = subprocess.run(command + ["--resume", str(tmp_path / "resumed"), "train.epochs=1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "train.epochs=1: a resumed run keeps its own configuration" in refused.stderr

    resumed = subprocess.run(command + ["--resume", str(tmp_path / "resumed")], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming MLflow run {parent_id} (resumed), which ended KILLED: SIGTERM received by topr run" in resumed.stdout
    parent = client.get_run(parent_id)
    assert (parent.info.status, parent.data.tags.get(ENDED_TAG), parent.data.tags[RESUMED_TAG]) == ("FINISHED", None, "1")
    assert parent.data.tags[f"{RESUMED_TAG}.1"].startswith("after: SIGTERM received by topr run")
    stages = client.search_runs([train.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_name = {}
    for run in stages:
        by_name.setdefault(run.info.run_name, []).append(run)
    # Each stage that had finished kept its one run; the one that was stopped ran again; the rest ran once.
    for name, run_id in finished_before.items():
        assert [run.info.run_id for run in by_name[name]] == [run_id], name
    assert sorted(run.info.status for run in by_name["iter1/train"]) == ["FINISHED", "KILLED"]
    assert [run.info.status for run in by_name["iter1/evaluate"]] == ["FINISHED"]
    assert (tmp_path / "resumed" / "report.md").exists()
    # A finished run has nothing left to resume.
    again = subprocess.run(command + ["--resume", str(tmp_path / "resumed")], capture_output=True, text=True)
    assert again.returncode == 2 and f"MLflow run {parent_id} (resumed) finished: nothing to resume" in again.stderr
