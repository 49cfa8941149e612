"""A run with LoRA against the real stack: it publishes the merged model with its adapter, and
lineage names the adapter, on its base model's weights, and verifies it in object storage."""

from __future__ import annotations

import json

import pytest

from test_experiment_run import TINY
from test_object_storage import object_keys
from topr.cli import main
from topr.config import load_config
from topr.inprocess import run_in_process


@pytest.mark.slow
def test_a_lora_run_publishes_the_merged_model_and_its_adapter(stack, tmp_path, tiny_model_dir, capsys):
    store = f"s3://{stack.bucket}/lora"
    overrides = [f"model.path={tiny_model_dir}", f"run.artifact_store={store}", "run.registered_model=lora-run", "run.iterations=1", "train.lora_rank=4", *TINY]
    parent_run_id = run_in_process(load_config(None, overrides), tmp_path / "run", stack.tracking_uri, "lora")

    keys = object_keys(stack.bucket, f"lora/{parent_run_id}/iter1/model/")
    assert {"model.safetensors", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "topr-manifest.json"} <= keys
    capsys.readouterr()
    lineage = ["lineage", "--tracking-uri", stack.tracking_uri]
    assert main([*lineage, "--json", "lora-run/1"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert [link["kind"] for link in chain][:3] == ["model", "adapter", "training run"]
    adapter = chain[1]
    assert adapter["uri"] == f"{store}/{parent_run_id}/iter1/model/adapter/adapter_model.safetensors"
    assert adapter["name"] == f"LoRA rank 4 on sha256:{chain[-1]['digest'][:12]}"  # trained on the base model
    assert main([*lineage, "--verify", "lora-run/1"]) == 0
    assert "0 problem(s)" in capsys.readouterr().err
