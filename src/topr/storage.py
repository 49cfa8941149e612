"""Local paths and ``s3://bucket/key`` URIs behind one small interface.

Every stage reads and writes local files; this module moves them to and from object storage.
Access goes through boto3 with the standard AWS settings (environment variables, profiles)
plus a custom endpoint for S3-compatible stores: ``AWS_ENDPOINT_URL`` or, as MLflow names it,
``MLFLOW_S3_ENDPOINT_URL``. Transient errors (connection resets, 5xx, throttling) are retried
by botocore's ``standard`` mode with exponential backoff and jitter, ``AWS_MAX_ATTEMPTS`` times
(default 5); an outage that outlasts them ends in a ``StorageError`` that names the endpoint.

A single object appears only when its upload completes, so files need no extra care. A model
is a directory of files, and is published with a manifest written last (every file's size
and SHA-256): readers accept only directories that have one, and check every file against it.
The manifest names files inside its directory only (no absolute path, no ``..``).

The manifest cannot vouch for itself: whoever can rewrite the files can rewrite it too. Its own
SHA-256 (``manifest_sha256``) is therefore recorded in MLflow when the model is registered, and
``fetch_directory``/``check_directory`` compare the manifest with it when the caller knows it.

The manifest is written with ``If-None-Match: *``, so that of two writers racing to publish the
same directory only one manifest lands and the other is refused. SeaweedFS honours the condition
(412 PreconditionFailed, tested in tests/integration/test_published_models.py), as AWS S3 does; on a
store that ignores it, the existence check made before any upload is the only guard. The files
themselves go up unconditionally (boto3's managed transfer cannot pass the condition): a racing
writer's files can replace them, and a reader then finds them differing from the manifest.

Retries and commit records. A Kubeflow task that fails is run again with the same output keys,
so publishing is idempotent: a file or directory already there with the same content counts as
published. Different content is replaced only when the caller says the earlier copy was never
committed (``replace_uncommitted``); otherwise it is refused. A stage's last act is its commit
record (``commit``): every output it published, with its digest, written once with
``If-None-Match: *``. Outputs without a commit record are an unfinished attempt's, and readers
of registered models require the record (``topr.lineage.committed_model``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
MANIFEST_NAME = "topr-manifest.json"
MANIFEST_VERSION = 1
MULTIPART_BYTES = 64 * 1024 * 1024


class StorageError(RuntimeError):
    """Object storage that cannot be reached, or an artifact that is missing or altered."""


class MissingObjectError(StorageError):
    """The bucket answered, and the object is not there."""


def is_s3(location: str | os.PathLike) -> bool:
    return str(location).startswith(S3_SCHEME)


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → ``("bucket", "some/key")``."""
    bucket, _, key = uri.removeprefix(S3_SCHEME).partition("/")
    if not is_s3(uri) or not bucket:
        raise StorageError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key.strip("/")


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or an S3 URI."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(part.strip("/") for part in parts)])
    return str(Path(base, *parts))


def endpoint_url() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None


def s3_client():
    return _client(endpoint_url(), os.environ.get("AWS_MAX_ATTEMPTS", "5"))


@lru_cache(maxsize=4)
def _client(endpoint: str | None, max_attempts: str):
    import boto3
    from botocore.config import Config

    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"), "max_attempts": int(max_attempts)}
    config = Config(retries=retries, connect_timeout=5, read_timeout=60)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


@contextmanager
def _s3_errors(action: str, uri: str) -> Iterator[None]:
    """Turn boto errors into one ``StorageError`` that says what failed, where, and why."""
    import boto3  # noqa: F401  first: without the workflow extra, the error names boto3, not botocore
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchKey", "NotFound"):
            raise MissingObjectError(f"{action} {uri}: no such object") from None
        if code == "NoSuchBucket":
            raise StorageError(f"{action} {uri}: the bucket does not exist") from None
        raise StorageError(f"{action} {uri}: {error}") from None
    except BotoCoreError as error:
        where = endpoint_url() or "the default AWS endpoint"
        raise StorageError(f"{action} {uri}: object storage at {where} failed ({error})") from None


def check_reachable(uri: str) -> None:
    """Fail fast, before any expensive work, if the bucket of ``uri`` cannot be reached."""
    bucket, _ = split_s3(uri)
    try:
        with _s3_errors("reaching the bucket of", uri):
            s3_client().head_bucket(Bucket=bucket)
    except MissingObjectError:  # HEAD has no body, so a missing bucket is a bare 404
        raise StorageError(f"{uri}: the bucket {bucket!r} does not exist") from None


def exists(uri: str) -> bool:
    bucket, key = split_s3(uri)
    try:
        with _s3_errors("checking", uri):
            s3_client().head_object(Bucket=bucket, Key=key)
    except MissingObjectError:
        return False
    return True


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)


def upload_file(path: str | os.PathLike, uri: str) -> str:
    """Upload one file (multipart when large); return ``uri``."""
    bucket, key = split_s3(uri)
    with _s3_errors("uploading to", uri):
        s3_client().upload_file(str(path), bucket, key, Config=_transfer_config())
    return uri


def download_file(uri: str, path: str | os.PathLike) -> Path:
    """Download one object to ``path``, which appears only when the download completes."""
    from topr.records import atomic_path

    bucket, key = split_s3(uri)
    with atomic_path(path) as partial, _s3_errors("downloading", uri):
        s3_client().download_file(bucket, key, str(partial), Config=_transfer_config())
    return Path(path)


def delete(uri: str) -> None:
    """Delete one object; a missing one is not an error (S3 answers both alike)."""
    bucket, key = split_s3(uri)
    with _s3_errors("deleting", uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


def read_bytes(uri: str) -> bytes:
    bucket, key = split_s3(uri)
    with _s3_errors("reading", uri):
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def directory_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """``{"files": {relative path: {"size", "sha256"}}}`` for every file under ``directory``."""
    directory = Path(directory)
    files = {
        path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }
    return {"manifest_version": MANIFEST_VERSION, "files": files}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """A manifest as it is published."""
    return json.dumps(manifest, indent=1).encode()


def manifest_sha256(manifest: dict[str, Any]) -> str:
    """The SHA-256 of a manifest as published: what MLflow records, to check the manifest by."""
    return hashlib.sha256(manifest_bytes(manifest)).hexdigest()


def _create_object(uri: str, body: bytes) -> bool:
    """Write an object only if ``uri`` holds none yet (``If-None-Match: *``, see the module
    docstring); False when one is there."""
    bucket, key = split_s3(uri)
    with _s3_errors("uploading to", uri):
        from botocore.exceptions import ClientError

        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            return False
    return True


def publish_file(path: str | os.PathLike, uri: str, replace_uncommitted: bool = False) -> str:
    """Upload one file to ``uri``; an object already there with the same SHA-256 counts as
    published. A different one is replaced only if ``replace_uncommitted`` (it was left by an
    attempt that did not commit), else refused."""
    if exists(uri):
        if object_sha256(uri) == file_sha256(path):
            log.info("%s is already published with the same content", uri)
            return uri
        if not replace_uncommitted:
            raise StorageError(f"{uri} already holds a different file, committed by an earlier attempt; refusing to overwrite it")
        log.warning("replacing %s, left by an attempt that did not commit", uri)
    return upload_file(path, uri)


def object_sha256(uri: str) -> str:
    with local_file(uri) as local:
        return file_sha256(local)


def publish_directory(directory: str | os.PathLike, uri: str, replace_uncommitted: bool = False) -> dict[str, Any]:
    """Upload every file of ``directory`` under ``uri``, then the manifest; return the manifest.

    A directory already published at ``uri`` with the same files counts as published (a retry).
    One with other files is never overwritten, unless ``replace_uncommitted`` says that an
    attempt which did not commit left it: its manifest is then removed before any upload, so the
    directory is never a mix under a valid manifest. The manifest's write is conditional.
    """
    manifest_uri = join(uri, MANIFEST_NAME)
    manifest = directory_manifest(directory)
    if exists(manifest_uri):
        if _same_manifest(uri, manifest):
            log.info("%s is already published with the same files", uri)
            return manifest
        _remove_uncommitted(uri, replace_uncommitted)
    for relative in manifest["files"]:
        upload_file(Path(directory, relative), join(uri, relative))
    if not _create_object(manifest_uri, manifest_bytes(manifest)) and not _same_manifest(uri, manifest):
        raise StorageError(f"{uri} is already published (by another writer, meanwhile) with other files; refusing to overwrite it")
    log.info("published %d files to %s", len(manifest["files"]), uri)
    return manifest


def _same_manifest(uri: str, manifest: dict[str, Any]) -> bool:
    try:
        return read_manifest(uri)["files"] == manifest["files"]
    except StorageError:
        return False


def _remove_uncommitted(uri: str, replace_uncommitted: bool) -> None:
    """Remove the manifest of a directory published at ``uri`` with other files, if an attempt
    that did not commit left it there; else refuse."""
    if not replace_uncommitted:
        raise StorageError(f"{uri} is already published with other files (it has {MANIFEST_NAME}); refusing to overwrite it")
    log.warning("replacing %s, left by an attempt that did not commit", uri)
    manifest_uri = join(uri, MANIFEST_NAME)
    bucket, key = split_s3(manifest_uri)
    with _s3_errors("removing", manifest_uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


COMMIT_VERSION = 1


def commit(uri: str, stage: str, iteration: int, stage_run_id: str, outputs: dict[str, dict[str, str]]) -> dict[str, Any]:
    """Write a stage's commit record at ``uri``: its published ``outputs`` (name -> uri and
    digest), the last thing the stage does. A record already there with the same outputs (a
    retried stage) counts as written; one with other outputs is refused."""
    record = {"version": COMMIT_VERSION, "stage": stage, "iteration": iteration, "stage_run_id": stage_run_id, "outputs": outputs}
    if _create_object(uri, json.dumps(record, indent=1, sort_keys=True).encode()):
        log.info("committed %s", uri)
        return record
    existing = read_commit(uri)
    if existing is None or existing.get("outputs") != outputs:
        raise StorageError(f"{uri}: the stage was already committed with other outputs; refusing to overwrite its record")
    log.info("%s was already committed with the same outputs", uri)
    return existing


def read_commit(uri: str) -> dict[str, Any] | None:
    """A stage's commit record, or None if the stage never committed."""
    try:
        raw = read_bytes(uri)
    except MissingObjectError:
        return None
    return _json_holding(raw, uri, "outputs", "commit record")


def _json_holding(raw: bytes, uri: str, key: str, what: str) -> dict[str, Any]:
    """``raw`` read as a JSON object holding an object under ``key``; else an error naming ``uri``."""
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not isinstance(value.get(key), dict):
        raise StorageError(f"{uri}: not a topr {what} (a JSON object with its {key} under '{key}')")
    return value


def read_manifest(uri: str, expected_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of a published directory; an error if it has none (unfinished or not ours),
    if it differs from ``expected_sha256`` (the digest MLflow recorded), or if it names a file
    outside the directory."""
    manifest_uri = join(uri, MANIFEST_NAME)
    try:
        raw = read_bytes(manifest_uri)
    except MissingObjectError:
        raise MissingObjectError(f"{uri} is not a published directory: {MANIFEST_NAME} is missing") from None
    if expected_sha256 and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise StorageError(f"{manifest_uri}: SHA-256 differs from the one recorded when it was published ({expected_sha256})")
    manifest = _json_holding(raw, manifest_uri, "files", "manifest")
    for relative in manifest["files"]:
        _check_inside(manifest_uri, relative)
    return manifest


def _check_inside(manifest_uri: str, relative: str) -> None:
    """Refuse a manifest entry that would be written outside the directory it is fetched into."""
    if any(part in ("", ".", "..") for part in relative.split("/")):  # "/abs" starts with an empty part
        raise StorageError(
            f"{manifest_uri}: refusing the file {relative!r}: a manifest names files inside its directory "
            "(a relative path without '.', '..' or empty parts)"
        )


def fetch_directory(uri: str, directory: str | os.PathLike, manifest_sha256: str | None = None) -> Path:
    """Download a published directory, checking each file's size and SHA-256 against its manifest,
    and the manifest against ``manifest_sha256`` when given (the digest recorded in MLflow)."""
    directory = Path(directory)
    manifest = read_manifest(uri, manifest_sha256)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for relative, expected in manifest["files"].items():
            target = download_file(join(uri, relative), partial / relative)
            problem = _mismatch(target, expected)
            if problem:
                raise StorageError(f"{join(uri, relative)}: {problem} (the manifest says otherwise)")
        os.chmod(partial, 0o755)
        partial.rename(directory)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return directory


def _mismatch(path: Path, expected: dict[str, Any]) -> str | None:
    size = path.stat().st_size
    if size != expected["size"]:
        return f"{size} bytes instead of {expected['size']}"
    if file_sha256(path) != expected["sha256"]:
        return "SHA-256 differs"
    return None


def check_directory(uri: str, manifest_sha256: str | None = None) -> list[str]:
    """Re-read every file of a published directory (and its manifest, against ``manifest_sha256``
    when given); return what is missing or changed."""
    try:
        manifest = read_manifest(uri, manifest_sha256)
    except StorageError as error:
        return [str(error)]
    problems = []
    with tempfile.TemporaryDirectory() as scratch:
        for relative, expected in manifest["files"].items():
            try:
                problem = _mismatch(download_file(join(uri, relative), Path(scratch, "file")), expected)
            except MissingObjectError:
                problem = "missing"
            if problem:
                problems.append(f"{join(uri, relative)}: {problem}")
    return problems


def _object_name(uri: str | os.PathLike) -> str:
    """The last part of an object's key, so a local copy keeps its name (and its suffix)."""
    return Path(split_s3(str(uri))[1]).name or "object"


@contextmanager
def local_file(location: str | os.PathLike) -> Iterator[Path]:
    """A local path to read ``location`` from: the path itself, or a downloaded copy of an object."""
    if not is_s3(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="topr-") as scratch:
        yield download_file(str(location), Path(scratch, _object_name(location)))


@contextmanager
def local_directory(location: str | os.PathLike, manifest_sha256: str | None = None) -> Iterator[Path]:
    """A local model directory for ``location``: itself, or a checked copy of a published one
    (see ``fetch_directory`` for ``manifest_sha256``)."""
    if not is_s3(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="topr-") as scratch:
        yield fetch_directory(str(location), Path(scratch, "model"), manifest_sha256)


@contextmanager
def output_file(location: str | os.PathLike) -> Iterator[Path]:
    """A local path to write; for an S3 URI it is uploaded when the block succeeds."""
    if not is_s3(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="topr-") as scratch:
        path = Path(scratch, _object_name(location))
        yield path
        upload_file(path, str(location))


@contextmanager
def output_directory(location: str | os.PathLike) -> Iterator[Path]:
    """A local directory to write a model into; for an S3 URI it is published when the block succeeds."""
    if not is_s3(location):
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="topr-") as scratch:
        path = Path(scratch, "model")
        yield path
        publish_directory(path, str(location))
