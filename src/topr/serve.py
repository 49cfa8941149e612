"""Serving the champion: a KServe InferenceService on a cluster, an OpenAI-compatible endpoint here.

On a cluster, the pipeline's ``serve`` stage (after ``promote``, with ``cluster.serve.enabled``)
and ``topr serve manifest`` write two documents (``manifests``):

- a ServiceAccount that hands KServe's storage initializer the pipeline's own S3 Secret
  (``cluster.s3_secret``: the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY that KServe reads)
  and, as the annotations KServe reads, the object store's endpoint;
- an InferenceService whose predictor is KServe's Hugging Face runtime (vLLM on a GPU, its
  Hugging Face backend on CPU) for the promoted version's published folder (``storageUri``),
  the registered version and its manifest's SHA-256 pinned as annotations, with the pipeline
  pods' security settings (user 1000, non-root, no privilege escalation, no capabilities,
  seccomp RuntimeDefault) and a GPU stage's node selector and tolerations.

The stage applies them (server-side apply, ``apply``) when it runs in a cluster that serves
KServe's API; anywhere else it writes them and says so. Before writing, the model's manifest is
read back and checked against the digest MLflow recorded, so a manifest never points at files
that changed since the version was registered.

Here, ``topr serve NAME@champion`` fetches the version (checked file by file against its
manifest) and runs ``transformers serve`` on loopback (``local_server``): /v1/chat/completions,
/v1/completions and /v1/models, the model named after the registered model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from topr import storage

log = logging.getLogger(__name__)

KSERVE_GROUP, KSERVE_VERSION = "serving.kserve.io", "v1beta1"
MODEL_DIR = "/mnt/models"  # where KServe's storage initializer puts storageUri's files
IMAGE_USER = 1000  # KServe's runtime images and the pipeline's pods run as this user
NAME_LIMIT = 45  # KServe names the predictor's Knative service and route after it: keep room for them
ANNOTATION = "topr.io"


class ServeError(RuntimeError):
    """A model that cannot be served as asked (not in object storage, changed since registered)."""


@dataclass(frozen=True)
class ServedModel:
    """A registered version to serve: where its files are and the SHA-256 of their manifest."""

    registered_model: str
    version: str
    model_uri: str
    manifest_sha256: str | None

    @property
    def reference(self) -> str:
        return f"{self.registered_model}/{self.version}"


def served_model(tracking_uri: str, reference: str) -> ServedModel:
    """The committed version ``reference`` names (``name@alias``, ``name/version``, ``models:/…``)."""
    from topr.lineage import committed_model, resolve_version
    from topr.tracking import mlflow_client

    client = mlflow_client(tracking_uri)
    version = resolve_version(client, reference)
    model_uri, manifest_sha256 = committed_model(client, version)
    return ServedModel(version.name, str(version.version), model_uri, manifest_sha256)


def service_name(registered_model: str) -> str:
    """A DNS-1035 label for ``registered_model`` (lower case, letters, digits and '-', starting
    with a letter), at most ``NAME_LIMIT`` characters; a shortened name keeps a digest of the whole."""
    name = re.sub(r"[^a-z0-9-]+", "-", registered_model.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"m-{name}".rstrip("-")
    if len(name) > NAME_LIMIT:
        digest = hashlib.sha256(registered_model.encode()).hexdigest()[:8]
        name = f"{name[: NAME_LIMIT - 9].rstrip('-')}-{digest}"
    return name


def _label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9-_.], beginning and ending alphanumeric."""
    return re.sub(r"[^A-Za-z0-9-_.]+", "-", text)[:63].strip("-_.")


def checked(model: ServedModel) -> ServedModel:
    """``model``, once its published manifest is read back and matches the digest MLflow recorded."""
    if not storage.is_s3(model.model_uri):
        raise ServeError(
            f"{model.reference} is at {model.model_uri}, not in object storage: a cluster cannot fetch it "
            "(publish models with run.artifact_store=s3://…)"
        )
    try:
        storage.read_manifest(model.model_uri, model.manifest_sha256)
    except storage.StorageError as error:
        raise ServeError(f"{model.reference}: {error}") from None
    return model


def s3_annotations(endpoint: str | None) -> dict[str, str]:
    """KServe's S3 annotations for ``endpoint`` (``http://host:port``); none for AWS's own."""
    if not endpoint:
        return {}
    parsed = urlparse(endpoint)
    return {
        "serving.kserve.io/s3-endpoint": parsed.netloc or parsed.path,
        "serving.kserve.io/s3-usehttps": "0" if parsed.scheme == "http" else "1",
    }


def manifests(model: ServedModel, cluster, s3_endpoint: str | None = None) -> list[dict]:
    """The ServiceAccount and the InferenceService that serve ``model`` (see the module's docstring),
    from ``cluster`` (``topr.cluster.ClusterConfig``: its ``serve`` section, secrets and GPU placement)."""
    serve = cluster.serve
    name = serve.name or service_name(model.registered_model)
    metadata = {
        "name": name,
        "labels": {"app.kubernetes.io/managed-by": "topr", f"{ANNOTATION}/registered-model": _label_value(model.registered_model)},
        "annotations": {
            f"{ANNOTATION}/model-version": model.reference,
            f"{ANNOTATION}/model-uri": model.model_uri,
            f"{ANNOTATION}/manifest-sha256": model.manifest_sha256 or "",
        },
    }
    if serve.namespace:
        metadata["namespace"] = serve.namespace
    account = {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {**({"namespace": serve.namespace} if serve.namespace else {}), "name": serve.service_account, "annotations": s3_annotations(s3_endpoint)},
        "secrets": [{"name": cluster.s3_secret}] if cluster.s3_secret else [],
    }
    service = {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_VERSION}",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": _predictor(name, model, cluster)},
    }
    return [account, service]


def _predictor(name: str, model: ServedModel, cluster) -> dict:
    serve = cluster.serve
    quantities = {"cpu": serve.cpu, "memory": serve.memory}
    if serve.gpus:
        quantities[cluster.accelerator_type] = str(serve.gpus)
    container = {
        "modelFormat": {"name": "huggingface"},
        "runtime": serve.runtime,
        "storageUri": model.model_uri,
        "args": [f"--model_name={name}", f"--model_dir={MODEL_DIR}", f"--backend={'vllm' if serve.gpus else 'huggingface'}", *serve.args],
        "resources": {"requests": quantities, "limits": dict(quantities)},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True},
    }
    predictor = {
        "serviceAccountName": serve.service_account,
        "minReplicas": serve.min_replicas,
        "maxReplicas": serve.max_replicas,
        "securityContext": {"runAsUser": IMAGE_USER, "runAsGroup": IMAGE_USER, "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "model": container,
    }
    if serve.gpus:
        if cluster.gpu_node_selector:
            predictor["nodeSelector"] = dict(cluster.gpu_node_selector)
        predictor["tolerations"] = [toleration.model_dump(exclude_none=True) for toleration in cluster.gpu_tolerations]
    return predictor


def write_manifests(documents: list[dict], path: str | Path) -> Path:
    """The documents as one multi-document YAML file, written whole or not at all."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    partial.replace(path)
    return path


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod with a service account's credentials."""
    from kubernetes import config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        return False
    return True


def apply(documents: list[dict], namespace: str, api_client=None) -> list[str]:
    """Server-side apply each document (field manager ``topr``) in ``namespace`` unless it names its
    own; return what was applied. A cluster without KServe's API refuses before anything is applied."""
    from kubernetes import client as kube

    api_client = api_client or kube.ApiClient()
    try:
        kube.CustomObjectsApi(api_client).get_api_resources(KSERVE_GROUP, KSERVE_VERSION)
    except kube.ApiException as error:
        if error.status == 404:
            raise ServeError(f"this cluster serves no {KSERVE_GROUP}/{KSERVE_VERSION} API: install KServe, or set cluster.serve.enabled=false") from None
        raise
    applied = []
    for document in documents:
        where = document["metadata"].get("namespace", namespace)
        path = _resource_path(document, where)
        api_client.call_api(
            path, "PATCH",
            query_params=[("fieldManager", "topr"), ("force", "true")],
            header_params={"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"},
            body=document, auth_settings=["BearerToken"], response_type="object", _return_http_data_only=True,
        )
        applied.append(f"{document['kind']} {where}/{document['metadata']['name']}")
    return applied


def _resource_path(document: dict, namespace: str) -> str:
    name = document["metadata"]["name"]
    if document["kind"] == "ServiceAccount":
        return f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"
    return f"/apis/{KSERVE_GROUP}/{KSERVE_VERSION}/namespaces/{namespace}/inferenceservices/{name}"


def pod_namespace(default: str = "default") -> str:
    """The namespace of this pod (its service account's), else ``default``."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else default


@contextmanager
def local_copy(model: ServedModel) -> Iterator[Path]:
    """A folder named after the registered model (the name the local server gives it) with
    ``model``'s files: a published model is downloaded, each file checked against its manifest
    and the manifest against MLflow's digest; one registered without an artifact store (no
    manifest) is linked where it lies."""
    with tempfile.TemporaryDirectory(prefix="topr-serve-") as scratch:
        served = Path(scratch, service_name(model.registered_model))
        if storage.is_s3(model.model_uri):
            storage.fetch_directory(model.model_uri, served, model.manifest_sha256)
        elif Path(model.model_uri, "config.json").is_file():
            served.symlink_to(Path(model.model_uri).resolve(), target_is_directory=True)
        else:
            raise ServeError(f"{model.reference}: no model at {model.model_uri} (its run folder was removed?)")
        yield served


def local_server(model_dir: Path, host: str, port: int, device: str = "cpu") -> list[str]:
    """The command that serves ``model_dir`` with transformers' OpenAI-compatible server; run it in
    ``model_dir``'s parent so that the model's id is the folder's name."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise ServeError("the local server is transformers serve, which needs FastAPI and Uvicorn: pip install 'topr[serve]'")
    executable = Path(sys.executable).parent / "transformers"
    command = [str(executable) if executable.exists() else shutil.which("transformers") or "transformers"]
    return [*command, "serve", model_dir.name, "--host", host, "--port", str(port), "--device", device]


def serve_locally(model: ServedModel, host: str, port: int, device: str = "cpu") -> int:
    """Serve ``model`` on ``host:port`` until the server ends or this process gets SIGINT or
    SIGTERM, which it passes on to the server; then the local copy goes. The server's exit status
    (143 when SIGTERM ended it)."""
    with local_copy(model) as model_dir:
        command = local_server(model_dir, host, port, device)
        log.info("serving %s as %r on http://%s:%d/v1 (Ctrl+C stops it)", model.reference, model_dir.name, host, port)
        server = subprocess.Popen(command, cwd=model_dir.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        handlers = {signum: signal.signal(signum, lambda signum, frame: server.send_signal(signum)) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            status = server.wait()
            return 128 - status if status < 0 else status  # ended by a signal: 128 + its number, as a shell says
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if server.poll() is None:
                server.kill()
                server.wait()
