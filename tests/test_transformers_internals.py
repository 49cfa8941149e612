"""The transformers internals that topr relies on (``topr.hf_internals``), one test each.

Each test exercises one internal against the installed transformers on a tiny model built from a
config, and when the internal no longer has the shape it was written for, fails naming it, the
function of ``topr.hf_internals`` that uses it, and the versions it was written for (the pin in
pyproject.toml) and checked against: the place to adapt before widening the pin.
"""

from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import transformers

from topr import hf_internals

VOCAB, LENGTH = 40, 6


@contextlib.contextmanager
def fenced(function: str, internal: str):
    """Within the block, ``check(holds, what)`` and any exception fail the test with a message
    naming ``internal`` (what ``topr.hf_internals.<function>`` relies on) and its versions."""

    class Changed(Exception):
        pass

    def check(holds: bool, what: str) -> None:
        if not holds:
            raise Changed(what)

    detail = None
    try:
        yield check
    except Exception as error:
        detail = str(error) if isinstance(error, Changed) else f"{type(error).__name__}: {error}"
    if detail is not None:
        pytest.fail(
            f"transformers {transformers.__version__}: {internal} no longer behaves as "
            f"topr.hf_internals.{function} expects ({detail}). It was written for transformers "
            f"{hf_internals.PINNED} (pyproject.toml) and checked against {', '.join(hf_internals.CHECKED_VERSIONS)}: "
            f"adapt topr.hf_internals.{function}, then the pin.",
            pytrace=False,
        )


def _config(**changes):
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=0.3,
    )
    return LlamaConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


def _ids(rows: int = 1, length: int = LENGTH, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _filled_cache(model, ids: torch.Tensor):
    cache = hf_internals.new_cache(model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{hf_internals.cache_keyword(model): cache})
    return cache


def test_the_forward_takes_its_kv_cache_by_the_keyword_that_cache_keyword_names(model):
    with fenced("cache_keyword", "forward's KV-cache argument (past_key_values, renamed cache in 5.24)") as check:
        for module in (model, model.base_model):
            keyword = hf_internals.cache_keyword(module)
            check(keyword in inspect.signature(module.forward).parameters, f"{type(module).__name__}.forward takes neither cache nor past_key_values")
            cache = hf_internals.new_cache(model.config)
            with torch.no_grad():
                module(input_ids=_ids(), use_cache=True, **{keyword: cache})
            check(cache.get_seq_length() == LENGTH, f"{type(module).__name__}.forward({keyword}=...) left the cache it was given unfilled")


def test_a_new_dynamic_cache_has_an_empty_layer_for_each_hidden_layer(model):
    with fenced("new_cache", "DynamicCache(config=...) and its .layers") as check:
        tensors = list(hf_internals.cache_tensors(hf_internals.new_cache(model.config)))
        check(len(tensors) == model.config.num_hidden_layers, f"{len(tensors)} layers before any forward, not one per hidden layer")
        check(all(keys is None and values is None for keys, values in tensors), "a layer holds keys or values before its first update")


def test_full_attention_layers_are_dynamic_layers_and_sliding_window_ones_are_not(model):
    from transformers import Qwen2Config

    sliding = Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )
    with fenced("full_attention", "transformers.cache_utils.DynamicLayer as the class of exactly the full-attention layers") as check:
        check(hf_internals.full_attention(hf_internals.new_cache(model.config)), "a full-attention model's cache has layers of another class")
        check(hf_internals.full_attention(_filled_cache(model, _ids())), "a filled full-attention cache has layers of another class")
        check(not hf_internals.full_attention(hf_internals.new_cache(sliding)), "a sliding-window layer is a plain DynamicLayer")


def test_each_layer_holds_keys_and_values_of_batch_heads_sequence_and_head_dimension(model):
    with fenced("cache_tensors", "the cache layers' .keys and .values") as check:
        tensors = list(hf_internals.cache_tensors(_filled_cache(model, _ids(rows=3))))
        head_dimension = model.config.hidden_size // model.config.num_attention_heads
        expected = (3, model.config.num_key_value_heads, LENGTH, head_dimension)
        check(len(tensors) == model.config.num_hidden_layers, f"{len(tensors)} layers after a forward")
        for keys, values in tensors:
            check(isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor), "a layer's keys or values are not tensors")
            check(tuple(keys.shape) == tuple(values.shape) == expected, f"keys {tuple(keys.shape)}, values {tuple(values.shape)}, not {expected}")


def test_keys_and_values_put_in_place_are_what_the_next_forward_attends_to(model):
    """Left padding cut from the cache (the sampler's ``_drop_padding_columns``): the next token's
    logits are those of the sequence without the padding."""
    ids, padding = _ids(length=LENGTH + 1), 2
    keyword = hf_internals.cache_keyword(model)
    prompt = torch.cat([torch.zeros(1, padding, dtype=torch.long), ids[:, :LENGTH]], dim=1)
    mask = torch.cat([torch.zeros(1, padding, dtype=torch.long), torch.ones(1, LENGTH, dtype=torch.long)], dim=1)
    with fenced("set_cache_tensors", "assigning the cache layers' .keys and .values") as check, torch.no_grad():
        cache = hf_internals.new_cache(model.config)
        model(input_ids=prompt, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True, **{keyword: cache})
        hf_internals.set_cache_tensors(cache, ((keys[:, :, padding:], values[:, :, padding:]) for keys, values in hf_internals.cache_tensors(cache)))
        check(cache.get_seq_length() == LENGTH, f"the cache's length is {cache.get_seq_length()}, not that of the keys put in place ({LENGTH})")
        step = model(
            input_ids=ids[:, LENGTH:], attention_mask=torch.ones(1, LENGTH + 1, dtype=torch.long),
            position_ids=torch.tensor([[LENGTH]]), use_cache=True, **{keyword: cache},
        ).logits[:, -1]
        whole = model(input_ids=ids).logits[:, -1]
        check(torch.allclose(step, whole, atol=1e-5), f"the next token's logits differ by {float((step - whole).abs().max()):.2e}")


def test_a_repeated_prefix_cache_gives_each_rows_own_result_and_sums_the_gradient(model):
    rows, shared = 3, 3
    ids = torch.cat([_ids(length=shared).expand(rows, -1), _ids(rows=rows, length=LENGTH - shared, seed=1)], dim=1)
    keyword = hf_internals.cache_keyword(model)
    with fenced("repeated_cache", "DynamicLayer.update on an empty cache, then a forward with it") as check, torch.no_grad():
        prefix = list(hf_internals.cache_tensors(_filled_cache(model, ids[:1, :shared])))
        cache = hf_internals.repeated_cache(prefix, rows, model.config)
        check(cache.get_seq_length() == shared, f"the repeated cache's length is {cache.get_seq_length()}, not the prefix's {shared}")
        positions = torch.arange(shared, LENGTH).expand(rows, -1)
        rest = model(input_ids=ids[:, shared:], position_ids=positions, use_cache=True, **{keyword: cache}).logits
        whole = model(input_ids=ids).logits[:, shared:]
        check(torch.allclose(rest, whole, atol=1e-5), f"rows after a shared prefix differ from whole rows by {float((rest - whole).abs().max()):.2e}")
    with fenced("repeated_cache", "DynamicLayer.update keeping the autograd graph") as check:
        leaves = [(keys.clone().requires_grad_(), values.clone().requires_grad_()) for keys, values in prefix]
        repeated = hf_internals.repeated_cache(leaves, rows, model.config)
        sum(keys.sum() + values.sum() for keys, values in hf_internals.cache_tensors(repeated)).backward()
        check(all(torch.equal(leaf.grad, torch.full_like(leaf, rows)) for pair in leaves for leaf in pair), "the prefix's gradient is not the sum over the rows")


def test_selecting_rows_keeps_those_rows_of_every_layer_in_that_order(model):
    with fenced("select_rows", "Cache.batch_select_indices") as check:
        cache = _filled_cache(model, _ids(rows=3))
        before = list(hf_internals.cache_tensors(cache))
        hf_internals.select_rows(cache, torch.tensor([2, 0]))
        after = list(hf_internals.cache_tensors(cache))
        check(len(after) == len(before), "the cache lost layers")
        for (keys, values), (kept_keys, kept_values) in zip(before, after):
            check(torch.equal(kept_keys, keys[[2, 0]]) and torch.equal(kept_values, values[[2, 0]]), "the kept rows are not rows 2 and 0 of each layer")


def test_a_model_with_its_gguf_quantizer_forgotten_saves_and_reloads_as_a_plain_model(model, tmp_path):
    from transformers import LlamaForCausalLM
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AutoHfQuantizer

    with fenced("forget_gguf_quantization", "save_pretrained's refusal of a model marked as GGUF-quantized (hf_quantizer, config.quantization_config, is_quantized)") as check:
        torch.manual_seed(1)
        marked = LlamaForCausalLM(_config())
        quantization = AUTO_QUANTIZATION_CONFIG_MAPPING["gguf"](gguf_file="model.gguf")
        marked.hf_quantizer, marked.config.quantization_config, marked.is_quantized = AutoHfQuantizer.from_config(quantization), quantization, True
        try:
            marked.save_pretrained(tmp_path / "refused")
        except ValueError as refusal:
            check("not serializable" in str(refusal), f"save_pretrained refuses for another reason: {refusal}")
        else:  # why the markers must go
            check(False, "save_pretrained saves a model marked as GGUF-quantized: the markers are no longer what it checks")
        hf_internals.forget_gguf_quantization(marked)
        marked.save_pretrained(tmp_path / "saved")
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved")
        check(getattr(reloaded.config, "quantization_config", None) is None, "the saved model is still marked as quantized")
        check(all(torch.equal(a, b) for a, b in zip(marked.state_dict().values(), reloaded.state_dict().values())), "the reloaded weights differ")


def test_the_transformer_blocks_are_the_classes_named_in_no_split_modules(model):
    with fenced("transformer_block_classes", "PreTrainedModel._no_split_modules") as check:
        blocks = hf_internals.transformer_block_classes(model)
        found = [module for module in model.modules() if type(module).__name__ in blocks]
        check(bool(blocks), "the model names no block classes")
        check(len(found) == model.config.num_hidden_layers, f"{len(found)} modules of the classes {sorted(blocks)}, not one per hidden layer")


def test_pyproject_pins_transformers_to_the_range_the_internals_were_written_for():
    import tomllib
    from pathlib import Path

    dependencies = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"transformers{hf_internals.PINNED}" in dependencies, (
        f"pyproject.toml's transformers pin is not topr.hf_internals.PINNED ({hf_internals.PINNED}): "
        "check the internals against the new range, then change both"
    )
