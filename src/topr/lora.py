"""LoRA: training low-rank adapters instead of every weight (``train.lora_rank`` > 0), with peft.

``with_adapter`` injects LoRA layers into the policy in place (the model object stays the one the
training step runs) and freezes every other weight, so only the adapters receive gradients and
optimizer state. The trained model is published merged: ``save_policy`` writes the adapter to
``adapter/`` inside the model folder, then merges it into the weights and saves a complete model,
so sampling, evaluation, vLLM, the gate, serving and lineage read it as any other. The adapter's
config names its base model by the weights digest of the model it was trained from (the parent in
lineage); the model's manifest covers the adapter's files.
"""

from __future__ import annotations

from topr.models import model_identity

ADAPTER_DIR = "adapter"
"""Where a LoRA-trained model folder keeps its adapter (peft's ``adapter_config.json`` and
``adapter_model.safetensors``)."""


def with_adapter(model, train, base_model_dir: str | None = None):
    """``model`` with fresh LoRA adapters (rank, alpha, dropout and target modules from ``train``,
    the ``TrainConfig``) and every other weight frozen; returns the peft model around it. Its
    config names ``base_model_dir``'s weights digest as its base."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=train.lora_rank,
        lora_alpha=train.lora_alpha,
        lora_dropout=train.lora_dropout,
        target_modules=train.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    adapted = get_peft_model(model, config)
    if base_model_dir is not None:
        adapted.peft_config["default"].base_model_name_or_path = model_identity(base_model_dir)
    return adapted


def trainable_parameters(model) -> tuple[int, int]:
    """How many of ``model``'s parameters train, and how many it has."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters())
