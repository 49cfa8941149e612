"""LoRA (train.lora_rank, topr.lora) on the tiny model: only the adapters train, the published
model is the base plus the adapter merged in, and the adapter is kept beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from topr.config import ConfigError
from topr.models import load_policy, model_identity
from topr.records import write_records
from topr.train import run_train

from helpers import train_config
from test_train import NEGATIVES, POSITIVES, TEMPERATURE, make_records

LORA = ("train.lora_rank=4", "train.lora_alpha=8", "train.learning_rate=1e-2")


def config(*overrides):
    return train_config(f"sample.temperature={TEMPERATURE}", "train.batch_size=4", "train.epochs=2", *overrides)


def test_only_the_adapters_train(tiny_model_dir):
    from topr.lora import trainable_parameters, with_adapter

    model, _ = load_policy(tiny_model_dir, device=torch.device("cpu"))
    with_adapter(model, config(*LORA).train, tiny_model_dir)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    # every linear layer of every decoder layer, none of the embeddings, norms or head
    assert {name.split(".")[-4] for name in trainable} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    count, total = trainable_parameters(model)
    assert 0 < count < total / 10


@pytest.fixture(scope="module")
def lora_trained(policy, tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("lora")
    records = make_records(policy, POSITIVES + NEGATIVES)
    write_records(tmp_path / "train.jsonl", records)
    steps = []
    summary = run_train(config(*LORA), tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "model", on_step=lambda step, stats: steps.append(stats))
    return summary, steps, tmp_path / "model"


def test_the_published_model_is_the_base_with_the_adapter_merged_in(lora_trained, tiny_model_dir):
    from peft import PeftModel

    summary, steps, output = lora_trained
    assert summary["steps"] == len(steps) >= 2 and all(stats["grad_norm"] > 0 for stats in steps)
    base, merged = load_file(Path(tiny_model_dir) / "model.safetensors"), load_file(output / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no LoRA weights in it
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all(name.split(".")[-2] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj") for name in changed)

    # Base + the saved adapter, merged by peft, gives the published weights.
    adapter_dir = output / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == model_identity(tiny_model_dir)
    model, _ = load_policy(tiny_model_dir, device=torch.device("cpu"))
    rebuilt = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()
    for name, weight in merged.items():
        torch.testing.assert_close(rebuilt[name], weight, rtol=0, atol=1e-6)


def test_a_lora_model_loads_and_its_digest_is_that_of_its_merged_weights(lora_trained):
    from topr.models import weights_digest

    summary, _, output = lora_trained
    assert summary["weights_sha256"] == weights_digest(output)  # the adapter in adapter/ is not part of it
    model, _ = load_policy(output, device=torch.device("cpu"))
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_lora_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match="lora_rank with parallelism=fsdp is not supported"):
        config("train.lora_rank=8", "train.parallelism=fsdp")
