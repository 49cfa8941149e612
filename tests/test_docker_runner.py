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
