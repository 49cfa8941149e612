"""What topr gc may remove because nothing needs it (topr.retention), against a real local MLflow
store: the local copies of a finished published run, and retired registered versions (never an
aliased one, one of the newest, an ancestor of a kept one, or one whose run still runs)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import yaml

from topr import retention
from topr.cli import main
from topr.lineage import UncommittedModelError, committed_model
from topr.tracking import FILES_REMOVED_TAG, default_tracking_uri

MODEL = "retention-test"
SIZE = 1000


def _folder(path: Path, content: bytes = b"w" * SIZE) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(content)
    (path / "config.json").write_text("{}")
    return path


@pytest.fixture
def registry(tmp_path):
    """Five versions: 1 ← 2 ← 3 (champion) ← 5, and 4 branching off 1; each with a published
    folder and an MLflow copy hard linked to it (as a local run logs a model)."""
    uri = default_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("runs")
    client.create_registered_model(MODEL)
    parents = {"1": "", "2": "w1", "3": "w2", "4": "w1", "5": "w3"}
    folders = {}
    for number, parent in parents.items():
        pipeline = client.create_run(experiment, run_name=f"run{number}")
        client.set_terminated(pipeline.info.run_id, "FINISHED")
        stage = client.create_run(experiment, tags={"mlflow.parentRunId": pipeline.info.run_id})
        client.set_terminated(stage.info.run_id, "FINISHED")
        published = _folder(tmp_path / f"run{number}" / "pipeline_root" / "model", f"{number}".encode() * SIZE)
        logged = tmp_path / "mlartifacts" / number / "model"
        logged.mkdir(parents=True)
        for file in published.iterdir():
            os.link(file, logged / file.name)
        tags = {"topr.model_uri": str(published), "topr.weights_sha256": f"w{number}", "topr.parent_weights_sha256": parent}
        client.create_model_version(MODEL, str(logged), run_id=stage.info.run_id, tags=tags)
        folders[number] = (published, logged)
    client.set_registered_model_alias(MODEL, "champion", "3")
    return uri, client, folders


def test_only_a_version_nothing_needs_is_retired(registry):
    uri, client, folders = registry
    (item,) = retention.retired_versions(uri, keep_versions=1)
    # 5 is the newest, 3 the champion, 2 and 1 their ancestors: 4, a branch off 1, goes.
    assert item.version == (MODEL, "4")
    assert item.locations == [str(path) for path in folders["4"]]
    assert item.freed_bytes == SIZE + 2  # each file once: the MLflow copy is a hard link
    assert retention.retired_versions(uri, keep_versions=2) == []  # 4 is among the newest two


def test_removing_a_version_tags_it_first_and_readers_refuse_it(registry, tmp_path):
    uri, client, folders = registry
    (item,) = retention.collect(uri, tmp_path, keep_versions=1, delete=True)
    assert item.removed and not any(path.exists() for path in folders["4"])
    assert all(path.exists() for number in "1235" for path in folders[number])
    version = client.get_model_version(MODEL, "4")
    assert "topr gc --keep-versions 1" in version.tags[FILES_REMOVED_TAG]
    with pytest.raises(UncommittedModelError, match=r"retention-test/4: its files were removed"):
        committed_model(client, version)
    assert retention.retired_versions(uri, keep_versions=1) == []  # not listed again


def test_a_version_whose_pipeline_still_runs_is_kept(registry):
    uri, client, _ = registry
    stage = client.get_run(client.get_model_version(MODEL, "4").run_id)
    client.update_run(stage.data.tags["mlflow.parentRunId"], "RUNNING")
    assert retention.retired_versions(uri, keep_versions=1) == []


def _run_folder(output_dir: Path, name: str, store: str | None) -> Path:
    folder = output_dir / name
    _folder(folder / "pipeline_root" / "topr-1" / "train" / "trained_model")
    (folder / "config.yaml").write_text(yaml.safe_dump({"run": {"artifact_store": store}}))
    return folder


@pytest.mark.parametrize(("status", "store", "listed"), [("FINISHED", "s3://b/runs", True), ("FAILED", "s3://b/runs", False), ("FINISHED", None, False)])
def test_local_copies_go_only_once_a_run_published_everything_and_finished(tmp_path, status, store, listed):
    uri = default_tracking_uri(tmp_path / "runs")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("topr"), run_name="nightly")
    client.set_terminated(run.info.run_id, status)
    folder = _run_folder(tmp_path / "runs", "nightly", store)

    found = retention.published_run_copies(uri, tmp_path / "runs")
    assert [item.locations for item in found] == ([[str(folder / "pipeline_root")]] if listed else [])
    if listed:
        assert found[0].freed_bytes == SIZE + 2 and "FINISHED" in found[0].why


def test_topr_gc_lists_then_removes_and_says_what_it_frees(tmp_path, capsys):
    uri = default_tracking_uri(tmp_path / "runs")
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("topr"), run_name="nightly")
    client.set_terminated(run.info.run_id, "FINISHED")
    folder = _run_folder(tmp_path / "runs", "nightly", "s3://b/runs")
    command = ["gc", "--tracking-uri", uri, "--output-dir", str(tmp_path / "runs")]

    assert main(command) == 0
    out = capsys.readouterr().out
    assert "local copies of run nightly: 1.00 kB (kept: topr gc --delete removes it" in out
    assert "1 unneeded item(s) listed: 1.00 kB to free" in out
    assert (folder / "pipeline_root").exists()
    assert main([*command, "--delete"]) == 0
    assert "1 unneeded item(s) removed: 1.00 kB freed" in capsys.readouterr().out
    assert not (folder / "pipeline_root").exists() and (folder / "config.yaml").exists()
