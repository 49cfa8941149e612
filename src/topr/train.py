"""The training stage: epochs of ``policy_loss`` over a curated set, then save the new policy.

Reads top to bottom: load records and model, build the optimizer, loop over global batches
(micro-batches of similar lengths, gradient accumulation, clipping), report every optimizer
step, save.
The behaviour log-probs come from the records, so no second model is held in memory.

Training runs in one process or, under torchrun, in several (``launch_train`` starts them when
``train.processes`` asks for more than one). An optimizer step takes one global batch of
batch_size × gradient_accumulation × processes sequences; each process computes its own part
of it (``topr.distributed`` holds the process group, the shards and the DDP/FSDP wrapping), and
the gradient is the mean over all the batch's sequences, so N processes give the result of one
process with N times the gradient accumulation. Rank 0 reports, saves and returns the summary.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from topr import distributed
from topr.config import Config, config_to_yaml
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import load_policy, model_identity, save_policy, set_threads
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


def global_batches(records: list[Record], size: int, epochs: int, seed: int) -> list[list[Record]]:
    """The training order in global batches of ``size`` sequences, one batch per optimizer step.

    Every epoch is a fresh shuffle with its own seed; epochs follow one another without a break,
    so only the very last batch can be short.
    """
    order = []
    for epoch in range(epochs):
        epoch_order = list(range(len(records)))
        random.Random(seed * 7919 + epoch).shuffle(epoch_order)
        order += epoch_order
    return [[records[i] for i in order[start : start + size]] for start in range(0, len(order), size)]


def sequence_length(record: Record) -> int:
    return len(record["prompt_token_ids"]) + len(record["completion_token_ids"])


def by_length(batch: list[Record], batch_size: int, world_size: int = 1) -> list[Record]:
    """The global batch reordered so that each micro-batch holds sequences of similar length.

    Micro-batches are right-padded to their longest sequence, so mixing short and long ones
    wastes compute on padding. The step's gradient is the mean over all sequences of the global
    batch whatever their order, so sorting inside it changes nothing but the padding (and float
    rounding). With several processes, a full global batch is laid out so that ``micro_batches``
    gives micro-batch k of every rank neighbouring lengths: ranks stay balanced.
    """
    ordered = sorted(batch, key=sequence_length)
    per_round = batch_size * world_size
    if world_size == 1 or len(ordered) % per_round:
        return ordered
    rounds = len(ordered) // per_round
    return [
        ordered[(k * world_size + rank) * batch_size + i]
        for rank in range(world_size)
        for k in range(rounds)
        for i in range(batch_size)
    ]


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


class CompletionLogprobs(torch.nn.Module):
    """log π of the completion tokens as one module's forward pass: DDP and FSDP act on forward."""

    def __init__(self, policy, chunk_size: int, temperature: float):
        super().__init__()
        self.policy, self.chunk_size, self.temperature = policy, chunk_size, temperature

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(self.policy, **tensors, chunk_size=self.chunk_size, temperature=self.temperature)


def loss_on_batch(scorer, batch: list[Record], config: Config, pad_token_id: int, device: torch.device):
    """``policy_loss`` of one micro-batch (the mean over its sequences) and its stats."""
    tensors = batch_prompt_completions(
        [r["prompt_token_ids"] for r in batch], [r["completion_token_ids"] for r in batch], pad_token_id
    )
    tensors = {name: value.to(device) for name, value in tensors.items()}
    logprobs = scorer(**tensors)
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


def negatives_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """How hard training pushed on negatives, from the per-step figures (each step's mean
    weighted by its count of negatives, or positives):

    - ``mean_weight_negative``: the mean weight on a negative's gradient over all steps (1 for
      REINFORCE; TOPR's tapered ratio falls towards 0 as π moves away from μ);
    - ``final_logprob_negative`` / ``final_logprob_positive``: the mean per-token log π of
      negatives / positives over the last quarter of the steps. A policy collapsing under
      negatives drives both down, not only the first.

    A figure is left out when its steps had no such sequences (no negatives, say).
    """
    last_quarter = history[-max(1, len(history) // 4) :]

    def weighted(steps: list[dict[str, float]], value: str, count: str) -> float | None:
        total = sum(step[count] for step in steps)
        return sum(step[value] * step[count] for step in steps) / total if total else None

    figures = {
        "mean_weight_negative": weighted(history, "mean_weight_negative", "negative_count"),
        "final_logprob_negative": weighted(last_quarter, "logprob_negative_mean", "negative_count"),
        "final_logprob_positive": weighted(last_quarter, "logprob_positive_mean", "positive_count"),
    }
    return {name: value for name, value in figures.items() if value is not None}


def run_train(
    config: Config,
    model_dir: str,
    data_path: str | Path,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
) -> dict | None:
    """Train the policy in ``model_dir`` on the curated set at ``data_path``; save to ``output_dir``.

    Under torchrun every process runs this; rank 0 calls ``on_step`` with figures summed over all
    processes, saves the model and returns the summary, the other ranks return None.
    """
    train = config.train
    records = read_records(data_path, required=TRAIN_FIELDS, check=check_train_record)
    if not records:
        raise RecordError(f"{data_path}: the training set is empty")
    set_threads(config.model.threads)
    torch.manual_seed(train.seed)
    with distributed.process_group() as (ranks, device):
        model, tokenizer = load_policy(model_dir, device=torch.device("cpu"))  # wrap() places it
        model.train()
        model.config.use_cache = False
        autocast_dtype = training_dtype(config, device)
        # π is evaluated at the sampling temperature, so on-policy data has ratio π/μ = 1.
        temperature = train.policy_temperature or config.sample.temperature
        scorer = CompletionLogprobs(model, train.logprob_chunk_size, temperature)
        scorer = distributed.wrap(scorer, train.parallelism, device, autocast_dtype)
        optimizer = make_optimizer(scorer, config)

        step_size = train.batch_size * train.gradient_accumulation * ranks.world_size
        batches = global_batches(records, step_size, train.epochs, train.seed)
        bar = tqdm(total=len(batches), desc="training", unit="step", disable=not ranks.main)
        history: list[dict[str, float]] = []
        started = time.perf_counter()
        tokens_seen = 0
        for step, batch in enumerate(batches):
            parts = distributed.micro_batches(by_length(batch, train.batch_size, ranks.world_size), train.batch_size, ranks)
            sums = {"sequences": 0.0, "tokens": 0.0}
            for index, part in enumerate(parts):
                # A rank left without sequences in a short last batch runs one at weight 0, so that
                # it still takes part in the collectives of the forward and backward passes.
                inputs = part or batch[:1]
                # Every sequence weighs 1/len(batch) in the gradient; DDP and FSDP average the
                # ranks' gradients, hence the factor world_size.
                weight = len(part) * ranks.world_size / len(batch)
                with distributed.gradient_sync(scorer, enabled=index == len(parts) - 1):
                    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                        loss, stats = loss_on_batch(scorer, inputs, config, tokenizer.pad_token_id, device)
                    (loss * weight).backward()
                for name, value in stats.items():
                    sums[name] = sums.get(name, 0.0) + value * len(part)
                sums["sequences"] += len(part)
                sums["tokens"] += sum(len(r["prompt_token_ids"]) + len(r["completion_token_ids"]) for r in part)
            # The step's figures: means over all its sequences, on every rank.
            totals = distributed.sum_over_ranks(sums, device)
            tokens_seen += int(totals.pop("tokens"))
            sequences = totals.pop("sequences")
            step_stats = {name: total / sequences for name, total in totals.items()}
            grad_norm = distributed.clip_grad_norm(scorer, train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - started
            step_stats.update(grad_norm=grad_norm, learning_rate=train.learning_rate, tokens_per_second=tokens_seen / elapsed)
            history.append(step_stats)
            if on_step and ranks.main:
                on_step(step, step_stats)
            bar.update()
            bar.set_postfix(loss=f"{step_stats['loss']:.4f}", tokens_per_s=f"{step_stats['tokens_per_second']:.0f}")
        bar.close()

        model.eval()
        model.config.use_cache = True
        policy = distributed.gathered_policy(model, train.parallelism)  # every rank, for FSDP
        if not ranks.main:
            return None
        digest = save_policy(
            policy, tokenizer, output_dir, provenance={"parent": model_identity(model_dir), "training_data": str(data_path)}
        )
    seconds = time.perf_counter() - started
    summary = {
        "examples": len(records),
        "steps": len(batches),
        "processes": ranks.world_size,
        "tokens": tokens_seen,
        "seconds": seconds,
        "tokens_per_second": tokens_seen / seconds,
        "final_loss": history[-1]["loss"],
        **negatives_summary(history),
        "weights_sha256": digest,
    }
    log.info("trained %(steps)d steps on %(examples)d examples in %(seconds).0f s", summary)
    return summary


def launch_train(
    config: Config,
    model_dir: str,
    data_path: str | Path,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
) -> dict | None:
    """``run_train`` here, or in torchrun workers when ``train.processes`` (default: one per GPU)
    is more than one and this process is not already one of them.

    The workers run ``topr train`` (the same code, under torchrun); rank 0 writes the summary with
    every step's figures to a file, and ``on_step`` is then called here for each step, in order.
    """
    if not distributed.should_launch(config.train.processes):
        return run_train(config, model_dir, data_path, output_dir, on_step)
    processes = distributed.process_count(config.train.processes)
    with tempfile.TemporaryDirectory(prefix="topr-train-") as scratch:
        config_path, summary_path = Path(scratch, "config.yaml"), Path(scratch, "summary.json")
        config_path.write_text(config_to_yaml(config))
        arguments = ["--model", str(model_dir), "--data", str(data_path), "--output", str(output_dir)]
        distributed.launch(processes, ["train", *arguments, "--config", str(config_path), "--summary", str(summary_path)])
        summary = json.loads(summary_path.read_text())
    for step, stats in enumerate(summary.pop("history")):
        if on_step:
            on_step(step, stats)
    return summary
