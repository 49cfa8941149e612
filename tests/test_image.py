"""The CPU image, built for real (``docker/build-image``, what ``make image`` runs) and run.

The build takes minutes from cold and seconds with the layer cache; CI builds it first. Every
test here fails, never skips, when no Docker engine can be started: the image is part of the
product. What the image promises a cluster: a numeric non-root user, a read-only root filesystem
with writable /tmp and /cache only, no capability needed, CPU torch and no vLLM, no secret from
the build, labels and the image's own name for the runs' records.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def image(topr_image) -> str:
    return topr_image


def docker(*arguments: str) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"docker {' '.join(arguments)}: {done.stderr[-2000:]}"
    return done


@pytest.fixture(scope="module")
def inspected(image) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]


def run_in(image: str, *command: str, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``command`` in a container of ``image`` secured as ``topr run --runner docker`` secures a task:
    read-only root, anonymous volumes at /tmp and /cache (a pod's emptyDirs), no capabilities."""
    writable = ("--mount", "type=volume,target=/tmp", "--mount", "type=volume,target=/cache")
    pod = ("--read-only", *writable, "--cap-drop", "ALL", "--security-opt", "no-new-privileges")
    return docker("run", "--rm", "--network", "none", *pod, *options, image, *command)


def test_tag_names_the_project_version(image):
    assert image == f"topr:{PYPROJECT['project']['version']}-cpu"


def test_runs_as_a_numeric_non_root_user(image, inspected):
    assert inspected["Config"]["User"] == "1000:1000"
    assert run_in(image, "id", "-u").stdout.strip() == "1000"


def test_topr_runs_with_a_read_only_root_and_no_capabilities(image):
    help_text = run_in(image, "topr", "--help").stdout
    assert "run" in help_text and "train" in help_text
    assert run_in(image).stdout == help_text  # the image's own command explains itself


def test_the_user_writes_only_its_mounts_and_the_kfp_artifact_paths(image):
    script = (
        "import os, pathlib\n"
        "for path in ('/tmp', '/cache', os.environ['HF_HOME']):\n"
        "    pathlib.Path(path).mkdir(parents=True, exist_ok=True); (pathlib.Path(path) / 'x').write_text('x')\n"
        "try:\n"
        "    pathlib.Path('/home/topr/x').write_text('x')\n"
        "except OSError as error:\n"
        "    print('refused', error.errno)\n"
    )
    assert run_in(image, "python", "-c", script).stdout.strip() == "refused 30"  # EROFS
    writable = "import os; print(all(os.access(p, os.W_OK) for p in ('/s3', '/minio', '/gcs', '/cache')))"
    assert docker("run", "--rm", "--network", "none", image, "python", "-c", writable).stdout.strip() == "True"


def test_cpu_torch_no_vllm_no_cuda_libraries(image):
    script = (
        "import importlib.util, importlib.metadata as m, torch\n"
        "print(torch.__version__, torch.backends.cuda.is_built(), importlib.util.find_spec('vllm') is None,\n"
        "      sorted(d.metadata['Name'] for d in m.distributions() if d.metadata['Name'].lower().startswith('nvidia')))\n"
    )
    assert run_in(image, "python", "-c", script).stdout.strip().split(None, 3) == ["2.13.0+cpu", "False", "True", "[]"]


def test_dependencies_are_consistent_and_the_embedded_model_ships(image):
    assert "No broken requirements" in run_in(image, "pip", "check").stdout
    found = run_in(
        image, "python", "-c", "from topr.config import EMBEDDED_MODEL; from topr.models import resolve_model_source as r; print(r(EMBEDDED_MODEL).gguf_file)"
    )
    assert found.stdout.strip().endswith(".gguf")


def test_no_build_secret_in_the_image(image, inspected):
    environment = dict(entry.split("=", 1) for entry in inspected["Config"]["Env"])
    assert not {"PIP_CERT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(environment)
    listing = run_in(image, "sh", "-c", "ls -A /run/secrets 2>/dev/null; ls /usr/local/bin").stdout.split()
    assert "pip_cert" not in listing and "with-pip-cert" not in listing  # mounted for the build only
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "BEGIN CERTIFICATE" not in history


def test_labels_and_the_name_each_run_records(image, inspected):
    labels = inspected["Config"]["Labels"]
    prefix = "org.opencontainers.image."
    assert labels[prefix + "version"] == PYPROJECT["project"]["version"]
    assert labels[prefix + "licenses"] == PYPROJECT["project"]["license"]
    assert labels[prefix + "title"] == PYPROJECT["project"]["name"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode:
        commit += "-dirty"  # built from a tree with uncommitted changes
    assert labels[prefix + "revision"] == commit
    tags = run_in(image, "python", "-c", "from topr.tracking import code_version; print(code_version())").stdout
    assert f"'topr.image': '{image}'" in tags and f"'topr.image.revision': '{commit}'" in tags


def test_no_network_means_no_network(image):
    reach = "import socket\ntry:\n    socket.create_connection(('pypi.org', 443), timeout=3)\nexcept OSError:\n    print('unreachable')\n"
    assert run_in(image, "python", "-c", reach).stdout.strip() == "unreachable"
