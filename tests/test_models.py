"""Tests for topr.models: resolving model paths, atomic saving, weight digests, chat prompts.

All but one use the tiny random Llama of conftest; the ``slow`` one converts the real embedded
SmolLM2-135M-Instruct GGUF and generates with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from topr.config import EMBEDDED_MODEL
from topr.models import (
    EMBEDDED_GGUF_FILE,
    PROVENANCE_FILE,
    ModelNotFoundError,
    ModelSource,
    load_policy,
    load_tokenizer,
    model_identity,
    prepare_base_model,
    prompt_token_ids,
    resolve_model_source,
    save_policy,
    weights_digest,
)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- resolve_model_source


def test_missing_path_is_a_plain_model_not_found_error(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_source(str(missing))
    message = str(error.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert "\n" not in message
    assert isinstance(error.value, FileNotFoundError)
    # load_policy reports the same error, not a Hugging Face traceback.
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_policy(str(missing))


def test_a_hub_model_needs_its_scheme_and_an_online_machine(monkeypatch):
    """A relative path with one slash that does not exist is a missing path, not a hub id: only
    hf://org/name goes to the hub, and not when HF_HUB_OFFLINE=1."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match="'models/policy' does not exist.*hf://org/name"):
        resolve_model_source("models/policy")
    assert resolve_model_source("hf://HuggingFaceTB/SmolLM2-135M-Instruct") == ModelSource("HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="hf://nobody/no-such-model: the hub is off .HF_HUB_OFFLINE=1."):
        resolve_model_source("hf://nobody/no-such-model")
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        resolve_model_source("hf://just-a-name/with/two-slashes")


def test_weights_are_read_from_safetensors_only(tiny_model_dir, tmp_path, monkeypatch):
    """A directory holding pickled weights (pytorch_model.bin) alone is refused: unpickling runs code."""
    import transformers

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    (pickled / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        load_policy(str(pickled), device=torch.device("cpu"))


def test_directory_without_config_or_gguf_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ModelNotFoundError) as error:
        resolve_model_source(str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert "config.json" in str(error.value) and ".gguf" in str(error.value)


def test_resolve_directories_gguf_files_and_the_embedded_model(tmp_path, tiny_model_dir):
    assert resolve_model_source(tiny_model_dir) == ModelSource(tiny_model_dir, None)
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    (gguf_dir / "b.gguf").write_bytes(b"")
    (gguf_dir / "a.gguf").write_bytes(b"")
    assert resolve_model_source(str(gguf_dir)) == ModelSource(str(gguf_dir), "a.gguf")
    assert resolve_model_source(str(gguf_dir / "b.gguf")) == ModelSource(str(gguf_dir), "b.gguf")
    embedded = resolve_model_source(EMBEDDED_MODEL)
    assert embedded.gguf_file == EMBEDDED_GGUF_FILE
    assert (Path(embedded.location) / EMBEDDED_GGUF_FILE).is_file()


# ----------------------------------------------------------------------------- save_policy


def test_save_policy_writes_a_complete_directory(policy, tmp_path):
    model, tokenizer = policy
    output = tmp_path / "models" / "saved"
    digest = save_policy(model, tokenizer, output, provenance={"parent": "sha256:abc", "note": 1})
    names = {path.name for path in output.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", PROVENANCE_FILE} <= names
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance == {"weights_sha256": digest, "parent": "sha256:abc", "note": 1}
    assert digest == weights_digest(output)
    assert model_identity(output) == f"sha256:{digest}"
    assert [path.name for path in output.parent.iterdir()] == ["saved"]
    reloaded, _ = load_policy(str(output), device=torch.device("cpu"))
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_policy_replaces_an_existing_directory(policy, tmp_path):
    model, tokenizer = policy
    output = tmp_path / "saved"
    output.mkdir()
    (output / "stale.bin").write_text("from an older model")
    save_policy(model, tokenizer, output, provenance={"round": 2})
    assert not (output / "stale.bin").exists()
    assert json.loads((output / PROVENANCE_FILE).read_text())["round"] == 2
    assert [path.name for path in tmp_path.iterdir()] == ["saved"]


@pytest.mark.parametrize("failing", ["model", "tokenizer"])
def test_failed_save_leaves_the_existing_directory_untouched(policy, tmp_path, monkeypatch, failing):
    model, tokenizer = policy
    output = tmp_path / "saved"
    save_policy(model, tokenizer, output, provenance={"round": 1})
    before = snapshot(output)
    target = model if failing == "model" else tokenizer
    real_save = target.save_pretrained

    def half_then_fail(directory, *args, **kwargs):
        real_save(directory, *args, **kwargs)  # files written into the staging directory ...
        (Path(directory) / "partial.bin").write_bytes(b"\0" * 10)
        raise OSError("disk full")  # ... and then the save fails

    monkeypatch.setattr(target, "save_pretrained", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_policy(model, tokenizer, output, provenance={"round": 2})
    assert snapshot(output) == before
    assert [path.name for path in tmp_path.iterdir()] == ["saved"]  # no stray staging directory


def test_failed_first_save_creates_nothing(policy, tmp_path, monkeypatch):
    model, tokenizer = policy

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(model, "save_pretrained", fail)
    with pytest.raises(RuntimeError, match="boom"):
        save_policy(model, tokenizer, tmp_path / "saved")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- digests


def test_weights_digest_follows_the_weights(tiny_model_dir, tmp_path):
    model, tokenizer = load_policy(tiny_model_dir, device=torch.device("cpu"))
    first = save_policy(model, tokenizer, tmp_path / "a")
    again = save_policy(model, tokenizer, tmp_path / "b", provenance={"other": "provenance"})
    assert first == again == weights_digest(tmp_path / "a") == weights_digest(tmp_path / "b")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    changed = save_policy(model, tokenizer, tmp_path / "c")
    assert changed != first
    assert len(first) == 64 and int(first, 16) >= 0


def test_weights_digest_and_identity_without_weights(tmp_path):
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        weights_digest(tmp_path)
    assert model_identity(tmp_path) == str(tmp_path)


# ----------------------------------------------------------------------------- prompt_token_ids


def test_prompt_ends_with_the_assistant_turn(real_tokenizer):
    ids = prompt_token_ids(real_tokenizer, "What is 2 + 3?")
    assistant_start = real_tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids[-len(assistant_start) :] == assistant_start
    text = real_tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_prompt_includes_the_system_prompt(real_tokenizer):
    plain = real_tokenizer.decode(prompt_token_ids(real_tokenizer, "What is 2 + 3?"))
    ids = prompt_token_ids(real_tokenizer, "What is 2 + 3?", system_prompt="Answer tersely.")
    text = real_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nAnswer tersely.<|im_end|>")
    assert text.index("Answer tersely.") < text.index("What is 2 + 3?")
    assert text.endswith("<|im_start|>assistant\n")
    assert text != plain and "Answer tersely." not in plain


def test_a_chat_is_templated_as_it_is_and_its_own_system_turn_wins(real_tokenizer):
    chat = [{"role": "system", "content": "Answer tersely."}, {"role": "user", "content": "What is 2 + 3?"}]
    expected = list(real_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert prompt_token_ids(real_tokenizer, chat) == prompt_token_ids(real_tokenizer, chat, system_prompt="Other.") == expected
    # Without a system turn, the chat is the user's prompt alone: the same tokens as the text.
    assert prompt_token_ids(real_tokenizer, chat[1:], system_prompt="Answer tersely.") == expected
    assert prompt_token_ids(real_tokenizer, chat[1:]) == prompt_token_ids(real_tokenizer, "What is 2 + 3?")


def test_a_chat_template_given_to_the_loader_replaces_the_models(tiny_model_dir):
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "
    tokenizer = load_tokenizer(tiny_model_dir, chat_template=template)
    assert tokenizer.decode(prompt_token_ids(tokenizer, "What is 2 + 3?", "Be brief.")) == "[system] Be brief.\n[user] What is 2 + 3?\n[assistant] "
    assert load_tokenizer(tiny_model_dir).chat_template != template


# ----------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_embedded_model_converts_reloads_and_answers(tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from topr.sample import SamplingParams, TransformersEngine
    from topr.tasks.arithmetic import ArithmeticTask

    monkeypatch.setenv("TOPR_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "base"
    digest = prepare_base_model(EMBEDDED_MODEL, output)
    assert digest == weights_digest(output)
    provenance = json.loads((output / PROVENANCE_FILE).read_text())
    assert provenance["source"] == EMBEDDED_MODEL and provenance["parent"] is None
    assert (output / "config.json").exists() and not list(output.glob("*.gguf"))

    model, tokenizer = load_policy(str(output), device=torch.device("cpu"))
    assert isinstance(model, LlamaForCausalLM)
    parameters = sum(p.numel() for p in model.parameters())
    assert abs(parameters - 134.5e6) < 0.5e6, parameters

    problem = ArithmeticTask("easy").problems("test", 1, seed=0)[0]
    engine = TransformersEngine(model, tokenizer, batch_size=1, progress=False)
    prompt = prompt_token_ids(tokenizer, problem["prompt"])
    ((completion,),) = engine.generate([prompt], SamplingParams(n=1, temperature=0, max_new_tokens=8))
    assert len(completion.token_ids) >= 1
    assert tokenizer.decode(completion.token_ids, skip_special_tokens=True).strip()


@pytest.mark.slow
def test_a_gguf_model_is_converted_once_per_machine(tmp_path, monkeypatch):
    from topr import models

    monkeypatch.setenv("TOPR_CACHE", str(tmp_path / "cache"))
    digest = prepare_base_model(EMBEDDED_MODEL, tmp_path / "first")
    (kept,) = (tmp_path / "cache" / "gguf").iterdir()

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was read again")

    with monkeypatch.context() as patched:
        patched.setattr(models, "load_policy", no_conversion)
        assert prepare_base_model(EMBEDDED_MODEL, tmp_path / "second") == digest
    provenance = json.loads((tmp_path / "second" / PROVENANCE_FILE).read_text())
    assert provenance == {"weights_sha256": digest, "source": EMBEDDED_MODEL, "parent": None}

    # A kept copy whose weights changed is not trusted: the GGUF file is converted again.
    with (kept / "model.safetensors").open("r+b") as weights:
        weights.seek(-4, 2)
        weights.write(b"\x00\x01\x02\x03")
    assert prepare_base_model(EMBEDDED_MODEL, tmp_path / "third") == digest
    assert weights_digest(kept) == digest
