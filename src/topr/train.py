"""The training stage: epochs of ``policy_loss`` over a curated set, then save the new policy.

Reads top to bottom: load records and model, build the optimizer, loop over shuffled
micro-batches (gradient accumulation, clipping), report every optimizer step, save.
The behaviour log-probs come from the records, so no second model is held in memory.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from topr.config import Config
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import load_policy, model_identity, pick_device, save_policy, set_threads
from topr.objectives import policy_loss
from topr.records import TRAIN_FIELDS, Record, RecordError, read_records

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    train = config.train
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            model.parameters(),
            lr=train.learning_rate,
            weight_decay=train.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)


def micro_batches(records: list[Record], batch_size: int, epochs: int, seed: int) -> list[list[Record]]:
    """Shuffled micro-batches for every epoch; each epoch reshuffles with its own seed."""
    batches = []
    for epoch in range(epochs):
        order = list(range(len(records)))
        random.Random(seed * 7919 + epoch).shuffle(order)
        batches += [[records[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]
    return batches


def check_train_record(record: Record) -> None:
    """One log mu per completion token, and at least one token to train on."""
    tokens, logprobs = len(record["completion_token_ids"]), len(record["behavior_logprobs"])
    if tokens != logprobs:
        raise ValueError(f"completion_token_ids has {tokens} tokens but behavior_logprobs has {logprobs} values")
    if not tokens:
        raise ValueError("empty completion (curate drops these)")


def training_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bfloat16 on GPU unless float32 is asked for; None means plain float32."""
    wanted = config.train.dtype
    if wanted == "bfloat16" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def loss_on_batch(model, batch: list[Record], config: Config, pad_token_id: int, temperature: float):
    """``policy_loss`` of one micro-batch and its stats."""
    device = model.device
    tensors = batch_prompt_completions(
        [r["prompt_token_ids"] for r in batch], [r["completion_token_ids"] for r in batch], pad_token_id
    )
    tensors = {name: value.to(device) for name, value in tensors.items()}
    logprobs = completion_logprobs(model, **tensors, chunk_size=config.train.logprob_chunk_size, temperature=temperature)
    behavior = torch.zeros_like(logprobs)
    for row, record in enumerate(batch):
        behavior[row, : len(record["behavior_logprobs"])] = torch.tensor(record["behavior_logprobs"])
    rewards = torch.tensor([float(r["reward"]) for r in batch], device=device)
    train = config.train
    return policy_loss(
        logprobs,
        behavior,
        rewards,
        tensors["completion_mask"],
        objective=train.objective,
        baseline=train.baseline,
        ratio_level=train.ratio_level,
        positive_bounds=train.positive_bounds,
        negative_bounds=train.negative_bounds,
        ppo_clip=train.ppo_clip,
    )


def run_train(
    config: Config,
    model_dir: str,
    data_path: str | Path,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
) -> dict:
    """Train the policy in ``model_dir`` on the curated set at ``data_path``; save to ``output_dir``."""
    train = config.train
    records = read_records(data_path, required=TRAIN_FIELDS, check=check_train_record)
    if not records:
        raise RecordError(f"{data_path}: the training set is empty")
    set_threads(config.model.threads)
    torch.manual_seed(train.seed)
    device = pick_device()
    model, tokenizer = load_policy(model_dir, device=device)
    model.train()
    model.config.use_cache = False
    optimizer = make_optimizer(model, config)
    autocast_dtype = training_dtype(config, device)
    # π is evaluated at the sampling temperature, so on-policy data has ratio π/μ = 1.
    temperature = train.policy_temperature or config.sample.temperature

    batches = micro_batches(records, train.batch_size, train.epochs, train.seed)
    steps = math.ceil(len(batches) / train.gradient_accumulation)
    bar = tqdm(total=steps, desc="training", unit="step")
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    tokens_seen = 0
    for step in range(steps):
        group = batches[step * train.gradient_accumulation : (step + 1) * train.gradient_accumulation]
        step_stats: dict[str, float] = {}
        for batch in group:
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss, stats = loss_on_batch(model, batch, config, tokenizer.pad_token_id, temperature)
            (loss / len(group)).backward()
            for name, value in stats.items():
                step_stats[name] = step_stats.get(name, 0.0) + value / len(group)
            tokens_seen += sum(len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in batch)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        step_stats.update(grad_norm=float(grad_norm), learning_rate=train.learning_rate, tokens_per_second=tokens_seen / elapsed)
        history.append(step_stats)
        if on_step:
            on_step(step, step_stats)
        bar.update()
        bar.set_postfix(loss=f"{step_stats['loss']:.4f}", tokens_per_s=f"{step_stats['tokens_per_second']:.0f}")
    bar.close()

    model.eval()
    model.config.use_cache = True
    digest = save_policy(
        model, tokenizer, output_dir, provenance={"parent": model_identity(model_dir), "training_data": str(data_path)}
    )
    seconds = time.perf_counter() - started
    summary = {
        "examples": len(records),
        "steps": steps,
        "tokens": tokens_seen,
        "seconds": seconds,
        "tokens_per_second": tokens_seen / seconds,
        "final_loss": history[-1]["loss"],
        "weights_sha256": digest,
    }
    log.info("trained %(steps)d steps on %(examples)d examples in %(seconds).0f s", summary)
    return summary
