"""Object storage against moto's S3 server on loopback (SeaweedFS is exercised in tests/integration)."""

import hashlib
import json

import pytest

from topr import storage
from topr.stack import free_port



def model_dir(tmp_path):
    directory = tmp_path / "model"
    (directory / "sub").mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 1000)
    (directory / "config.json").write_text('{"layers": 2}')
    (directory / "sub" / "tokenizer.json").write_text("{}")
    return directory


def test_uri_helpers():
    assert storage.split_s3("s3://bucket/a/b.jsonl") == ("bucket", "a/b.jsonl")
    assert storage.join("s3://bucket/runs/", "r1", "iter1", "samples.jsonl") == "s3://bucket/runs/r1/iter1/samples.jsonl"
    assert storage.join("/tmp/x", "a") == "/tmp/x/a"
    with pytest.raises(storage.StorageError, match="not an s3://bucket/key URI"):
        storage.split_s3("s3:///key")


def test_file_round_trip(s3, tmp_path):
    source = tmp_path / "samples.jsonl"
    source.write_text('{"prompt_id": "p1"}\n')
    uri = storage.upload_file(source, f"{s3}/run/iter1/samples.jsonl")
    assert storage.exists(uri) and not storage.exists(f"{s3}/run/iter2/samples.jsonl")
    with storage.local_file(uri) as local:
        assert local.read_text() == source.read_text() and local.name == "samples.jsonl"
    with pytest.raises(storage.MissingObjectError, match="no such object"):
        storage.download_file(f"{s3}/nothing.jsonl", tmp_path / "nothing.jsonl")
    assert not (tmp_path / "nothing.jsonl").exists()


def test_large_files_go_up_in_parts(s3, tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_BYTES", 5 * 1024 * 1024)  # S3's smallest part
    big = tmp_path / "model.safetensors"
    big.write_bytes(b"\x01" * (11 * 1024 * 1024))
    uri = storage.upload_file(big, f"{s3}/big/model.safetensors")
    bucket, key = storage.split_s3(uri)
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart object's ETag counts its parts
    with storage.local_file(uri) as local:
        assert storage.file_sha256(local) == storage.file_sha256(big)


def test_published_directory_has_a_manifest_and_comes_back_checked(s3, tmp_path):
    source = model_dir(tmp_path)
    manifest = storage.publish_directory(source, f"{s3}/run/iter1/model")
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "sub/tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["size"] == 256_000
    stored = json.loads(storage.read_bytes(f"{s3}/run/iter1/model/{storage.MANIFEST_NAME}"))
    assert stored == manifest
    copy = storage.fetch_directory(f"{s3}/run/iter1/model", tmp_path / "copy")
    assert (copy / "sub" / "tokenizer.json").read_text() == "{}"
    assert (copy / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert storage.check_directory(f"{s3}/run/iter1/model") == []


def other_model_dir(tmp_path):
    directory = model_dir(tmp_path)
    (directory / "config.json").write_text('{"layers": 3}')
    return directory


def last_modified(uri):
    bucket, key = storage.split_s3(uri)
    return storage.s3_client().head_object(Bucket=bucket, Key=key)["LastModified"]


def test_a_published_directory_is_never_overwritten(s3, tmp_path):
    first = storage.publish_directory(model_dir(tmp_path), f"{s3}/m")
    with pytest.raises(storage.StorageError, match=f"{s3}/m is already published with other files"):
        storage.publish_directory(other_model_dir(tmp_path / "other"), f"{s3}/m")
    assert json.loads(storage.read_bytes(f"{s3}/m/{storage.MANIFEST_NAME}")) == first
    assert storage.check_directory(f"{s3}/m") == []


def test_publishing_the_same_directory_again_is_a_success_that_uploads_nothing(s3, tmp_path):
    """A retried stage publishes the same model to the same key: that is done already."""
    first = storage.publish_directory(model_dir(tmp_path), f"{s3}/m")
    written = last_modified(f"{s3}/m/model.safetensors"), last_modified(f"{s3}/m/{storage.MANIFEST_NAME}")
    again = storage.publish_directory(model_dir(tmp_path / "retry"), f"{s3}/m")
    assert again == first
    assert (last_modified(f"{s3}/m/model.safetensors"), last_modified(f"{s3}/m/{storage.MANIFEST_NAME}")) == written


def test_an_uncommitted_directory_is_replaced_when_the_caller_says_so(s3, tmp_path):
    storage.publish_directory(model_dir(tmp_path), f"{s3}/m")
    replacement = storage.publish_directory(other_model_dir(tmp_path / "retry"), f"{s3}/m", replace_uncommitted=True)
    assert json.loads(storage.read_bytes(f"{s3}/m/{storage.MANIFEST_NAME}")) == replacement
    copy = storage.fetch_directory(f"{s3}/m", tmp_path / "copy")
    assert (copy / "config.json").read_text() == '{"layers": 3}'


def test_a_published_file_is_kept_when_the_same_and_replaced_only_when_uncommitted(s3, tmp_path):
    first, other = tmp_path / "first.jsonl", tmp_path / "other.jsonl"
    first.write_text('{"prompt_id": "p1"}\n')
    other.write_text('{"prompt_id": "p2"}\n')
    uri = storage.publish_file(first, f"{s3}/run/iter1/samples.jsonl")
    written = last_modified(uri)
    assert storage.publish_file(first, uri) == uri and last_modified(uri) == written
    with pytest.raises(storage.StorageError, match=f"{uri} already holds a different file, committed by an earlier attempt"):
        storage.publish_file(other, uri)
    assert storage.read_bytes(uri) == first.read_bytes()
    storage.publish_file(other, uri, replace_uncommitted=True)
    assert storage.read_bytes(uri) == other.read_bytes()


def test_a_commit_record_is_written_once(s3):
    uri = f"{s3}/run/iter1/train.commit.json"
    outputs = {"model": {"uri": f"{s3}/run/iter1/model", "manifest_sha256": "ab" * 32, "registered_version": "1"}}
    assert storage.read_commit(uri) is None
    record = storage.commit(uri, "train", 1, "run-a", outputs)
    assert storage.read_commit(uri) == record == {"version": 1, "stage": "train", "iteration": 1, "stage_run_id": "run-a", "outputs": outputs}
    assert storage.commit(uri, "train", 1, "run-b", outputs) == record  # a retry that made the same outputs
    moved = {"model": {**outputs["model"], "registered_version": "2"}}
    with pytest.raises(storage.StorageError, match=f"{uri}: the stage was already committed with other outputs"):
        storage.commit(uri, "train", 1, "run-b", moved)
    assert storage.read_commit(uri) == record
    bucket, key = storage.split_s3(f"{s3}/run/iter2/train.commit.json")
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"[]")
    with pytest.raises(storage.StorageError, match="iter2/train.commit.json: not a topr commit record"):
        storage.read_commit(f"{s3}/run/iter2/train.commit.json")


def test_a_directory_without_manifest_is_refused(s3, tmp_path):
    storage.upload_file(model_dir(tmp_path) / "config.json", f"{s3}/half/config.json")
    with pytest.raises(storage.StorageError, match="not a published directory.*topr-manifest.json is missing"):
        storage.fetch_directory(f"{s3}/half", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_changed_and_deleted_files_are_caught(s3, tmp_path):
    source = model_dir(tmp_path)
    storage.publish_directory(source, f"{s3}/m")
    bucket, _ = storage.split_s3(s3)
    client = storage.s3_client()
    changed = bytearray((source / "model.safetensors").read_bytes())
    changed[1000] ^= 1
    client.put_object(Bucket=bucket, Key="m/model.safetensors", Body=bytes(changed))
    client.delete_object(Bucket=bucket, Key="m/config.json")
    problems = storage.check_directory(f"{s3}/m")
    assert len(problems) == 2
    assert any("model.safetensors: SHA-256 differs" in problem for problem in problems)
    assert f"{s3}/m/config.json: missing" in problems
    with pytest.raises(storage.StorageError, match="m/config.json: no such object"):
        storage.fetch_directory(f"{s3}/m", tmp_path / "copy")
    client.delete_object(Bucket=bucket, Key=f"m/{storage.MANIFEST_NAME}")
    assert storage.check_directory(f"{s3}/m") == [f"{s3}/m is not a published directory: {storage.MANIFEST_NAME} is missing"]
    assert not (tmp_path / "copy").exists()


def forge(uri, relative, content, manifest_changes=None):
    """Rewrite one published file and its manifest entry together, as someone with write access could."""
    bucket, prefix = storage.split_s3(uri)
    client = storage.s3_client()
    client.put_object(Bucket=bucket, Key=storage.split_s3(storage.join(uri, relative))[1], Body=content)
    manifest = json.loads(storage.read_bytes(storage.join(uri, storage.MANIFEST_NAME)))
    manifest["files"][relative] = {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}
    client.put_object(Bucket=bucket, Key=f"{prefix}/{storage.MANIFEST_NAME}", Body=json.dumps(manifest, indent=1).encode())


@pytest.mark.parametrize("escape", ["relative", "absolute"])
def test_a_manifest_naming_a_file_outside_its_directory_is_refused(s3, tmp_path, escape):
    uri = f"{s3}/{escape}/m"
    storage.publish_directory(model_dir(tmp_path), uri)
    key = "../escaped.txt" if escape == "relative" else str(tmp_path / "escaped.txt")
    forge(uri, key, b"planted")

    refusal = f"{uri}/{storage.MANIFEST_NAME}: refusing the file {key!r}: a manifest names files inside its directory"
    with pytest.raises(storage.StorageError) as caught:
        storage.fetch_directory(uri, tmp_path / "fetched" / "copy")
    assert str(caught.value).startswith(refusal)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "fetched").exists()
    assert storage.check_directory(uri)[0].startswith(refusal)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"files": ["config.json"]}'])
def test_a_manifest_that_is_not_one_is_refused(s3, tmp_path, body):
    bucket, _ = storage.split_s3(s3)
    storage.s3_client().put_object(Bucket=bucket, Key=f"odd/{storage.MANIFEST_NAME}", Body=body)
    with pytest.raises(storage.StorageError, match=f"odd/{storage.MANIFEST_NAME}: not a topr manifest"):
        storage.fetch_directory(f"{s3}/odd", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_files_and_manifest_rewritten_together_are_caught_by_the_recorded_digest(s3, tmp_path):
    uri = f"{s3}/m"
    recorded = storage.manifest_sha256(storage.publish_directory(model_dir(tmp_path), uri))
    assert storage.manifest_sha256(json.loads(storage.read_bytes(f"{uri}/{storage.MANIFEST_NAME}"))) == recorded
    storage.fetch_directory(uri, tmp_path / "genuine", manifest_sha256=recorded)
    assert storage.check_directory(uri, manifest_sha256=recorded) == []

    forge(uri, "model.safetensors", b"forged weights")
    assert storage.check_directory(uri) == []  # the manifest alone vouches for the forgery
    problem = f"{uri}/{storage.MANIFEST_NAME}: SHA-256 differs from the one recorded when it was published ({recorded})"
    with pytest.raises(storage.StorageError) as caught:
        storage.fetch_directory(uri, tmp_path / "copy", manifest_sha256=recorded)
    assert str(caught.value) == problem
    assert not (tmp_path / "copy").exists()
    assert storage.check_directory(uri, manifest_sha256=recorded) == [problem]
    with pytest.raises(storage.StorageError, match="SHA-256 differs from the one recorded"):
        with storage.local_directory(uri, manifest_sha256=recorded):
            pass


def test_a_manifest_that_appears_while_publishing_is_not_overwritten(s3, tmp_path, monkeypatch):
    """Another writer publishes between the existence check and the manifest's write: the
    conditional write (If-None-Match: *) refuses, and the first manifest stays."""
    uri = f"{s3}/m"
    first = storage.publish_directory(model_dir(tmp_path), uri)
    monkeypatch.setattr(storage, "exists", lambda _uri: False)  # the check ran before the other writer finished
    other = model_dir(tmp_path / "other")
    (other / "config.json").write_text('{"layers": 3}')
    with pytest.raises(storage.StorageError, match=f"{uri} is already published"):
        storage.publish_directory(other, uri)
    assert json.loads(storage.read_bytes(f"{uri}/{storage.MANIFEST_NAME}")) == first
    # Its files were written before the refusal: a reader checking them against the manifest sees it.
    with pytest.raises(storage.StorageError, match=r"m/config\.json: SHA-256 differs"):
        storage.fetch_directory(uri, tmp_path / "copy")


def test_output_directory_publishes_only_on_success(s3, tmp_path):
    with pytest.raises(ValueError, match="training failed"):
        with storage.output_directory(f"{s3}/failed") as local:
            local.mkdir()
            (local / "config.json").write_text("{}")
            raise ValueError("training failed")
    assert not storage.exists(f"{s3}/failed/config.json")
    with storage.output_directory(f"{s3}/done") as local:
        local.mkdir()
        (local / "config.json").write_text("{}")
    assert storage.check_directory(f"{s3}/done") == []


def test_transient_errors_are_retried(s3, tmp_path):
    """Two 503 answers in a row, then the server's own: botocore's standard mode retries through."""
    from botocore.awsrequest import AWSResponse

    class Empty:
        def stream(self, **_):
            return iter([b""])

    failures = []

    def fail_twice(request, **_):
        if len(failures) < 2 and request.method == "PUT":
            failures.append(request.url)
            return AWSResponse(request.url, 503, {}, Empty())
        return None

    client = storage.s3_client()
    client.meta.events.register_first("before-send.s3.PutObject", fail_twice)
    try:
        source = tmp_path / "a.jsonl"
        source.write_text("{}\n")
        storage.upload_file(source, f"{s3}/retried/a.jsonl")
    finally:
        client.meta.events.unregister("before-send.s3.PutObject", fail_twice)
    assert len(failures) == 2
    assert storage.exists(f"{s3}/retried/a.jsonl")


def test_an_outage_ends_in_a_clear_error(monkeypatch, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with pytest.raises(storage.StorageError, match=f"object storage at {closed} failed"):
        storage.check_reachable("s3://bucket/runs")
    with pytest.raises(storage.StorageError, match=f"s3://bucket/m/.*object storage at {closed} failed"):
        storage.publish_directory(model_dir(tmp_path), "s3://bucket/m")
