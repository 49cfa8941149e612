"""How each stage runs on a Kubernetes cluster: image, resources, GPUs, secrets, retries, timeouts.

This is the ``cluster`` section of the configuration. It only matters when the pipeline is
compiled for Kubeflow Pipelines (``topr compile``, ``topr submit``, ``topr schedule``);
``topr run`` (kfp.local) ignores it: kfp.local would honour the retries, and ``topr run`` leaves
them out (``topr_pipelines.runner.local_pipeline``). The pipeline applies it to every task (see
``pipelines/cluster_settings.py``); the library itself never imports KFP.

Stage settings merge over the defaults field by field, so a config file may say only::

    cluster:
      stages:
        train: {gpus: 8, memory: 640Gi}
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from topr.workflow import POD_DEFAULTS

DEFAULT_IMAGE = "ghcr.io/topr-project/topr:0.1.0"


def default_image() -> str:
    """The image of every component: $TOPR_IMAGE, else the release image."""
    return os.environ.get("TOPR_IMAGE", DEFAULT_IMAGE)


QUANTITY = re.compile(r"^([0-9]*\.)?[0-9]+(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageResources(_Strict):
    """One stage's pod: requests equal limits unless a limit is given (Guaranteed QoS by default)."""

    cpu: str = Field("1", description="CPU request, e.g. 500m or 8.")
    cpu_limit: str | None = Field(None, description="CPU limit; default: the request.")
    memory: str = Field("2Gi", description="Memory request, e.g. 64Gi.")
    memory_limit: str | None = Field(None, description="Memory limit; default: the request.")
    gpus: int = Field(0, ge=0, description="GPUs (cluster.accelerator_type) for the pod; 0 = CPU only.")
    retries: int = Field(0, ge=0, le=10, description="Retries after a failure, on a cluster: for transient node or network faults, though KFP retries every failure alike.")
    timeout_minutes: int = Field(0, ge=0, description="Kill the pod after this long (activeDeadlineSeconds); 0 = never.")
    ephemeral_storage: str = Field(
        "5Gi",
        description="Local disk the stage writes under /tmp (an emptyDir): staged models, checkpoints, scratch. "
        "kfp 2.17 cannot set a container's ephemeral-storage request, so this is the emptyDir's sizeLimit "
        "(unless ephemeral_storage_limit is given): the kubelet evicts the pod past it.",
    )
    ephemeral_storage_limit: str | None = Field(None, description="sizeLimit of /tmp; default: ephemeral_storage.")
    shared_memory: str = Field(
        "16Gi", description="Size of the memory-backed /dev/shm of a GPU stage (NCCL, vLLM); counts against its memory limit."
    )
    s3_secret: str | None = Field(
        None, description="Secret with this stage's S3 keys (e.g. read-only ones); default: cluster.s3_secret."
    )

    @field_validator(
        "cpu", "cpu_limit", "memory", "memory_limit", "ephemeral_storage", "ephemeral_storage_limit", "shared_memory"
    )
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not QUANTITY.match(str(value)):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 8, 64Gi)")
        return None if value is None else str(value)


class Toleration(_Strict):
    key: str | None = Field(None, description="Taint key; empty with operator Exists tolerates every taint.")
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class ServeConfig(_Strict):
    """Serving the promoted model with KServe (``topr.serve``): the ``serve`` stage after ``promote``."""

    enabled: bool = Field(
        False,
        description="After a promotion, write the champion's KServe InferenceService (and a ServiceAccount with "
        "cluster.s3_secret) and apply it when the pipeline runs in a cluster with KServe; needs run.artifact_store.",
    )
    name: str | None = Field(None, description="The InferenceService's name; default: the registered model's, as a DNS label.")
    namespace: str | None = Field(None, description="Its namespace; default: the pipeline pod's.")
    runtime: str = Field("kserve-huggingfaceserver", description="The KServe ServingRuntime (its Hugging Face server).")
    gpus: int = Field(1, ge=0, description="GPUs (cluster.accelerator_type) of the predictor: > 0 serves with vLLM, 0 with the Hugging Face backend on CPU.")
    cpu: str = Field("4", description="CPU request and limit of the predictor.")
    memory: str = Field("16Gi", description="Memory request and limit of the predictor.")
    min_replicas: int = Field(1, ge=0, description="Fewest predictor replicas (0 lets it scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most predictor replicas.")
    service_account: str = Field("topr-serve", description="The ServiceAccount that hands KServe the S3 Secret.")
    args: list[str] = Field(default_factory=list, description="More arguments of the runtime, e.g. --max_model_len=4096.")

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        if not QUANTITY.match(str(value)):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 500m, 8, 64Gi)")
        return str(value)

    @model_validator(mode="after")
    def _replicas_in_order(self) -> ServeConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas={self.max_replicas} is below min_replicas={self.min_replicas}")
        return self


class ClusterConfig(_Strict):
    image: str = Field(
        default_factory=default_image,
        description="Container image of every component (default: $TOPR_IMAGE or the release image).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Kubernetes imagePullPolicy of every component."
    )
    accelerator_type: str = Field("nvidia.com/gpu", description="Resource name of the GPUs that stages ask for.")
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a GPU stage must run on, e.g. {nvidia.com/gpu.product: H100}."
    )
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Tolerations of GPU stages (GPU node pools are usually tainted).",
    )
    s3_secret: str | None = Field(
        "topr-s3-credentials",
        description="Secret with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for object storage; null = none.",
    )
    mlflow_secret: str | None = Field(
        None, description="Secret with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, if MLflow needs auth."
    )
    endpoints_config_map: str | None = Field(
        "topr-endpoints", description="ConfigMap with AWS_ENDPOINT_URL and MLFLOW_S3_ENDPOINT_URL; null = none."
    )
    caching: bool = Field(
        False, description="Let Kubeflow reuse a task's earlier outputs; off because stages log to MLflow."
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving the champion with KServe after a promotion.")
    stages: dict[str, StageResources] = Field(
        default_factory=lambda: {name: StageResources(**fields) for name, fields in POD_DEFAULTS.items()},
        description="Per-stage pod settings (cpu, memory, gpus, retries, timeout_minutes, ephemeral_storage, "
        "shared_memory, s3_secret), merged over the defaults.",
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _merge_over_defaults(cls, given: Any) -> Any:
        if not isinstance(given, dict):
            return given
        unknown = sorted(set(given) - set(POD_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} (choices: {', '.join(POD_DEFAULTS)})")
        merged = {}
        for name, defaults in POD_DEFAULTS.items():
            override = given.get(name) or {}
            if isinstance(override, StageResources):
                override = override.model_dump(exclude_unset=True)
            merged[name] = {**defaults, **override}
        return merged

    def stage(self, name: str) -> StageResources:
        return self.stages[name]
