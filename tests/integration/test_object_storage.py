"""The pipeline against the real stack: SeaweedFS for artifacts, an MLflow server for tracking."""

from __future__ import annotations

import json
import logging
import os
import time

import mlflow
import pytest

from topr_pipelines.runner import run_local
from topr import stack as topr_stack
from topr import steps, storage
from topr.cli import main
from topr.config import config_to_dict, load_config
from topr.records import write_records
from topr.stack import free_port

from test_pipeline import TINY_RUN


def object_keys(bucket: str, prefix: str) -> set[str]:
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"].removeprefix(prefix) for page in pages for item in page.get("Contents", [])}


@pytest.mark.slow
def test_run_publishes_every_artifact_under_run_scoped_keys(stack, tmp_path, tiny_model_dir, capsys, caplog, monkeypatch):
    store = f"s3://{stack.bucket}/runs"
    overrides = [f"model.path={tiny_model_dir}", "run.iterations=1", f"run.artifact_store={store}", "run.registered_model=stack-test"]
    config = load_config(None, [*overrides, *TINY_RUN])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "topr")  # sent, and ignored by a server without auth
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", TRACKING_PASSWORD)
    with caplog.at_level(logging.DEBUG, logger="topr"):
        parent_run_id = run_local(config, tmp_path / "run", stack.tracking_uri, "stack-test")
    check_no_credentials(stack, parent_run_id, tmp_path / "run", capsys.readouterr(), caplog.text)

    keys = object_keys(stack.bucket, f"runs/{parent_run_id}/")
    expected = {
        "iter0/train_prompts.jsonl", "iter0/eval_prompts.jsonl", "iter0/model/topr-manifest.json",
        "iter0/evaluation.json", "iter1/samples.jsonl", "iter1/verified.jsonl", "iter1/train_set.jsonl",
        "iter1/composition.json", "iter1/model/topr-manifest.json", "iter1/model/model.safetensors",
        "iter1/evaluation.json", "iter1/evaluation_completions.jsonl",
    }  # fmt: skip
    assert expected <= keys, expected - keys
    model_uri = f"{store}/{parent_run_id}/iter1/model"
    assert storage.check_directory(model_uri) == []

    client = mlflow.MlflowClient(stack.tracking_uri)
    parent = client.get_run(parent_run_id)
    assert parent.info.status == "FINISHED"
    (train_run,) = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`topr.stage` = 'train'"
    )
    assert train_run.data.params["model_uri"] == model_uri
    sources = {item.dataset.name: json.loads(item.dataset.source) for item in train_run.inputs.dataset_inputs}
    assert sources == {
        "train_set_iter1": {"uri": f"{store}/{parent_run_id}/iter1/train_set.jsonl"},
        "samples_iter1": {"uri": f"{store}/{parent_run_id}/iter1/samples.jsonl"},
    }
    # The published copy is what is registered: the model is not uploaded a second time through MLflow.
    assert client.get_model_version("stack-test", "1").source == model_uri
    # (Its artifacts are under mlflow/<experiment>/<run id>/: other tests' runs with no artifact store log models there.)
    assert not any(key.endswith("model.safetensors") and f"/{train_run.info.run_id}/" in key for key in object_keys(stack.bucket, "mlflow/"))
    # What a stage committed, with digests, is its last object.
    committed = storage.read_commit(f"{store}/{parent_run_id}/iter1/train.commit.json")
    assert committed["outputs"]["model"] == {
        "uri": model_uri, "manifest_sha256": storage.manifest_sha256(storage.read_manifest(model_uri)), "registered_version": "1",
    }  # fmt: skip
    assert {f"iter0/{stage}.commit.json" for stage in ("prepare_model", "prompts", "evaluate")} <= keys
    assert {f"iter1/{stage}.commit.json" for stage in ("collect_samples", "verify", "curate", "train", "evaluate")} <= keys
    check_lineage(stack, store, parent_run_id, tiny_model_dir, capsys)


TRACKING_PASSWORD = "tracking-password-4f1c"


def check_no_credentials(stack, parent_run_id, run_folder, captured, logged):
    """Neither the object store's secret key nor MLflow's password is in any param or tag of
    the run and its stages, any model version's tags, the run's files, or what it printed."""
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], TRACKING_PASSWORD]
    client = mlflow.MlflowClient(stack.tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}'") + [client.get_run(parent_run_id)]
    texts = [json.dumps([run.data.params, run.data.tags]) for run in runs]
    texts += [json.dumps(version.tags) for version in client.search_model_versions("name = 'stack-test'")]
    texts += [path.read_text(errors="replace") for path in run_folder.rglob("*") if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md", ".txt")]
    texts += [captured.out, captured.err, logged]
    assert len(runs) > 5 and all(secret not in text for secret in secrets for text in texts)


def check_lineage(stack, store, parent_run_id, base_model, capsys):
    """The chain of the trained model reaches the base model; --verify catches a deleted object and a changed byte."""
    capsys.readouterr()  # what the pipeline printed
    run_prefix = f"{store}/{parent_run_id}"
    lineage = ["lineage", "--tracking-uri", stack.tracking_uri]
    assert main([*lineage, "--json", "stack-test/1"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [link["kind"] for link in chain] == ["model", "training run", "curated set", "samples", "sampling model", "base model"]
    assert chain[0]["uri"] == f"{run_prefix}/iter1/model"
    assert chain[2]["uri"] == f"{run_prefix}/iter1/train_set.jsonl" and chain[2]["digest"]
    assert chain[3]["uri"] == f"{run_prefix}/iter1/samples.jsonl" and chain[3]["digest"]
    assert chain[4]["digest"] == chain[5]["digest"]  # iteration 1 sampled from the base model
    assert chain[5]["name"] == base_model and chain[5]["uri"] == f"{run_prefix}/iter0/model"
    assert main([*lineage, f"{run_prefix}/iter1/model"]) == 0
    assert "← base model" in capsys.readouterr().out

    assert main([*lineage, "--verify", "stack-test/1"]) == 0
    assert "0 problem(s)" in capsys.readouterr().err
    client = storage.s3_client()
    client.delete_object(Bucket=stack.bucket, Key=f"runs/{parent_run_id}/iter1/samples.jsonl")
    weights_key = f"runs/{parent_run_id}/iter1/model/model.safetensors"
    weights = bytearray(client.get_object(Bucket=stack.bucket, Key=weights_key)["Body"].read())
    weights[-1] ^= 1
    client.put_object(Bucket=stack.bucket, Key=weights_key, Body=bytes(weights))
    assert main([*lineage, "--verify", "stack-test/1"]) == 1
    problems = capsys.readouterr().err
    assert f"{run_prefix}/iter1/samples.jsonl: missing" in problems
    assert f"{run_prefix}/iter1/model/model.safetensors: SHA-256 differs" in problems
    assert "2 problem(s)" in problems


def test_a_tracking_server_that_is_down_stops_the_run_before_any_work(tmp_path, capsys):
    down = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    code = main(["run", "--tracking-uri", down, f"run.output_dir={tmp_path}", "run.name=never"])
    assert code == 2
    assert time.monotonic() - started < 30
    assert f"the MLflow tracking server at {down} is not reachable" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_an_unreachable_store_stops_the_run_before_any_work(stack, tmp_path, capsys):
    code = main(["run", f"run.output_dir={tmp_path}", "run.name=never", "run.artifact_store=s3://no-such-bucket/runs"])
    assert code == 2
    assert "s3://no-such-bucket/runs: the bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_an_s3_outage_during_training_fails_the_stage_and_publishes_no_manifest(stack, tmp_path, tiny_model_dir, monkeypatch):
    """Train against a private SeaweedFS that stops before the model is published."""
    s3_port = free_port()
    private = topr_stack.start_seaweedfs(tmp_path / "seaweedfs", s3_port, bucket="outage")
    monkeypatch.setenv("AWS_ENDPOINT_URL", private.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    config = load_config(None, [f"model.path={tiny_model_dir}", "run.artifact_store=s3://outage/runs", "train.batch_size=2"])
    config_json = json.dumps(config_to_dict(config))
    parent_run_id = steps.start(config_json, stack.tracking_uri, "outage")
    data = tmp_path / "train_set.jsonl"
    write_records(data, [_record(1.0), _record(-1.0)])

    topr_stack.stop(private)
    with pytest.raises(storage.StorageError, match=f"object storage at {private.url} failed"):
        steps.train(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), tiny_model_dir, str(data), str(data), str(tmp_path / "trained"))

    client = mlflow.MlflowClient(stack.tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    (train_run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    assert train_run.info.status == "FAILED" and "model_uri" not in train_run.data.params
    assert client.search_model_versions(f"name = '{config.run.registered_model}' and run_id = '{train_run.info.run_id}'") == []
    restarted = topr_stack.start_seaweedfs(tmp_path / "seaweedfs", s3_port, bucket="outage")
    try:
        assert not storage.exists(f"s3://outage/runs/{parent_run_id}/iter1/model/{storage.MANIFEST_NAME}")
    finally:
        topr_stack.stop(restarted)


def _record(reward: float) -> dict:
    return {
        "prompt_id": f"p{reward}",
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": [4, 5],
        "behavior_logprobs": [-1.0, -1.0],
        "reward": reward,
    }
