"""The Kubernetes manifests (k8s/): built with kustomize, validated against the API schemas, and
checked for what they promise.

Each overlay is built with `kubectl kustomize` (kustomize is built into kubectl and works
offline), every object is validated against the Kubernetes 1.32 OpenAPI schemas with
kubernetes-validate in strict mode (unknown fields are errors), and then the behaviour is
asserted: the KFP launcher's pipeline root, the security context and resources of every pod,
placeholder-only Secrets, NetworkPolicies that admit only pipeline pods and let pipeline pods
reach only what they need, GPU placement in prod only, and the switch to an existing S3 bucket.
No cluster runs here.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.32"
NAMESPACE = "topr"
OVERLAYS = ("dev", "prod")
PIPELINE_POD = {"pipelines.kubeflow.org/v2_component": "true"}  # KFP v2 labels every task pod so
CLIENT_POD = {"topr-client": "true"}
S3_SECRET = ("topr-s3-credentials", {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})
DB_SECRET = ("topr-mlflow-db", {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"})
WORKLOADS = ("Deployment", "StatefulSet")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: these tests build the manifests with `kubectl kustomize` "
            "(kubectl >= 1.27; CI and the development image have it at /usr/bin/kubectl)"
        )
    return path


def kustomize(directory: Path) -> list[dict]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _built(overlay: str) -> tuple[dict, ...]:
    return tuple(kustomize(K8S / "overlays" / overlay))


def build(overlay: str) -> list[dict]:
    return list(_built(overlay))


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def workloads(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] in WORKLOADS]


def containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def matches(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels only, as these manifests use) against a label set."""
    assert not selector.get("matchExpressions"), "tests only understand matchLabels"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


# --- building and schema validation --------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_object_is_valid_for_kubernetes(overlay):
    docs = build(overlay)
    assert len(docs) >= 15, f"{overlay}: only {len(docs)} objects"
    problems = []
    for doc in docs:
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{what}: no schema (only built-in kinds belong in the overlays)")
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{what}: {error.message} at {'/'.join(map(str, error.path))}")
    assert not problems, "\n".join(problems)


def test_validation_rejects_an_unknown_field():
    # The strict validator is what catches typos such as `readOnlyRootFileSystem`.
    deployment = one(build("dev"), "Deployment", "mlflow")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_is_in_namespace_topr_and_labelled(overlay):
    for doc in build(overlay):
        meta = doc["metadata"]
        what = f"{doc['kind']}/{meta['name']}"
        if doc["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{what} is not in namespace {NAMESPACE}"
        labels = meta.get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "topr", what
        assert labels.get("app.kubernetes.io/name"), what
    for workload in workloads(build(overlay)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "topr", workload["metadata"]["name"]
        assert labels.get("app.kubernetes.io/name") == workload["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned(overlay):
    for workload in workloads(build(overlay)):
        for container in containers(workload):
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and tag != "latest", f"{image} is not pinned"
            assert re.search(r"\d+\.\d+", tag), f"{image}: not an exact version"


# --- pods: security context and resources --------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_locked_down_and_has_requests_and_limits(overlay):
    checked = 0
    for workload in workloads(build(overlay)):
        pod = workload["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, f"{workload['metadata']['name']}: token mounted"
        for container in containers(workload):
            what = f"{workload['kind']}/{workload['metadata']['name']}/{container['name']}"
            security = {**pod_security, **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, f"{what}: runAsNonRoot"
            assert security.get("runAsUser", 1) != 0, f"{what}: runs as uid 0"
            assert security.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation"
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: capabilities"
            assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: seccomp"
            assert security.get("readOnlyRootFilesystem") is True, f"{what}: writable root filesystem"
            resources = container.get("resources", {})
            for part in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    assert resources.get(part, {}).get(resource), f"{what}: no {part}.{resource}"
            assert container.get("readinessProbe") and container.get("livenessProbe"), f"{what}: probes"
            checked += 1
    assert checked == 3, f"expected MLflow, PostgreSQL and SeaweedFS containers, checked {checked}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_read_only_pods_have_writable_tmp(overlay):
    for workload in workloads(build(overlay)):
        pod = workload["spec"]["template"]["spec"]
        for container in pod["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{workload['metadata']['name']}: no writable /tmp"
            volume = next(v for v in pod["volumes"] if v["name"] == mounts["/tmp"])
            assert "emptyDir" in volume


def test_mlflow_server_command_and_probes():
    deployment = one(build("dev"), "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].startswith("ghcr.io/mlflow/mlflow:v")
    argv = container["command"] + container["args"]
    assert argv[:2] == ["mlflow", "server"]
    for flag in ("--serve-artifacts", "--artifacts-destination"):
        assert flag in argv
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "5000"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health", probe
    env = {e["name"]: e for e in container["env"]}
    names = [e["name"] for e in container["env"]]
    # The backend store URI refers to the database credentials, defined before it (Kubernetes
    # expands $(VAR) only from earlier entries) and taken from the Secret, not written inline.
    uri = env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert uri.startswith("postgresql://") and "@mlflow-postgres:5432/" in uri
    for variable in re.findall(r"\$\((\w+)\)", uri):
        assert names.index(variable) < names.index("MLFLOW_BACKEND_STORE_URI"), variable
        assert env[variable]["valueFrom"]["secretKeyRef"]["name"] == DB_SECRET[0]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "topr-endpoints"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy's, raised on importing mlflow.server
def test_mlflow_accepts_the_host_names_clients_use_and_no_others():
    # MLflow 3 answers 403 to a Host header outside MLFLOW_SERVER_ALLOWED_HOSTS: check the list
    # with MLflow's own matcher (the pinned mlflow is the server's version).
    from mlflow.server.security_utils import is_allowed_host_header

    docs = build("dev")
    container = one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    value = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    allowed = [host.strip() for host in value.split(",")]  # as MLflow splits it
    tracking = urlparse(one(docs, "ConfigMap", "topr-endpoints")["data"]["MLFLOW_TRACKING_URI"])
    for host in (tracking.netloc, "mlflow:5000", "mlflow.topr:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    for host in ("mlflow.attacker.example", "mlflow.attacker.example:5000", "evil.example"):
        assert not is_allowed_host_header(allowed, host), host


# --- configuration: endpoints, kfp-launcher, secrets ---------------------------------------------


def service_address(docs: list[dict], url: str) -> tuple[dict, int]:
    """The Service a cluster URL (name.namespace.svc.cluster.local:port) points at, and the port."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    parts = parsed.hostname.split(".")
    assert parts[1:] == [NAMESPACE, "svc", "cluster", "local"], f"{url}: not a Service of {NAMESPACE}"
    service = one(docs, "Service", parts[0])
    ports = [p["port"] for p in service["spec"]["ports"]]
    assert parsed.port in ports, f"{url}: Service {parts[0]} has ports {ports}"
    return service, parsed.port


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_endpoints_point_at_the_services(overlay):
    docs = build(overlay)
    data = one(docs, "ConfigMap", "topr-endpoints")["data"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"} <= set(data)
    mlflow, _ = service_address(docs, data["MLFLOW_TRACKING_URI"])
    assert mlflow["spec"]["selector"] == {"app.kubernetes.io/name": "mlflow"}
    storage, port = service_address(docs, data["AWS_ENDPOINT_URL"])
    assert storage["metadata"]["name"] == "seaweedfs" and port == 8333
    assert data["MLFLOW_S3_ENDPOINT_URL"] == data["AWS_ENDPOINT_URL"]
    assert data["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://topr/")


def launcher_config(docs: list[dict]) -> tuple[str, dict]:
    data = one(docs, "ConfigMap", "kfp-launcher")["data"]
    return data["defaultPipelineRoot"], yaml.safe_load(data["providers"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kfp_launcher_uses_the_s3_store_and_the_s3_secret(overlay):
    docs = build(overlay)
    root, providers = launcher_config(docs)
    assert root.startswith("s3://"), root
    default = providers["s3"]["default"]
    # The launcher's endpoint is host:port of the same store the components use.
    endpoint = urlparse(one(docs, "ConfigMap", "topr-endpoints")["data"]["AWS_ENDPOINT_URL"])
    assert default["endpoint"] == endpoint.netloc
    assert default["disableSSL"] is (endpoint.scheme == "http")
    assert default["region"]
    credentials = default["credentials"]
    assert credentials["fromEnv"] is False
    assert credentials["secretRef"] == {
        "secretName": S3_SECRET[0],
        "accessKeyKey": "AWS_ACCESS_KEY_ID",
        "secretKeyKey": "AWS_SECRET_ACCESS_KEY",
    }
    # The bucket of the pipeline root is the one SeaweedFS creates.
    seaweedfs = one(docs, "StatefulSet", "seaweedfs")["spec"]["template"]["spec"]["containers"][0]
    assert f"-bucket={urlparse(root).netloc}" in seaweedfs["args"]


def secret_values(secret: dict) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def test_dev_secrets_have_the_expected_names_keys_and_only_placeholders():
    docs = build("dev")
    secrets = {s["metadata"]["name"]: secret_values(s) for s in find(docs, "Secret")}
    assert set(secrets) == {S3_SECRET[0], DB_SECRET[0]}
    for name, keys in (S3_SECRET, DB_SECRET):
        assert set(secrets[name]) == keys, f"{name}: keys {sorted(secrets[name])}"
    for name, values in secrets.items():
        for key, value in values.items():
            if key in ("POSTGRES_USER", "POSTGRES_DB"):
                assert value == "mlflow", f"{name}.{key}"  # names, not secrets
            else:
                assert value == "CHANGE_ME", f"{name}.{key} holds something other than the placeholder"
    for secret in find(docs, "Secret"):
        assert secret["metadata"]["labels"].get("topr-placeholder") == "true"


def test_prod_generates_no_secrets_so_real_ones_are_never_overwritten():
    docs = build("prod")
    assert find(docs, "Secret") == []
    # ... but its pods still expect the same two Secrets.
    referenced = {ref for w in workloads(docs) for ref in secret_refs(w)}
    assert {name for name, _ in referenced} == {S3_SECRET[0], DB_SECRET[0]}


def secret_refs(workload: dict) -> set[tuple[str, str]]:
    refs = set()
    for container in containers(workload):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    return refs


def test_every_referenced_secret_key_exists():
    docs = build("dev")
    available = {(s["metadata"]["name"], k) for s in find(docs, "Secret") for k in secret_values(s)}
    for workload in workloads(docs):
        missing = secret_refs(workload) - available
        assert not missing, f"{workload['metadata']['name']} refers to missing Secret keys {missing}"


def test_placeholder_files_hold_no_real_values():
    for path in (K8S / "components" / "placeholder-secrets").glob("*.env.example"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert value in ("CHANGE_ME", "mlflow"), f"{path.name}: {key}={value!r}"


# --- RBAC ---------------------------------------------------------------------------------------


def test_pipeline_service_account_has_least_privilege():
    docs = build("prod")
    one(docs, "ServiceAccount", "topr-pipeline")
    binding = one(docs, "RoleBinding", "topr-pipeline")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "topr-pipeline"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "topr-pipeline", "namespace": NAMESPACE}]
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    rules = one(docs, "Role", "topr-pipeline")["rules"]
    granted = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in rule["verbs"] and resource != "*" and group != "*", rule
                granted[(group, resource)] = (set(rule["verbs"]), rule.get("resourceNames"))
    assert granted[("", "secrets")] == ({"get"}, [S3_SECRET[0]])
    assert granted[("", "configmaps")] == ({"get"}, ["kfp-launcher"])
    assert granted[("", "pods")][0] <= {"get", "list", "watch"}
    assert granted[("argoproj.io", "workflowtaskresults")][0] == {"create", "patch"}
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    for (group, resource), (verbs, _) in granted.items():
        if group == "":
            assert not verbs & writes, f"write access to {resource}: {verbs}"


# --- NetworkPolicies ----------------------------------------------------------------------------


def pod_labels(docs: list[dict], name: str) -> dict:
    workload = next(w for w in workloads(docs) if w["metadata"]["name"] == name)
    return workload["spec"]["template"]["metadata"]["labels"]


def ingress_rules_for(docs: list[dict], labels: dict) -> list[dict]:
    policies = [p for p in find(docs, "NetworkPolicy") if matches(p["spec"]["podSelector"], labels)]
    assert policies, f"no NetworkPolicy selects pods {labels}"
    for policy in policies:
        assert "Ingress" in policy["spec"]["policyTypes"]
    return [rule for p in policies for rule in p["spec"].get("ingress", [])]


def allowed_sources(docs: list[dict], name: str, port: int) -> list[dict]:
    """The pod selectors allowed to reach workload `name`; each rule is checked to be narrow."""
    sources = []
    for rule in ingress_rules_for(docs, pod_labels(docs, name)):
        assert rule.get("from"), f"{name}: a rule admits every source"
        assert [p["port"] for p in rule.get("ports", [])] == [port], f"{name}: rule ports {rule.get('ports')}"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"{name}: peer {peer} reaches outside the namespace"
            sources.append(peer["podSelector"])
    return sources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_is_denied_by_default(overlay):
    docs = build(overlay)
    default = one(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert default["podSelector"] == {} and default["policyTypes"] == ["Ingress"] and not default.get("ingress")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_and_storage_admit_only_pipeline_pods_and_clients(overlay):
    docs = build(overlay)
    mlflow = pod_labels(docs, "mlflow")
    postgres = pod_labels(docs, "mlflow-postgres")
    pipeline_pod = {**PIPELINE_POD, "app": "some-kfp-task"}
    stranger = {"app.kubernetes.io/name": "something-else"}

    def admitted(name: str, port: int, labels: dict) -> bool:
        return any(matches(source, labels) for source in allowed_sources(docs, name, port))

    assert admitted("mlflow", 5000, pipeline_pod) and admitted("mlflow", 5000, CLIENT_POD)
    assert not admitted("mlflow", 5000, stranger) and not admitted("mlflow", 5000, {})
    assert admitted("seaweedfs", 8333, pipeline_pod) and admitted("seaweedfs", 8333, mlflow)
    assert not admitted("seaweedfs", 8333, stranger) and not admitted("seaweedfs", 8333, postgres)
    # The database: only the tracking server.
    assert admitted("mlflow-postgres", 5432, mlflow)
    assert not admitted("mlflow-postgres", 5432, pipeline_pod) and not admitted("mlflow-postgres", 5432, CLIENT_POD)


def egress_allowed(docs: list[dict], source: dict, port: int, protocol: str = "TCP", namespace: str = NAMESPACE,
                   labels: dict | None = None, ip: str | None = None) -> bool:
    """Whether a pod of this namespace labelled ``source`` may connect to a pod (``namespace``,
    ``labels``) or to an address outside the cluster (``ip``) on ``port``/``protocol``."""
    policies = [
        p for p in find(docs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"] and matches(p["spec"]["podSelector"], source)
    ]
    if not policies:
        return True  # not isolated for egress
    for rule in (rule for p in policies for rule in p["spec"].get("egress", [])):
        if "ports" in rule and not any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in rule["ports"]):
            continue
        for peer in rule.get("to", [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"namespaceSelector": {}}]):
            if "ipBlock" in peer:
                block = peer["ipBlock"]
                inside = ip is not None and ipaddress.ip_address(ip) in ipaddress.ip_network(block["cidr"])
                if inside and not any(ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in block.get("except", [])):
                    return True
            elif labels is not None:
                in_namespace = (
                    matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace})
                    if "namespaceSelector" in peer else namespace == NAMESPACE
                )
                if in_namespace and matches(peer.get("podSelector", {}), labels):
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_pods_reach_only_dns_mlflow_storage_kfp_and_the_kubernetes_api(overlay):
    docs = build(overlay)
    pod = {**PIPELINE_POD, "app": "some-kfp-task"}

    def reach(**destination) -> bool:
        return egress_allowed(docs, pod, **destination)

    dns = {"namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}, "port": 53}
    assert reach(**dns, protocol="UDP") and reach(**dns, protocol="TCP")
    assert reach(labels=pod_labels(docs, "mlflow"), port=5000)
    assert reach(labels=pod_labels(docs, "seaweedfs"), port=8333)
    # KFP's driver and launcher talk to its API server and ML Metadata; Argo's wait container
    # archives the logs to KFP's own object store (pod ports: the policy sees them after the Service).
    assert reach(namespace="kubeflow", labels={"app": "ml-pipeline"}, port=8887)
    assert reach(namespace="kubeflow", labels={"component": "metadata-grpc-server"}, port=8080)
    assert reach(namespace="kubeflow", labels={"app": "seaweedfs"}, port=8333)
    # ... and the Kubernetes API: its Service address, or the control plane's after translation.
    assert reach(ip="10.96.0.1", port=443) and reach(ip="172.18.0.2", port=6443)
    # Nothing else: not the database, other pods or namespaces, nor the internet (the model hub).
    assert not reach(labels=pod_labels(docs, "mlflow-postgres"), port=5432)
    assert not reach(labels={"app.kubernetes.io/name": "something-else"}, port=8333)
    assert not reach(namespace="other", labels={"app": "seaweedfs"}, port=8333)
    assert not reach(namespace="kubeflow", labels={"app": "ml-pipeline-ui"}, port=3000)
    assert not reach(ip="18.244.202.73", port=443)  # huggingface.co
    assert not reach(ip="8.8.8.8", port=53, protocol="UDP")  # DNS only through the cluster's resolver
    assert not reach(ip="10.1.2.3", port=80)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_egress_rule_names_its_destinations_and_ports(overlay):
    for policy in find(build(overlay), "NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to") and rule.get("ports"), f"{policy['metadata']['name']}: a rule admits everything"


def test_topr_services_keep_their_egress():
    # MLflow reaches PostgreSQL and an external S3 endpoint; only pipeline pods are fenced in.
    docs = build("prod")
    for name in ("mlflow", "mlflow-postgres", "seaweedfs"):
        assert egress_allowed(docs, pod_labels(docs, name), ip="52.216.0.1", port=443), name


def test_namespace_enforces_baseline_and_warns_and_audits_restricted():
    # Not "restricted" enforced: see the comment in k8s/base/namespace.yaml (KFP < 2.16, and KFP's
    # per-profile artifact server, make pods that restricted rejects). Every pod is still checked.
    labels = one(build("prod"), "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"


# --- GPUs and sizes -----------------------------------------------------------------------------


def topr_config(docs: list[dict]) -> dict:
    return yaml.safe_load(one(docs, "ConfigMap", "topr-config")["data"]["topr-config.yaml"])


def scheduling(workload: dict) -> str:
    pod = workload["spec"]["template"]["spec"]
    return yaml.safe_dump({k: pod.get(k) for k in ("nodeSelector", "tolerations", "affinity")})


def test_dev_has_no_gpu_placement_anywhere():
    docs = build("dev")
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        assert not pod.get("nodeSelector") and not pod.get("tolerations") and not pod.get("affinity")
    cluster = topr_config(docs)["cluster"]
    assert cluster["gpu_node_selector"] == {} and cluster["gpu_tolerations"] == []
    assert all(stage.get("gpus", 0) == 0 for stage in cluster["stages"].values())
    assert cluster["image"].endswith("-cpu"), "dev runs the CPU image"


def test_prod_puts_gpu_stages_on_gpu_nodes_and_services_off_them():
    docs = build("prod")
    cluster = topr_config(docs)["cluster"]
    assert cluster["gpu_node_selector"], "prod: no node selector for GPU stages"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in cluster["gpu_tolerations"]
    for stage in ("sample", "train", "evaluate"):
        assert cluster["stages"][stage]["gpus"] >= 1, stage
    [(label, value)] = cluster["gpu_node_selector"].items()
    for workload in workloads(docs):
        pod = workload["spec"]["template"]["spec"]
        name = workload["metadata"]["name"]
        assert "nvidia.com/gpu" not in yaml.safe_dump(pod.get("tolerations")), f"{name} tolerates GPU nodes"
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert {"key": label, "operator": "NotIn", "values": [value]} in terms[0]["matchExpressions"], name
        for container in containers(workload):
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topr_config_of_each_overlay_is_a_valid_topr_configuration(overlay):
    # The file users pass to `topr submit --config` must load with topr's own config code.
    from topr.config import load_config

    config = load_config(K8S / "overlays" / overlay / "topr-config.yaml")
    assert config.cluster.s3_secret == S3_SECRET[0]
    assert config.cluster.endpoints_config_map == "topr-endpoints"
    assert config.run.tracking_uri == one(build(overlay), "ConfigMap", "topr-endpoints")["data"]["MLFLOW_TRACKING_URI"]
    assert config.cluster.image.startswith("ghcr.io/topr-project/topr:")
    # The ConfigMap in the cluster is the same file.
    assert topr_config(build(overlay)) == yaml.safe_load((K8S / "overlays" / overlay / "topr-config.yaml").read_text())


QUANTITY = {"": 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-zA-Z]*)", str(value)).groups()
    return float(number) * QUANTITY[unit]


def test_prod_is_bigger_than_dev():
    dev, prod = build("dev"), build("prod")
    assert one(prod, "Deployment", "mlflow")["spec"]["replicas"] >= 2
    assert one(dev, "Deployment", "mlflow")["spec"]["replicas"] == 1
    pdb = one(prod, "PodDisruptionBudget", "mlflow")["spec"]
    assert pdb["minAvailable"] == 1 and matches(pdb["selector"], pod_labels(prod, "mlflow"))
    for dev_workload in workloads(dev):
        name = dev_workload["metadata"]["name"]
        prod_workload = next(w for w in workloads(prod) if w["metadata"]["name"] == name)
        for part in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                small = quantity(containers(dev_workload)[0]["resources"][part][resource])
                large = quantity(containers(prod_workload)[0]["resources"][part][resource])
                assert large > small, f"{name} {part}.{resource}: prod {large} <= dev {small}"
        for small, large in zip(
            dev_workload["spec"].get("volumeClaimTemplates", []), prod_workload["spec"].get("volumeClaimTemplates", [])
        ):
            assert quantity(large["spec"]["resources"]["requests"]["storage"]) > quantity(
                small["spec"]["resources"]["requests"]["storage"]
            ), name


# --- switching to an existing S3 bucket ---------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_external_s3_component_removes_seaweedfs_and_repoints_endpoints(overlay, tmp_path):
    # Exactly what k8s/README.md tells users to do: uncomment / add the Component in the overlay.
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    text = kustomization.read_text()
    component = "- ../../components/external-s3"
    if overlay == "prod":  # the whole `components:` block is commented out
        pattern, replacement = rf"^# components:\n#   {re.escape(component)}$", f"components:\n  {component}"
    else:  # dev has a components: list; the line is commented out in it
        pattern, replacement = rf"^  # {re.escape(component)}$", f"  {component}"
    text, n = re.subn(pattern, replacement, text, flags=re.M)
    assert n == 1, f"{overlay}: the commented-out external-s3 line is not where the README says"
    kustomization.write_text(text)
    docs = kustomize(kustomization.parent)

    assert not [d for d in docs if "seaweedfs" in d["metadata"]["name"]], "SeaweedFS objects remain"
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    data = one(docs, "ConfigMap", "topr-endpoints")["data"]
    for key in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        assert "seaweedfs" not in data[key] and data[key].startswith("https://"), f"{key}={data[key]}"
    root, providers = launcher_config(docs)
    default = providers["s3"]["default"]
    assert default["endpoint"] == urlparse(data["AWS_ENDPOINT_URL"]).netloc
    assert default["disableSSL"] is False
    assert default["credentials"]["secretRef"]["secretName"] == S3_SECRET[0]
    bucket = urlparse(root).netloc
    assert bucket != "topr" and urlparse(data["MLFLOW_ARTIFACTS_DESTINATION"]).netloc == bucket
    # Nothing else changed: MLflow, PostgreSQL and their policies are still there.
    one(docs, "Deployment", "mlflow")
    one(docs, "StatefulSet", "mlflow-postgres")
    assert {p["metadata"]["name"] for p in find(docs, "NetworkPolicy")} == {
        "default-deny-ingress", "mlflow-ingress", "mlflow-postgres-ingress", "pipeline-egress", "pipeline-egress-object-store"
    }
    # Pipeline pods reach the external endpoint (NetworkPolicies know addresses, not host names).
    pipeline_pod = {**PIPELINE_POD, "app": "some-kfp-task"}
    assert egress_allowed(docs, pipeline_pod, ip="52.216.0.1", port=443)
    store = one(docs, "NetworkPolicy", "pipeline-egress-object-store")["spec"]
    assert "seaweedfs" not in yaml.safe_dump(store)


# --- serving the champion with KServe -----------------------------------------------------------


def test_serving_component_lets_the_pipeline_apply_only_its_serving_objects(tmp_path):
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    kustomization = copy / "overlays" / "dev" / "kustomization.yaml"
    text, n = re.subn(r"^  # - \.\./\.\./components/serving$", "  - ../../components/serving", kustomization.read_text(), flags=re.M)
    assert n == 1, "the commented-out serving line is not where the README says"
    kustomization.write_text(text)
    docs = kustomize(kustomization.parent)
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    binding = one(docs, "RoleBinding", "topr-serve-deployer")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "topr-pipeline", "namespace": NAMESPACE}]
    rules = one(docs, "Role", "topr-serve-deployer")["rules"]
    granted = {(group, resource, verb, tuple(rule.get("resourceNames", ()))) for rule in rules for group in rule["apiGroups"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert granted == {
        ("serving.kserve.io", "inferenceservices", "get", ()), ("serving.kserve.io", "inferenceservices", "create", ()),
        ("serving.kserve.io", "inferenceservices", "patch", ()), ("", "serviceaccounts", "create", ()),
        ("", "serviceaccounts", "get", ("topr-serve",)), ("", "serviceaccounts", "patch", ("topr-serve",)),
    }  # fmt: skip
    assert not find(docs, "ClusterRole") and not find(docs, "ClusterRoleBinding")
    pipeline_pod = {**PIPELINE_POD, "app": "some-kfp-task"}
    api = one(docs, "NetworkPolicy", "pipeline-egress-kubernetes-api")["spec"]["egress"][0]["to"][0]["ipBlock"]["cidr"]
    assert egress_allowed(docs, pipeline_pod, ip=api.split("/")[0], port=6443)
    admitted = one(docs, "NetworkPolicy", "seaweedfs-ingress-kserve")["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert admitted == {"matchExpressions": [{"key": "serving.kserve.io/inferenceservice", "operator": "Exists"}]}


# --- the TrainJob example -----------------------------------------------------------------------


def trainjob() -> dict:
    docs = [d for d in yaml.safe_load_all((K8S / "examples" / "trainjob.yaml").read_text()) if d]
    assert len(docs) == 1
    return docs[0]


def test_trainjob_runs_topr_train_under_torchrun_on_two_gpu_nodes():
    job = trainjob()
    assert job["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and job["kind"] == "TrainJob"
    assert job["metadata"]["namespace"] == NAMESPACE
    spec = job["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2
    assert trainer["image"] == "ghcr.io/topr-project/topr:0.1.0"
    command = trainer["command"]
    assert command[0] == "torchrun" and command[-2:] == ["topr", "train"], command
    args = trainer["args"]
    for flag in ("--model", "--data", "--output"):
        assert args[args.index(flag) + 1].startswith("s3://"), flag
    gpus = trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert int(gpus) == trainer["numProcPerNode"] >= 1


def test_trainjob_pod_fields_are_valid_core_objects():
    # TrainJob is a custom resource (no schema here), but the parts it copies into pods are core
    # types: validate them inside a Pod, strictly.
    job = trainjob()
    trainer = job["spec"]["trainer"]
    [patch] = job["spec"]["runtimePatches"]
    [replicated] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"
    pod_template = replicated["template"]["spec"]["template"]
    pod_spec = dict(pod_template["spec"])
    [container_patch] = pod_spec.pop("containers")
    assert container_patch["name"] == "node"
    container = {
        "name": "node",
        "image": trainer["image"],
        "command": trainer["command"],
        "args": trainer["args"],
        "env": trainer["env"],
        "resources": trainer["resourcesPerNode"],
        "volumeMounts": container_patch["volumeMounts"],
        "securityContext": container_patch["securityContext"],
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "trainjob-node", "labels": pod_template["metadata"]["labels"]},
        "spec": {**pod_spec, "containers": [container]},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    # It can reach MLflow and storage, lands on GPU nodes, and runs as the image's user.
    assert matches({"matchLabels": CLIENT_POD}, pod_template["metadata"]["labels"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod_spec["tolerations"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True and pod_spec["securityContext"]["runAsUser"] == 1000
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == S3_SECRET[0]
    assert env["AWS_ENDPOINT_URL"]["valueFrom"]["configMapKeyRef"]["name"] == "topr-endpoints"


def test_trainjob_is_not_part_of_any_kustomization():
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "examples" not in kustomization.read_text(), kustomization
    for overlay in OVERLAYS:
        assert not find(build(overlay), "TrainJob")
