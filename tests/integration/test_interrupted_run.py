"""A real ``topr run`` (tiny model, warm tasks through kfp.local) stopped by SIGTERM while it trains,
tracked by the real MLflow server of the stack: it stops its tasks, ends its MLflow runs KILLED
with the reason, and exits with 128 + 15."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import mlflow
import psutil
import pytest

from test_pipeline import TINY_RUN
from topr.tracking import ENDED_TAG

EXPERIMENT = "interrupted-run"


def running_train_stage(client: mlflow.MlflowClient, process: subprocess.Popen, log_path, timeout_s: float = 900):
    """The run's ``iter1/train`` stage run once it is RUNNING (the test fails if ``topr run`` ends first)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"topr run ended ({process.returncode}) before it trained:\n{log_path.read_text()[-4000:]}"
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            runs = client.search_runs([experiment.experiment_id], "attributes.run_name = 'iter1/train' and attributes.status = 'RUNNING'")
            if runs:
                return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"no RUNNING iter1/train stage run after {timeout_s} s:\n{log_path.read_text()[-4000:]}")


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
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        train = running_train_stage(client, process, log_path)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()

    assert code == 128 + signal.SIGTERM, output[-4000:]
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
