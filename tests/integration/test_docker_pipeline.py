"""The pipeline with every task in a container of the CPU image (``topr run --runner docker``),
against the real stack (SeaweedFS and an MLflow server on loopback), secured as a pod."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import mlflow
import pytest

from topr import storage
from topr.cli import main
from topr.tracking import STAGE_TAG
from topr_pipelines.docker_runner import RUN_LABEL

from test_interrupted_run import stop_while_training
from test_pipeline import TINY_RUN


def docker_json(*arguments: str):
    return json.loads(subprocess.run(["docker", *arguments], capture_output=True, text=True, check=True).stdout)


def docker_lines(*arguments: str) -> set[str]:
    return set(subprocess.run(["docker", *arguments], capture_output=True, text=True, check=True).stdout.split())


@pytest.mark.slow
def test_every_task_runs_in_the_image_and_the_model_verifies(stack, topr_image, tmp_path, tiny_model_dir, capsys):
    model_uri = f"s3://{stack.bucket}/models/tiny"
    storage.publish_directory(tiny_model_dir, model_uri)  # a container sees no host path: the model comes from S3
    store = f"s3://{stack.bucket}/docker-runs"
    dangling_before = docker_lines("volume", "ls", "-q", "--filter", "dangling=true")

    code = main([
        "run", "--runner", "docker", "--tracking-uri", stack.tracking_uri, f"run.output_dir={tmp_path}", "run.name=in-containers",
        f"model.path={model_uri}", "run.iterations=1", f"run.artifact_store={store}", "run.registered_model=docker-test",
        "run.experiment=in-containers", *TINY_RUN,
    ])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "pass@1" in capsys.readouterr().out  # the run's table

    client = mlflow.MlflowClient(stack.tracking_uri)
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("in-containers").experiment_id], "attributes.run_name = 'in-containers'"
    )
    assert parent.info.status == "FINISHED"
    stage_runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert {run.data.tags[STAGE_TAG] for run in stage_runs} >= {"prepare_model", "sample", "verify", "curate", "train", "evaluate"}
    digest = docker_json("image", "inspect", topr_image)[0]["Id"]
    for run in stage_runs:  # each stage ran in the image, and says which
        assert run.data.tags["topr.image"] == topr_image, run.info.run_name
        assert run.data.tags["topr.image.digest"] == digest, run.info.run_name
    # The containers wrote the pipeline root as user 1000, through the group the run kept writable.
    outputs = list((tmp_path / "in-containers" / "pipeline_root").rglob("executor_output.json"))
    assert outputs and all(path.stat().st_uid == 1000 for path in outputs)

    assert main(["lineage", "--tracking-uri", stack.tracking_uri, "--verify", "docker-test/1"]) == 0
    assert "0 problem(s)" in capsys.readouterr().err
    # Every container and its writable volumes went with its task.
    assert docker_lines("ps", "-aq", "--filter", f"ancestor={topr_image}") == set()
    assert docker_lines("volume", "ls", "-q", "--filter", "dangling=true") <= dangling_before


def test_a_tracking_uri_the_containers_cannot_reach_is_refused_before_the_run(tmp_path, capsys):
    code = main(["run", "--runner", "docker", "--tracking-uri", "http://mlflow.example.org:5000", f"run.output_dir={tmp_path}", "run.name=x"])
    assert code != 0
    assert "not a service on this machine's loopback" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_a_signal_removes_the_running_tasks_containers(stack, topr_image, tmp_path, tiny_model_dir):
    """SIGTERM while a task trains in its container: ``topr run`` exits 143 and no container of its
    own is left running, as a pod goes with its pipeline run."""
    model_uri = f"s3://{stack.bucket}/models/tiny-signal"
    storage.publish_directory(tiny_model_dir, model_uri)
    client = mlflow.MlflowClient(stack.tracking_uri)
    log_path = tmp_path / "topr-run.out"
    command = [
        sys.executable, "-m", "topr.cli", "run", "--runner", "docker", "--tracking-uri", stack.tracking_uri,
        f"run.output_dir={tmp_path}", "run.name=stopped", "run.experiment=docker-stopped", f"model.path={model_uri}",
        "run.iterations=1", f"run.artifact_store=s3://{stack.bucket}/docker-stopped", *TINY_RUN, "train.epochs=1000",
    ]  # fmt: skip
    training = set()  # the train task's container

    def containers_running():
        training.update(docker_lines("ps", "-q", "--filter", f"ancestor={topr_image}", "--filter", f"label={RUN_LABEL}"))
        assert training

    stopped = stop_while_training(command, client, log_path, "docker-stopped", training=containers_running)
    assert stopped.process.returncode == 128 + signal.SIGTERM, stopped.output[-4000:]
    assert docker_lines("ps", "-aq", "--filter", f"ancestor={topr_image}") & training == set(), stopped.output[-4000:]
