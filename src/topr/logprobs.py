"""Token log-probabilities of completions, computed in chunks over the vocabulary.

The naive ``log_softmax(model(...).logits.float())`` holds float32 logits of shape
[batch, length, vocabulary] (and again for the backward pass). Here the backbone's hidden states
are gathered at the positions that predict completion tokens only, and the output head is
applied ``chunk_size`` positions at a time; under autograd each chunk is checkpointed, so its
logits are recomputed in the backward pass instead of being kept.

Under bfloat16 autocast the head would give bfloat16 logits, whose rounding (about 0.03 on a
logit of 10) shows in every log-probability, while the behaviour log-probs were recorded in
float32: the ratio π/μ would be noisy even on data the model has just sampled. So by default
(``float32_head``) the head and its log-softmax run in float32, outside autocast.

The tokens that every sequence of a batch begins with (a chat template's system turn: 24 of the
default run's ~110 tokens a sequence) go through the backbone once for the whole batch
(``shared_prefix_length``): every row attends to the same keys and values of that prefix, and
the gradient through them is the sum over the rows, as when each row computes its own copy.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from topr.hf_internals import cache_keyword, cache_tensors, full_attention, new_cache, repeated_cache


def _float32_logits(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    """head(hidden) computed in float32 whatever the autocast dtype.

    The head's weight is normally float32 already (autocast keeps float32 master weights), and
    ``.float()`` leaves it as it is; a lower-precision weight (FSDP gathers weights in the compute
    dtype) is upcast for the product.
    """
    bias = None if head.bias is None else head.bias.float()
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def _chunk_logprobs(
    hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float, float32_head: bool
):
    logits = _float32_logits(hidden, head) if float32_head else head(hidden).float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    float32_head: bool = True,
) -> torch.Tensor:
    """log softmax(head(hidden) / temperature)[targets] for hidden [N, H], targets [N].

    ``float32_head``: apply the head (an ``nn.Linear``) in float32 even under autocast.
    """
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (hidden[start : start + chunk_size], head, targets[start : start + chunk_size], temperature, float32_head)
        if torch.is_grad_enabled() and hidden.requires_grad:
            pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*args))
    if not pieces:
        return hidden.new_zeros(0, dtype=torch.float32)
    return torch.cat(pieces)


def batch_prompt_completions(
    prompts: list[list[int]], completions: list[list[int]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad prompt+completion sequences and record where each completion starts.

    Returns ``input_ids`` and ``attention_mask`` [B, L], ``completion_ids`` and
    ``completion_mask`` [B, T] (T = longest completion), and ``completion_start`` [B].
    The masks come from lengths, never from ``ids != pad`` (pad can equal end-of-sequence).
    """
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width, completion_width = max(lengths), max(len(c) for c in completions)
    batch = len(prompts)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    completion_ids = torch.full((batch, completion_width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, completion_width), dtype=torch.float32)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        input_ids[row, : lengths[row]] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, : lengths[row]] = 1
        completion_ids[row, : len(completion)] = torch.tensor(completion, dtype=torch.long)
        completion_mask[row, : len(completion)] = 1.0
    completion_start = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "completion_start": completion_start,
    }


def completion_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    completion_start: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    float32_head: bool = True,
    share_prefix: bool = True,
) -> torch.Tensor:
    """log π(completion token | prefix) [B, T], zero at masked positions (see ``batch_prompt_completions``).

    ``float32_head``: the output head and its log-softmax in float32 even under autocast.
    ``share_prefix``: run the rows' common prefix once (``backbone_hidden_states``); FSDP, which
    frees each block's gathered weights after its forward, needs a single forward instead.
    """
    shared = shared_prefix_length(input_ids, completion_start) if share_prefix else 0
    hidden, shared = backbone_hidden_states(model, input_ids, attention_mask, shared)
    offsets = torch.arange(completion_ids.shape[1], device=hidden.device)
    # The hidden state at position p predicts the token at p + 1; hidden starts at position ``shared``.
    positions = (completion_start.to(hidden.device).unsqueeze(1) - shared + offsets - 1).clamp(0, hidden.shape[1] - 1)
    mask = completion_mask.to(hidden.device) > 0
    selected = hidden[torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1), positions][mask]
    head = model.get_output_embeddings()
    targets = completion_ids.to(hidden.device)[mask]
    values = chunked_token_logprobs(selected, head, targets, chunk_size, temperature, float32_head)
    logprobs = torch.zeros(completion_ids.shape, dtype=torch.float32, device=hidden.device)
    return logprobs.masked_scatter(mask, values)


def shared_prefix_length(input_ids: torch.Tensor, completion_start: torch.Tensor) -> int:
    """How many leading tokens all rows have in common (0 for a single row), short of each row's
    last prompt token, whose hidden state predicts the row's first completion token."""
    limit = int(completion_start.min()) - 1
    if input_ids.shape[0] < 2 or limit < 1:
        return 0
    differs = (input_ids[:, :limit] != input_ids[:1, :limit]).any(dim=0).nonzero()
    return int(differs[0]) if len(differs) else limit


def prefix_can_be_shared(model) -> bool:
    """Whether the rows' common prefix can run once with the same result as in every row: full
    attention in every layer, no rotary scaling that changes with the sequence's length
    (dynamic, longrope), and, in training, no dropout (it would draw one mask for all rows)."""
    config = model.config
    if _rope_types(config) & {"dynamic", "longrope"}:
        return False
    dropout = getattr(config, "attention_dropout", 0.0) or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    if model.training and dropout:
        return False
    return full_attention(new_cache(config))


def _rope_types(config) -> set[str]:
    """Every rotary embedding type named in the configuration (per layer type too)."""
    types, settings = set(), [getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)]
    while settings:
        item = settings.pop()
        if isinstance(item, dict):
            types |= {str(item[key]) for key in ("rope_type", "type") if key in item}
            settings += [value for value in item.values() if isinstance(value, dict)]
    return types


def backbone_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: int) -> tuple[torch.Tensor, int]:
    """The backbone's last hidden states from position ``shared`` on, and ``shared``: the first
    ``shared`` tokens, the same in every row, run once and every row attends to their keys and
    values. Where that would not give each row's own result (``prefix_can_be_shared``), or the
    prefix's keys and values are not all in the cache afterwards (a model that ignores the
    cache, gradient checkpointing), the rows run whole and ``shared`` is 0."""
    backbone = model.base_model
    if shared and prefix_can_be_shared(model):
        keyword = cache_keyword(backbone)
        prefix = new_cache(model.config)
        backbone(input_ids=input_ids[:1, :shared], use_cache=True, **{keyword: prefix})
        tensors = list(cache_tensors(prefix))
        if all(keys is not None and keys.shape[-2] == shared for keys, _ in tensors):
            rows = input_ids.shape[0]
            cache = repeated_cache(tensors, rows, model.config)
            positions = torch.arange(shared, input_ids.shape[1], device=input_ids.device).expand(rows, -1)
            hidden = backbone(
                input_ids=input_ids[:, shared:], attention_mask=attention_mask, position_ids=positions, use_cache=True, **{keyword: cache}
            ).last_hidden_state
            return hidden, shared
    return backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, 0
