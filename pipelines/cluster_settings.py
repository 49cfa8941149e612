"""Apply the ``cluster`` configuration (``topr.cluster``) to the pipeline's tasks.

Everything here ends up in the compiled YAML: the image, requests and limits, GPUs with their
node selector and tolerations, credentials from Kubernetes Secrets, endpoints from a ConfigMap,
retries with backoff, pod deadlines, caching, the writable emptyDirs and the hub switched off.
``kfp.local`` ignores all of it but the retries, which ``topr run`` leaves out
(``topr_pipelines.runner.local_pipeline``).

Retries: KFP 2.17's retry policy (``set_retry``) is a count and a backoff (60 s, 120 s, ...),
with no condition on the error or the exit code. KFP's backend gives it to Argo with Argo's
default retryPolicy, OnFailure (kubeflow/pipelines#13386): every non-zero exit of the stage's
container is retried, a failure certain to repeat too (a bad record, a prompt longer than the
context, a refused promotion, an invalid config), which fails again and costs the backoff and
the stage's start-up, nothing else (a retried stage finds its earlier outputs,
``topr.steps.StageOutputs``); what they are kept for is what can pass: a network fault past the
clients' own retries, a GPU or process crash, an OOM kill. A pod lost with its node or evicted
ends in Argo's Error phase, which OnFailure does not retry.

Pod security: kfp-kubernetes 2.17 can only set runAsUser/runAsGroup/runAsNonRoot. KFP's backend
(>= 2.16) adds the rest of what Pod Security "restricted" asks to every pod it makes
(allowPrivilegeEscalation: false, capabilities drop ALL, seccomp RuntimeDefault). Neither can
set readOnlyRootFilesystem or a container's ephemeral-storage request/limit: docs/deploy.md.
"""

from __future__ import annotations

from kfp import dsl, kubernetes

from topr.cluster import ClusterConfig, StageResources

S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
MLFLOW_SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}
ENDPOINT_KEYS = {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}
IMAGE_USER = 1000  # the non-root user of the project's Dockerfile
RETRY_BACKOFF = {"backoff_duration": "60s", "backoff_factor": 2.0, "backoff_max_duration": "3600s"}
CACHE_DIR, CACHE_LIMIT = "/cache", "20Gi"  # XDG_CACHE_HOME of the image: compile caches (Triton, vLLM)
OFFLINE = {"HF_HUB_OFFLINE": "1"}  # models come from S3 or the registry, never from the hub


def on_cluster(task: dsl.PipelineTask, cluster: ClusterConfig) -> dsl.PipelineTask:
    """Give ``task`` its cluster settings, those of its component's stage (``train`` for the
    component ``train``, named ``train`` in KFP too); returns it."""
    settings = cluster.stage(task.component_spec.name.replace("-", "_"))
    task.set_container_image(cluster.image)
    kubernetes.set_image_pull_policy(task, cluster.image_pull_policy)
    task.set_cpu_request(settings.cpu).set_cpu_limit(settings.cpu_limit or settings.cpu)
    task.set_memory_request(settings.memory).set_memory_limit(settings.memory_limit or settings.memory)
    if settings.gpus:
        task.set_accelerator_type(cluster.accelerator_type).set_accelerator_limit(settings.gpus)
        for label, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for toleration in cluster.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration.model_dump())
    if settings.retries:
        task.set_retry(settings.retries, **RETRY_BACKOFF)
    if settings.timeout_minutes:
        kubernetes.set_timeout(task, settings.timeout_minutes * 60)
    s3_secret = settings.s3_secret or cluster.s3_secret
    if s3_secret:
        kubernetes.use_secret_as_env(task, secret_name=s3_secret, secret_key_to_env=S3_SECRET_KEYS)
    if cluster.mlflow_secret:
        kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret, secret_key_to_env=MLFLOW_SECRET_KEYS)
    if cluster.endpoints_config_map:
        kubernetes.use_config_map_as_env(
            task, config_map_name=cluster.endpoints_config_map, config_map_key_to_env=ENDPOINT_KEYS
        )
    kubernetes.set_security_context(task, run_as_user=IMAGE_USER, run_as_group=IMAGE_USER, run_as_non_root=True)
    _writable_dirs(task, settings)
    for name, value in OFFLINE.items():
        task.set_env_variable(name, value)
    task.set_caching_options(enable_caching=cluster.caching)
    return task


def _writable_dirs(task: dsl.PipelineTask, settings: StageResources) -> None:
    """Bounded emptyDirs for every path the stage writes besides KFP's own artifact folders.

    The sizeLimit is the only disk bound kfp can express (no ephemeral-storage request or limit),
    and the mounts are what a read-only root filesystem will need. A GPU stage's /dev/shm is
    memory-backed: the runtime's default (64 MiB) is too small for NCCL and vLLM's workers.
    """
    tmp_limit = settings.ephemeral_storage_limit or settings.ephemeral_storage
    kubernetes.empty_dir_mount(task, volume_name="tmp", mount_path="/tmp", size_limit=tmp_limit)
    kubernetes.empty_dir_mount(task, volume_name="cache", mount_path=CACHE_DIR, size_limit=CACHE_LIMIT)
    if settings.gpus:
        kubernetes.empty_dir_mount(
            task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=settings.shared_memory
        )
