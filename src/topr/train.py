"""The training stage: epochs of ``policy_loss`` over a curated set, then save the new policy.

``run_train`` reads top to bottom: load records and model, build the optimizer, loop over
global batches (``forward_backward`` on micro-batches of similar lengths with gradient
accumulation, clipping, the optimizer step), report every step, save. A step's figures are
added up over its micro-batches (``StepTally``) and derived once over all processes;
``RunProgress`` keeps every step's figures, which a checkpoint carries and the summary sums up.
The behaviour log-probs come from the records, so no second model is held in memory.

Training runs in one process or, under torchrun, in several (``launch_train`` starts them when
``train.processes`` asks for more than one). An optimizer step takes one global batch of
batch_size × gradient_accumulation × processes sequences (or a fixed number of steps per epoch,
``train.steps_per_epoch``); each process computes its own part
of it (``topr.distributed`` holds the process group, the shards and the DDP/FSDP wrapping), and
the gradient is the mean over all the batch's sequences, so N processes give the result of one
process with N times the gradient accumulation. Rank 0 reports, saves and returns the summary.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from topr import distributed, lora
from topr.checkpoint import TrainCheckpoint, job_fingerprint
from topr.config import Config, config_to_yaml
from topr.console import progress_bar
from topr.curate import is_positive
from topr.logprobs import batch_prompt_completions, completion_logprobs
from topr.models import load_policy, model_identity, save_policy, set_threads
from topr.objectives import NEGATIVE_RATIO_STATS, LossStats, policy_loss
from topr.records import RECORD_KEY, TRAIN_FIELDS, Record, RecordError, check_token_ids, read_records
from topr.tasks import ANSWER_MARKER

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]

SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
"""``train.lr_schedule`` -> the name ``transformers.get_scheduler`` knows it by (warm-up included)."""

GROUP_STATS = {
    "mean_weight_positive": "positive_count",
    "logprob_positive_mean": "positive_count",
    "mean_weight_negative": "negative_count",
    "logprob_negative_mean": "negative_count",
    "log_ratio_per_token": "completion_tokens",
}
"""Stats of ``policy_loss`` that describe one group of a micro-batch, and the size of that group.

A step's figure for such a stat is its mean over the micro-batches weighted by the group's size
(any other stat: by the micro-batch's sequences), and is left out when the group is empty in the
whole step. The counts (``SUMMED_STATS``) are added up instead, and the quantiles of the ratio
on negatives are taken over all the step's negatives (``negative_ratio_quantiles``), not
averaged over micro-batches, whose sequences ``by_length`` groups by length.
"""

SUMMED_STATS = ("positive_count", "negative_count", "excluded_negative_tokens")

SHARED_TOKENS = "shared_token_positions"
"""Where a record read for training keeps, with ``train.negatives_skip_shared_tokens``, the
positions of its ``shared_token_positions`` (``mark_shared_tokens``)."""

FRESH_DATA_LOG_RATIO_TOLERANCE = 0.02
"""Nats: |mean log π/μ per token| at step 0 beyond which π and μ disagree on data that the
trained model sampled itself (where they should be the same distribution)."""


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    """The optimizer of the weights that train (with LoRA, the adapters' alone)."""
    train = config.train
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            parameters,
            lr=train.learning_rate,
            weight_decay=train.weight_decay,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
        )
    return torch.optim.AdamW(parameters, lr=train.learning_rate, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: Config, steps: int):
    """The learning rate over the run's ``steps`` optimizer steps; ``step()`` it after each."""
    from transformers import get_scheduler

    train = config.train
    return get_scheduler(
        SCHEDULES[train.lr_schedule], optimizer, num_warmup_steps=train.warmup_steps, num_training_steps=steps
    )


def global_batches(
    records: list[Record],
    size: int,
    epochs: int,
    seed: int,
    order: str = "shuffle",
    baseline: float = 0.0,
    steps_per_epoch: int | None = None,
) -> list[list[Record]]:
    """The training order in global batches of ``size`` sequences, one batch per optimizer step.

    Every epoch is a fresh shuffle with its own seed; epochs follow one another without a break,
    so only the very last batch can be short. With ``steps_per_epoch``, each epoch is cut instead
    into that many batches of sizes differing by at most one (``size`` is then not used).
    ``order="stratified"`` spreads the positives (reward - ``baseline`` >= 0, as in
    ``policy_loss``) evenly (see ``stratified_order``).
    """
    count = len(records)
    if steps_per_epoch:
        parts = min(steps_per_epoch, count)
        cuts = [epoch * count + part * count // parts for epoch in range(epochs) for part in range(parts)]
    else:
        cuts = list(range(0, count * epochs, size))
    if order == "stratified":
        indices = stratified_order(records, cuts, epochs, seed, baseline)
    else:
        indices = shuffled_order(count, epochs, seed)
    return [[records[i] for i in indices[low:high]] for low, high in zip(cuts, cuts[1:] + [len(indices)])]


def epoch_random(seed: int, epoch: int) -> random.Random:
    """The random source of one epoch's shuffles."""
    return random.Random(seed * 7919 + epoch)


def shuffled_order(count: int, epochs: int, seed: int) -> list[int]:
    """Record indices, each epoch a fresh shuffle, epochs back to back."""
    indices = []
    for epoch in range(epochs):
        epoch_indices = list(range(count))
        epoch_random(seed, epoch).shuffle(epoch_indices)
        indices += epoch_indices
    return indices


def stratified_order(records: list[Record], cuts: list[int], epochs: int, seed: int, baseline: float) -> list[int]:
    """Record indices, each once per epoch, epochs back to back, with the positives spread evenly.

    With P positives among N records, slot k of every epoch takes a positive when
    floor((k + 1) P / N) > floor(k P / N), else a negative. These slots repeat with period N, so
    any L consecutive slots, across an epoch boundary too, hold floor or ceil of L · P / N
    positives: so does every global batch. Each epoch deals its own shuffle of the positives and
    of the negatives into the slots, then shuffles the order inside each global batch (``cuts``:
    where each batch starts in the run; inside the epoch's part of a batch that spans two epochs).
    Without stratification, 10 positives among 89 records in batches of 8 leave about a third
    of the batches without any positive.
    """
    positive = [is_positive(record, baseline) for record in records]
    count, positives = len(records), sum(positive)
    slots = [(k + 1) * positives // count > k * positives // count for k in range(count)]
    groups = {sign: [i for i in range(count) if positive[i] == sign] for sign in (True, False)}
    indices = []
    for epoch in range(epochs):
        rng = epoch_random(seed, epoch)
        dealt = {sign: iter(rng.sample(members, len(members))) for sign, members in groups.items()}
        epoch_indices = [next(dealt[slot]) for slot in slots]
        start = epoch * count  # where this epoch begins in the run
        epoch_cuts = sorted({0, count, *(cut - start for cut in cuts if start < cut < start + count)})
        for low, high in zip(epoch_cuts, epoch_cuts[1:]):
            epoch_indices[low:high] = rng.sample(epoch_indices[low:high], high - low)
        indices += epoch_indices
    return indices


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
    """One log mu (at most 0) per completion token, at least one token to train on, and a reward
    in [-1, 1], the range verify writes (``topr.rewards``); the baseline (``train.baseline``)
    shifts it in the loss, never in the records. (Non-finite numbers are refused when the file is
    read.)"""
    tokens, logprobs = len(record["completion_token_ids"]), len(record["behavior_logprobs"])
    if tokens != logprobs:
        raise ValueError(f"completion_token_ids has {tokens} tokens but behavior_logprobs has {logprobs} values")
    if not tokens:
        raise ValueError("empty completion (curate drops these)")
    positive = next((index for index, value in enumerate(record["behavior_logprobs"]) if value > 0), None)
    if positive is not None:
        raise ValueError(f"behavior_logprobs[{positive}] is {record['behavior_logprobs'][positive]}: a log-probability is at most 0")
    if not -1.0 <= record["reward"] <= 1.0:
        raise ValueError(f"reward is {record['reward']}, outside [-1, 1]; train.baseline shifts rewards in the loss")


def vocabulary_size(model) -> int:
    """How many token ids the model can take: its input embedding's rows (what an out-of-range id
    fails on), or its output head's, if fewer (the log-probs of completion tokens are gathered
    there). ``len(tokenizer)`` may be smaller: embeddings are often padded past the tokenizer."""
    sizes = [model.get_input_embeddings().num_embeddings]
    head = model.get_output_embeddings()
    if head is not None and hasattr(head, "out_features"):
        sizes.append(head.out_features)
    return min(sizes)


class NonFiniteStepError(RuntimeError):
    """A training step whose loss or gradient norm is NaN or infinite; training stops before it."""


def check_finite_step(step: int, loss: float, grad_norm: float) -> None:
    """Stop before the optimizer applies a non-finite step: it would turn the weights into NaN,
    and the model saved after it would be published, registered and could be promoted."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    raise NonFiniteStepError(
        f"training stopped at step {step} (counting from 0, as in the logged metrics): the loss is {loss}, "
        f"the gradient norm is {grad_norm}; nothing was saved. Look for a model whose weights are already "
        "NaN, a learning rate too high for the precision (train.dtype), or behaviour log-probs far from the policy's."
    )


def training_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bfloat16 on GPU unless float32 is asked for; None means plain float32."""
    wanted = config.train.dtype
    if wanted == "bfloat16" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class CompletionLogprobs(torch.nn.Module):
    """log π of the completion tokens as one module's forward pass: DDP and FSDP act on forward."""

    def __init__(self, policy, chunk_size: int, temperature: float, float32_head: bool = True, share_prefix: bool = True):
        super().__init__()
        self.policy, self.chunk_size, self.temperature = policy, chunk_size, temperature
        self.float32_head, self.share_prefix = float32_head, share_prefix

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return completion_logprobs(
            self.policy,
            **tensors,
            chunk_size=self.chunk_size,
            temperature=self.temperature,
            float32_head=self.float32_head,
            share_prefix=self.share_prefix,
        )


def shared_token_positions(record: Record, tokenizer) -> list[int]:
    """The positions of the completion tokens that every completion ends with whatever its reward:
    its end-of-sequence token, when it finished by one (finish_reason "stop", the last token), and
    the tokens that spell its last answer marker; what ``train.negatives_skip_shared_tokens`` leaves
    out of a negative's loss."""
    token_ids = record["completion_token_ids"]
    positions = marker_token_positions(token_ids, tokenizer)
    if record.get("finish_reason", "stop") == "stop":  # as curation reads a record without one
        positions.append(len(token_ids) - 1)
    return sorted(set(positions))


def marker_token_positions(token_ids: list[int], tokenizer) -> list[int]:
    """The positions of the tokens that overlap the last ``ANSWER_MARKER`` in the decoded
    completion; none without one.

    Token k spans the characters between the decoded lengths of the first k and the first k + 1
    tokens: decoding prefixes, rather than each token alone, keeps the spaces and multi-byte
    characters that a token shares with its neighbours as the whole text has them. The walk goes
    back from the end, where the marker usually is, and stops at the token where it starts.
    """

    def decode(count: int) -> str:
        return tokenizer.decode(token_ids[:count], skip_special_tokens=True)

    text = decode(len(token_ids))
    markers = list(ANSWER_MARKER.finditer(text))
    if not markers:
        return []
    marker, positions, end = markers[-1], [], len(text)
    for index in reversed(range(len(token_ids))):
        start = len(decode(index))
        if start < marker.end() and end > marker.start():
            positions.append(index)
        if start <= marker.start():
            break
        end = start
    return positions[::-1]


def mark_shared_tokens(records: list[Record], tokenizer) -> None:
    """Give every record its ``shared_token_positions`` under ``SHARED_TOKENS``: found once for
    the run rather than every epoch. Positives get them too; ``policy_loss`` decides which
    sequences are negatives."""
    for record in records:
        record[SHARED_TOKENS] = shared_token_positions(record, tokenizer)


def shared_token_marks(batch: list[Record], shape: torch.Size) -> torch.Tensor:
    """[B, T] True at every sequence's ``SHARED_TOKENS``: ``policy_loss``'s ``negative_excluded``."""
    marks = torch.zeros(shape, dtype=torch.bool)
    for row, record in enumerate(batch):
        marks[row, record[SHARED_TOKENS]] = True
    return marks


def loss_on_batch(
    scorer, batch: list[Record], config: Config, pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, LossStats]:
    """``policy_loss`` of one micro-batch (the mean over its sequences) and its stats, which hold
    the sequence ratios π/μ of its negatives (for the step's quantiles). With
    ``train.negatives_skip_shared_tokens`` the records carry their ``SHARED_TOKENS``."""
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
    normalizer = config.sample.max_new_tokens if train.length_normalization == "constant" else None
    excluded = shared_token_marks(batch, logprobs.shape).to(device) if train.negatives_skip_shared_tokens else None
    loss, stats = policy_loss(
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
        length_normalization=train.length_normalization,
        normalizer=normalizer,
        negative_excluded=excluded,
    )
    return loss, stats


def negative_ratio_quantiles(ratios: list[float]) -> dict[str, float]:
    """``ratio_negative_p10/p50/p90`` over a step's negatives; empty without negatives."""
    if not ratios:
        return {}
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return dict(zip(NEGATIVE_RATIO_STATS, torch.quantile(torch.tensor(ratios, dtype=torch.float64), levels).tolist(), strict=True))


def group_sizes(stats: dict[str, float], part: list[Record]) -> dict[str, float]:
    """The size of each group that a micro-batch's stats describe (see ``GROUP_STATS``)."""
    sizes = {
        "sequences": len(part),
        "positive_count": stats["positive_count"],
        "negative_count": stats["negative_count"],
        "completion_tokens": sum(len(r["completion_token_ids"]) for r in part),
    }
    # A rank's stand-in micro-batch (no sequences of its own) weighs nothing.
    return {group: size if part else 0.0 for group, size in sizes.items()}


@dataclass
class StepTally:
    """One optimizer step's micro-batches on this rank, added up; ``figures`` derives the step's
    figures from them once, over all ranks.

    ``sums`` holds ``tokens`` (prompt and completion tokens trained on), the counts of
    ``SUMMED_STATS``, and every other stat of ``policy_loss`` times its weight under its name,
    the weight under ``weight/<name>``; ``negative_ratios``, the sequence ratio of every negative.
    """

    sums: dict[str, float] = field(default_factory=lambda: {"tokens": 0.0})
    negative_ratios: list[float] = field(default_factory=list)

    def add(self, stats: LossStats, part: list[Record]) -> None:
        """Add a micro-batch's stats; ``part`` holds its sequences (none for a rank's stand-in).
        Every stat of ``GROUP_STATS`` gets a sum and a weight, present or not, so that every rank
        passes the same keys to ``distributed.sum_over_ranks``."""
        sizes = group_sizes(stats, part)
        for name in dict.fromkeys([*stats, *GROUP_STATS]):
            if name in NEGATIVE_RATIO_STATS:
                continue  # taken over the whole step's negatives
            if name in SUMMED_STATS:
                self.sums[name] = self.sums.get(name, 0.0) + (stats[name] if part else 0.0)
                continue
            weight = sizes[GROUP_STATS.get(name, "sequences")]
            self.sums[name] = self.sums.get(name, 0.0) + stats.get(name, 0.0) * weight
            self.sums[f"weight/{name}"] = self.sums.get(f"weight/{name}", 0.0) + weight
        self.negative_ratios += stats.negative_ratios if part else []
        self.sums["tokens"] += sum(sequence_length(record) for record in part)

    def figures(self, device: torch.device) -> tuple[dict[str, float], int]:
        """The step's figures (``step_figures`` and the quantiles of the ratio on its negatives),
        and the tokens it trained on, all over every rank's micro-batches."""
        totals = distributed.sum_over_ranks(self.sums, device)
        tokens = int(totals.pop("tokens"))
        figures = step_figures(totals)
        return figures | negative_ratio_quantiles(distributed.gather_over_ranks(self.negative_ratios)), tokens


def step_figures(totals: dict[str, float]) -> dict[str, float]:
    """The step's figures from the sums of ``StepTally`` over its micro-batches and ranks:
    each stat's weighted mean (left out when its group is empty in the whole step),
    ``positive_weight_share``, the positives' part of the gradient weight after the taper
    (left out when there is none), and with ``train.negatives_skip_shared_tokens``
    ``excluded_tokens_per_negative`` (left out without negatives)."""
    figures = {name: totals[name] for name in SUMMED_STATS if name in totals}
    figures |= {
        name: total / totals[f"weight/{name}"]
        for name, total in totals.items()
        if not name.startswith("weight/") and name not in SUMMED_STATS and totals[f"weight/{name}"]
    }
    both = figures["gradient_weight_positive"] + figures["gradient_weight_negative"]
    if both:
        figures["positive_weight_share"] = figures["gradient_weight_positive"] / both
    if "excluded_negative_tokens" in figures and figures["negative_count"]:
        figures["excluded_tokens_per_negative"] = figures["excluded_negative_tokens"] / figures["negative_count"]
    return figures


def weighted_mean(steps: list[dict[str, float]], value: str, weight: str) -> float | None:
    """The mean of ``value`` over the steps that report it, each weighted by its ``weight``;
    None when they weigh nothing."""
    steps = [step for step in steps if value in step]
    total = sum(step[weight] for step in steps)
    return sum(step[value] * step[weight] for step in steps) / total if total else None


def negatives_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """How hard training pushed on negatives, from the per-step figures (each step's mean
    weighted by its count of negatives, or positives):

    - ``mean_weight_negative``: the mean weight on a negative's gradient over all steps (1 for
      REINFORCE; TOPR's tapered ratio falls towards 0 as π moves away from μ);
    - ``final_logprob_negative`` / ``final_logprob_positive``: the mean per-token log π of
      negatives / positives over the last quarter of the steps. A policy collapsing under
      negatives drives both down, not only the first;
    - ``final_ratio_negative_p50``: the median ratio π/μ of negatives over the last quarter of
      the steps: how far the taper has gone by the end of training.

    A figure is left out when its steps had no such sequences (no negatives, say); a step that
    does not report a figure (none of its group) does not count towards it.
    """
    last_quarter = history[-max(1, len(history) // 4) :]
    figures = {
        "mean_weight_negative": weighted_mean(history, "mean_weight_negative", "negative_count"),
        "final_logprob_negative": weighted_mean(last_quarter, "logprob_negative_mean", "negative_count"),
        "final_logprob_positive": weighted_mean(last_quarter, "logprob_positive_mean", "positive_count"),
        "final_ratio_negative_p50": weighted_mean(last_quarter, "ratio_negative_p50", "negative_count"),
    }
    return {name: value for name, value in figures.items() if value is not None}


def gradient_summary(history: list[dict[str, float]]) -> dict[str, float]:
    """What the gradient was made of, from the per-step figures:

    - ``first_step_log_ratio_per_token``: step 0's mean log π/μ per completion token, about 0
      when the data was sampled by the model being trained (π evaluated as it sampled);
    - ``positive_weight_share``: the positives' share of the gradient weight |α·A| over the
      whole run, after the taper (each step weighted by its sequences); left out when there is
      none. Compare with the c-formula "effective positive fraction" of curation, which counts
      examples before any taper.
    """
    positive = sum(step["gradient_weight_positive"] * step["sequences"] for step in history)
    negative = sum(step["gradient_weight_negative"] * step["sequences"] for step in history)
    figures = {"first_step_log_ratio_per_token": history[0]["log_ratio_per_token"]}
    if positive + negative:
        figures["positive_weight_share"] = positive / (positive + negative)
    return figures


@dataclass
class RunProgress:
    """The run so far, all of which a checkpoint carries over: every finished step's figures
    (``history``), the tokens trained on, and the clock (``started`` is set back by the time a
    resumed run had already spent, so that throughput counts the earlier steps too)."""

    history: list[dict[str, float]]
    tokens_seen: int
    started: float
    seconds: float = 0.0
    """Time spent when the last step was recorded."""

    @classmethod
    def from_checkpoint(cls, state: dict | None) -> RunProgress:
        """The progress a checkpoint's ``state`` saved, or a fresh run's without one."""
        if not state:
            return cls(history=[], tokens_seen=0, started=time.perf_counter())
        return cls(state["history"], state["tokens_seen"], time.perf_counter() - state["seconds"])

    def record(
        self, figures: dict[str, float], tokens: int, sequences: int, grad_norm: float, learning_rate: float
    ) -> dict[str, float]:
        """Add a finished step: the figures of its micro-batches (``StepTally.figures``), its
        sequences, and the optimizer's figures; return them with the throughput so far."""
        self.tokens_seen += tokens
        self.seconds = time.perf_counter() - self.started
        throughput = self.tokens_seen / self.seconds
        figures.update(sequences=sequences, grad_norm=grad_norm, learning_rate=learning_rate, tokens_per_second=throughput)
        self.history.append(figures)
        return figures

    def summary(self, examples: int, steps: int, processes: int, weights_sha256: str) -> dict:
        """What ``run_train`` returns once the model is saved: the run's sizes and throughput, and
        what its steps' figures add up to."""
        seconds = time.perf_counter() - self.started
        return {
            "examples": examples,
            "steps": steps,
            "processes": processes,
            "tokens": self.tokens_seen,
            "seconds": seconds,
            "tokens_per_second": self.tokens_seen / seconds,
            "final_loss": self.history[-1]["loss"],
            **negatives_summary(self.history),
            **gradient_summary(self.history),
            "weights_sha256": weights_sha256,
        }


def warn_if_own_data_starts_off_policy(records: list[Record], model_dir: str, first_step_log_ratio: float) -> None:
    """Warn when π and μ disagree at step 0 on data that the model being trained sampled itself."""
    identity = model_identity(model_dir)
    sampled_here = all(record.get("behavior_model") == identity for record in records)
    if sampled_here and abs(first_step_log_ratio) > FRESH_DATA_LOG_RATIO_TOLERANCE:
        log.warning(
            "step 0: mean log π/μ per token is %.4f nats on data that this model sampled itself, where "
            "π and μ should agree (|value| <= %g): truncated sampling (sample.top_k/top_p), a temperature "
            "mismatch (train.policy_temperature) or a precision mismatch (train.float32_head, train.dtype) "
            "makes every ratio π/μ start away from 1",
            first_step_log_ratio,
            FRESH_DATA_LOG_RATIO_TOLERANCE,
        )


def usable_checkpoint(checkpoint: TrainCheckpoint | None, config: Config, world_size: int) -> TrainCheckpoint | None:
    """``checkpoint``, unless FSDP shards the state over several processes (not checkpointed)."""
    if checkpoint and config.train.parallelism == "fsdp" and world_size > 1:
        log.warning("training under fsdp writes no checkpoints: a retried stage starts from step 0")
        return None
    return checkpoint


def training_state(fingerprint: str, next_step: int, model, optimizer, scheduler, progress: RunProgress) -> dict:
    """What a checkpoint holds (see ``topr.checkpoint``)."""
    return {
        "fingerprint": fingerprint,
        "next_step": next_step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "history": progress.history,
        "tokens_seen": progress.tokens_seen,
        "seconds": progress.seconds,
    }


def resume(state: dict, optimizer, scheduler) -> None:
    """Put the optimizer, the scheduler and the random state back as a checkpoint saved them
    (the weights are loaded before the model is wrapped)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])


def training_scorer(model, config: Config, world_size: int, device: torch.device, autocast_dtype: torch.dtype | None):
    """The policy in training mode as a module whose forward pass gives log π of the completion
    tokens, wrapped for the processes (DDP or FSDP; ``distributed.wrap`` places it on ``device``)."""
    train = config.train
    model.train()
    model.config.use_cache = False
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # π is evaluated at the sampling temperature, so on-policy data has ratio π/μ = 1.
    temperature = train.policy_temperature or config.sample.temperature
    sharded = train.parallelism == "fsdp" and world_size > 1
    # A shared prefix's keys and values come from a cache, which checkpointed layers do not fill.
    share_prefix = not (sharded or train.gradient_checkpointing)
    scorer = CompletionLogprobs(model, train.logprob_chunk_size, temperature, train.float32_head, share_prefix)
    return distributed.wrap(scorer, train.parallelism, device, autocast_dtype)


def forward_backward(
    scorer,
    batch: list[Record],
    config: Config,
    pad_token_id: int,
    ranks: distributed.Ranks,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
) -> StepTally:
    """This rank's forward and backward passes over its micro-batches of a global batch, the
    gradient accumulating (and averaged over the ranks on the last one); their stats, tallied."""
    batch_size = config.train.batch_size
    parts = distributed.micro_batches(by_length(batch, batch_size, ranks.world_size), batch_size, ranks)
    tally = StepTally()
    for index, part in enumerate(parts):
        # A rank left without sequences in a short last batch runs one at weight 0, so that
        # it still takes part in the collectives of the forward and backward passes.
        inputs = part or batch[:1]
        # Every sequence weighs 1/len(batch) in the gradient; DDP and FSDP average the
        # ranks' gradients, hence the factor world_size.
        weight = len(part) * ranks.world_size / len(batch)
        with distributed.gradient_sync(scorer, enabled=index == len(parts) - 1):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss, stats = loss_on_batch(scorer, inputs, config, pad_token_id, device)
            (loss * weight).backward()
        tally.add(stats, part)
    return tally


def run_train(
    config: Config,
    model_dir: str,
    data_path: str | Path,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
    checkpoint: TrainCheckpoint | None = None,
) -> dict | None:
    """Train the policy in ``model_dir`` on the curated set at ``data_path``; save to ``output_dir``.

    Under torchrun every process runs this; rank 0 calls ``on_step`` with figures summed over all
    processes, saves the model and returns the summary, the other ranks return None. A step
    whose loss or gradient norm is not finite stops training before the optimizer applies it
    (``NonFiniteStepError``), and nothing is saved. With a ``checkpoint``, rank 0 saves the
    training state when it is due, and a run that finds its job's checkpoint resumes from it,
    first replaying the finished steps' figures to ``on_step``. The records are checked before
    any step (``RecordError`` with file and line): as they are read (``check_train_record``, each
    (prompt_id, sample_index) once), and their token ids against the model's ``vocabulary_size``.
    """
    train = config.train
    records = read_records(data_path, required=TRAIN_FIELDS, check=check_train_record, unique=RECORD_KEY)
    if not records:
        raise RecordError(f"{data_path}: the training set is empty")
    set_threads(config.model.threads)
    torch.manual_seed(train.seed)
    with distributed.process_group() as (ranks, device):
        checkpoint = usable_checkpoint(checkpoint, config, ranks.world_size)
        fingerprint = job_fingerprint(config, model_dir, data_path, ranks.world_size) if checkpoint else ""
        resumed = checkpoint.load(fingerprint) if checkpoint else None
        # wrap() places it; the tokenizer, saved with the trained model, carries the run's chat template
        model, tokenizer = load_policy(model_dir, device=torch.device("cpu"), chat_template=config.model.chat_template)
        check_token_ids(data_path, records, vocabulary_size(model))  # before any step, naming file and line
        if train.negatives_skip_shared_tokens:
            mark_shared_tokens(records, tokenizer)
        adapter = lora.with_adapter(model, train, model_dir) if train.lora_rank else None
        if adapter is not None:
            log.info("LoRA rank %d: %d of %d parameters train", train.lora_rank, *lora.trainable_parameters(model))
        if resumed:
            model.load_state_dict(resumed["model"])
        autocast_dtype = training_dtype(config, device)
        scorer = training_scorer(model, config, ranks.world_size, device, autocast_dtype)
        optimizer = make_optimizer(scorer, config)
        step_size = train.batch_size * train.gradient_accumulation * ranks.world_size
        batches = global_batches(
            records, step_size, train.epochs, train.seed, train.batch_order, train.baseline, train.steps_per_epoch
        )
        scheduler = make_scheduler(optimizer, config, len(batches))
        progress = RunProgress.from_checkpoint(resumed)
        if resumed:
            resume(resumed, optimizer, scheduler)
            del resumed  # weights and optimizer moments: a second copy in memory for the whole run otherwise
            for step, stats in enumerate(progress.history):
                if on_step and ranks.main:
                    on_step(step, stats)

        bar = progress_bar(total=len(batches), initial=len(progress.history), desc="training", unit="step", disable=not ranks.main)
        for step in range(len(progress.history), len(batches)):
            batch = batches[step]
            tally = forward_backward(scorer, batch, config, tokenizer.pad_token_id, ranks, device, autocast_dtype)
            figures, tokens = tally.figures(device)
            grad_norm = distributed.clip_grad_norm(scorer, train.max_grad_norm)
            check_finite_step(step, figures["loss"], grad_norm)
            learning_rate = optimizer.param_groups[0]["lr"]  # this step's, before the scheduler moves it
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            stats = progress.record(figures, tokens, len(batch), grad_norm, learning_rate)
            if on_step and ranks.main:
                on_step(step, stats)
            if checkpoint and ranks.main and step + 1 < len(batches) and checkpoint.due():
                checkpoint.save(training_state(fingerprint, step + 1, model, optimizer, scheduler, progress))
            bar.update()
            bar.set_postfix(loss=f"{stats['loss']:.4f}", tokens_per_s=f"{stats['tokens_per_second']:.0f}")
        bar.close()

        model.eval()
        model.config.use_cache = True
        policy = distributed.gathered_policy(model, train.parallelism)  # every rank, for FSDP
        if not ranks.main:
            return None
        digest = save_policy(
            policy, tokenizer, output_dir, provenance={"parent": model_identity(model_dir), "training_data": str(data_path)}, adapter=adapter
        )
    summary = progress.summary(len(records), len(batches), ranks.world_size, digest)
    warn_if_own_data_starts_off_policy(records, model_dir, summary["first_step_log_ratio_per_token"])
    log.info("trained %(steps)d steps on %(examples)d examples in %(seconds).0f s", summary)
    return summary


HISTORY_KEY = "history"
"""Where a summary written by ``write_summary`` holds every step's figures."""


def write_summary(path: str | Path, summary: dict, history: list[dict[str, float]]) -> None:
    """The summary with every step's figures: what ``topr train --summary`` writes, and how
    ``launch_train`` hears from its torchrun workers."""
    Path(path).write_text(json.dumps({**summary, HISTORY_KEY: history}, indent=2))


def launch_train(
    config: Config,
    model_dir: str,
    data_path: str | Path,
    output_dir: str | Path,
    on_step: StepCallback | None = None,
    checkpoint: TrainCheckpoint | None = None,
) -> dict | None:
    """``run_train`` here, or in torchrun workers when ``train.processes`` (default: one per GPU)
    is more than one and this process is not already one of them.

    The workers run ``topr train`` (the same code, under torchrun); rank 0 writes the summary with
    every step's figures to a file, and ``on_step`` is then called here for each step, in order.
    A remote checkpoint is fetched here, once, for all of them.
    """
    if checkpoint:
        checkpoint.fetch()
    if not distributed.should_launch(config.train.processes):
        return run_train(config, model_dir, data_path, output_dir, on_step, checkpoint)
    processes = distributed.process_count(config.train.processes)
    with tempfile.TemporaryDirectory(prefix="topr-train-") as scratch:
        config_path, summary_path = Path(scratch, "config.yaml"), Path(scratch, "summary.json")
        config_path.write_text(config_to_yaml(config))
        arguments = ["--model", str(model_dir), "--data", str(data_path), "--output", str(output_dir)]
        if checkpoint:
            arguments += ["--checkpoint", str(checkpoint.path), *(["--checkpoint-uri", checkpoint.remote] if checkpoint.remote else [])]
        distributed.launch(processes, ["train", *arguments, "--config", str(config_path), "--summary", str(summary_path)])
        summary = json.loads(summary_path.read_text())
    for step, stats in enumerate(summary.pop(HISTORY_KEY)):
        if on_step:
            on_step(step, stats)
    return summary
