"""``topr lineage`` on a sqlite MLflow store with hand-made versions."""

from __future__ import annotations

import mlflow

from topr.lineage import trace
from topr.tracking import default_tracking_uri


def register(client, run_id: str, digest: str, parent_digest: str):
    tags = {
        "topr.model_uri": f"/models/{digest}",
        "topr.weights_sha256": digest,
        "topr.parent_weights_sha256": parent_digest,
        "topr.parent_model_uri": "/models/base",
        "topr.train_set_uri": "/data/train_set.jsonl",
        "topr.samples_uri": "/data/samples.jsonl",
    }
    return client.create_model_version("looped", f"/models/{digest}", run_id=run_id, tags=tags)


def test_a_chain_that_loops_back_on_itself_ends(tmp_path):
    """Two versions with the same weights (a step of learning rate 0 changes nothing) each name
    the other as parent; the chain lists each once and ends at the base model."""
    tracking_uri = default_tracking_uri(tmp_path)
    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment("lineage")).info.run_id
    client.create_registered_model("looped")
    register(client, run_id, "aaaa", "aaaa")  # its own parent
    register(client, run_id, "aaaa", "aaaa")
    chain = trace(tracking_uri, "looped/2")
    models = [link.name for link in chain if link.kind == "model"]
    assert models == ["looped/2", "looped/1"]
    assert chain[-1].kind == "base model"
