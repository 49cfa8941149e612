"""What ``topr run --runner docker`` decides before any container starts: which services the
containers may reach, how their addresses move, and the forwarder that carries their bytes."""

from __future__ import annotations

import socket
import threading

import pytest

from topr_pipelines.docker_runner import DockerRunnerError, forward, loopback_address, moved


@pytest.mark.parametrize(
    ("url", "address"),
    [("http://127.0.0.1:5000", ("127.0.0.1", 5000)), ("http://localhost:8333/", ("localhost", 8333)), ("https://127.0.0.1", ("127.0.0.1", 443))],
)
def test_services_on_loopback_are_reachable(url, address):
    assert loopback_address(url, "the tracking URI") == address


@pytest.mark.parametrize("url", ["http://mlflow.example.org:5000", "sqlite:///runs/mlflow.db", "http://10.0.0.5:5000", "file:///tmp/mlruns"])
def test_anything_else_is_refused_by_name(url):
    with pytest.raises(DockerRunnerError, match="not a service on this machine's loopback") as refused:
        loopback_address(url, "the tracking URI")
    assert url in str(refused.value) and "the tracking URI" in str(refused.value)


def test_an_address_moves_with_its_path_kept():
    assert moved("http://127.0.0.1:5000/api?x=1", ("172.18.0.1", 40123)) == "http://172.18.0.1:40123/api?x=1"


def test_the_forwarder_carries_both_directions_and_the_end_of_each():
    upstream = socket.create_server(("127.0.0.1", 0))
    received = []

    def serve_once():
        connection, _ = upstream.accept()
        with connection:
            while chunk := connection.recv(65536):
                received.append(chunk)
            connection.sendall(b"reply:" + b"".join(received)[:5])

    server = threading.Thread(target=serve_once)
    server.start()
    forwarder = forward("127.0.0.1", upstream.getsockname()[:2])
    try:
        with socket.create_connection(forwarder.address, timeout=10) as client:
            client.sendall(b"x" * 300_000)
            client.shutdown(socket.SHUT_WR)  # the server reads to the end, then answers
            answer = b"".join(iter(lambda: client.recv(65536), b""))
    finally:
        forwarder.close()
        server.join(10)
        upstream.close()
    assert len(b"".join(received)) == 300_000
    assert answer == b"reply:xxxxx"


def test_removing_the_runs_containers_never_fails_the_run():
    """As a run ends, Docker may be removing its last container already (``auto_remove``): the
    409 that a second removal meets, or an engine that does not answer, leaves the run's outcome
    alone (it once failed a run that had succeeded). A real engine can't be made to race on cue,
    so the engine's replies are injected."""
    import docker

    from topr_pipelines.docker_runner import RUN_LABEL, remove_containers

    class Container:
        short_id, name = "c5d07cd15801", "train"

        def __init__(self, error):
            self.error, self.removed = error, False

        def remove(self, force):
            if self.error:
                raise self.error
            self.removed = force

    class Containers:
        def __init__(self, listing):
            self.listing, self.filters = listing, None

        def list(self, filters):
            self.filters = filters
            if isinstance(self.listing, Exception):
                raise self.listing
            return self.listing

    class Client:
        def __init__(self, listing):
            self.containers = Containers(listing)

    in_progress = docker.errors.APIError("Conflict", response=type("Response", (), {"status_code": 409, "reason": "Conflict"})())
    running, ending, gone = Container(None), Container(in_progress), Container(docker.errors.NotFound("gone"))
    client = Client([running, ending, gone])
    remove_containers(client, "host 42 1.0")
    assert running.removed and client.containers.filters == {"label": f"{RUN_LABEL}=host 42 1.0", "status": "running"}
    remove_containers(Client(docker.errors.DockerException("no engine answers")), "host 42 1.0")
