"""Serving the champion against the real stack: a pipeline run (kfp.local) with cluster.serve on
promotes its model and writes the KServe manifests for it; `topr serve manifest` writes the same;
`topr serve` answers a real OpenAI-style chat request with the champion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
import yaml
from openai import OpenAI

from topr import storage
from topr.cli import main
from topr.config import load_config
from topr.stack import free_port
from topr.tracking import http_ok
from topr_pipelines.runner import run_local

from test_pipeline import TINY_RUN
from helpers import check_against

NAME = "serve-test"


@pytest.mark.slow
def test_a_promoted_model_gets_its_manifests_and_answers_on_loopback(stack, tmp_path, tiny_model_dir, capsys):
    store = f"s3://{stack.bucket}/serving"
    overrides = [f"model.path={tiny_model_dir}", "run.iterations=1", f"run.artifact_store={store}", f"run.registered_model={NAME}", "cluster.serve.enabled=true", "cluster.serve.gpus=0"]
    run_local(load_config(None, [*overrides, *TINY_RUN]), tmp_path / "run", stack.tracking_uri, NAME)

    client = mlflow.MlflowClient(stack.tracking_uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.tags["topr.serving"] == "written; not applied: not running in a Kubernetes pod"
    (written,) = (tmp_path / "run").rglob("serve/manifest")
    account, service = yaml.safe_load_all(written.read_text())
    check_against("V1beta1InferenceService", service)
    assert service["spec"]["predictor"]["model"]["storageUri"] == champion.tags["topr.model_uri"]
    assert service["metadata"]["annotations"]["topr.io/manifest-sha256"] == champion.tags["topr.manifest_sha256"]
    assert service["metadata"]["annotations"]["topr.io/model-version"] == f"{NAME}/{champion.version}"
    assert account["metadata"]["annotations"]["serving.kserve.io/s3-endpoint"] == stack.s3_endpoint.split("://")[1]

    capsys.readouterr()
    output = tmp_path / "isvc.yaml"
    command = ["serve", "manifest", f"{NAME}@champion", "--tracking-uri", stack.tracking_uri, "-o", str(output), "cluster.serve.gpus=0"]
    assert main(command) == 0
    assert list(yaml.safe_load_all(output.read_text())) == [account, service]
    # A manifest never points at files that changed since the version was registered.
    bucket, key = storage.split_s3(f"{champion.tags['topr.model_uri']}/{storage.MANIFEST_NAME}")
    original = storage.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=original + b" ")
    assert main(command) == 2
    assert f"{NAME}/{champion.version}: {champion.tags['topr.model_uri']}/{storage.MANIFEST_NAME}: SHA-256 differs" in capsys.readouterr().err
    storage.s3_client().put_object(Bucket=bucket, Key=key, Body=original)

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "topr"), "serve", f"{NAME}@champion", "--tracking-uri", stack.tracking_uri, "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not http_ok(f"http://127.0.0.1:{port}/health") and time.monotonic() < deadline:
            assert server.poll() is None, server.stdout.read()
            time.sleep(0.5)
        reply = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused").chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=5
        )
        assert reply.model == NAME and reply.usage.completion_tokens >= 1
        assert isinstance(reply.choices[0].message.content, str)
        (transformers_server,) = psutil.Process(server.pid).children()
        served = Path(transformers_server.cwd(), NAME)
        assert served.is_dir()
    finally:
        os.kill(server.pid, signal.SIGTERM)  # to topr serve alone (systemd, docker stop): it stops its server
        assert server.wait(timeout=30) == 128 + signal.SIGTERM
    assert not psutil.pid_exists(transformers_server.pid) and not served.parent.exists()
