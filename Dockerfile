# topr's container image: one image for every Kubeflow Pipelines component and for `topr` on a
# cluster. The components (components/*/component.py) run in it with install_kfp_package=False,
# so kfp comes from the project's own dependencies (its workflow extra in pyproject.toml).
#
# Build from the repository root with BuildKit (Docker >= 20.10; no `# syntax=` line, so the
# builder's own Dockerfile frontend is used and nothing is pulled to parse this file):
#   docker build -t ghcr.io/topr-project/topr:0.1.0 .                               # GPU (default)
#   docker build -t ghcr.io/topr-project/topr:0.1.0-cpu --build-arg VARIANT=cpu .   # CPU only
#   make image       the CPU variant on a machine that reaches only Debian's archive and PyPI
#                    (docker/build-image: a Debian base made with debootstrap, local wheels)
#
#   VARIANT=gpu  CUDA 13.0 runtime on Ubuntu 24.04 (Python 3.12), torch 2.13.0+cu130 and
#                vLLM 0.32.0, whose wheel requires exactly torch==2.13.0 (0.33 moved to 2.14,
#                outside pyproject's torch<2.14); topr installed with its [workflow,gpu] extras.
#                Nodes need an NVIDIA driver that supports CUDA 13 (>= 580).
#   VARIANT=cpu  a Debian bookworm Python (CPU_BASE), torch 2.13.0+cpu, no vLLM
#                (sample.engine=transformers).
#
# Build arguments for builders without a registry or PyTorch's index:
#   CPU_BASE, GPU_BASE  the base images (default: the public ones below). CPU_BASE needs python3
#                with venv and CA certificates, e.g. a debootstrap'ed Debian (docker/make-base).
#   TORCH_INDEX_URL     where the torch wheel comes from (default PyTorch's CPU or CUDA index);
#                       empty: only PyPI and docker/wheels/.
#   docker/wheels/      wheels in this folder of the build context are preferred over any index
#                       (`make image` puts the CPU torch wheel and llama-cpp-python, built once on
#                       the host, there); it holds only a README otherwise.
#   secret pip_cert     a CA bundle for pip (`--secret id=pip_cert,src=FILE`), for networks that
#                       re-sign TLS; mounted only while pip runs, never a layer of the image.
#
# Base images are pinned to exact version tags. For byte-for-byte reproducible builds pin their
# digests as well, FROM <image>:<tag>@sha256:<digest> (`docker buildx imagetools inspect
# <image>:<tag>` prints it); they are not written here because this project's build environment
# cannot reach a registry to read them, and a made-up digest would only break the build.
#
# At run time:
#   * user 1000:1000, numeric so that Kubernetes can check runAsNonRoot; the installed code is
#     owned by root and read-only for it; the image runs with a read-only root filesystem when
#     /tmp and /cache are mounted writable (the pipeline's pods mount emptyDirs there);
#   * caches (Hugging Face, torch/Triton/vLLM compile caches, matplotlib) go under /cache,
#     writable by that user: mount a volume there to keep them between pods;
#   * HF_HUB_OFFLINE is deliberately not set, so a cluster with access to the Hugging Face Hub
#     can load models by id. Set HF_HUB_OFFLINE=1 in the pod where models only come from S3 or
#     the image (pipeline pods do, pipelines/cluster_settings.py; so does k8s/examples/trainjob.yaml);
#   * no credentials of any kind: S3 keys and MLflow settings come from Kubernetes Secrets and
#     ConfigMaps at run time (k8s/README.md);
#   * TOPR_IMAGE_REF names the image it was built as (the IMAGE build argument), so every MLflow
#     run of a stage records the image it ran in.

ARG VARIANT=gpu
ARG CPU_BASE=python:3.12.12-slim-bookworm
ARG GPU_BASE=nvidia/cuda:13.0.2-runtime-ubuntu24.04

# --- wheel: topr built once, as a wheel, from a clean copy of the sources (not editable) -------
FROM ${CPU_BASE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
COPY components ./components
COPY pipelines ./pipelines
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=docker/with-pip-cert,target=/usr/local/bin/with-pip-cert \
    python3 -m venv /tmp/build-venv \
 && with-pip-cert /tmp/build-venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# --- base-gpu: CUDA runtime, Python, CUDA torch and vLLM ---------------------------------------
FROM ${GPU_BASE} AS base-gpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
# gcc, the libc and Python headers: Triton (under vLLM and torch.compile) compiles small C
# launchers at run time and fails without them. The cuDNN/cuBLAS/NCCL libraries come with
# torch's wheels, so the plain "runtime" image is enough (no "-cudnn-" variant).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TOPR_VARIANT=gpu \
    TOPR_EXTRAS=[workflow,gpu]
# torch first, from PyTorch's CUDA 13.0 index, then the vLLM release built against that exact
# torch (pip keeps the installed 2.13.0+cu130: it satisfies vllm's torch==2.13.0).
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=docker/with-pip-cert,target=/usr/local/bin/with-pip-cert \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    with-pip-cert pip install --no-cache-dir --find-links /wheels ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} torch==2.13.0 \
 && with-pip-cert pip install --no-cache-dir vllm==0.32.0

# --- base-cpu: Python and CPU torch, nothing CUDA ----------------------------------------------
FROM ${CPU_BASE} AS base-cpu
# The CPU index: the default torch wheel would pull several GB of CUDA libraries.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    TOPR_VARIANT=cpu \
    TOPR_EXTRAS=[workflow]
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=docker/with-pip-cert,target=/usr/local/bin/with-pip-cert \
    --mount=type=bind,source=docker/wheels,target=/wheels \
    with-pip-cert pip install --no-cache-dir --find-links /wheels ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} torch==2.13.0

# --- runtime: the image, on the base that VARIANT selects --------------------------------------
FROM base-${VARIANT} AS runtime

# The user, uid/gid 1000 (Ubuntu 24.04 images ship a user "ubuntu" with that uid: remove it).
# /cache holds every cache. /s3, /minio and /gcs are where the KFP v2 launcher puts a
# component's input and output artifacts (a fixed contract of KFP's Python components); as
# root-owned directories they would make every artifact-passing task fail for a non-root user.
# Group 0 may write too, for platforms that run images under an arbitrary uid in group 0.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
 && if getent group 1000 >/dev/null; then groupdel "$(getent group 1000 | cut -d: -f1)"; fi \
 && groupadd --gid 1000 topr \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/topr --shell /bin/bash topr \
 && mkdir -p /cache /s3 /minio /gcs \
 && chown 1000:0 /cache /s3 /minio /gcs \
 && chmod 0775 /cache /s3 /minio /gcs

# Caches under /cache. HF_HOME covers transformers' and huggingface_hub's caches
# (TRANSFORMERS_CACHE is deprecated in favour of it).
ENV HOME=/home/topr \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_CACHE_ROOT=/cache/vllm \
    MPLCONFIGDIR=/cache/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# topr's dependencies, read from pyproject.toml with the extras its base chose ([workflow], and
# [gpu] on GPU, whose vLLM is already installed and pinned above), in a layer of their own: it is
# rebuilt only when pyproject.toml changes, not with every change of the code. Then topr itself
# from the wheel, and `pip check` fails the build on any inconsistent pin.
# --prefer-binary with docker/wheels: a wheel built on the host (llama-cpp-python, which the
# embedded model's package requires and PyPI has only as a C++ source of ~11 min on 2 cores) wins
# over a newer source release.
RUN --mount=type=secret,id=pip_cert --mount=type=bind,source=docker/with-pip-cert,target=/usr/local/bin/with-pip-cert \
    --mount=type=bind,source=docker/wheels,target=/wheels --mount=type=bind,source=pyproject.toml,target=/pyproject.toml \
    python3 -c 'import sys, tomllib; project = tomllib.load(open("/pyproject.toml", "rb"))["project"]; \
extras = sys.argv[1].strip("[]").split(","); \
print("\n".join(project["dependencies"] + [d for e in extras for d in project["optional-dependencies"][e]]))' \
        "${TOPR_EXTRAS}" > /tmp/requirements.txt \
 && with-pip-cert pip install --no-cache-dir --prefer-binary --find-links /wheels -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    pip install --no-cache-dir --no-deps /dist/topr-*.whl \
 && pip check

# What changes with every commit comes last, so that the layers above stay cached.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG IMAGE=topr:${VERSION}
LABEL org.opencontainers.image.title="topr" \
      org.opencontainers.image.description="TOPR (Tapered Off-Policy REINFORCE) fine-tuning of LLMs as Kubeflow Pipelines steps" \
      org.opencontainers.image.source="https://github.com/topr-project/topr" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
ENV TOPR_IMAGE_REF=${IMAGE} \
    TOPR_REVISION=${REVISION}

USER 1000:1000
WORKDIR /home/topr
# The console script works for the unprivileged user.
RUN topr --help > /dev/null

# Kubeflow replaces the command of every component; on its own the image explains itself.
CMD ["topr", "--help"]
