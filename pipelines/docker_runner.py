"""Run every task of the pipeline in its own container of topr's image, as a cluster's pods run.

``topr run --runner docker`` hands kfp.local a ``DockerRunner`` whose containers get what the
pipeline's pod spec gives a pod (``pipelines/cluster_settings.py``, docs/deploy.md):

- user 1000:1000, plus the group of whoever runs ``topr run``: kfp.local bind-mounts the
  pipeline root at its host path, which the run makes group-writable for them;
- a read-only root filesystem, writable only at /tmp and /cache (anonymous volumes, one per
  container, as the pod's emptyDirs are one per pod);
- every capability dropped, no privilege escalation (``no-new-privileges``);
- no network but the stack's: an internal Docker network (no route out of the machine) on which
  this process forwards the MLflow server's and the S3 store's ports, and nothing else, from the
  network's gateway to their loopback addresses (``topr up`` binds them to 127.0.0.1).

Each container is told the image it runs (``TOPR_IMAGE_REF``, ``TOPR_IMAGE_DIGEST``), which every
stage's MLflow run records as a tag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from topr.tracking import OWNER_ENV

log = logging.getLogger(__name__)

NETWORK = "topr-stack"
"""The internal Docker network the tasks' containers join (made when missing)."""
IMAGE_USER = "1000:1000"
WRITABLE = ("/tmp", "/cache")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
THROUGH_THE_SERVER = ("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD")
"""An MLflow server that offers multipart transfers hands its clients presigned URLs of its own
S3 endpoint (a loopback address here, which a container cannot reach): artifacts go through the
server instead."""
RUN_LABEL = "topr.run.owner"
"""The label of every container of one ``topr run``: its owner (``topr.tracking.OWNER_ENV``)."""
PASSED_ENV_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TOPR_", "OMP_", "TOKENIZERS_")
"""Host variables a container gets (credentials, endpoints, offline switches, thread counts);
the rest of the host's environment stays out, as it stays out of a pod."""


class DockerRunnerError(RuntimeError):
    """The Docker runner cannot run here: no engine, no image, or a service it cannot reach."""


@dataclass
class Forwarder:
    """A TCP port on the gateway whose connections are piped to ``server.target`` (host, port)."""

    server: socketserver.ThreadingTCPServer

    @property
    def address(self) -> tuple[str, int]:
        return self.server.server_address[:2]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Pipe(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        try:
            upstream = socket.create_connection(self.server.target, timeout=30)
        except OSError as error:
            log.warning("docker runner: cannot reach %s:%d for a container: %s", *self.server.target, error)
            return
        upstream.settimeout(None)
        with upstream:
            other = threading.Thread(target=_copy, args=(upstream, self.request), daemon=True)
            other.start()
            _copy(self.request, upstream)
            other.join()


def _copy(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until ``source`` ends; then end ``sink``'s writing side."""
    try:
        while chunk := source.recv(1 << 16):
            sink.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def forward(gateway: str, target: tuple[str, int]) -> Forwarder:
    """Listen on ``gateway`` (a free port) and pipe every connection to ``target``, in threads."""
    server = socketserver.ThreadingTCPServer((gateway, 0), _Pipe, bind_and_activate=True)
    server.daemon_threads = True
    server.target = target
    threading.Thread(target=server.serve_forever, name=f"forward-{target[1]}", daemon=True).start()
    return Forwarder(server)


def loopback_address(url: str, what: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL on this machine's loopback, or a clear error."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
        raise DockerRunnerError(
            f"--runner docker: {what} {url!r} is not a service on this machine's loopback; the containers reach "
            "only the stack that 'topr up' starts (an http://127.0.0.1:PORT MLflow server and S3 store)"
        )
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def moved(url: str, address: tuple[str, int]) -> str:
    """``url`` with its host and port replaced by ``address``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{address[0]}:{address[1]}"))


def stack_network(client) -> str:
    """The internal network's gateway address (the network made when missing)."""
    import docker

    try:
        network = client.networks.get(NETWORK)
    except docker.errors.NotFound:
        network = client.networks.create(NETWORK, driver="bridge", internal=True, check_duplicate=True)
        network.reload()
    if not network.attrs.get("Internal"):
        raise DockerRunnerError(f"Docker network {NETWORK!r} exists but is not internal: remove it (docker network rm {NETWORK})")
    configs = network.attrs["IPAM"]["Config"]
    if not configs or not configs[0].get("Gateway"):
        raise DockerRunnerError(f"Docker network {NETWORK!r} has no gateway address")
    return configs[0]["Gateway"]


def docker_client():
    try:
        import docker
    except ImportError as error:
        raise DockerRunnerError("--runner docker needs the docker package: pip install 'topr[workflow]'") from error
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        raise DockerRunnerError(f"--runner docker: no Docker engine answers ({error}); start one (as root: docker/start-engine)") from error
    return client


def image_digest(client, image: str) -> str:
    """The image's content digest (its id), or a clear error when it is not on this machine."""
    import docker

    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        raise DockerRunnerError(f"--runner docker: image {image!r} is not on this machine; build it with 'make image'") from None


S3_ENDPOINTS = ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


def stack_services(tracking_uri: str, environment: dict[str, str]) -> dict[str, tuple[str, tuple[str, int]]]:
    """The services the containers need (the tracking server, the S3 store where an endpoint is
    set): each variable that names one, with its URL and its (loopback) address."""
    urls = {"MLFLOW_TRACKING_URI": tracking_uri} | {name: environment[name] for name in S3_ENDPOINTS if environment.get(name)}
    return {
        name: (url, loopback_address(url, "the tracking URI" if name == "MLFLOW_TRACKING_URI" else f"the S3 endpoint ({name})"))
        for name, url in urls.items()
    }


def preflight(image: str, tracking_uri: str) -> None:
    """Fail before the run starts when its containers could not run: no engine, no image, or a
    service they could not reach; warn when the image holds other code than this checkout (the
    tasks parse the configuration this process writes, so a field one side lacks fails them)."""
    from topr.tracking import code_version

    stack_services(tracking_uri, dict(os.environ))
    client = docker_client()
    try:
        image_digest(client, image)
        built_from = client.images.get(image).labels.get("org.opencontainers.image.revision", "")
    finally:
        client.close()
    checkout = code_version().get("topr.git_commit")
    if checkout and built_from != checkout:
        log.warning("image %s was built from %s, this checkout is at %s: rebuild it (make image) if the code differs", image, built_from or "an unknown commit", checkout)


@dataclass
class ContainerSetup:
    """What ``runner`` needs: the kfp.local runner, and the tracking URI as the containers see it."""

    runner: object
    tracking_uri: str


@contextlib.contextmanager
def docker_runner(image: str, tracking_uri: str, pipeline_root: Path) -> Iterator[ContainerSetup]:
    """A kfp.local ``DockerRunner`` for ``image`` whose containers reach only the stack (see module
    doc), the forwarders living as long as the block.

    ``pipeline_root`` is made here, group-writable, before any container mounts it: a missing
    bind-mount source would be made by the Docker daemon, owned by root and closed to user 1000.
    """
    from docker.types import Mount
    from kfp import local

    pipeline_root.mkdir(parents=True, exist_ok=True)
    pipeline_root.chmod(0o775)
    client = docker_client()
    digest = image_digest(client, image)
    gateway = stack_network(client)
    environment = {name: value for name, value in os.environ.items() if name.startswith(PASSED_ENV_PREFIXES)}
    services = stack_services(tracking_uri, environment)
    forwarders = {address: forward(gateway, address) for _, address in services.values()}
    environment.update({name: moved(url, forwarders[address].address) for name, (url, address) in services.items()})
    environment.update({"TOPR_IMAGE_REF": image, "TOPR_IMAGE_DIGEST": digest})
    for name in THROUGH_THE_SERVER:
        environment.setdefault(name, "false")
    owner = os.environ.get(OWNER_ENV) or f"{socket.gethostname()} {os.getpid()}"
    runner = local.DockerRunner(
        labels={RUN_LABEL: owner},
        user=IMAGE_USER,
        group_add=[str(os.getgid())],
        read_only=True,
        mounts=[Mount(target=path, source=None, type="volume") for path in WRITABLE],
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        network=NETWORK,
        environment=environment,
    )
    try:
        yield ContainerSetup(runner, environment["MLFLOW_TRACKING_URI"])
    finally:
        remove_containers(client, owner)
        for forwarder in forwarders.values():
            forwarder.close()
        client.close()


def remove_containers(client, owner: str) -> None:
    """Remove the containers of the run ``owner`` runs that still run: none after a run that
    ended by itself (each is removed as its task ends), the running tasks' after a signal or an
    error stopped it, as a pod goes with its pipeline run. Never raises: whatever stopped the run
    (or its success) is what it reports."""
    import docker

    try:
        running = client.containers.list(filters={"label": f"{RUN_LABEL}={owner}", "status": "running"})
    except docker.errors.DockerException as error:
        log.warning("docker runner: could not list the run's containers to remove them: %s", error)
        return
    for container in running:
        try:
            container.remove(force=True)
            log.warning("docker runner: removed container %s (%s), left running as the run stopped", container.short_id, container.name)
        except docker.errors.NotFound:
            pass  # removed as its task ended, meanwhile
        except docker.errors.DockerException as error:
            if getattr(error, "status_code", None) != 409:  # 409: its task ended and Docker is removing it already
                log.warning("docker runner: could not remove container %s (%s): %s", container.short_id, container.name, error)
