"""Serving the champion (topr.serve): the KServe manifests, validated against KServe's own Python
models (kserve 0.21) and the Kubernetes schemas; applying them to a cluster's API; the checks
before a model is served; the serve stage's place in the pipeline; and the CLI's refusals.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kubernetes_validate
import pytest
import yaml

from topr import serve, storage
from topr.cli import main
from topr.cluster import ClusterConfig
from topr.config import ConfigError, load_config

from helpers import check_against


def _model(uri: str = "s3://models/runs/abc/iter2/model", sha: str | None = "f" * 64, name: str = "topr-arithmetic") -> serve.ServedModel:
    return serve.ServedModel(name, "3", uri, sha)


def test_the_checker_refuses_what_kserve_does_not_define():
    service = serve.manifests(_model(), ClusterConfig())[1]
    service["spec"]["predictor"]["model"]["storageURI"] = "s3://x"  # storageUri, misspelled
    with pytest.raises(AssertionError, match="storageURI: no such field"):
        check_against("V1beta1InferenceService", service)
    service = serve.manifests(_model(), ClusterConfig())[1]
    service["spec"]["predictor"]["minReplicas"] = "1"
    with pytest.raises(AssertionError, match="minReplicas: '1' is not int"):
        check_against("V1beta1InferenceService", service)


@pytest.mark.parametrize("gpus", [1, 0])
def test_the_inference_service_is_valid_for_kserve_and_serves_the_pinned_version(gpus):
    cluster = ClusterConfig(serve={"gpus": gpus, "namespace": "serving"}, gpu_node_selector={"nvidia.com/gpu.product": "H100"})
    account, service = yaml.safe_load_all(yaml.safe_dump_all(serve.manifests(_model(), cluster, "http://seaweedfs.topr:8333")))

    built = check_against("V1beta1InferenceService", service)
    assert built.spec.predictor.model.storage_uri == "s3://models/runs/abc/iter2/model"
    kubernetes_validate.validate(account, "1.32", strict=True)

    assert service["metadata"]["name"] == "topr-arithmetic" and service["metadata"]["namespace"] == "serving"
    assert service["metadata"]["annotations"] == {
        "topr.io/model-version": "topr-arithmetic/3", "topr.io/model-uri": "s3://models/runs/abc/iter2/model", "topr.io/manifest-sha256": "f" * 64,
    }  # fmt: skip
    predictor = service["spec"]["predictor"]
    model = predictor["model"]
    assert model["modelFormat"] == {"name": "huggingface"} and model["runtime"] == "kserve-huggingfaceserver"
    assert f"--backend={'vllm' if gpus else 'huggingface'}" in model["args"] and "--model_dir=/mnt/models" in model["args"]
    assert ("nvidia.com/gpu" in model["resources"]["limits"]) == bool(gpus)
    assert model["resources"]["requests"] == model["resources"]["limits"]
    # The pipeline pods' security settings, and the GPU stages' placement on a GPU.
    assert predictor["securityContext"] == {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    assert model["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True}
    assert ("nodeSelector" in predictor) == bool(gpus) and ("tolerations" in predictor) == bool(gpus)
    # KServe's storage initializer gets the pipeline's S3 Secret and endpoint through the account.
    assert predictor["serviceAccountName"] == account["metadata"]["name"] == "topr-serve"
    assert account["secrets"] == [{"name": "topr-s3-credentials"}]
    assert account["metadata"]["annotations"] == {"serving.kserve.io/s3-endpoint": "seaweedfs.topr:8333", "serving.kserve.io/s3-usehttps": "0"}


@pytest.mark.parametrize(
    ("registered", "expected"),
    [("topr-arithmetic", "topr-arithmetic"), ("topr-jsonl-home-me-Capitals_test", "topr-jsonl-home-me-capitals-test"), ("7up", "m-7up")],
)
def test_service_names_are_dns_labels(registered, expected):
    assert serve.service_name(registered) == expected


def test_a_long_name_is_shortened_and_stays_distinct():
    first, second = serve.service_name("topr-jsonl-" + "a" * 80), serve.service_name("topr-jsonl-" + "a" * 79 + "b")
    assert first != second and len(first) <= serve.NAME_LIMIT and re.fullmatch(r"[a-z]([a-z0-9-]*[a-z0-9])?", first)


def test_only_a_published_model_whose_manifest_matches_is_served(s3, tmp_path):
    with pytest.raises(serve.ServeError, match="not in object storage"):
        serve.checked(_model(uri=str(tmp_path)))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    manifest = storage.publish_directory(folder, f"{s3}/model")
    digest = storage.manifest_sha256(manifest)
    assert serve.checked(_model(uri=f"{s3}/model", sha=digest)).model_uri == f"{s3}/model"
    with pytest.raises(serve.ServeError, match="topr-arithmetic/3"):
        serve.checked(_model(uri=f"{s3}/model", sha="0" * 64))


def test_a_local_copy_is_named_after_the_model(tiny_model_dir, tmp_path):
    with serve.local_copy(_model(uri=tiny_model_dir, sha=None)) as served:
        assert served.name == "topr-arithmetic" and (served / "config.json").exists()
        command = serve.local_server(served, "127.0.0.1", 8123)
        assert command[1:] == ["serve", "topr-arithmetic", "--host", "127.0.0.1", "--port", "8123", "--device", "cpu"]
    with pytest.raises(serve.ServeError, match="no model at"):
        with serve.local_copy(_model(uri=str(tmp_path / "gone"), sha=None)):
            pass


def test_a_published_copy_is_checked_file_by_file(s3, tiny_model_dir):
    manifest = storage.publish_directory(tiny_model_dir, f"{s3}/model")
    with serve.local_copy(_model(uri=f"{s3}/model", sha=storage.manifest_sha256(manifest))) as served:
        assert (served / "model.safetensors").read_bytes() == (storage.Path(tiny_model_dir) / "model.safetensors").read_bytes()
    bucket, key = storage.split_s3(f"{s3}/model/model.safetensors")
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=b"changed")
    with pytest.raises(storage.StorageError, match="model.safetensors"):
        with serve.local_copy(_model(uri=f"{s3}/model", sha=storage.manifest_sha256(manifest))):
            pass


class KubernetesApi(BaseHTTPRequestHandler):
    """A loopback Kubernetes API with or without KServe's group; records each request."""

    requests: list[tuple[str, str, str, dict]] = []
    kserve = True

    def do_GET(self):
        self.requests.append(("GET", self.path, "", {}))
        if self.path.startswith("/apis/serving.kserve.io/v1beta1") and self.kserve:
            self._answer(200, {"kind": "APIResourceList", "groupVersion": "serving.kserve.io/v1beta1", "resources": []})
        else:
            self._answer(404, {"kind": "Status", "code": 404})

    def do_PATCH(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.requests.append(("PATCH", self.path, self.headers["Content-Type"], json.loads(body)))
        self._answer(200, json.loads(body))

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def kubernetes_api():
    from kubernetes import client

    KubernetesApi.requests, KubernetesApi.kserve = [], True
    server = ThreadingHTTPServer(("127.0.0.1", 0), KubernetesApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.server_address[1]}")
    configuration.api_key = {"authorization": "token-1"}
    configuration.api_key_prefix = {"authorization": "Bearer"}
    yield client.ApiClient(configuration)
    server.shutdown()


def test_apply_is_a_server_side_apply_of_each_document(kubernetes_api):
    documents = serve.manifests(_model(), ClusterConfig())
    applied = serve.apply(documents, "topr", kubernetes_api)

    assert applied == ["ServiceAccount topr/topr-serve", "InferenceService topr/topr-arithmetic"]
    patches = [request for request in KubernetesApi.requests if request[0] == "PATCH"]
    assert [path.split("?")[0] for _, path, _, _ in patches] == [
        "/api/v1/namespaces/topr/serviceaccounts/topr-serve",
        "/apis/serving.kserve.io/v1beta1/namespaces/topr/inferenceservices/topr-arithmetic",
    ]
    assert all(content_type == "application/apply-patch+yaml" and "fieldManager=topr" in path for _, path, content_type, _ in patches)
    assert [body for *_, body in patches] == documents


def test_a_cluster_without_kserve_applies_nothing_and_says_why(kubernetes_api):
    KubernetesApi.kserve = False
    with pytest.raises(serve.ServeError, match="no serving.kserve.io/v1beta1 API: install KServe"):
        serve.apply(serve.manifests(_model(), ClusterConfig()), "topr", kubernetes_api)
    assert not [request for request in KubernetesApi.requests if request[0] == "PATCH"]


def test_serving_needs_the_gate_and_an_artifact_store():
    with pytest.raises(ConfigError, match="cluster.serve.enabled=true needs gate.enabled=true and run.artifact_store"):
        load_config(None, ["cluster.serve.enabled=true"])
    config = load_config(None, ["cluster.serve.enabled=true", "run.artifact_store=s3://b/runs", "cluster.serve.gpus=0"])
    assert config.cluster.serve.gpus == 0


def test_nested_overrides_name_the_unknown_field():
    with pytest.raises(ConfigError, match=r"unknown field cluster.serve.gpu \(choices: enabled, name"):
        load_config(None, ["cluster.serve.gpu=1"])
    with pytest.raises(ConfigError, match="run.name is a field, not a section"):
        load_config(None, ["run.name.x=1"])


def test_the_serve_stage_follows_promotion_in_one_condition_only_when_enabled():
    from topr_pipelines.topr_pipeline import build_pipeline

    def finish_tasks(config):
        spec = build_pipeline(config).pipeline_spec
        conditions = [name for name in spec.components if name.startswith("comp-condition")]
        return {name: sorted(spec.components[name].dag.tasks) for name in conditions}

    assert list(finish_tasks(load_config(None, [])).values()) == [["promote"]]
    enabled = load_config(None, ["cluster.serve.enabled=true", "run.artifact_store=s3://b/runs"])
    (tasks,) = finish_tasks(enabled).values()
    assert tasks == ["promote", "serve"]
    spec = build_pipeline(enabled).pipeline_spec
    (condition,) = [spec.components[name] for name in spec.components if name.startswith("comp-condition")]
    assert list(condition.dag.tasks["serve"].dependent_tasks) == ["promote"]


def test_serve_manifest_needs_a_model(capsys):
    assert main(["serve", "manifest"]) == 2
    assert "expected [manifest] MODEL" in capsys.readouterr().err
