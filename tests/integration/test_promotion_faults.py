"""The tracking server lost at each step of a promotion, with MLflow's client retrying requests
(its default) and not: whatever was lost, the alias, its history, the versions' tags and the lock
agree afterwards, and the next run's promotion goes through.

A pass-through proxy sits between the client and the real MLflow server. At the chosen request
it forwards the request (or not) and drops the reply, then refuses every request until the test
brings the server back: what a server killed at that instant looks like to the client.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from topr import promotion
from topr.stack import free_port

ALIAS = "champion"

# step: (method, path of the request at which the server is lost, whether it reached the server, which one)
STEPS = {
    "before the lock": ("POST", "/registered-models/create", False, 1),
    "after the lock": ("POST", "/registered-models/create", True, 1),
    "after the alias": ("POST", "/registered-models/alias", True, 1),
    "after the history": ("POST", "/registered-models/set-tag", True, 2),  # the move recorded done
}


class LosingProxy(ThreadingHTTPServer):
    """Forwards to ``upstream`` until the ``count``-th request matching ``method`` and ``path``."""

    daemon_threads = True

    def __init__(self, upstream: str):
        super().__init__(("127.0.0.1", free_port()), Handler)
        self.upstream = urlsplit(upstream).netloc
        self.fault: tuple[str, str, bool, int] | None = None
        self.down = False
        self.lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def lose_at(self, method: str, path: str, forwarded: bool, count: int) -> None:
        self.fault, self.down = (method, path, forwarded, count), False

    def restore(self) -> None:
        self.fault, self.down = None, False

    def decide(self, method: str, path: str) -> tuple[bool, bool]:
        """Whether to forward this request, and whether to answer it."""
        with self.lock:
            if self.down:
                return False, False
            if self.fault and self.fault[0] == method and path.endswith(self.fault[1]):
                fault_method, fault_path, forwarded, count = self.fault
                if count > 1:
                    self.fault = (fault_method, fault_path, forwarded, count - 1)
                    return True, True
                self.down = True
                return forwarded, False
            return True, True


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        forward, answer = self.server.decide(self.command, urlsplit(self.path).path)
        if forward:
            upstream = http.client.HTTPConnection(self.server.upstream, timeout=30)
            headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "connection")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            reply = upstream.getresponse()
            payload = reply.read()
            upstream.close()
        if not answer:
            self.close_connection = True  # the reply is lost with the server
            return
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _relay


@pytest.fixture
def proxy(stack):
    server = LosingProxy(stack.tracking_uri)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("retries", ["retried", "not retried"])
@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_promotion_that_loses_the_server_leaves_a_state_the_next_run_proceeds_from(stack, proxy, monkeypatch, step, retries):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2" if retries == "retried" else "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    monkeypatch.setattr(promotion, "LOCK_WAIT_S", 2.0)
    direct = mlflow.MlflowClient(stack.tracking_uri)
    name = f"lost-{step.replace(' ', '-')}-{retries.replace(' ', '-')}"
    direct.create_registered_model(name)
    first, second = (str(direct.create_model_version(name, f"s3://{stack.bucket}/{name}/m{i}").version) for i in (1, 2))
    experiment = direct.create_experiment(name)
    runs = [direct.create_run(experiment).info.run_id for _ in range(2)]

    proxy.lose_at(*STEPS[step])
    with pytest.raises(MlflowException):
        promotion.promote(mlflow.MlflowClient(proxy.uri), name, ALIAS, first, None, runs[0])
    proxy.restore()
    direct.set_terminated(runs[0], "FAILED")  # the run's exit handler ends it

    champion = promotion.alias_version(direct, name, ALIAS)  # what the next run's gate beats
    promotion.promote(mlflow.MlflowClient(proxy.uri), name, ALIAS, second, champion, runs[1])

    moves = [(move["version"], move.get("state")) for move in promotion.alias_history(direct, name, ALIAS)]
    expected = [first, second] if step in ("after the alias", "after the history") else [second]
    assert moves == [(version, None) for version in expected]
    assert promotion.alias_version(direct, name, ALIAS) == second
    tags = {version: direct.get_model_version(name, version).tags.get("topr.promotion", "") for version in (first, second)}
    assert {version for version, tag in tags.items() if tag.startswith("promoted")} == set(expected)
    assert direct.search_registered_models(f"name = '{name}{promotion.LOCK_SUFFIX}'") == []
