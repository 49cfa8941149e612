"""Tests for topr.logprobs: chunked log-probs, batching by lengths, and completion log-probs.

Every result is compared with the naive computation written out here: the full logits in float32,
``log_softmax``, gathered at the target tokens. The model tests use a tiny random Llama built in
this file (small vocabulary, pad == eos == 2 like the SmolLM2 tokenizer), so they need neither the
GGUF tokenizer nor a saved model directory.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import topr.logprobs as logprobs_module
from topr.logprobs import batch_prompt_completions, chunked_token_logprobs, completion_logprobs, prefix_can_be_shared, shared_prefix_length

PAD = EOS = 2
VOCAB = 64


def naive_logprobs(hidden, head, targets, temperature=1.0):
    logits = head(hidden).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def make_inputs(n=7, width=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=generator)
    head = torch.nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, width, generator=generator))
    targets = torch.randint(0, vocab, (n,), generator=generator)
    return hidden, head, targets


# ----------------------------------------------------------------------------- chunked_token_logprobs


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_values_match_naive(chunk_size, temperature):
    hidden, head, targets = make_inputs()
    with torch.no_grad():
        result = chunked_token_logprobs(hidden, head, targets, chunk_size=chunk_size, temperature=temperature)
        expected = naive_logprobs(hidden, head, targets, temperature)
    assert result.dtype == torch.float32
    assert result.shape == (7,)
    assert_close(result, expected, rtol=0, atol=1e-5)
    assert (result <= 0).all()


def test_temperature_changes_the_values():
    hidden, head, targets = make_inputs()
    with torch.no_grad():
        plain = chunked_token_logprobs(hidden, head, targets, chunk_size=3)
        tempered = chunked_token_logprobs(hidden, head, targets, chunk_size=3, temperature=0.5)
    assert not torch.allclose(plain, tempered, atol=1e-3)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_gradients_match_naive(chunk_size, temperature, monkeypatch):
    calls = []
    real_checkpoint = logprobs_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(logprobs_module, "checkpoint", spy)
    hidden, head, targets = make_inputs()
    weights = torch.linspace(-1.0, 2.0, hidden.shape[0])

    hidden_a = hidden.clone().requires_grad_(True)
    result = chunked_token_logprobs(hidden_a, head, targets, chunk_size=chunk_size, temperature=temperature)
    (result * weights).sum().backward()
    grad_hidden, grad_head = hidden_a.grad.clone(), head.weight.grad.clone()
    head.weight.grad = None

    hidden_b = hidden.clone().requires_grad_(True)
    expected = naive_logprobs(hidden_b, head, targets, temperature)
    (expected * weights).sum().backward()

    # The checkpointed path was taken, one checkpoint per chunk.
    assert len(calls) == math.ceil(hidden.shape[0] / chunk_size)
    assert_close(result.detach(), expected.detach(), rtol=0, atol=1e-5)
    assert_close(grad_hidden, hidden_b.grad, rtol=1e-4, atol=1e-5)
    assert_close(grad_head, head.weight.grad, rtol=1e-4, atol=1e-5)
    assert grad_head.abs().sum() > 0


def test_no_checkpoint_without_grad(monkeypatch):
    monkeypatch.setattr(logprobs_module, "checkpoint", lambda *a, **k: pytest.fail("checkpoint under no_grad"))
    hidden, head, targets = make_inputs()
    with torch.no_grad():
        result = chunked_token_logprobs(hidden.requires_grad_(True), head, targets, chunk_size=2)
    assert result.grad_fn is None


def test_chunked_bfloat16_is_computed_in_float32():
    """A bfloat16 head and hidden states: the product is taken in float32 (``float32_head``), or
    in bfloat16 with only the log-softmax in float32."""
    hidden, head, targets = make_inputs()
    head = head.to(torch.bfloat16)
    hidden = hidden.to(torch.bfloat16)
    with torch.no_grad():
        result = chunked_token_logprobs(hidden, head, targets, chunk_size=3)
        expected = naive_logprobs(hidden.float(), lambda h: h @ head.weight.float().T, targets)
        low = chunked_token_logprobs(hidden, head, targets, chunk_size=3, float32_head=False)
        expected_low = naive_logprobs(hidden, head, targets)
    assert result.dtype == low.dtype == torch.float32
    assert_close(result, expected, rtol=0, atol=1e-5)
    assert_close(low, expected_low, rtol=0, atol=1e-4)


def test_float32_head_under_bfloat16_autocast_matches_float32():
    """Under autocast the head's logits would be bfloat16; log π would then be off by their rounding
    (about 0.03 on a logit of 10) compared with the float32 log μ recorded at sampling."""
    hidden, head, targets = make_inputs(n=64, width=32, vocab=4096)
    with torch.no_grad():
        exact = chunked_token_logprobs(hidden, head, targets, chunk_size=16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            float32_head = chunked_token_logprobs(hidden, head, targets, chunk_size=16)
            bfloat16_head = chunked_token_logprobs(hidden, head, targets, chunk_size=16, float32_head=False)
    assert float32_head.dtype == bfloat16_head.dtype == torch.float32
    assert_close(float32_head, exact, rtol=0, atol=1e-5)
    assert (bfloat16_head - exact).abs().max() > 1e-3


def test_float32_head_under_autocast_has_float32_gradients():
    hidden, head, targets = make_inputs()
    expected_hidden = hidden.clone().requires_grad_(True)
    naive_logprobs(expected_hidden, head, targets).sum().backward()
    expected_head, head.weight.grad = head.weight.grad.clone(), None
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = chunked_token_logprobs(hidden, head, targets, chunk_size=3)
    result.sum().backward()  # outside autocast, as in training
    assert head.weight.grad.dtype == torch.float32
    assert_close(head.weight.grad, expected_head, rtol=1e-4, atol=1e-5)
    assert_close(hidden.grad, expected_hidden.grad, rtol=1e-4, atol=1e-5)


def test_chunked_empty():
    hidden, head, _ = make_inputs()
    result = chunked_token_logprobs(hidden[:0], head, torch.zeros(0, dtype=torch.long), chunk_size=4)
    assert result.shape == (0,)
    assert result.dtype == torch.float32


# ----------------------------------------------------------------------------- batch_prompt_completions


def test_batch_masks_come_from_lengths_when_pad_is_eos():
    prompts = [[5, 6, 7], [8]]
    # pad == eos == 2 appears inside and at the end of both completions.
    completions = [[9, EOS, EOS], [EOS, 10, EOS, 11]]
    batch = batch_prompt_completions(prompts, completions, pad_token_id=PAD)

    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 2, 2], [8, 2, 10, 2, 11, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert batch["completion_ids"].tolist() == [[9, 2, 2, PAD], [2, 10, 2, 11]]
    assert batch["completion_mask"].tolist() == [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
    assert batch["completion_start"].tolist() == [3, 1]
    assert batch["input_ids"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.float32


def test_batch_single_row_without_padding():
    batch = batch_prompt_completions([[1, 2]], [[3]], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[1.0]]
    assert batch["completion_start"].tolist() == [2]


# ----------------------------------------------------------------------------- completion_logprobs


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


PROMPTS = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1]]
COMPLETIONS = [[12, EOS], [13, EOS, 14, 15], [16, 17, EOS]]


def reference_rows(model, temperature=1.0, prompts=PROMPTS, completions=COMPLETIONS):
    """Per row, a full forward over the unpadded sequence; log-softmax of the logits at p - 1."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        logits = model(torch.tensor([prompt + completion])).logits[0].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        rows.append(torch.stack([logp[len(prompt) - 1 + t, token] for t, token in enumerate(completion)]))
    return rows


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_completion_logprobs_match_full_forward(tiny_llama, chunk_size, temperature):
    batch = batch_prompt_completions(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    with torch.no_grad():
        result = completion_logprobs(tiny_llama, **batch, chunk_size=chunk_size, temperature=temperature)
        expected_rows = reference_rows(tiny_llama, temperature)
        # The batched full forward over the right-padded batch, shifted by one position.
        logits = tiny_llama(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        full = torch.log_softmax(logits / temperature, dim=-1)

    assert result.shape == (3, 4)
    assert result.dtype == torch.float32
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        assert_close(result[row, : len(completion)], expected_rows[row], rtol=0, atol=1e-5)
        shifted = torch.stack(
            [full[row, len(prompt) - 1 + t, token] for t, token in enumerate(completion)]
        )
        assert_close(result[row, : len(completion)], shifted, rtol=0, atol=1e-5)
        # Masked positions are exactly zero.
        assert (result[row, len(completion) :] == 0).all()
        assert (result[row, : len(completion)] < 0).all()


def test_completion_logprobs_gradient_matches_full_forward(tiny_llama):
    batch = batch_prompt_completions(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0]]).expand(3, 4)

    tiny_llama.zero_grad(set_to_none=True)
    result = completion_logprobs(tiny_llama, **batch, chunk_size=2, temperature=0.8)
    (result * weights * batch["completion_mask"]).sum().backward()
    chunked = {name: p.grad.clone() for name, p in tiny_llama.named_parameters()}

    tiny_llama.zero_grad(set_to_none=True)
    rows = reference_rows(tiny_llama, temperature=0.8)
    sum(
        (row * weights[i, : len(row)]).sum() for i, row in enumerate(rows)
    ).backward()
    for name, parameter in tiny_llama.named_parameters():
        assert_close(chunked[name], parameter.grad, rtol=1e-4, atol=1e-6, msg=name)
    tiny_llama.zero_grad(set_to_none=True)
    assert chunked["model.embed_tokens.weight"].abs().sum() > 0


def test_completion_logprobs_pass_float32_head_on(tiny_llama):
    """Under bfloat16 autocast the backbone runs in bfloat16 either way; the head is float32 by default."""
    batch = batch_prompt_completions(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    mask = batch["completion_mask"] > 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = tiny_llama.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        float32_head = completion_logprobs(tiny_llama, **batch)
        bfloat16_head = completion_logprobs(tiny_llama, **batch, float32_head=False)
    logits = hidden.float() @ tiny_llama.lm_head.weight.T
    expected = [
        torch.log_softmax(logits[row, len(prompt) - 1 : len(prompt) - 1 + len(completion)], dim=-1)[
            torch.arange(len(completion)), torch.tensor(completion)
        ]
        for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS))
    ]
    assert_close(float32_head[mask], torch.cat(expected), rtol=0, atol=1e-5)
    assert not torch.allclose(bfloat16_head[mask], float32_head[mask], rtol=0, atol=1e-5)


def test_completion_logprobs_ignore_padding_contents(tiny_llama):
    """Whatever sits in padded positions (here: other tokens) does not change the result."""
    batch = batch_prompt_completions(PROMPTS, COMPLETIONS, pad_token_id=PAD)
    other = dict(batch)
    other["input_ids"] = torch.where(batch["attention_mask"] == 0, 33, batch["input_ids"])
    other["completion_ids"] = torch.where(batch["completion_mask"] == 0, 44, batch["completion_ids"])
    with torch.no_grad():
        first = completion_logprobs(tiny_llama, **batch)
        second = completion_logprobs(tiny_llama, **other)
    assert_close(first, second, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the rows' common prefix

SHARED_PROMPTS = [[1, 5, 6, 7, 20], [1, 5, 6, 7, 21, 22, 23], [1, 5, 6, 8]]  # [1, 5, 6] in common


def test_the_shared_prefix_stops_before_any_difference_and_before_each_last_prompt_token():
    def shared(prompts, completions=None):
        completions = completions or [[12]] * len(prompts)
        batch = batch_prompt_completions(prompts, completions, pad_token_id=PAD)
        return shared_prefix_length(batch["input_ids"], batch["completion_start"])

    assert shared(SHARED_PROMPTS) == 3
    assert shared([[1, 5, 6, 7], [1, 5, 6, 7, 8]]) == 3  # the shorter prompt's last token stays out
    assert shared([[1, 5, 6], [1, 5, 6]], [[12], [13]]) == 2  # identical prompts: completions differ
    assert shared([[1, 5], [2, 5]]) == 0
    assert shared([[1, 5, 6, 7]]) == 0  # one row: nothing to share


def test_the_common_prefix_runs_once_with_the_values_and_gradients_of_each_row_alone(tiny_llama):
    batch = batch_prompt_completions(SHARED_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    weights = torch.tensor([[1.0, -2.0, 0.5, 3.0]]).expand(3, 4)
    shapes = []
    hook = tiny_llama.model.embed_tokens.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    tiny_llama.zero_grad(set_to_none=True)
    try:
        result = completion_logprobs(tiny_llama, **batch, temperature=0.8)
    finally:
        hook.remove()
    (result * weights * batch["completion_mask"]).sum().backward()
    shared = {name: p.grad.clone() for name, p in tiny_llama.named_parameters()}

    assert shapes == [(1, 3), (3, batch["input_ids"].shape[1] - 3)]
    tiny_llama.zero_grad(set_to_none=True)
    rows = reference_rows(tiny_llama, 0.8, SHARED_PROMPTS, COMPLETIONS)
    for row, (expected, completion) in enumerate(zip(rows, COMPLETIONS)):
        assert_close(result[row, : len(completion)], expected.detach(), rtol=0, atol=1e-5)
    sum((row * weights[i, : len(row)]).sum() for i, row in enumerate(rows)).backward()
    for name, parameter in tiny_llama.named_parameters():
        # The prefix's gradient is summed over the rows in another order: float32 rounding of
        # gradients up to ~15 in size.
        assert_close(shared[name], parameter.grad, rtol=1e-4, atol=5e-5, msg=name)
    tiny_llama.zero_grad(set_to_none=True)


def test_a_model_with_sliding_window_layers_runs_every_row_whole():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], eos_token_id=EOS, pad_token_id=PAD,
    )
    model = Qwen2ForCausalLM(config).eval()
    batch = batch_prompt_completions(SHARED_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    with torch.no_grad():
        result = completion_logprobs(model, **batch)
        whole = completion_logprobs(model, **batch, share_prefix=False)
    for row, (expected, completion) in enumerate(zip(reference_rows(model, 1.0, SHARED_PROMPTS, COMPLETIONS), COMPLETIONS)):
        assert_close(result[row, : len(completion)], expected.detach(), rtol=0, atol=1e-5)
    assert_close(result, whole, rtol=0, atol=1e-6)


def test_the_prefix_is_not_shared_where_sharing_would_change_the_result(tiny_llama):
    from transformers import LlamaForCausalLM

    assert prefix_can_be_shared(tiny_llama)
    dynamic_rope = tiny_llama.config.to_dict() | {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}
    assert not prefix_can_be_shared(LlamaForCausalLM(type(tiny_llama.config)(**dynamic_rope)))

    with_dropout = LlamaForCausalLM(type(tiny_llama.config)(**tiny_llama.config.to_dict() | {"attention_dropout": 0.1}))
    assert not prefix_can_be_shared(with_dropout.train())  # one dropout mask for every row
    assert prefix_can_be_shared(with_dropout.eval())

    batch = batch_prompt_completions(SHARED_PROMPTS, COMPLETIONS, pad_token_id=PAD)
    shapes = []
    hook = with_dropout.model.embed_tokens.register_forward_hook(lambda module, args, output: shapes.append(tuple(args[0].shape)))
    try:
        completion_logprobs(with_dropout.train(), **batch)
    finally:
        hook.remove()
    assert shapes == [tuple(batch["input_ids"].shape)]
