"""Shared fixtures: a tiny Llama policy built from a config, with the real SmolLM2 tokenizer.

Most tests use ``tiny_model_dir`` (random weights, 2 layers, the default model's real
tokenizer and chat template), saved once per session as a Hugging Face directory exactly as
``topr.models.save_policy`` writes it; ``policy`` and ``peaked_policy`` load it, once per test
module. Tests marked ``slow`` use the real embedded model. Plain helper functions shared by
several modules (``write_jsonl``, ``train_config``, ...) are in ``helpers.py``.
"""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from topr import promotion, storage
from topr.config import EMBEDDED_MODEL

torch.set_num_threads(2)

INTEGRATION = Path(__file__).resolve().parent / "integration"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(items):
    """Every test under tests/integration/ is marked ``integration``: ``make test`` runs them in its
    second lane, with the ``slow`` ones, after the fast lane (``make test-fast``) has passed."""
    for item in items:
        if item.path.resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def real_tokenizer():
    from topr.models import load_tokenizer

    return load_tokenizer(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    from topr.models import save_policy

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(real_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=real_tokenizer.bos_token_id,
        eos_token_id=real_tokenizer.eos_token_id,
        pad_token_id=real_tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_policy(model, real_tokenizer, path, provenance={"source": "tests/conftest.py tiny Llama"})
    return str(path)


@pytest.fixture(scope="session")
def nan_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny policy with one NaN weight in its output head: every log-probability is NaN."""
    from topr.models import load_policy, save_policy

    model, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    path = tmp_path_factory.mktemp("nan") / "model"
    save_policy(model, tokenizer, path, provenance={"source": "tests/conftest.py tiny Llama with a NaN weight"})
    return str(path)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    """``(model, tokenizer)``: the tiny policy loaded on the CPU, once per test module."""
    from topr.models import load_policy

    return load_policy(tiny_model_dir, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def peaked_policy(tiny_model_dir):
    """``(model, tokenizer)``: the tiny policy with a separate random output head of a larger
    scale (N(0, 0.5²), seed 0), once per test module. The tied head gives near-uniform next-token
    distributions; this one gives varied, peaked ones, so that temperature, top-k truncation and
    padding errors show."""
    from topr.models import load_policy

    model, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    head = torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    model.lm_head.weight = torch.nn.Parameter(head)
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
    return model, tokenizer


RECURRING_RUN = {"recurring_run_id": "rr-1", "display_name": "nightly", "status": "ENABLED", "trigger": {"cron_schedule": {"cron": "0 0 3 * * *"}}}


class RecordingApi(BaseHTTPRequestHandler):
    """Answers the few Kubeflow Pipelines v2beta1 calls the client makes, and records each request."""

    requests: list[tuple[str, str, dict]] = []
    authorizations: list[str | None] = []
    cookies: list[str | None] = []

    def _answer(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.requests.append((method, self.path, body))
        self.authorizations.append(self.headers.get("Authorization"))
        self.cookies.append(self.headers.get("Cookie"))
        path = self.path.split("?")[0]
        if path == "/apis/v2beta1/experiments" and method == "GET":
            payload = {}
        elif path == "/apis/v2beta1/experiments":
            payload = {"experiment_id": "exp-1", "display_name": body.get("display_name")}
        elif path == "/apis/v2beta1/recurringruns" and method == "POST":
            payload = {**body, "recurring_run_id": "rr-1"}
        elif path == "/apis/v2beta1/runs" and method == "POST":
            payload = {**body, "run_id": "run-1"}
        elif path == "/apis/v2beta1/recurringruns":
            payload = {"recurringRuns": [RECURRING_RUN], "total_size": 1}
        else:
            payload = {}
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_DELETE(self):
        self._answer("DELETE")

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    """A loopback Kubeflow Pipelines API: yields ``(host, requests)``; requests are (method, path, body)."""
    RecordingApi.requests, RecordingApi.authorizations, RecordingApi.cookies = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RecordingApi.requests
    server.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny models of the unit tests run faster on one thread than synchronising several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on loopback (starts in a fraction of a second); its URL."""
    from moto.server import ThreadedMotoServer

    from topr.stack import free_port

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def kfp_authorizations(kfp_api) -> list[str | None]:
    """The Authorization header of every request the loopback Kubeflow API received."""
    return RecordingApi.authorizations


@pytest.fixture
def kfp_cookies(kfp_api) -> list[str | None]:
    """The Cookie header of every request the loopback Kubeflow API received."""
    return RecordingApi.cookies


@pytest.fixture
def s3(s3_endpoint, monkeypatch, request):
    """A fresh bucket on the moto server; its URI prefix."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    bucket = f"topr-tests-{request.node.name.replace('_', '-')[:40].lower()}"
    storage.s3_client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def promotion_race():
    """Runs ``promote(version)`` for every version at the same moment, each in its own thread;
    returns the version that won and the text of the other's refusal."""

    def race(promote, versions: tuple[str, str]) -> tuple[str, str]:
        start, outcomes = threading.Barrier(len(versions)), {}

        def attempt(version: str) -> None:
            start.wait()
            try:
                promote(version)
                outcomes[version] = "won"
            except promotion.PromotionRefused as refusal:
                outcomes[version] = str(refusal)

        threads = [threading.Thread(target=attempt, args=(version,)) for version in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        (winner,) = [version for version, outcome in outcomes.items() if outcome == "won"]
        (loser,) = set(outcomes) - {winner}
        return winner, outcomes[loser]

    return race


@pytest.fixture(scope="session")
def topr_image() -> str:
    """The CPU image, built by ``docker/build-image`` (what ``make image`` runs: seconds with the
    layer cache); the Docker engine started first, installed if missing (as root). Fails, never
    skips, when either cannot be done."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    built = subprocess.run(
        [str(root / "docker" / "build-image")], cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}
    )
    assert built.returncode == 0, f"docker/build-image failed:\n{built.stderr[-4000:]}"
    return built.stdout.strip().splitlines()[-1]
