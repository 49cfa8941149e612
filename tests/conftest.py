"""Shared fixtures: a tiny Llama policy built from a config, with the real SmolLM2 tokenizer.

Most tests use ``tiny_model_dir`` (random weights, 2 layers, the default model's real
tokenizer and chat template), saved once per session as a Hugging Face directory exactly as
``topr.models.save_policy`` writes it. Tests marked ``slow`` use the real embedded model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from topr.config import EMBEDDED_MODEL

torch.set_num_threads(2)


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
